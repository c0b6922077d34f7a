"""The test problems, made in one place: seeded, drawn in float64 on the CPU, then cast and moved.

``line_problem`` gives a line (z0, d, y) for the scorer ops; ``head_problem`` a search batch and a head
(h, W, b, y) for the whole search. Ignored rows are every ``ignore_every``-th row from ``ignore_from``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

IGNORE_INDEX = -100


def _labels(n: int, classes: int, gen: torch.Generator, ignore_every: int, ignore_from: int) -> Tensor:
    y = torch.randint(0, classes, (n,), generator=gen)
    if ignore_every:
        y[ignore_from::ignore_every] = IGNORE_INDEX
    return y


def line_problem(
    n: int, classes: int, *, dtype: torch.dtype = torch.float32, scale: float = 3.0, offset: float = 0.0,
    ignore_every: int = 0, ignore_from: int = 0, seed: int = 0, device="cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """z0 ``[n, C]`` ~ offset + scale N(0, 1), d ``[n, C]`` ~ N(0, 1), y ``[n]``."""
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, classes, generator=gen, dtype=torch.float64) * scale + offset
    d = torch.randn(n, classes, generator=gen, dtype=torch.float64)
    y = _labels(n, classes, gen, ignore_every, ignore_from)
    return z0.to(device=device, dtype=dtype), d.to(device=device, dtype=dtype), y.to(device)


def head_problem(
    n: int, dim: int, classes: int, *, bias: bool = True, dtype: torch.dtype = torch.float32, spread: float = 1.0,
    bias_scale: float = 0.1, ignore_every: int = 0, ignore_from: int = 0, seed: int = 0, device="cpu",
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """h ``[n, D]`` ~ N(0, 1), W ``[C, D]`` ~ spread N(0, 1/D), b ``[C]`` ~ bias_scale N(0, 1) or None, y ``[n]``."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64) * (spread / dim**0.5)
    b = torch.randn(classes, generator=gen, dtype=torch.float64) * bias_scale if bias else None
    y = _labels(n, classes, gen, ignore_every, ignore_from)

    def cast(x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else x.to(device=device, dtype=dtype)

    return cast(h), cast(w), cast(b), y.to(device)
