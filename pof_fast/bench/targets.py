"""The speed-up, floor and memory targets of the search, judged on a run's rows (reported, never asserted).

Speed-ups are judged on ``bracket_grid`` rows, the same search as the baselines, of the backends a target
names (``"auto"``: the one ``backend="auto"`` picks on the device), as a plain call (``"call"``, the
``backend`` rows) and, on CUDA, as a CUDA graph replay (``"graph"``, the ``graph`` rows). A row that is
missing or failed gives nan, never "met".

:func:`judge_results` judges the JSON files of a GPU check (``benchmarks/gpu/``): the search benchmark
(``benchmarks/run.py --json``), the share of the search in a training step (``benchmarks/step.py --json``) and,
reported without a threshold, the split of a PoF Trainer step (``benchmarks/lm_step.py --json``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch

from .. import dispatch

__all__ = ["FLOOR_TARGETS", "NEWTON_TARGETS", "STEP_SHARE_TARGETS", "TARGETS", "Target", "auto_backend",
           "judge_results", "judge_step", "judge_targets", "load_results", "trainer_split"]

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
    Target("cuda", "script", 6.0, "D", ("cuda",)),
    Target("cuda", "compile", 6.0, "D", ("cuda",)),
)
# (device, most, cases, backend, floor): the backend's bracket_grid call within ``most`` times a measured floor,
# its own ("own") or the lowest of the case's backends ("lowest": triton's logits-free search on D against the
# three 16-bit GEMMs of the cuda floor, not against its own fp32 products).
FLOOR_TARGETS = (("cuda", 2.0, "ABC", "auto", "own"), ("cuda", 2.0, "D", "cuda", "own"),
                 ("cuda", 3.0, "D", "triton", "lowest"))
# (device, most, cases, backends): newton's call within ``most`` times bracket_grid's on the same backend.
NEWTON_TARGETS = (("cuda", 1.5, "ABCD", ("cuda", "triton")),)
# The search with the default checks (``validate=True``) as a share of a plain SGD step at most: WRN-28-10 on a GPU,
# WRN-10-2 on the CPU (``benchmarks/step.py``).
STEP_SHARE_TARGETS = {"cuda": 0.02, "cpu": 0.05}
# Case D's peak extra memory of a bracket_grid call beyond the inputs and the returned direction (u_W fp32,
# u_b), in 16-bit [n, C] arrays: cuda stores z0 and R, then z0 and d (plus one 8 MiB 16-bit chunk of u_W);
# triton's logits-free path stores none (beyond its 16-bit copy of u_W, which it scores from).
MEMORY_ARRAYS = {"cuda": 2, "triton": 0}
ROUNDED_CHUNK_BYTES = 1 << 23


def _judged(case: Dict[str, Any], backend: str, kind: str, key: str, baseline: str = "",
            method: str = "bracket_grid") -> float:
    row = next((r for r in case["rows"] if r["kind"] == kind and r["name"] == backend
                and r["method"] == method), None)
    return float("nan") if row is None else (row[key][baseline] if baseline else row[key])


def judge_targets(device: str, cases: Dict[str, Dict[str, Any]], auto: Optional[str] = None) -> List[Dict[str, Any]]:
    """The targets for ``device`` on the cases run so far: speed-ups, floors, newton against bracket_grid, and
    case D's peak memory on CUDA. ``auto``: the backend ``"auto"`` stands for (default: the one it picks here)."""
    auto = auto or dispatch.resolve("auto", torch.device(device)).name
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
    for target_device, most, names, backend, floor in FLOOR_TARGETS:
        if target_device != device:
            continue
        backend = auto if backend == "auto" else backend
        for name in (c for c in names if c in cases):
            if floor == "own":
                got = _judged(cases[name], backend, "backend", "x_floor")
            else:
                got = _judged(cases[name], backend, "backend", "median_s") / _lowest_floor(cases[name])
            which = "its floor" if floor == "own" else "the lowest floor of the case"
            out.append(dict(case=name, backend=backend, timing="call", baseline="floor", value=got, met=got <= most,
                            what=f"{backend} bracket_grid <= {most:g}x {which}: {got:.2f}x"))
    for target_device, most, names, backends in NEWTON_TARGETS:
        if target_device != device:
            continue
        for name in (c for c in names if c in cases):
            for backend in backends:
                got = (_judged(cases[name], backend, "backend", "median_s", method="newton")
                       / _judged(cases[name], backend, "backend", "median_s"))
                out.append(dict(case=name, backend=backend, timing="call", baseline="bracket_grid", value=got,
                                met=got <= most, what=f"{backend} newton <= {most:g}x bracket_grid: {got:.2f}x"))
    if device == "cuda" and "D" in cases:
        out += _memory_targets(cases["D"])
    return out


def _lowest_floor(case: Dict[str, Any]) -> float:
    return min((r["median_s"] for r in case["rows"] if r["kind"] == "floor"), default=float("nan"))


