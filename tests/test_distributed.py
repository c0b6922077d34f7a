"""The union search and class-sharded heads on torch.distributed (gloo, 2 processes spawned by the test).

Oracles: the single-process search on the concatenated batch (union) and on the full head (sharded), run in
the same process. Checks: t* and directions bitwise equal across ranks, equal to the oracle within fp32
tolerance, the collectives counted; PoF with a DDP- or FSDP2-wrapped feature extractor keeps the ranks'
weights identical and the head at theta0.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import pof_fast
from pof_fast import dispatch, distributed, plans
from pof_fast._types import SearchPlan
from gloo import WORLD, gathered_equal, spawn

FIELDS = ("step", "grad_norm", "loss0", "loss", "capped", "direction_norm")


def count_collectives(monkeypatch_target):
    counter = {"n": 0}
    for name in ("all_reduce", "all_gather"):
        original = getattr(monkeypatch_target, name)

        def counted(*a, _original=original, **k):
            counter["n"] += 1
            return _original(*a, **k)

        setattr(monkeypatch_target, name, counted)
    return counter


def batches(classes, sizes, ignored_rank=None, dim=16):
    """Every rank's (h, y), made the same way on every rank from one seed."""
    gen = torch.Generator().manual_seed(classes)
    w = torch.randn(classes, dim, generator=gen) * (2.0 / dim**0.5)
    b = torch.randn(classes, generator=gen) * 0.1
    parts = []
    for r, n in enumerate(sizes):
        h = torch.randn(n, dim, generator=gen)
        y = torch.randint(0, classes, (n,), generator=gen)
        y[::5] = -100
        if r == ignored_rank:
            y[:] = -100
        parts.append((h, y))
    return w, b, parts


def union_worker(rank, classes, sizes, ignored_rank, backend):
    w, b, parts = batches(classes, sizes, ignored_rank)
    h, y = parts[rank]
    out = {}
    for method, direction in (("bracket_grid", "raw"), ("newton", "normalized")):
        counter = count_collectives(distributed.dist)
        got = pof_fast.line_search(h, w, b, y, method=method, direction=direction, backend=backend,
                                   process_group=dist.group.WORLD)
        calls = counter["n"]
        for name in ("all_reduce", "all_gather"):  # undo the counting wrappers
            setattr(distributed.dist, name, getattr(dist, name))
        want = pof_fast.line_search(torch.cat([p[0] for p in parts]), w, b, torch.cat([p[1] for p in parts]),
                                    method=method, direction=direction, backend=backend)
        out[method] = dict(
            same_on_ranks=all(gathered_equal(getattr(got, f).reshape(-1).double()) for f in FIELDS)
            and gathered_equal(got.weight_direction) and gathered_equal(got.bias_direction),
            step=(got.step.item(), want.step.item()),
            loss=(got.loss.item(), want.loss.item()),
            direction_error=(got.weight_direction - want.weight_direction).abs().max().item(),
            capped=(bool(got.capped), bool(want.capped)),
            collectives=(calls, distributed.collectives(
                dispatch.resolve(backend, h.device).resolve_plan(SearchPlan(method=method), h, w))),
        )
    return out


@pytest.mark.parametrize("classes,sizes,ignored_rank,backend", [
    (10, (37, 20), None, "auto"),
    (100, (64, 64), None, "torch"),
    (10, (33, 12), 1, "auto"),  # uneven shards, a rank whose rows are all ignored
])
def test_union_search_equals_the_search_on_the_concatenated_batch(classes, sizes, ignored_rank, backend):
    results = spawn(union_worker, classes, sizes, ignored_rank, backend)
    for rank, methods in results.items():
        for method, r in methods.items():
            what = f"rank {rank} {method}"
            assert r["same_on_ranks"], what
            got_t, want_t = r["step"]
            assert got_t == pytest.approx(want_t, rel=1e-4, abs=1e-6), what
            assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-5), what
            assert r["direction_error"] <= 1e-5, what
            assert r["capped"][0] == r["capped"][1], what
            assert r["collectives"][0] == r["collectives"][1], what


