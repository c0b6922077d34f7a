"""Models for PoF: split a classifier into feature extractor and linear head; built-in networks.

:func:`split_model` finds the linear head of a trained classifier and returns ``(phi, head)`` with
``model(x) == head(phi(x))``: ``phi`` shares every parameter and buffer with ``model`` (nothing is
copied, ``model`` is not modified), and ``head`` is the model's own ``nn.Linear``, so perturbing it
(what :class:`pof_fast.PoF` does) perturbs the model.

Built-in networks (``build_model``): ``mlp``, ``cnn`` (a small CNN with BatchNorm), ``wrn16-4``,
``wrn28-10`` (Wide ResNets, Zagoruyko and Komodakis 2016) and ``resnet18`` (the 32x32 variant with a
3x3 stem and no max-pool). Every one has ``.phi`` and ``.head`` attributes. Imports only torch.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["split_model", "build_model", "MODELS", "MLP", "SmallCNN", "WideResNet", "ResNet18", "Classifier"]


# -- split_model -----------------------------------------------------------------------------------------


class _TimmFeatures(nn.Module):
    """phi of a timm-style model: ``forward_head(forward_features(x), pre_logits=True)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def parameters(self, recurse: bool = True):  # the head's parameters are not phi's
        head = {id(p) for p in self.model.get_classifier().parameters()}
        return (p for p in self.model.parameters(recurse) if id(p) not in head)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        head = {id(p) for p in self.model.get_classifier().parameters()}
        return ((n, p) for n, p in self.model.named_parameters(prefix, recurse, remove_duplicate) if id(p) not in head)


def _without(model: nn.Module, path: Sequence[str]) -> nn.Module:
    """A shallow copy of ``model`` whose submodule at ``path`` is ``nn.Identity()``.

    Only the containers on the path are copied (their ``_modules`` dicts too); every other submodule,
    parameter and buffer is shared with ``model``, which is left as it was.
    """
    root = copy.copy(model)
    root._modules = dict(model._modules)
    parent = root
    for name in path[:-1]:
        child = copy.copy(parent._modules[name])
        child._modules = dict(child._modules)
        parent._modules[name] = child
        parent = child
    parent._modules[path[-1]] = nn.Identity()
    return root


def _submodule(model: nn.Module, path: Sequence[str]) -> Optional[nn.Module]:
    module = model
    for name in path:
        module = module._modules.get(name) if isinstance(module, nn.Module) else None
        if module is None:
            return None
    return module


def _describe(model: nn.Module) -> str:
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    found = f"its nn.Linear layers: {', '.join(linears[:8])}" if linears else "it has no nn.Linear layer"
    return (f"cannot find the linear head of {type(model).__name__} ({found}). PoF needs the classifier's last layer "
            "to be an nn.Linear: name it (--head NAME / split_model(model, head='NAME')), or give the model .phi "
            "and .head, a final nn.Linear in an nn.Sequential, .fc, .classifier[-1], .heads.head, or timm's "
            "get_classifier()/forward_head(pre_logits=True)")