def _memory_targets(case: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Case D's bracket_grid calls: peak extra memory beyond the returned direction, in 16-bit [n, C] arrays."""
    n, classes, dim = case["n"], case["classes"], case["dim"]
    array = n * classes * 2
    returned = classes * dim * 4 + classes * 4
    out = []
    for backend, arrays in MEMORY_ARRAYS.items():
        allowed = arrays * array + (ROUNDED_CHUNK_BYTES if arrays else classes * dim * 2)
        peak = _judged(case, backend, "backend", "peak_bytes")
        got = (peak - returned) / array
        out.append(dict(case="D", backend=backend, timing="call", baseline="memory", value=got,
                        met=peak - returned <= allowed,
                        what=f"{backend} bracket_grid peak beyond the returned direction {got:.2f} [n, C] 16-bit "
                             f"arrays (allowed {arrays}{' + an 8 MiB chunk' if arrays else ' + a 16-bit u_W'})"))
    return out


def auto_backend(device: str, statuses: Mapping[str, Any]) -> str:
    """The backend ``backend="auto"`` picked on a run's machine, from the statuses it recorded
    (``env["backends"]``: ``True`` or the reason a backend did not load)."""
    return next((name for name in dispatch.PREFERENCE.get(device, ("torch",)) if statuses.get(name) is True), "torch")


def judge_step(result: Dict[str, Any]) -> Dict[str, Any]:
    """The search's share of a plain SGD step (``benchmarks/step.py``'s JSON), against its device's target."""
    device = "cuda" if "gpu" in result["env"] else "cpu"  # environment() names the GPU of a CUDA run
    most = STEP_SHARE_TARGETS[device]
    got = result["times"]["search"]["median_s"] / result["times"]["sgd"]["median_s"]
    return dict(case=f"{result['model']} step", backend=result["backend"], timing="call", baseline="sgd step",
                value=got, met=got <= most,
                what=f"the search with the default checks <= {most:.0%} of an SGD step ({device}): {got:.2%}")


def trainer_split(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Where a PoF Trainer step's time goes (``benchmarks/lm_step.py``'s JSON), one row per PoF run (each method and
    search mode run): reported, no threshold (``met`` is None); ``value`` is that step over the plain one. Steps are
    ``seconds`` (``"plain"`` or ``"plain step"``, ``"pof ..."``); the parts timed alone are the other ``seconds``
    and ``parts``."""
    args, seconds = result["args"], result["seconds"]
    plain_name = "plain" if "plain" in seconds else "plain step"
    plain = seconds[plain_name]
    runs = {name: s for name, s in seconds.items() if name.startswith("pof")}
    alone = {name: s for name, s in seconds.items() if name != plain_name and name not in runs}
    alone.update(result.get("parts", {}))
    shape = (f"vocabulary {args['vocab']}, hidden {args['hidden']}, {args['layers']} layers, {args['batch']} x "
             f"{args['seq']} tokens, {'bf16' if args['bf16'] else 'fp32'}")
    parts = "; ".join(f"{name} {s * 1e3:.1f} ms" for name, s in alone.items())
    backend = auto_backend(args["device"], result["environment"]["backends"])
    return [dict(case="Trainer step", backend=backend, timing="call", baseline="plain step", value=s / plain,
                 met=None, what=f"{shape}: {name if name != 'pof step' else 'pof step, method ' + args['method']} "
                                f"{s * 1e3:.1f} ms = {s / plain:.2f}x the plain step ({plain * 1e3:.1f} ms); "
                                f"alone: {parts}")
            for name, s in runs.items()]


def _is_trainer_run(data: Dict[str, Any]) -> bool:
    seconds = data.get("seconds")
    return "args" in data and isinstance(seconds, dict) and ("plain" in seconds or "plain step" in seconds)


Results = List[Tuple[str, Dict[str, Any]]]


def load_results(paths: Iterable[Union[str, Path]]) -> Results:
    """``(file name, content)`` of each JSON file named, or found in a folder named, in order."""
    files: List[Path] = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.json")) if path.is_dir() else [path]
    return [(str(f), json.loads(f.read_text())) for f in files]


def judge_results(results: Results) -> List[Dict[str, Any]]:
    """Every target judged on the files of a run: search benchmarks (their ``auto`` as picked there), step
    benchmarks and Trainer steps; each target names its ``source`` file. Other files (a part's record, a sweep)
    are left out."""
    out = []
    for source, data in results:
        if not isinstance(data, dict):
            continue
        if "cases" in data and "device" in data:
            device = data["device"]
            judged = judge_targets(device, data["cases"], auto_backend(device, data["env"]["backends"]))
        elif "search_share_of_sgd" in data:
            judged = [judge_step(data)]
        elif _is_trainer_run(data):
            judged = trainer_split(data)
        else:
            continue
        out += [dict(target, source=source) for target in judged]
    return out
