"""PoF with DistributedDataParallel on gloo, 2 processes: built before or after the DDP wrapper.

The rank-consistent search (one t* for all ranks) is another matter; here every rank searches its own
batch, and the checks are that training runs, the feature extractor stays identical across ranks and the
head is exactly theta0 after every step.
"""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pof_fast
from gloo import WORLD, gathered_equal, spawn


def worker(rank: int, order: str, freeze_head) -> tuple:
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
    return gathered_equal(flat), torch.equal(head.weight, theta0)


@pytest.mark.parametrize("order,freeze_head", [("before", None), ("after", None), ("before", True)])
def test_pof_with_ddp_in_either_order(order, freeze_head):
    assert spawn(worker, order, freeze_head) == {rank: (True, True) for rank in range(WORLD)}
