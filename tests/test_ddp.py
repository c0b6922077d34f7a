"""PoF with DistributedDataParallel on gloo, 2 processes: built before or after the DDP wrapper.

The rank-consistent search (one t* for all ranks) is another matter; here every rank searches its own
batch, and the checks are that training runs, the feature extractor stays identical across ranks and the
head is exactly theta0 after every step.
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import pof_fast

WORLD = 2


def worker(rank: int, init_file: str, order: str, freeze_head, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same initial model on every rank
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))
        phi, head = model[:2], model[2]
        make = lambda: pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, lr=0.1, momentum=0.9, seed=rank,
                                    freeze_head=freeze_head)
        if order == "before":
            opt = make()
            ddp = nn.parallel.DistributedDataParallel(model)
        else:
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = make()
        theta0 = head.weight.detach().clone()
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(3):
            xs, ys = torch.randn(32, 6, generator=gen), torch.randint(0, 4, (32,), generator=gen)
            xt, yt = torch.randn(16, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen)
            opt.perturb(opt.search_features(phi, xs), ys)
            opt.zero_grad()
            F.cross_entropy(ddp(xt), yt).backward()
            opt.step()
            assert torch.equal(head.weight, theta0)
        flat = torch.cat([p.detach().reshape(-1) for p in phi.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        results[rank] = (torch.equal(gathered[0], gathered[1]), torch.equal(head.weight, theta0))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("order,freeze_head", [("before", None), ("after", None), ("before", True)])
def test_pof_with_ddp_in_either_order(order, freeze_head):
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(worker, args=(os.path.join(tmp, "init"), order, freeze_head, results), nprocs=WORLD, join=True)
        assert dict(results) == {0: (True, True), 1: (True, True)}
