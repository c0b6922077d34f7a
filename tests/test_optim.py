"""PoF optimizer semantics: perturbation, exact restore, only phi moves, state_dict round trip."""
import copy

import pytest
import torch
from torch import nn

import pof_fast
import oracle


def model(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh()), nn.Linear(12, 4, bias=bias)


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def pof_step(opt, phi, head, seed):
    xs, ys = batch(32, seed)
    xt, yt = batch(16, seed + 100)
    with torch.no_grad():
        hs = phi(xs)
    res = opt.perturb(hs, ys)
    opt.zero_grad()
    nn.functional.cross_entropy(head(phi(xt)), yt).backward()
    opt.step()
    return res, hs, ys


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sampling", ["fixed", "uniform"])
def test_perturb_sets_head_to_theta0_minus_gamma_t_u(bias, sampling):
    phi, head = model(bias)
    w0 = head.weight.detach().clone()
    b0 = head.bias.detach().clone() if bias else None
    opt = pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, gamma=2.0, gamma_sampling=sampling, lr=0.1, seed=1)
    xs, ys = batch(32, 0)
    with torch.no_grad():
        hs = phi(xs)
    res = opt.perturb(hs, ys)
    _, gw, gb, norm = oracle.head_gradient(hs, w0, b0, ys)
    factor = opt.last.gamma.item()
    assert factor == 2.0 if sampling == "fixed" else 0.0 <= factor < 2.0
    t = res.step.item()
    assert t > 0 and not bool(res.capped)
    expected_w = w0.double() - factor * t * gw / norm
    assert torch.allclose(head.weight.double(), expected_w, atol=1e-6)
    if bias:
        assert torch.allclose(head.bias.double(), b0.double() - factor * t * gb / norm, atol=1e-6)
    assert opt.last.perturbation_norm.item() == pytest.approx(factor * t, rel=1e-5)


@pytest.mark.parametrize("head_dtype,direction_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                         (torch.bfloat16, torch.float32)])
def test_head_write_is_theta0_minus_coef_u_bit_for_bit(head_dtype, direction_dtype):
    """FixedHead.write: in place where the dtypes agree, the promoted expression elsewhere; the value of
    ``theta0 - coef * u`` exactly (as PyTorch rounds it), with theta0, coef and u left as they were."""
    from pof_fast.head import FixedHead

    gen = torch.Generator().manual_seed(3)
    head = nn.Linear(24, 40).to(head_dtype)
    fixed = FixedHead(head)
    u = torch.randn(40, 24, generator=gen, dtype=torch.float64).to(direction_dtype)
    ub = torch.randn(40, generator=gen, dtype=torch.float64).to(direction_dtype)
    coef = torch.tensor(0.7312, dtype=direction_dtype)
    before = [x.clone() for x in (fixed.theta0_weight, fixed.theta0_bias, u, ub, coef)]
    fixed.write(coef, u, ub)
    assert torch.equal(head.weight, (fixed.theta0_weight - coef * u).to(head_dtype))
    assert torch.equal(head.bias, (fixed.theta0_bias - coef * ub).to(head_dtype))
    assert not torch.equal(head.weight, fixed.theta0_weight)
    for kept, now in zip(before, (fixed.theta0_weight, fixed.theta0_bias, u, ub, coef)):
        assert torch.equal(kept, now)
    fixed.restore()
    assert torch.equal(head.weight, fixed.theta0_weight) and torch.equal(head.bias, fixed.theta0_bias)


@pytest.mark.parametrize("base,kwargs", [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
])
def test_step_restores_theta0_exactly_and_moves_only_phi(base, kwargs):
    phi, head = model()
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    phi0 = [p.detach().clone() for p in phi.parameters()]
    opt = pof_fast.PoF(phi.parameters(), base, head=head, seed=0, **kwargs)
    for s in range(3):
        pof_step(opt, phi, head, s)
        assert torch.equal(head.weight, w0) and torch.equal(head.bias, b0)
    assert all(not torch.equal(p, q) for p, q in zip(phi.parameters(), phi0))
    assert head.weight.grad is None and not head.weight.requires_grad


def test_training_gradient_is_taken_at_the_perturbed_head():
    phi, head = model()
    ref_phi, ref_head = copy.deepcopy(phi), copy.deepcopy(head)
    opt = pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, gamma_sampling="fixed", lr=0.1, seed=0)
    res, hs, ys = pof_step(opt, phi, head, 7)
    with torch.no_grad():  # the same step by hand, in float64-free plain torch
        ref_head.weight -= 2.0 * res.step * res.weight_direction
        ref_head.bias -= 2.0 * res.step * res.bias_direction
    xt, yt = batch(16, 107)
    nn.functional.cross_entropy(ref_head(ref_phi(xt)), yt).backward()
    with torch.no_grad():
        for p in ref_phi.parameters():
            p -= 0.1 * p.grad
    for p, q in zip(phi.parameters(), ref_phi.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_skip_and_clip_when_capped():
    for on_capped, expected in [("skip", 0.0), ("clip", 5.0)]:
        head = nn.Linear(4, 4, bias=False)
        nn.init.zeros_(head.weight)
        opt = pof_fast.PoF([nn.Parameter(torch.zeros(1))], torch.optim.SGD, head=head, max_step=5.0,
                           gamma_sampling="fixed", on_capped=on_capped, lr=0.1)
        res = opt.perturb(torch.eye(4).repeat(4, 1), torch.arange(4).repeat(4))  # separable: capped
        assert bool(res.capped) and opt.last.applied_step.item() == expected
        assert bool(opt.last.skipped) == (on_capped == "skip")
        assert head.weight.abs().max().item() == pytest.approx(2.0 * expected * res.weight_direction.abs().max().item())
        assert opt.summary()["capped_rate"] == 1.0


def test_state_dict_round_trip():
    phi, head = model()
    opt = pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, lr=0.1, momentum=0.9, seed=3)
    pof_step(opt, phi, head, 0)
    saved = copy.deepcopy(opt.state_dict())
    saved_phi = copy.deepcopy(phi.state_dict())
    res_a, *_ = pof_step(opt, phi, head, 1)
    after_a = [p.detach().clone() for p in phi.parameters()]

    phi2, head2 = model(seed=9)  # different starting weights: everything must come from the state
    phi2.load_state_dict(saved_phi)
    opt2 = pof_fast.PoF(phi2.parameters(), torch.optim.SGD, head=head2, lr=0.1, momentum=0.9, seed=99)
    opt2.load_state_dict(saved)
    assert torch.equal(head2.weight, head.weight) and torch.equal(head2.bias, head.bias)
    res_b, *_ = pof_step(opt2, phi2, head2, 1)
    assert torch.equal(opt2.last.gamma, opt.last.gamma)
    assert torch.equal(res_a.step, res_b.step)
    assert all(torch.equal(p, q) for p, q in zip(after_a, phi2.parameters()))
    assert opt2.param_groups is opt2.base_optimizer.param_groups


