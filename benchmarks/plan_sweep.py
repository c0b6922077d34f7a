"""Sweep Newton's rounds x points on every search path of a device: accuracy on the plan problem set, time per plan.

For each plan (R rounds of K points) and each backend of the device:
    accuracy: every problem of ``pof_fast.bench.plan_problems`` (and its bf16 copy, for the 16-bit paths) searched
              with that plan; t_exact by float64 bisection on l' along the direction the search returned (the line
              it searched); the plan meets the criterion when |t* - t_exact| <= 1e-3 max(1, t_exact) everywhere.
    time:     the whole search (``validate=False``) on a full-size shape that runs on each path (cases A-C of SPEC
              section 5, a language-model head), median of repeats, the plans alternated round after round.
The plan a path should use is the cheapest one that meets the criterion ("chosen" in the output and the JSON);
``pof_fast/plans.py`` holds the chosen plans with the run that chose them. Results are written as they come.

    python benchmarks/plan_sweep.py --device cpu --threads 2 --json plan_sweep_cpu.json
    python benchmarks/plan_sweep.py --device cuda --json "$OUT/plan_sweep.json"
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pof_fast import dispatch, plans  # noqa: E402
from pof_fast._types import SearchPlan  # noqa: E402
from pof_fast.backends.compiled import stores_16bit_lines  # noqa: E402
from pof_fast.bench import plan_problems  # noqa: E402
from pof_fast.bench.cases import CASES, Problem  # noqa: E402
from pof_fast.bench.environment import write_json  # noqa: E402
from pof_fast.bench.timing import interleaved  # noqa: E402

PLANS = "8x8,4x8,3x16,3x12,5x4,4x6,4x5,6x3,5x3,4x4,7x2,6x2,5x2"
BACKENDS = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton")}
# Full-size shapes timed per path: (label, n, D, C, dtype, logits_free).
TIMED = {
    "cpp-narrow": [("case A", 256, 640, 10, "float32", None)],
    "cpp-wide": [("case B", 256, 640, 100, "float32", None), ("case C", 256, 2560, 1000, "float32", None)],
    "cpp-16bit": [("LM head (C=32000)", 1024, 896, 32000, "bfloat16", None)],
    "torch": [("case A", 256, 640, 10, "float32", None), ("case C", 256, 2560, 1000, "float32", None)],
    "cuda": [("case A", 256, 640, 10, "float32", None), ("case C", 256, 2560, 1000, "float32", None),
             ("case D", 4096, 4096, 128256, "bfloat16", None)],
    "triton": [("case A", 256, 640, 10, "float32", None), ("case C", 256, 2560, 1000, "float32", None)],
    "triton-logits-free": [("case D", 4096, 4096, 128256, "bfloat16", True)],
}


def parse_plans(text: str) -> list:
    out = []
    for item in text.split(","):
        rounds, points = item.lower().split("x")
        out.append((int(rounds), int(points)))
    return out


def newton_plan(rounds: int, points: int, normalized: bool = True, max_step: float = 100.0,
                logits_free=None) -> SearchPlan:
    return SearchPlan("newton", normalized, max_step=max_step, newton_iterations=rounds, newton_points=points,
                      logits_free=logits_free)


def accuracy(backend, device: str, rounds: int, points: int, dtype: str) -> dict:
    """Every problem of the set, in ``dtype`` ("problem" keeps each one's own): path, t*, t_exact, error, met."""
    rows = []
    for problem in plan_problems.PROBLEMS:
        if dtype != "problem":
            problem = problem._replace(dtype=dtype)
        h, w, b, y = plan_problems.make(problem, device)
        plan = newton_plan(rounds, points, problem.normalized, problem.max_step)
        out = backend.line_search(h, w, b, y, plan)
        path = backend.plan_path(h, w, plan)
        u_b = out.bias_direction if b is not None else None  # the op returns [0] for a head without bias
        stored_16bit = backend.name == "cpp" and stores_16bit_lines(h, w)
        z0, d = plan_problems.searched_line(h, w, b, out.weight_direction, u_b, stored_16bit)
        exact = plan_problems.exact_step(z0, d, y, problem.max_step)
        step = float(out.step)
        rows.append(dict(problem=problem.name, dtype=problem.dtype, path=path, step=step,
                         exact=exact, error=abs(step - exact) / max(1.0, exact),
                         met=plans.within_tolerance(step, exact)))
    return dict(rows=rows, met=all(r["met"] for r in rows), worst=max(r["error"] for r in rows))


def timed_problem(n, dim, classes, dtype, device):
    case = CASES["A"].__class__("timed", "", n, dim, classes, dtype)
    return Problem.make(case, device).args()


def timings(backend, device: str, path: str, plan_list: list, budget_s: float) -> list:
    """Seconds per search of each plan on the path's full-size shapes, plans alternated round after round."""
    rows = []
    for label, n, dim, classes, dtype, logits_free in TIMED.get(path, []):
        h, w, b, y = timed_problem(n, dim, classes, dtype, device)
        probe = newton_plan(1, 1, logits_free=logits_free)
        if backend.plan_path(h, w, probe) != path:
            continue
        calls = [lambda r=r, k=k: backend.line_search(h, w, b, y, newton_plan(r, k, logits_free=logits_free))
                 for r, k in plan_list]
        samples = interleaved(calls, device, budget_s, min_rounds=3, max_rounds=50)
        base = samples[0]
        for (r, k), times in zip(plan_list, samples):
            rows.append(dict(shape=label, n=n, dim=dim, classes=classes, dtype=dtype, plan=f"{r}x{k}",
                             seconds=statistics.median(times), repeats=len(times),
                             vs_first=statistics.median([t / t0 for t, t0 in zip(times, base)])))
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--plans", default=PLANS, help="comma-separated RxK (the first is the baseline of vs_first)")
    parser.add_argument("--backends", default="", help="comma-separated (default: cpp,torch on cpu; cuda,triton)")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed rounds per shape")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-timing", action="store_true", help="accuracy only")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan_list = parse_plans(args.plans)
    names = args.backends.split(",") if args.backends else BACKENDS[args.device]
    result = dict(plans=[f"{r}x{k}" for r, k in plan_list], accuracy={}, timings={}, chosen={})
    device = torch.device(args.device)
    for name in names:
        backend = dispatch.load(name)
        if not isinstance(backend, dispatch.Backend) or not backend.handles(device):
            print(f"{name}: unavailable ({backend})")
            continue
        for dtype in ("problem", "bfloat16"):
            key = f"{name} {dtype}"
            result["accuracy"][key] = {}
            for r, k in plan_list:
                acc = accuracy(backend, args.device, r, k, dtype)
                result["accuracy"][key][f"{r}x{k}"] = acc
                missed = [row["problem"] for row in acc["rows"] if not row["met"]]
                print(f"accuracy {key:<16} {r}x{k:<3} candidates {2 + r * k:3d}: worst {acc['worst']:.1e} "
                      f"{'met' if acc['met'] else 'missed ' + '; '.join(missed)}", flush=True)
                write_json(args.json, args.device, args=vars(args), **result)
        if args.no_timing:
            continue
        paths = [p for p, shapes in TIMED.items() if shapes]
        for path in paths:
            rows = timings(backend, args.device, path, plan_list, args.budget)
            if not rows:
                continue
            result["timings"][f"{name} {path}"] = rows
            for row in rows:
                print(f"time {name} {path:<19} {row['shape']:<18} {row['plan']:<5} {row['seconds'] * 1e3:9.2f} ms "
                      f"x{row['vs_first']:.2f} vs {rows[0]['plan']}", flush=True)
            keys = [key for key in result["accuracy"] if key.startswith(name + " ")]
            met = {plan for plan in result["plans"] if all(result["accuracy"][key][plan]["met"] for key in keys)}
            cost = {}
            for row in rows:
                cost.setdefault(row["plan"], []).append(row["vs_first"])
            ranked = sorted((statistics.mean(v), plan) for plan, v in cost.items() if plan in met)
            if ranked:
                result["chosen"][path] = dict(plan=ranked[0][1], mean_vs_first=ranked[0][0],
                                              table=f"{plans.NEWTON_PLANS[path].rounds}x"
                                                    f"{plans.NEWTON_PLANS[path].points}")
                print(f"chosen {path}: {ranked[0][1]} ({ranked[0][0]:.2f}x {plan_list[0][0]}x{plan_list[0][1]}); "
                      f"the table has {result['chosen'][path]['table']}", flush=True)
            write_json(args.json, args.device, args=vars(args), **result)
    return write_json(args.json, args.device, args=vars(args), **result)


if __name__ == "__main__":
    main()
