"""On a GPU: no host synchronisation in the search or the PoF step, and the search as a CUDA graph replay.

``torch.cuda.set_sync_debug_mode("error")`` turns any synchronising CUDA call into an error; the graph
tests capture once and replay on new data written into the same buffers, against eager calls.
"""
import copy
from contextlib import contextmanager, nullcontext

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pof_fast
from problems import head_problem

pytestmark = pytest.mark.cuda
BACKENDS = ["cuda", "triton", "torch"]
METHODS = ["newton", "bracket_grid", "grid"]
FIELDS = ("step", "weight_direction", "bias_direction", "grad_norm", "loss0", "loss", "capped", "direction_norm")


@contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_line_search_never_synchronises(backend, method):
    h, w, b, y = head_problem(256, 640, 100, ignore_every=7, seed=1, device="cuda")
    search = lambda: pof_fast.line_search(h, w, b, y, method=method, backend=backend, validate=False)
    search()  # warm-up: loads the backend, compiles Triton kernels
    with no_sync():
        search()


def test_pof_perturb_and_step_never_synchronise():
    torch.manual_seed(0)
    phi, head = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU()).cuda(), nn.Linear(128, 10).cuda()
    opt = pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, lr=0.1, momentum=0.9, validate=False, seed=0)
    xs, ys = torch.randn(256, 64, device="cuda"), torch.randint(0, 10, (256,), device="cuda")
    xt, yt = torch.randn(64, 64, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    for checked in (False, True):  # the first round warms up
        with no_sync() if checked else nullcontext():
            opt.perturb(opt.search_features(phi, xs), ys)
            opt.zero_grad()
            F.cross_entropy(head(phi(xt)), yt).backward()
            opt.step()
    assert torch.equal(head.weight, opt.theta0_weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_captured_search_replays_on_new_data_as_eager(backend):
    h, w, b, y = head_problem(256, 640, 10, seed=2, device="cuda")
    captured = pof_fast.CapturedSearch(h, w, b, y, method="bracket_grid", backend=backend)
    for seed in (3, 4):
        h2, _, _, y2 = head_problem(256, 640, 10, seed=seed, device="cuda")
        got = captured(h2, y2)
        want = pof_fast.line_search(h2, w, b, y2, method="bracket_grid", backend=backend, validate=False)
        for field in FIELDS:
            assert torch.equal(getattr(got, field), getattr(want, field)), (backend, seed, field)
    with pytest.raises(ValueError, match="must match the captured search"):
        captured(h2[:10], y2[:10])


def test_pof_with_cuda_graph_equals_pof_without():
    torch.manual_seed(0)
    phi, head = nn.Sequential(nn.Linear(32, 64), nn.ReLU()).cuda(), nn.Linear(64, 10).cuda()
    phi_g, head_g = copy.deepcopy(phi), copy.deepcopy(head)
    make = lambda p, hd, graph: pof_fast.PoF(p.parameters(), torch.optim.SGD, head=hd, lr=0.1, seed=1,
                                             validate=False, cuda_graph=graph)
    opt, opt_g = make(phi, head, False), make(phi_g, head_g, True)
    gen = torch.Generator(device="cuda").manual_seed(5)
    for _ in range(4):
        xs = torch.randn(128, 32, device="cuda", generator=gen)
        ys = torch.randint(0, 10, (128,), device="cuda", generator=gen)
        xt = torch.randn(32, 32, device="cuda", generator=gen)
        yt = torch.randint(0, 10, (32,), device="cuda", generator=gen)
        for o, p, hd in ((opt, phi, head), (opt_g, phi_g, head_g)):
            o.perturb(o.search_features(p, xs), ys)
            o.zero_grad()
            F.cross_entropy(hd(p(xt)), yt).backward()
        assert torch.equal(head.weight, head_g.weight)
        opt.step()
        opt_g.step()
    assert all(torch.equal(a, b) for a, b in zip(phi.parameters(), phi_g.parameters()))
    assert opt.summary() == opt_g.summary()


def test_pof_default_checks_never_stall_and_name_bad_data_at_the_next_call():
    torch.manual_seed(0)
    phi, head = nn.Sequential(nn.Linear(64, 128), nn.ReLU()).cuda(), nn.Linear(128, 10).cuda()
    opt = pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, lr=0.1, seed=0)  # validate=True
    xs, ys = torch.randn(256, 64, device="cuda"), torch.randint(0, 10, (256,), device="cuda")

    def step(features):
        opt.perturb(features, ys)
        opt.zero_grad()
        F.cross_entropy(head(phi(xs[:64])), ys[:64]).backward()
        opt.step()

    step(opt.search_features(phi, xs))  # warm-up (and the one-time head check)
    with no_sync():
        for _ in range(2):
            step(opt.search_features(phi, xs))
    bad = opt.search_features(phi, xs)
    bad[3, 5] = float("nan")
    opt.perturb(bad, ys)
    assert torch.equal(head.weight, opt.theta0_weight)  # the bad search did not perturb
    opt.restore()
    with pytest.raises(ValueError, match="search_features contains NaN"):
        opt.perturb(opt.search_features(phi, xs), ys)
