"""The whole search as a CUDA graph replay (CUDA only).

``pof_fast.line_search(..., validate=False)`` runs with no host synchronisation, so it can be captured:
:class:`pof_fast.CapturedSearch` warms it up on a side stream (Triton compiles, the caching allocator fills)
and captures one call on static input buffers with ``torch.cuda.graph``; every ``graph.replay()`` reruns the
whole search (head gradient, direction logits, search, result) into the same output tensors, with no
Python and no launch overhead between kernels. A training loop copies each new search batch into the
static features and labels before the replay.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graph import CapturedSearch
from ..search import LineSearchResult
from .cases import IGNORE_INDEX, SCRIPT, Problem

__all__ = ["GRAPH_CASES", "GraphSearch", "capture"]

# A graph removes launch and Python overhead, which bounds the searches of cases A to C (SPEC section 4);
# case D's searches are bound by memory traffic, and its targets are not about graphs.
GRAPH_CASES = "ABC"


@dataclass
class GraphSearch:
    """A captured search (:class:`pof_fast.CapturedSearch`): :meth:`replay` reruns it on ``inputs``.

    ``inputs``: the static (features, weight, bias, target) the graph reads; copy new values into them.
    ``pool_bytes``: the rise of ``torch.cuda.max_memory_allocated`` while the search was warmed up and captured,
    about the memory the graph's private pool holds for as long as the graph lives (a replay allocates nothing).
    """

    search: CapturedSearch
    pool_bytes: int

    @property
    def inputs(self) -> tuple:
        return self.search.features, self.search.weight, self.search.bias, self.search.target

    @property
    def result(self) -> LineSearchResult:
        return self.search.result

    def replay(self) -> None:
        self.search.graph.replay()


def capture(problem: Problem, backend: str, method: str, direction: str) -> GraphSearch:
    """Capture one ``pof_fast.line_search`` of ``problem`` on ``backend`` (a CUDA problem) in a CUDA graph."""
    if problem.features.device.type != "cuda":
        raise ValueError(f"CUDA graphs need CUDA tensors, got {problem.features.device}")
    h, w, b, y = problem.args()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    # The head too gets static buffers of its own: callers copy other problems' heads into them.
    search = CapturedSearch(h, w.clone(), None if b is None else b.clone(), y, method=method, direction=direction,
                            backend=backend, ignore_index=IGNORE_INDEX, **SCRIPT)
    torch.cuda.synchronize()
    pool_bytes = torch.cuda.max_memory_allocated() - before
    search.graph.replay()
    torch.cuda.synchronize()
    return GraphSearch(search, pool_bytes)
