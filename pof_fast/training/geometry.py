"""The loss geometry of a trained model: Hessian lambda_max of the head or of the network, and the line landscape."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .. import data as datasets
from ..metrics import EigenResult, LandscapeResult, head_hessian_hvp, hessian_lambda_max
from ..metrics import landscape as line_landscape
from ..metrics import model_hessian_hvp
from .evaluation import features

__all__ = ["head_sharpness", "network_sharpness", "landscape_of"]


def head_sharpness(phi: nn.Module, head: nn.Linear, data: datasets.Data, device: torch.device, *,
                   samples: int = 2048, method: str = "lanczos", iters: int = 50, tol: float = 1e-3, seed: int = 0,
                   workers: int = 0, on_iteration: Optional[Callable[[int, float, float], None]] = None
                   ) -> EigenResult:
    """lambda_max of the Hessian of the training loss with respect to the head's parameters, at the head as
    it is, on ``samples`` training rows (a seeded choice; all when there are fewer), features in eval mode,
    in float64."""
    n = len(data.train)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(samples, n)].sort().values
    h, y = features(phi, data, "train", device, index, workers=workers)
    bias = None if head.bias is None else head.bias.detach().double()
    hvp, dim = head_hessian_hvp(h.double(), y, head.weight.detach().double(), bias)
    return hessian_lambda_max(hvp, dim, method=method, iters=iters, tol=tol, seed=seed, device=h.device,
                              dtype=torch.float64, on_iteration=on_iteration)


def network_sharpness(model: nn.Module, data: datasets.Data, device: torch.device, *, samples: int = 2048,
                      batch_size: int = 256, method: str = "lanczos", iters: int = 50, tol: float = 1e-3,
                      seed: int = 0, workers: int = 0,
                      on_iteration: Optional[Callable[[int, float, float], None]] = None) -> EigenResult:
    """lambda_max of the Hessian of the training loss with respect to every trainable parameter (eval mode, so
    BatchNorm uses its running statistics), on ``samples`` training rows, by double back-propagation."""
    n = len(data.train)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(samples, n)].sort().values
    batches = [datasets.prepare(data, *b, device) for b in datasets.batches(data.train, list(index.split(batch_size)),
                                                                            workers)]
    params = [p for p in model.parameters() if p.requires_grad]
    was = model.training
    model.eval()
    try:
        hvp, dim = model_hessian_hvp(model, params, batches)
        return hessian_lambda_max(hvp, dim, method=method, iters=iters, tol=tol, seed=seed, device=device,
                                  dtype=torch.float32, on_iteration=on_iteration)
    finally:
        model.train(was)


def landscape_of(phi: nn.Module, head: nn.Linear, data: datasets.Data, device: torch.device, *,
                 batch_size: int = 128, batches: int = 32, max_step: float = 100.0, seed: int = 0,
                 workers: int = 0) -> LandscapeResult:
    """:func:`pof_fast.metrics.landscape` on ``batches`` random batches of ``batch_size`` rows of the training
    and of the test split (rows distinct within a batch; features in eval mode, no augmentation)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for split in ("train", "test"):
        n = len(getattr(data, split))
        size = min(batch_size, n)
        index = torch.cat([torch.randperm(n, generator=gen)[:size] for _ in range(batches)])
        h, y = features(phi, data, split, device, index, workers=workers)
        pairs.append(list(zip(h.split(size), y.split(size))))
    weight = head.weight.detach()
    bias = None if head.bias is None else head.bias.detach()
    return line_landscape(pairs[0], pairs[1], weight, bias, max_step=max_step)
