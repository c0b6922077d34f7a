"""A model's outputs and features on a split (eval mode, no augmentation), and its test metrics."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import data as datasets
from ..metrics import classification_metrics
from .sampling import index_batches

__all__ = ["predict", "evaluate", "features"]


@torch.no_grad()
def predict(model: nn.Module, data: datasets.Data, split: str, device: torch.device, batch_size: int = 512,
            workers: int = 0, limit: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """``(logits, labels)`` of ``split`` ("train" or "test", no augmentation) in eval mode, on the CPU."""
    part = getattr(data, split)
    n = len(part) if limit is None else min(limit, len(part))
    was = model.training
    model.eval()
    outs, labels = [], []
    try:
        for x, y in datasets.batches(part, index_batches(n, batch_size), workers):
            x, y = datasets.prepare(data, x, y, device)
            outs.append(model(x).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was)
    return torch.cat(outs), torch.cat(labels)


def evaluate(model: nn.Module, data: datasets.Data, device: torch.device, workers: int = 0) -> Dict[str, float]:
    """Test error, NLL and ECE."""
    return classification_metrics(*predict(model, data, "test", device, workers=workers))


@torch.no_grad()
def features(phi: nn.Module, data: datasets.Data, split: str, device: torch.device, index: Optional[Tensor] = None,
             batch_size: int = 512, workers: int = 0) -> Tuple[Tensor, Tensor]:
    """``(phi(x), y)`` for rows ``index`` (all by default) of ``split``, eval mode, no augmentation."""
    part = getattr(data, split)
    index = torch.arange(len(part)) if index is None else index
    was = phi.training
    phi.eval()
    outs, labels = [], []
    try:
        for x, y in datasets.batches(part, list(index.split(batch_size)), workers):
            x, y = datasets.prepare(data, x, y, device)
            outs.append(phi(x))
            labels.append(y)
    finally:
        phi.train(was)
    return torch.cat(outs), torch.cat(labels)
