"""The three baselines, all running the reference script's search (SPEC section 3), defined here only.

- ``script``:  the authors' loop, one head forward and one ``.item()`` per candidate
  (:func:`pof_fast.reference.script_search`);
- ``eager``:   the same search vectorised in eager PyTorch, all candidates broadcast: the ``torch``
  backend's :meth:`~pof_fast.backends.base.Backend.compose` (the search as plain Python calls), called
  directly, without the public API's input checks;
- ``compile``: that same function under ``torch.compile(dynamic=False)``; its first call compiles.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch

from .. import dispatch, reference
from ..backends.base import Backend
from ..drivers import evaluations
from .cases import SCRIPT, Problem, plan

__all__ = ["BASELINES", "baselines", "searched"]

BASELINES = ("script", "eager", "compile")


def baselines(problem: Problem) -> Dict[str, Callable[[], Any]]:
    """The three baselines on one problem. ``script`` returns (t*, head forwards); ``eager`` and ``compile``
    return the torch backend's ``SearchTensors``. ``compile`` compiles on its first call (dynamo is reset here)."""
    args = problem.args()
    script_plan = plan()
    torch_backend = dispatch.load("torch")
    assert isinstance(torch_backend, Backend), torch_backend
    eager = torch_backend.compose
    torch._dynamo.reset()
    compiled = torch.compile(eager, dynamic=False)
    return {
        "script": lambda: reference.script_search(*args, **SCRIPT),
        "eager": lambda: eager(*args, script_plan),
        "compile": lambda: compiled(*args, script_plan),
    }


def searched(name: str, out: Any) -> Tuple[float, int]:
    """(t*, candidates scored, l(0) included) from what baseline ``name`` returned."""
    if name == "script":
        return float(out[0]), int(out[1])
    return float(out.step), evaluations(plan())
