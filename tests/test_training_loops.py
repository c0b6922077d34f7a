"""PoF dropped into real training loops: mixed precision, GradScaler, BatchNorm, base optimizers, heads.

Each test is one way a user's loop broke or surprised before (CPU, torch's own AMP); the GPU-marked one
runs fp16 + GradScaler on CUDA. Oracles: the same loop without PoF's shortcut (features cast by hand,
no scaler, one big batch), or an explicit float64 computation.
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pof_fast
from pof_fast import dispatch
from problems import head_problem


def model(seed=0, bn=False, bias=True):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 12)] + ([nn.BatchNorm1d(12)] if bn else []) + [nn.Tanh()]
    return nn.Sequential(*layers), nn.Linear(12, 4, bias=bias)


def batch(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def pof(phi, head, base=torch.optim.SGD, **kwargs):
    kwargs = {"lr": 0.1, "seed": 0, **kwargs}
    return pof_fast.PoF(phi.parameters(), base, head=head, **kwargs)


def train_loss(phi, head, seed, n=16):
    x, y = batch(n, seed)
    return F.cross_entropy(head(phi(x)), y)


# -- mixed precision -----------------------------------------------------------------------------------

def test_autocast_features_are_promoted_and_the_compiled_backend_stays_in_use():
    phi, head = model()
    x, y = batch(64, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = phi(x)
    assert features.dtype == torch.bfloat16
    opt = pof(phi, head)
    got = opt.perturb(features, y)
    want = pof_fast.line_search(features.float(), opt.theta0_weight, opt.theta0_bias, y)  # cast by the caller
    assert torch.equal(got.step, want.step) and torch.equal(got.weight_direction, want.weight_direction)
    assert pof_fast.backends()["cpp"] is True  # nothing was disabled
    assert dispatch.resolve("auto", torch.device("cpu")).name in ("cpp", "triton")


def test_line_search_inside_autocast_equals_outside():
    h, w, b, y = head_problem(64, 12, 4, seed=3)
    outside = pof_fast.line_search(h, w, b, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = pof_fast.line_search(h, w, b, y)
    assert torch.equal(inside.step, outside.step) and torch.equal(inside.weight_direction, outside.weight_direction)


@pytest.mark.parametrize("head_dtype", [torch.bfloat16, torch.float64])
def test_heads_of_another_dtype_than_the_features(head_dtype):
    h, w, b, y = head_problem(48, 12, 4, seed=4)
    w, b = w.to(head_dtype), b.to(head_dtype)
    common = torch.promote_types(head_dtype, torch.float32)
    got = pof_fast.line_search(h, w, b, y)
    want = pof_fast.line_search(h.to(common), w.to(common), b.to(common), y)
    assert torch.equal(got.step, want.step) and torch.equal(got.weight_direction, want.weight_direction)


# -- GradScaler --------------------------------------------------------------------------------------

def scaler_step(opt, phi, head, seed, scaler, poison=False, clip=None):
    xs, ys = batch(32, seed)
    opt.perturb(opt.search_features(phi, xs), ys)
    opt.zero_grad()
    scaler.scale(train_loss(phi, head, seed + 100)).backward()
    if poison:
        next(phi.parameters()).grad.view(-1)[0] = float("inf")
    if clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_unscales_once_skips_inf_steps_and_restores_theta0(fused):
    phi, head = model()
    phi_ref, head_ref = copy.deepcopy(phi), copy.deepcopy(head)
    opt = pof(phi, head, fused=fused)
    ref = pof(phi_ref, head_ref, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for seed in range(3):
        before = [p.detach().clone() for p in phi.parameters()]
        poison = seed == 1
        scaler_step(opt, phi, head, seed, scaler, poison=poison)
        assert torch.equal(head.weight, opt.theta0_weight) and torch.equal(head.bias, opt.theta0_bias)
        xs, ys = batch(32, seed)  # the reference: the same step without a scaler
        ref.perturb(ref.search_features(phi_ref, xs), ys)
        if poison:  # skipped: phi unchanged, and the reference loop skips that step too
            assert all(torch.equal(a, b) for a, b in zip(before, phi.parameters()))
            ref.restore()
            continue
        ref.zero_grad()
        train_loss(phi_ref, head_ref, seed + 100).backward()
        ref.step()
        for a, b in zip(phi.parameters(), phi_ref.parameters()):  # unscaled exactly once
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert scaler.get_scale() == 2.0**11  # one inf step halved the scale


def test_grad_scaler_with_unscale_and_clipping_before_the_step():
    phi, head = model()
    phi_ref, head_ref = copy.deepcopy(phi), copy.deepcopy(head)
    opt, ref = pof(phi, head), pof(phi_ref, head_ref)
    scaler_step(opt, phi, head, 0, torch.amp.GradScaler("cpu", init_scale=2.0**10), clip=0.05)
    xs, ys = batch(32, 0)
    ref.perturb(ref.search_features(phi_ref, xs), ys)
    ref.zero_grad()
    train_loss(phi_ref, head_ref, 100).backward()
    torch.nn.utils.clip_grad_norm_(list(phi_ref.parameters()), 0.05)
    ref.step()
    for a, b in zip(phi.parameters(), phi_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(head.weight, opt.theta0_weight)


@pytest.mark.cuda
def test_fp16_autocast_and_grad_scaler_on_cuda():
    phi, head = (m.cuda() for m in model())
    phi_ref, head_ref = copy.deepcopy(phi), copy.deepcopy(head)
    opt, ref = pof(phi, head), pof(phi_ref, head_ref)
    scaler = torch.amp.GradScaler("cuda")
    for seed in range(3):
        xs, ys = (t.cuda() for t in batch(64, seed))
        xt, yt = (t.cuda() for t in batch(32, seed + 100))
        with torch.autocast("cuda", dtype=torch.float16):
            opt.perturb(opt.search_features(phi, xs), ys)
            opt.zero_grad()
            loss = F.cross_entropy(head(phi(xt)), yt)
        scaler.scale(loss).backward()
        if seed == 1:
            next(phi.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        assert torch.equal(head.weight, opt.theta0_weight)
        ref.perturb(ref.search_features(phi_ref, xs), ys)
        ref.zero_grad()
        F.cross_entropy(head_ref(phi_ref(xt)), yt).backward()
        if seed != 1:
            ref.step()
        else:
            ref.restore()
        for a, b in zip(phi.parameters(), phi_ref.parameters()):  # fp16 forward vs fp32: loose
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


# -- BatchNorm ---------------------------------------------------------------------------------------

def test_search_features_leave_batchnorm_statistics_alone_by_default():
    phi, head = model(bn=True)
    phi.train()
    opt = pof(phi, head)
    bn = phi[1]
    before = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
    xs, _ = batch(32, 0)
    features = opt.search_features(phi, xs)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2])
    with torch.no_grad():  # train-mode normalisation: the batch's own statistics, as in a training forward
        mean, var = phi[0](xs).mean(0), phi[0](xs).var(0, unbiased=False)
        want = torch.tanh((phi[0](xs) - mean) / (var + bn.eps).sqrt() * bn.weight + bn.bias)
    torch.testing.assert_close(features, want, rtol=1e-5, atol=1e-6)
    opt.search_features(phi, xs, norm_stats="update")  # the reference script's way: statistics move
    assert not torch.equal(bn.running_mean, before[0]) and bn.num_batches_tracked.item() == before[2].item() + 1


# -- base optimizers -----------------------------------------------------------------------------------

def test_closure_and_explicit_loop_give_the_same_parameters():
    runs = []
    for use_closure in (False, True):
        phi, head = model()
        opt = pof(phi, head, momentum=0.9)
        for seed in range(3):
            xs, ys = batch(32, seed)
            opt.perturb(opt.search_features(phi, xs), ys)

            def closure():
                opt.zero_grad()
                loss = train_loss(phi, head, seed + 100)
                loss.backward()
                return loss

            if use_closure:
                opt.step(closure)
            else:
                closure()
                opt.step()
        runs.append([p.detach().clone() for p in phi.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_lbfgs_gets_the_closure_and_needs_one():
    phi, head = model()
    opt = pof(phi, head, base=torch.optim.LBFGS, lr=0.5, max_iter=3)
    xs, ys = batch(32, 0)
    opt.perturb(opt.search_features(phi, xs), ys)
    perturbed = head.weight.detach().clone()
    seen = []

    def closure():
        seen.append(torch.equal(head.weight, perturbed))
        opt.zero_grad()
        loss = train_loss(phi, head, 100)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in phi.parameters()]
    loss = opt.step(closure)
    assert len(seen) > 1 and all(seen)  # every evaluation at the perturbed head
    assert torch.isfinite(loss) and not all(torch.equal(a, b) for a, b in zip(before, phi.parameters()))
    assert torch.equal(head.weight, opt.theta0_weight)
    with pytest.raises(TypeError, match="LBFGS needs a closure"):
        opt.step()


class TwoStepSAM(torch.optim.Optimizer):
    """A SAM-style optimizer that takes a base optimizer itself (as pytorch_optimizer.SAM does)."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)

    @torch.no_grad()
    def step(self, closure):
        with torch.enable_grad():
            closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        eps = [p.grad * (self.defaults["rho"] / norm) for p in params]
        for p, e in zip(params, eps):
            p.add_(e)
        with torch.enable_grad():
            loss = closure()
        for p, e in zip(params, eps):
            p.sub_(e)
        self.base_optimizer.step()
        return loss


