"""split_model on torchvision-, timm- and Sequential-style classifiers built here; the built-in networks."""
import pytest
import torch
from torch import nn

import pof_fast
from pof_fast.models import MODELS, build_model, check_split, split_model


class TorchvisionResNetLike(nn.Module):
    """torchvision's ResNet shape: ``self.fc`` applied last in ``forward``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


class TorchvisionVGGLike(nn.Module):
    """VGG/MobileNet/EfficientNet shape: ``self.classifier`` is a Sequential whose last layer is the head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.0), nn.Linear(12, 5))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class TorchvisionDenseNetLike(nn.Module):
    """DenseNet shape: ``self.classifier`` is the Linear itself."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(6, 5)

    def forward(self, x):
        return self.classifier(self.features(x))


class TorchvisionViTLike(nn.Module):
    """ViT shape: ``self.heads`` is a Sequential holding ``head`` (after a pre-logits layer)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
        self.heads = nn.Sequential()
        self.heads.add_module("pre_logits", nn.Linear(10, 10))
        self.heads.add_module("act", nn.Tanh())
        self.heads.add_module("head", nn.Linear(10, 5))

    def forward(self, x):
        return self.heads(self.embed(x))


class TimmLike(nn.Module):
    """timm's interface: forward_features, forward_head(pre_logits=...), get_classifier()."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.head_drop = nn.Dropout(0.0)
        self.fc = nn.Linear(6, 5)

    def forward_features(self, x):
        return torch.relu(self.stem(x))

    def forward_head(self, x, pre_logits=False):
        x = self.head_drop(self.norm(x.mean((2, 3))))
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


LIKES = [TorchvisionResNetLike, TorchvisionVGGLike, TorchvisionDenseNetLike, TorchvisionViTLike, TimmLike]


@pytest.mark.parametrize("cls", LIKES, ids=lambda c: c.__name__)
def test_split_finds_the_head_shares_parameters_and_leaves_the_model_alone(cls):
    torch.manual_seed(0)
    model = cls().eval()
    before = {name: type(m) for name, m in model.named_modules()}
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    phi, head = split_model(model)
    assert isinstance(head, nn.Linear) and head.out_features == 5
    assert any(head is m for m in model.modules())  # the model's own head: perturbing it perturbs the model
    torch.testing.assert_close(head(phi(x)), expected)
    assert {name: type(m) for name, m in model.named_modules()} == before
    torch.testing.assert_close(model(x), expected)
    head_ids = {id(p) for p in head.parameters()}
    model_ids = {id(p) for p in model.parameters()}
    phi_ids = {id(p) for p in phi.parameters()}
    assert phi_ids == model_ids - head_ids  # shared, nothing copied, the head excluded
    check_split(model, phi, head, x)


def test_split_with_pof_perturbs_the_model():
    torch.manual_seed(0)
    model = TorchvisionResNetLike()
    phi, head = split_model(model)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(5, (32,))
    opt = pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, lr=0.1, gamma_sampling="fixed", seed=0)
    clean = model(x).detach()
    opt.perturb(opt.search_features(phi, x), y)
    assert not torch.equal(model(x).detach(), clean)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.equal(head.weight, opt.theta0_weight)


def test_split_sequential_phi_head_and_named_heads():
    seq = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    phi, head = split_model(seq)
    assert head is seq[2] and len(phi) == 2 and phi[0] is seq[0]
    builtin = build_model("mlp", (1, 8, 8), 10)
    phi, head = split_model(builtin)
    assert phi is builtin.phi and head is builtin.head
    vgg = TorchvisionVGGLike().eval()
    phi, head = split_model(vgg, head="classifier.3")
    assert head is vgg.classifier[3]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(head(phi(x)), vgg(x))


def test_split_errors_are_clear():
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        split_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    with pytest.raises(ValueError, match="last layer of the nn.Sequential is Softmax"):
        split_model(nn.Sequential(nn.Linear(4, 3), nn.Softmax(1)))
    with pytest.raises(ValueError, match="no submodule 'fc'"):
        split_model(TorchvisionVGGLike(), head="fc")
    with pytest.raises(ValueError, match="is a Conv2d, not an nn.Linear"):
        split_model(TorchvisionVGGLike(), head="features.0")

    class HiddenLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(ValueError, match="its nn.Linear layers: proj"):
        split_model(HiddenLinear())
    with pytest.raises(TypeError):
        split_model("resnet")
    vit = TorchvisionViTLike().eval()
    phi, head = split_model(vit, head="heads.pre_logits")  # not the last operation: check_split says so
    with pytest.raises(ValueError, match="not the model's last operation"):
        check_split(vit, phi, head, torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("name,params", [("wrn16-4", 2_748_890), ("resnet18", 11_173_962)])
def test_builtin_networks_for_32x32(name, params):
    torch.manual_seed(0)
    model = build_model(name, (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == params  # the published sizes for CIFAR-10
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    phi, head = split_model(model)
    assert phi(x).shape == (2, head.in_features)


def test_wrn28_10_size_and_the_small_models():
    with torch.device("meta"):
        model = build_model("wrn28-10", (3, 32, 32), 100)
    assert sum(p.numel() for p in model.parameters()) == 36_536_884
    assert set(MODELS) == {"mlp", "cnn", "wrn16-4", "wrn28-10", "resnet18"}
    for name in ("mlp", "cnn"):
        model = build_model(name, (1, 8, 8), 10)
        assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_model("cnn", (1, 8, 8), 10).modules())
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        pof_fast.models.WideResNet(depth=20)


def test_models_imports_only_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(pof_fast.models))
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"torch", "copy", "typing", "__future__"}