def test_scheduler_sees_the_base_optimizer_groups():
    phi, head = model()
    opt = pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    pof_step(opt, phi, head, 0)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_closure_runs_before_the_base_step():
    phi, head = model()
    opt = pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, lr=0.1)
    xs, ys = batch(32, 0)
    opt.perturb(phi(xs).detach(), ys)
    perturbed = head.weight.detach().clone()

    def closure():
        opt.zero_grad()
        assert torch.equal(head.weight, perturbed)
        loss = nn.functional.cross_entropy(head(phi(xs)), ys)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and torch.isfinite(loss)
    assert torch.equal(head.weight, opt.theta0_weight)


def test_summary_means_over_steps():
    phi, head = model()
    opt = pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, lr=0.01, seed=0)
    steps = [pof_step(opt, phi, head, s)[0].step.item() for s in range(4)]
    summary = opt.summary()
    assert summary["steps"] == 4 and summary["step"] == pytest.approx(sum(steps) / 4)
    opt.reset_summary()
    assert opt.summary()["steps"] == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(gamma=-1.0), "gamma"), (dict(gamma=float("nan")), "gamma"), (dict(gamma_sampling="normal"), "gamma_sampling"),
    (dict(on_capped="stop"), "on_capped"), (dict(method="golden"), "method"), (dict(direction="unit"), "direction"),
    (dict(max_step=0.0), "max_step"), (dict(partitions=0), "partitions"),
])
def test_bad_hyperparameters(kwargs, message):
    phi, head = model()
    with pytest.raises(ValueError, match=message):
        pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, lr=0.1, **kwargs)


def test_bad_construction():
    phi, head = model()
    with pytest.raises(TypeError, match="base_optimizer"):
        pof_fast.PoF(phi.parameters(), torch.optim.SGD(phi.parameters(), lr=0.1), head=head)
    with pytest.raises(TypeError, match="head"):
        pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=phi, lr=0.1)
    with pytest.raises(ValueError, match="head's parameters"):
        pof_fast.PoF(list(phi.parameters()) + list(head.parameters()), torch.optim.SGD, head=head, lr=0.1)
    opt = pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, lr=0.1)
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"base": {}})