def sharded_worker(rank, classes, bias):
    gen = torch.Generator().manual_seed(7)
    dim, n = 12, 48
    h = torch.randn(n, dim, generator=gen)
    w = torch.randn(classes, dim, generator=gen) * 0.5
    b = torch.randn(classes, generator=gen) * 0.1 if bias else None
    y = torch.randint(0, classes, (n,), generator=gen)
    y[::7] = -100
    cut = [0, classes // 3, classes]  # uneven slices
    rows = slice(cut[rank], cut[rank + 1])
    out = {}
    for method in ("bracket_grid", "newton"):
        counter = count_collectives(distributed.dist)
        got = pof_fast.line_search(h, w[rows], None if b is None else b[rows], y, method=method,
                                   process_group=dist.group.WORLD, sharded_classes=True)
        calls = counter["n"]
        for name in ("all_reduce", "all_gather"):
            setattr(distributed.dist, name, getattr(dist, name))
        want = pof_fast.line_search(h, w, b, y, method=method, backend="torch")
        out[method] = dict(
            same_on_ranks=all(gathered_equal(getattr(got, f).reshape(-1).double()) for f in FIELDS),
            step=(got.step.item(), want.step.item()),
            grad_norm=(got.grad_norm.item(), want.grad_norm.item()),
            slice_error=(got.weight_direction - want.weight_direction[rows]).abs().max().item(),
            bias_error=0.0 if b is None else (got.bias_direction - want.bias_direction[rows]).abs().max().item(),
            collectives=(calls, distributed.collectives(plans.resolve(SearchPlan(method=method), "torch"),
                                                        sharded_classes=True)),
        )
    return out


@pytest.mark.parametrize("classes,bias", [(10, True), (100, False)])
def test_class_sharded_head_equals_the_search_on_the_full_head(classes, bias):
    for rank, methods in spawn(sharded_worker, classes, bias).items():
        for method, r in methods.items():
            what = f"rank {rank} {method}"
            assert r["same_on_ranks"], what
            assert r["step"][0] == pytest.approx(r["step"][1], rel=1e-4, abs=1e-6), what
            assert r["grad_norm"][0] == pytest.approx(r["grad_norm"][1], rel=1e-5), what
            assert r["slice_error"] <= 1e-5 and r["bias_error"] <= 1e-5, what
            assert r["collectives"][0] == r["collectives"][1], what


def training_worker(rank, wrapper):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4))
    phi, head = model[:4], model[4]
    opt_kwargs = dict(head=head, lr=0.1, seed=rank, process_group=dist.group.WORLD)  # seeds differ: rank 0's wins
    if wrapper == "ddp":
        opt = pof_fast.PoF(phi.parameters(), torch.optim.SGD, freeze_head=True, **opt_kwargs)
        net = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in (phi[0], phi[2]):
            fully_shard(layer)
        opt = pof_fast.PoF(phi.parameters(), torch.optim.SGD, freeze_head=True, **opt_kwargs)
        net = model
    theta0 = head.weight.detach().clone()
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    same_perturbation = True
    for _ in range(3):
        xs, ys = torch.randn(32, 6, generator=gen), torch.randint(0, 4, (32,), generator=gen)
        xt, yt = torch.randn(16, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        opt.perturb(opt.search_features(phi, xs), ys)
        same_perturbation &= gathered_equal(head.weight.detach())
        opt.zero_grad()
        F.cross_entropy(net(xt), yt).backward()
        opt.step()
        assert torch.equal(head.weight, theta0)
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in phi.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in full])
    return dict(same_perturbation=same_perturbation, same_phi=gathered_equal(flat),
                head_at_theta0=torch.equal(head.weight, theta0))


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_post_training_with_a_wrapped_feature_extractor(wrapper):
    results = spawn(training_worker, wrapper)
    assert results == {r: dict(same_perturbation=True, same_phi=True, head_at_theta0=True) for r in range(WORLD)}