def test_sam_style_base_gets_its_own_base_optimizer():
    phi, head = model()
    opt = pof_fast.PoF(phi.parameters(), TwoStepSAM, head=head, base_optimizer=torch.optim.SGD, lr=0.1, seed=0)
    assert isinstance(opt.base_optimizer, TwoStepSAM) and isinstance(opt.base_optimizer.base_optimizer, torch.optim.SGD)
    xs, ys = batch(32, 0)
    opt.perturb(opt.search_features(phi, xs), ys)

    def closure():
        opt.zero_grad()
        loss = train_loss(phi, head, 100)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in phi.parameters()]
    opt.step(closure)
    assert not all(torch.equal(a, b) for a, b in zip(before, phi.parameters()))
    assert torch.equal(head.weight, opt.theta0_weight)
    plain = pof_fast.PoF(phi.parameters(), base_optimizer=torch.optim.SGD, head=nn.Linear(12, 4), lr=0.1)
    assert isinstance(plain.base_optimizer, torch.optim.SGD)


# -- heads and theta0 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "parametrize"])
def test_reparametrized_heads_are_refused(wrap):
    phi, head = model()
    if wrap == "weight_norm":
        head = torch.nn.utils.parametrizations.weight_norm(head)
    elif wrap == "spectral_norm":
        head = torch.nn.utils.spectral_norm(head)
    else:
        class Scale(nn.Module):
            def forward(self, w):
                return 2 * w
        torch.nn.utils.parametrize.register_parametrization(head, "weight", Scale())
    with pytest.raises(ValueError, match="computed from other parameters"):
        pof(phi, head)


