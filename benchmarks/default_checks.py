"""What the default data checks cost: one search of SPEC cases A-C with ``validate=True`` against
``validate=False`` and the reference script's loop, at torch's default thread count (``auto`` backend,
bracket_grid, raw direction: the script's search).

    python benchmarks/default_checks.py          # medians of three interleaved rounds per case
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

import pof_fast
from pof_fast import reference

CASES = {"A": (256, 640, 10), "B": (256, 640, 100), "C": (256, 2560, 1000)}


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print("threads", torch.get_num_threads(), torch.__version__)
    for case, (n, dim, classes) in CASES.items():
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(n, dim, generator=gen)
        w = torch.randn(classes, dim, generator=gen) / dim**0.5
        b = torch.randn(classes, generator=gen) * 0.1
        y = torch.randint(0, classes, (n,), generator=gen)
        repeats = 40 if case == "C" else 400

        def search(validate: bool) -> Callable[[], object]:
            return lambda: pof_fast.line_search(h, w, b, y, method="bracket_grid", direction="raw", validate=validate)

        rounds = [(median_time(search(True), repeats), median_time(search(False), repeats),
                   median_time(lambda: reference.script_search(h, w, b, y), max(5, repeats // 10), 2))
                  for _ in range(3)]
        checked, unchecked, loop = (statistics.median(r[i] for r in rounds) for i in range(3))
        print(f"{case}: defaults {checked * 1e3:.3f} ms, validate=False {unchecked * 1e3:.3f} ms, "
              f"checks {100 * (checked / unchecked - 1):+.1f}%, script loop {loop * 1e3:.2f} ms, "
              f"defaults vs loop {loop / checked:.1f}x")


if __name__ == "__main__":
    main()
