"""Block-size sweep of the Triton and CUDA kernels: each family's tuning settings set in turn, checked, timed.

    python benchmarks/sweep.py --json sweep.json            # on a GPU (triton.testing.do_bench)
    TRITON_INTERPRET=1 python benchmarks/sweep.py --device cpu --quick   # Triton logic check only, no timings worth reading

The Triton kernels' host functions read their module constants (``kernels/*.py``: ``BLOCK_N``, ``NUM_WARPS``,
``TILE_ELEMENTS``, ``RES_BLOCK_N``, ``LF_BLOCK_N``, ...) at every call; the CUDA kernels read their launch settings
(``csrc/common.h`` ``CudaLaunch``: threads per row of the residual kernel, rows per block of the scorer and the
one-launch search) from ``pof_fast._C._cuda_launch``. A sweep sets them, calls the kernel on a SPEC section 5 case,
compares the output with the output at the shipped settings (a configuration that disagrees, or fails to compile,
is reported and not timed) and times it. The table says which setting was fastest per case; the shipped values
are changed by hand, with the card and this command written beside them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pof_fast import _ext, reference  # noqa: E402
from pof_fast._types import HALF_DTYPES  # noqa: E402
from pof_fast.backends.triton import load_kernels  # noqa: E402

# family -> (module, {setting: values}, cases): small grids, so the sweep fits a short GPU stage. Module: a
# kernels/ module (Triton) or "cuda" (the extension's launch settings).
GRIDS: Dict[str, Tuple[str, Dict[str, Sequence[int]], Sequence[str]]] = {
    "line_stats": ("line_stats", {"BLOCK_N": (8, 16, 32), "NUM_WARPS": (4, 8)}, ("A", "B", "C")),
    "head_residual": ("head_residual", {"RES_BLOCK_N": (8, 16, 32)}, ("B", "C")),
    "logits_free": ("logits_free", {"LF_BLOCK_N": (32, 64), "LF_BLOCK_C": (32, 64), "LF_NUM_WARPS": (4, 8)}, ("D",)),
    "cuda_residual": ("cuda", {"row_threads": (128, 256, 512, 1024)}, ("C", "D")),
    "cuda_search": ("cuda", {"scorer_warps": (2, 4, 8)}, ("A", "B", "C")),
}
CUDA_FAMILIES = tuple(f for f, (module, _, _) in GRIDS.items() if module == "cuda")


class CudaLaunch:
    """The extension's CUDA launch settings (``csrc/common.h`` ``CudaLaunch``) as attributes."""

    FIELDS = ("row_threads", "scorer_warps")

    def __getattr__(self, name: str) -> int:
        return _ext.cuda_launch()[self.FIELDS.index(name)]

    def __setattr__(self, name: str, value: int) -> None:
        values = list(_ext.cuda_launch())
        values[self.FIELDS.index(name)] = value
        _ext.set_cuda_launch(*values)
# n, D, C, dtype; D is reduced (the full head takes seconds per call and would not fit the stage).
SIZES = {"A": (256, 640, 10, torch.float32), "B": (256, 640, 100, torch.float32),
         "C": (256, 2560, 1000, torch.float32), "D": (1024, 1024, 32000, torch.bfloat16)}
QUICK = {"A": (8, 6, 5, torch.float32), "B": (8, 6, 7, torch.float32), "C": (9, 6, 11, torch.float32),
         "D": (8, 6, 9, torch.bfloat16)}


def problem(case: str, device: torch.device, quick: bool) -> Dict[str, Any]:
    n, dim, classes, dtype = (QUICK if quick else SIZES)[case]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, dim, generator=gen)
    w = torch.randn(classes, dim, generator=gen) / dim**0.5
    b = torch.randn(classes, generator=gen) * 0.1
    y = torch.randint(0, classes, (n,), generator=gen)
    grad = reference.head_gradient(h, w, b, y, -100, True)
    d = reference.direction_logits(h, grad.grad_weight, grad.grad_bias, grad.scale)
    on = dict(device=device)
    return dict(h=h.to(dtype=dtype, **on), w=w.to(dtype=dtype, **on), b=b.to(dtype=dtype, **on), y=y.to(**on),
                z0=grad.logits.to(dtype=dtype, **on), d=d.to(**on), gw=grad.grad_weight.to(dtype=dtype, **on),
                gb=grad.grad_bias.to(**on), scale=grad.scale.reshape(1).to(**on),
                steps=torch.linspace(0.0, 8.0, 24, device=device), count=(y != -100).sum().reshape(1).to(**on))