def test_a_tied_head_is_refused_with_a_message_that_says_so():
    embedding = nn.Embedding(4, 12)
    head = nn.Linear(12, 4, bias=False)
    head.weight = embedding.weight
    with pytest.raises(ValueError, match="tied"):
        pof_fast.PoF(list(embedding.parameters()), torch.optim.SGD, head=head, lr=0.1)


def test_weights_loaded_after_construction_are_warned_about_once():
    phi, head = model()
    opt = pof(phi, head)
    head.load_state_dict(model(seed=5)[1].state_dict())  # loaded after PoF was built
    xs, ys = batch(32, 0)
    with pytest.warns(RuntimeWarning, match="retake_theta0"):
        opt.perturb(opt.search_features(phi, xs), ys)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.perturb(opt.search_features(phi, xs), ys)  # checked once


def test_theta0_is_taken_at_construction_and_retaken_on_request():
    phi, head = model()
    trained = model(seed=5)[1].state_dict()
    opt = pof(phi, head)  # built before loading the trained head
    head.load_state_dict(trained)
    opt.retake_theta0()
    assert torch.equal(opt.theta0_weight, trained["weight"]) and torch.equal(opt.theta0_bias, trained["bias"])
    xs, ys = batch(32, 0)
    opt.perturb(opt.search_features(phi, xs), ys)
    opt.zero_grad()
    train_loss(phi, head, 100).backward()
    opt.step()
    assert torch.equal(head.weight, trained["weight"])


