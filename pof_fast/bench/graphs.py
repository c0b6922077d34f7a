"""The whole search as a CUDA graph replay (CUDA only).

``pof_fast.line_search(..., validate=False)`` runs with no host synchronisation, so it can be captured:
after a warm-up on a side stream (Triton compiles and autotunes, the caching allocator fills), one call on
static input buffers is captured with ``torch.cuda.graph``; every ``graph.replay()`` then reruns the
whole search (head gradient, direction logits, search, result) into the same output tensors, with no
Python and no launch overhead between kernels. A training loop copies each new search batch into the
static features and labels before the replay.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..search import LineSearchResult, line_search
from .cases import IGNORE_INDEX, SCRIPT, Problem

__all__ = ["GRAPH_CASES", "WARMUP_CALLS", "GraphSearch", "capture"]

# A graph removes launch and Python overhead, which bounds the searches of cases A to C (SPEC section 4);
# case D's searches are bound by memory traffic, and its targets are not about graphs.
GRAPH_CASES = "ABC"
# Calls on the side stream before the capture (torch.cuda.graph's documentation asks for a few).
WARMUP_CALLS = 3


@dataclass
class GraphSearch:
    """A captured search: :meth:`replay` reruns it on ``inputs``, writing into ``result``'s tensors.

    ``inputs``: the static (features, weight, bias, target) the graph reads; they must outlive it.
    ``pool_bytes``: the rise of ``torch.cuda.max_memory_allocated`` during the capture, the memory the
    graph's private pool holds for as long as the graph lives (a replay allocates nothing).
    """

    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]
    result: LineSearchResult
    pool_bytes: int

    def replay(self) -> None:
        self.graph.replay()


def capture(problem: Problem, backend: str, method: str, direction: str) -> GraphSearch:
    """Capture one ``pof_fast.line_search`` of ``problem`` on ``backend`` (a CUDA problem) in a CUDA graph."""
    if problem.features.device.type != "cuda":
        raise ValueError(f"CUDA graphs need CUDA tensors, got {problem.features.device}")
    inputs = tuple(t.clone() for t in problem.args())  # the static input buffers the graph reads
    h, w, b, y = inputs

    def search() -> LineSearchResult:
        return line_search(h, w, b, y, method=method, direction=direction, backend=backend,
                           ignore_index=IGNORE_INDEX, validate=False, **SCRIPT)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            search()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.cuda.graph(graph):
        result = search()
    torch.cuda.synchronize()
    pool_bytes = torch.cuda.max_memory_allocated() - before
    graph.replay()
    torch.cuda.synchronize()
    return GraphSearch(graph, inputs, result, pool_bytes)
