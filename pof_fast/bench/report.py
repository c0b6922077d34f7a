"""The printed table of one case and the lines of the targets."""
from __future__ import annotations

from typing import Any, Dict

__all__ = ["format_case", "format_target", "format_time", "label"]


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def label(row: Dict[str, Any]) -> str:
    """What a row times: the baseline or backend name; ``"<backend> graph"`` for a CUDA graph replay."""
    return f"{row['name']} graph" if row["kind"] == "graph" else row["name"]


def _ratio(value: float) -> str:
    return f"{'-':>7}" if value != value else f"{value:>6.2f}x"


def _agreement(row: Dict[str, Any]) -> str:
    if row["kind"] == "floor":
        return "(3 products + 1 scorer call)"
    if not row["agrees"]:
        return f"NO (loss +{row['loss_gap']:.2g})"
    return "same t*" if row.get("same_point") else f"yes (loss {row['loss_gap']:+.2g})"


def format_case(case: Dict[str, Any]) -> str:
    """The table of one case: a row per baseline, backend search, graph replay and floor."""
    width = max([9] + [len(label(r)) for r in case["rows"]])
    head = (f"case {case['name']}: n={case['n']} D={case['dim']} C={case['classes']} {case['dtype']}"
            f" ({case['what']}{'; ' + case['note'] if case['note'] else ''})")
    lines = [head, f"{'impl':<{width}} {'method':<13} {'time/search':>11} {'spread':>7} {'vs script':>9} "
                   f"{'vs eager':>8} {'vs compile':>10} {'x floor':>7} {'cand':>5} {'peak MB':>8} {'t*':>9}  "
                   f"agrees with script"]
    for r in case["rows"]:
        spread = (r["p80_s"] - r["p20_s"]) / r["median_s"] * 100
        s = r["speedup"]
        lines.append(f"{label(r):<{width}} {r['method']:<13} {format_time(r['median_s']):>11} {spread:>6.0f}% "
                     f"{s['script']:>8.2f}x {s['eager']:>7.2f}x {s['compile']:>9.2f}x {_ratio(r['x_floor'])} "
                     f"{r['candidates']:>5} "
                     f"{r['peak_bytes'] / 2**20:>8.2f} {r['t_star']:>9.4g}  {_agreement(r)}")
    compile_s = next((r["compile_s"] for r in case["rows"] if r["name"] == "compile"), None)
    if compile_s is not None:
        lines.append(f"torch.compile: first call (compilation) took {compile_s:.1f} s, excluded from its time/search")
    if any(r["kind"] == "graph" for r in case["rows"]):
        lines.append("graph: the same pof_fast.line_search captured once in a CUDA graph, time of graph.replay(); "
                     "its peak MB is the graph's memory pool")
    for what, reason in case["failed"].items():
        lines.append(f"FAILED {what}: {reason}")
    if case["skipped"]:
        lines.append("not run: " + "; ".join(f"{k} ({v})" for k, v in case["skipped"].items()))
    return "\n".join(lines)


def format_target(target: Dict[str, Any]) -> str:
    """One line per target: met, MISSED, or reported (a number without a threshold: ``met`` is None)."""
    verdict = "reported" if target["met"] is None else "met" if target["met"] else "MISSED"
    return f"target {target['case']}: {target['what']}: {verdict}"