def test_a_non_finite_head_is_refused_once_at_construction():
    phi, head = model()
    with torch.no_grad():
        head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="head.weight contains NaN"):
        pof(phi, head)


def test_a_stale_head_gradient_is_cleared_and_clipping_sees_phi_only():
    phi, head = model()
    train_loss(phi, head, 0).backward()  # left over from pretraining
    assert head.weight.grad is not None
    opt = pof(phi, head)
    assert head.weight.grad is None and head.bias.grad is None
    xs, ys = batch(32, 0)
    opt.perturb(opt.search_features(phi, xs), ys)
    opt.zero_grad()
    train_loss(phi, head, 100).backward()
    everything = torch.nn.utils.clip_grad_norm_(list(phi.parameters()) + list(head.parameters()), 1e9)
    phi_only = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in phi.parameters()]))
    assert everything.item() == pytest.approx(phi_only.item(), rel=1e-6)


def test_seed_none_leaves_the_global_rng_alone_and_seeds_differ():
    phi, _ = model()
    heads = [nn.Linear(12, 4) for _ in range(2)]
    state = torch.random.get_rng_state()
    opts = [pof(phi, head, seed=None) for head in heads]
    assert torch.equal(torch.random.get_rng_state(), state)
    draws = [o.gamma_sampler.draw(2.0, True).item() for o in opts]
    assert draws[0] != draws[1] and all(0.0 <= d < 2.0 for d in draws)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_gamma_draws_are_uniform():
    """The device-side stream against U(0, 1): mean, variance and a Kolmogorov-Smirnov bound."""
    sampler = pof_fast.optim.GammaSampler(123, torch.device("cpu"))
    draws = torch.stack([sampler.draw(1.0, True) for _ in range(4000)]).sort().values
    assert abs(draws.mean().item() - 0.5) < 0.015 and abs(draws.var().item() - 1 / 12) < 0.005
    ks = (draws - torch.arange(1, 4001, dtype=torch.float64) / 4000).abs().max().item()
    assert ks < 1.63 / 4000**0.5  # the 1% critical value


def test_unknown_backend_is_refused_at_construction():
    phi, head = model()
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        pof(phi, head, backend="gpu")


def test_cuda_graph_needs_a_cuda_head():
    phi, head = model()
    with pytest.raises(ValueError, match="cuda_graph=True needs the head on a CUDA device"):
        pof(phi, head, cuda_graph=True)


# -- accumulation and telemetry ------------------------------------------------------------------------

def test_accumulating_four_micro_batches_equals_one_batch_four_times_as_large():
    runs = []
    for micro in (1, 4):
        phi, head = model()
        opt = pof(phi, head, momentum=0.9, gamma_sampling="fixed")
        for seed in range(2):
            xs, ys = batch(32, seed)
            opt.perturb(opt.search_features(phi, xs), ys)  # once per optimizer step
            opt.zero_grad()
            x, y = batch(64, seed + 100)
            for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                (F.cross_entropy(head(phi(xm)), ym) / micro).backward()
            opt.step()
        assert opt.summary()["steps"] == 2 and opt.summary()["perturbations"] == 2
        runs.append([p.detach().clone() for p in phi.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