def split_model(model: nn.Module, head: Optional[str] = None) -> Tuple[nn.Module, nn.Linear]:
    """``(feature_extractor, head)`` of a classifier whose last layer is an ``nn.Linear``.

    Looks, in order, for: ``head`` (a dotted submodule name, e.g. ``"fc"``, ``"classifier.6"``,
    ``"heads.head"``); pof-fast's ``.phi``/``.head``; a timm-style ``get_classifier()`` with
    ``forward_features``/``forward_head(pre_logits=True)``; the final ``nn.Linear`` of an
    ``nn.Sequential``; torchvision-style ``.fc``, ``.classifier`` (or its last layer), ``.heads.head``.
    The feature extractor shares its parameters with ``model`` (nothing copied, ``model`` untouched).
    Raises ``ValueError`` when no linear head is found, naming the model's linear layers.

    The head must be the model's last operation (``model(x) == head(phi(x))``); :func:`check_split`
    verifies that on a batch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if head is not None:
        path = [p for p in head.split(".") if p]
        module = _submodule(model, path) if path else None
        if module is None:
            raise ValueError(f"model {type(model).__name__} has no submodule {head!r}. " + _describe(model))
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{head!r} is a {type(module).__name__}, not an nn.Linear: PoF needs a linear head")
        return _without(model, path), module
    phi, own = getattr(model, "phi", None), getattr(model, "head", None)
    if isinstance(phi, nn.Module) and isinstance(own, nn.Linear):
        return phi, own
    if all(callable(getattr(model, name, None)) for name in ("get_classifier", "forward_features", "forward_head")):
        classifier = model.get_classifier()
        if isinstance(classifier, nn.Linear):
            return _TimmFeatures(model), classifier
        raise ValueError(f"{type(model).__name__}.get_classifier() is a {type(classifier).__name__}, not an nn.Linear")
    if isinstance(model, nn.Sequential):
        if len(model) and isinstance(model[-1], nn.Linear):
            return nn.Sequential(*list(model)[:-1]), model[-1]
        last = type(model[-1]).__name__ if len(model) else "nothing (it is empty)"
        raise ValueError(f"the last layer of the nn.Sequential is {last}, not an nn.Linear. " + _describe(model))
    for path in (["fc"], ["classifier"], ["heads", "head"], ["head"]):
        module = _submodule(model, path)
        if isinstance(module, nn.Linear):
            return _without(model, path), module
        if path == ["classifier"] and isinstance(module, nn.Sequential) and len(module) \
                and isinstance(module[-1], nn.Linear):
            return _without(model, ["classifier", str(len(module) - 1)]), module[-1]
    raise ValueError(_describe(model))


@torch.no_grad()
def check_split(model: nn.Module, phi: nn.Module, head: nn.Linear, x: Tensor) -> None:
    """Raise ``ValueError`` unless ``model(x)`` equals ``head(phi(x))`` (both in eval mode)."""
    message = ("model(x) differs from head(phi(x)): the head found is not the model's last operation (layers after "
               "it change the logits). Name the right head with --head / split_model(model, head=...)")
    was = model.training
    model.eval()
    try:
        full = model(x)
        try:
            split = head(phi(x))
        except RuntimeError as exc:  # e.g. the features do not fit the head
            raise ValueError(f"{message} ({str(exc).splitlines()[0]})") from exc
    finally:
        model.train(was)
    if full.shape != split.shape or not torch.allclose(full, split, rtol=1e-4, atol=1e-5):
        raise ValueError(message)


# -- built-in networks -----------------------------------------------------------------------------------


class Classifier(nn.Module):
    """``head(phi(x))``: the shape every built-in network has."""

    def __init__(self, phi: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.phi = phi
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.phi(x))


class MLP(Classifier):
    """Flatten, then Linear/ReLU layers (default 64 -> 256 -> 128) and a linear head."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: Sequence[int] = (256, 128)) -> None:
        layers, width = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        super().__init__(nn.Sequential(*layers), nn.Linear(width, num_classes))


class SmallCNN(Classifier):
    """Three conv/BatchNorm/ReLU blocks (``width``, 2x``width`` with stride 2, 2x``width``), global average pool."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        w = width
        phi = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        super().__init__(phi, nn.Linear(2 * w, num_classes))


class _WideBlock(nn.Module):
    """Pre-activation basic block of a Wide ResNet (BN-ReLU-conv3x3, BN-ReLU, dropout, conv3x3)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(self.conv1(out)))))
        return out + skip


class WideResNet(Classifier):
    """WRN-depth-k for 32x32 inputs: 3 groups of (depth - 4) / 6 pre-activation blocks, widths 16k, 32k, 64k."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0) -> None:
        if (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n + 4 (16, 22, 28, 40, ...), got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        layers = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        for group in range(3):
            for i in range(n):
                cin = widths[group] if i == 0 else widths[group + 1]
                layers.append(_WideBlock(cin, widths[group + 1], (1 if group == 0 else 2) if i == 0 else 1, dropout))
        layers += [nn.BatchNorm2d(widths[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        super().__init__(nn.Sequential(*layers), nn.Linear(widths[3], num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


class _BasicBlock(nn.Module):
    """ResNet basic block (conv3x3-BN-ReLU-conv3x3-BN, projection shortcut when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(Classifier):
    """ResNet-18 for 32x32 inputs: 3x3 stem without max-pool, 4 stages of 2 basic blocks (64-512 channels)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        layers = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        super().__init__(nn.Sequential(*layers), nn.Linear(512, num_classes))


def _flat(shape: Sequence[int]) -> int:
    size = 1
    for s in shape:
        size *= int(s)
    return size


# name -> builder(input shape [C, H, W], num_classes)
MODELS: Dict[str, Callable[[Sequence[int], int], nn.Module]] = {
    "mlp": lambda shape, classes: MLP(_flat(shape), classes),
    "cnn": lambda shape, classes: SmallCNN(shape[0], classes),
    "wrn16-4": lambda shape, classes: WideResNet(16, 4, classes, shape[0]),
    "wrn28-10": lambda shape, classes: WideResNet(28, 10, classes, shape[0]),
    "resnet18": lambda shape, classes: ResNet18(classes, shape[0]),
}


def build_model(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """A built-in network by name (see :data:`MODELS`) for inputs of shape ``[C, H, W]``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](tuple(input_shape), int(num_classes))