def call(family: str, kernels: Any, p: Dict[str, Any]) -> Callable[[], torch.Tensor]:
    ops = torch.ops.pof_fast
    if family == "cuda_residual":
        return lambda: ops.head_gradient(p["h"], p["w"], p["b"], p["y"], -100, True)[1]
    if family == "cuda_search":  # l(0) and l(t*) of bracket_grid: another block count may break a tie elsewhere
        return lambda: torch.stack(ops.search(p["z0"], p["d"], p["y"], "bracket_grid", 1.0, 100.0, 16, -100, 8, 8)[1:3])
    if family == "line_stats":
        return lambda: kernels.line_stats.line_stats(p["z0"], p["d"], p["y"], p["steps"], -100)
    if family == "head_residual":
        return lambda: kernels.head_residual.head_residual(p["z0"], p["y"], p["count"], -100)
    return lambda: kernels.logits_free.line_stats_logits_free(p["h"], p["w"], p["b"], p["gw"], p["gb"], p["scale"],
                                                               p["y"], p["steps"], -100)


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn)) * 1e-3
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep(family: str, device: torch.device, quick: bool) -> List[Dict[str, Any]]:
    module_name, grid, cases = GRIDS[family]
    kernels = None if module_name == "cuda" else load_kernels()
    module = CudaLaunch() if module_name == "cuda" else getattr(kernels, module_name)
    shipped = {name: getattr(module, name) for name in grid}
    rows = []
    for case in cases:
        p = problem(case, device, quick)
        fn = call(family, kernels, p)
        want = fn()
        for values in itertools.product(*grid.values()):
            setting = dict(zip(grid, values))
            row = dict(family=family, case=case, setting=setting, shipped=setting == shipped)
            try:
                for name, value in setting.items():
                    setattr(module, name, value)
                got = fn()
                rtol = 1e-2 if got.dtype in HALF_DTYPES else 1e-4  # 16-bit: one rounding apart
                if not torch.allclose(got.float(), want.float(), rtol=rtol, atol=1e-6, equal_nan=True):
                    row["error"] = f"disagrees with the shipped setting (max diff {(got - want).abs().max().item():.3g})"
                else:
                    row["seconds"] = timed(fn, device)
            except Exception as exc:  # a setting that cannot compile here is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            finally:
                for name, value in shipped.items():
                    setattr(module, name, value)
            rows.append(row)
    return rows


def report(rows: List[Dict[str, Any]]) -> None:
    for (family, case), group in itertools.groupby(rows, key=lambda r: (r["family"], r["case"])):
        group = list(group)
        timed_rows = [r for r in group if "seconds" in r]
        best = min(timed_rows, key=lambda r: r["seconds"], default=None)
        print(f"{family}, case {case}:")
        for r in group:
            what = f"{r['seconds'] * 1e6:9.1f} us" if "seconds" in r else r["error"]
            marks = (" shipped" if r["shipped"] else "") + (" best" if r is best else "")
            print(f"  {r['setting']}  {what}{marks}")


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--families", help="comma-separated, of " + ", ".join(GRIDS) + " (default: all; the CUDA "
                        "ones need a GPU and the extension built with CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a logic check)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    families = args.families.split(",") if args.families else [
        f for f in GRIDS if f not in CUDA_FAMILIES or (device.type == "cuda" and _ext.cuda_compiled())]
    rows = [row for family in families for row in sweep(family, device, args.quick)]
    report(rows)
    if args.json:
        meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
