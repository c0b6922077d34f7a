"""The speed-up, floor and memory targets of the search, judged on a run's rows (reported, never asserted).

Speed-ups are judged on ``bracket_grid`` rows, the same search as the baselines, of the backends a target
names (``"auto"``: the one ``backend="auto"`` picks on the device), as a plain call (``"call"``, the
``backend`` rows) and, on CUDA, as a CUDA graph replay (``"graph"``, the ``graph`` rows). A row that is
missing or failed gives nan, never "met".
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Tuple

import torch

from .. import dispatch
from .cases import SCRIPT

__all__ = ["FLOOR_TARGETS", "TARGETS", "Target", "judge_targets"]

# Row kind of each way of timing a search.
TIMINGS = {"call": "backend", "graph": "graph"}


class Target(NamedTuple):
    """At least ``minimum`` times faster than ``baseline`` on ``device``, on every case in ``cases``."""

    device: str
    baseline: str
    minimum: float
    cases: str
    backends: Tuple[str, ...] = ("auto",)
    timings: Tuple[str, ...] = ("call",)


TARGETS = (
    Target("cpu", "script", 5.0, "ABCD"),
    Target("cpu", "eager", 1.5, "BC"),
    Target("cuda", "script", 30.0, "ABC", ("cuda", "auto"), ("call", "graph")),
    Target("cuda", "eager", 3.0, "ABC"),
    Target("cuda", "compile", 1.3, "ABC", ("cuda", "auto"), ("call", "graph")),
)
# (device, most, cases): the auto backend's bracket_grid call within ``most`` times its measured floor.
FLOOR_TARGETS = (("cuda", 2.0, "ABC"),)


def _judged(case: Dict[str, Any], backend: str, kind: str, key: str, baseline: str = "") -> float:
    row = next((r for r in case["rows"] if r["kind"] == kind and r["name"] == backend
                and r["method"] == "bracket_grid"), None)
    return float("nan") if row is None else (row[key][baseline] if baseline else row[key])


def judge_targets(device: str, cases: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The targets for ``device`` on the cases run so far, and, for case D on CUDA, that no backend held
    a ``[K, n, C]`` fp32 buffer (K = 16, the grid's one call)."""
    auto = dispatch.resolve("auto", torch.device(device)).name
    out = []
    for target in (t for t in TARGETS if t.device == device):
        backends = dict.fromkeys(auto if b == "auto" else b for b in target.backends)
        for name in (c for c in target.cases if c in cases):
            for backend in backends:
                for timing in target.timings:
                    got = _judged(cases[name], backend, TIMINGS[timing], "speedup", target.baseline)
                    how = " graph replay" if timing == "graph" else ""
                    out.append(dict(case=name, backend=backend, timing=timing, baseline=target.baseline, value=got,
                                    met=got >= target.minimum,
                                    what=f"{backend} bracket_grid{how} >= {target.minimum:g}x vs {target.baseline}: "
                                         f"{got:.2f}x"))
    for target_device, most, names in FLOOR_TARGETS:
        if target_device != device:
            continue
        for name in (c for c in names if c in cases):
            got = _judged(cases[name], auto, "backend", "x_floor")
            out.append(dict(case=name, backend=auto, timing="call", baseline="floor", value=got, met=got <= most,
                            what=f"{auto} bracket_grid <= {most:g}x its floor: {got:.2f}x"))
    if device == "cuda" and "D" in cases:
        case = cases["D"]
        limit = SCRIPT["partitions"] * case["n"] * case["classes"] * 4
        for row in (r for r in case["rows"] if r["kind"] == "backend"):
            out.append(dict(case="D", backend=row["name"], timing="call", baseline="memory", value=row["peak_bytes"],
                            met=row["peak_bytes"] < limit,
                            what=f"{row['name']} {row['method']} peak {row['peak_bytes'] / 2**30:.2f} GiB "
                                 f"< [16, n, C] fp32 = {limit / 2**30:.1f} GiB"))
    return out
