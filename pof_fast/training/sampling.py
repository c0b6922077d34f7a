"""Which rows each step sees: the epoch's generator, its batches of row indices, and each rank's share of them.

Every random choice of an epoch (data order, augmentation, search batches) comes from a generator seeded by
``(seed, epoch)``. Under ``torch.distributed`` every rank draws the same indices from it and keeps its own
slice (:func:`shard`, as ``DistributedSampler(drop_last=True)`` does), so the ranks see disjoint rows.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

__all__ = ["index_batches", "search_batches", "epoch_generator", "shard"]


def shard(order: Tensor, rank: int, ranks: int) -> Tensor:
    """Rank ``rank``'s slice of ``order``: every ``ranks``-th entry from ``rank`` on, every slice of the same
    length (the last ``len(order) % ranks`` entries are dropped)."""
    return order if ranks == 1 else order[: len(order) - len(order) % ranks][rank::ranks]


def index_batches(n: int, size: int, gen: Optional[torch.Generator] = None, drop_last: bool = False,
                  rank: int = 0, ranks: int = 1) -> List[Tensor]:
    """Batches of ``size`` row indices of ``range(n)`` (shuffled by ``gen``), of this rank's share of the rows."""
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    parts = list(shard(order, rank, ranks).split(size))
    if drop_last and len(parts) > 1 and len(parts[-1]) < size:
        parts.pop()
    return parts


def search_batches(n: int, size: int, steps: int, gen: torch.Generator, rank: int = 0, ranks: int = 1) -> List[Tensor]:
    """One search batch per step: ``size`` random training rows per rank (all rows, shuffled, when the ranks'
    batches together would hold ``n`` or more); the ranks' batches are slices of one draw."""
    rows = size * ranks
    return [shard(torch.randint(n, (rows,), generator=gen) if rows < n else torch.randperm(n, generator=gen),
                  rank, ranks) for _ in range(steps)]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
