"""Search-batch forwards that leave normalisation statistics where they were."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["frozen_norm_stats"]


@contextmanager
def frozen_norm_stats(*modules: nn.Module) -> Iterator[None]:
    """Inside, the running statistics of every BatchNorm-style layer in ``modules`` stay as they were.

    Covers every ``_NormBase`` that tracks running statistics (BatchNorm1d/2d/3d, SyncBatchNorm,
    InstanceNorm with ``track_running_stats=True``). Layers in training mode still normalise with the
    batch's own statistics, exactly as in a training forward; on exit their ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` are put back bit-exactly. Train/eval modes are not touched.
    """
    layers = [m for root in modules for m in root.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
             for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(layers, saved):
                current = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
                for dst, src in zip(current, buffers):
                    dst.copy_(src)
