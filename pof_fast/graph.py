"""The whole search as a CUDA graph replay: one capture per search-batch shape, then no launch overhead."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .search import LineSearchResult, line_search

__all__ = ["CapturedSearch"]


class CapturedSearch:
    """:func:`pof_fast.line_search` captured in one CUDA graph for a fixed search batch, replayed on new data.

    features ``[n, D]`` and target ``[n]``: examples of the shapes and dtypes every call will have.
    weight ``[C, D]`` and bias ``[C]`` or None: the head, read in place at every replay (PoF's theta0 never
    moves; update them in place, never rebind them). ``search_kwargs``: those of :func:`line_search` but
    ``validate``: no data check runs inside a graph (it would need a host read), so a bad label gives NaN.

    Each call copies its inputs into the graph's input buffers and replays. The returned result's tensors
    are the graph's output buffers, overwritten by the next call: clone what you keep.
    """

    def __init__(self, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                 **search_kwargs: Any) -> None:
        if features.device.type != "cuda":
            raise ValueError(f"CapturedSearch needs CUDA tensors (CUDA graphs), features are on {features.device}")
        if "validate" in search_kwargs:
            raise TypeError("CapturedSearch runs no data checks (validate=False): do not pass validate")
        self.features = features.detach().clone()
        self.target = target.detach().clone()
        self.weight, self.bias = weight, bias
        self.search_kwargs = dict(search_kwargs, validate=False)
        # Warm up on a side stream (backend loaded, Triton kernels compiled, cuBLAS workspaces made), then capture.
        side = torch.cuda.Stream(device=features.device)
        side.wait_stream(torch.cuda.current_stream(features.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._search()
        torch.cuda.current_stream(features.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.result = self._search()

    def _search(self) -> LineSearchResult:
        return line_search(self.features, self.weight, self.bias, self.target, **self.search_kwargs)

    def __call__(self, features: Tensor, target: Tensor) -> LineSearchResult:
        """Replay on ``features`` ``[n, D]`` and ``target`` ``[n]`` (the captured shapes, dtypes and device)."""
        for name, new, static in (("features", features, self.features), ("target", target, self.target)):
            if new.shape != static.shape or new.dtype != static.dtype or new.device != static.device:
                raise ValueError(
                    f"{name} must match the captured search ({list(static.shape)}, {static.dtype}, {static.device}), "
                    f"got ({list(new.shape)}, {new.dtype}, {new.device}): capture another CapturedSearch"
                )
        self.features.copy_(features)
        self.target.copy_(target)
        self.graph.replay()
        return self.result
