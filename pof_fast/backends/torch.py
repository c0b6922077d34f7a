"""The ``torch`` backend: vectorised eager PyTorch (all candidates broadcast at once); runs everywhere."""
from __future__ import annotations

from .base import Backend, register_search_op

__all__ = ["TorchBackend"]


@register_search_op
class TorchBackend(Backend):
    """The reference ops of :mod:`pof_fast.reference` under the search drivers, as one registered op."""

    name = "torch"
