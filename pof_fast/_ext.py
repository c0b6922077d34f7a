"""The only module that imports the compiled extension ``pof_fast._C``.

The import is tried once, on first use; a failure is kept (``reason()``) and reported with one
warning, and every caller falls back to the ``"torch"`` backend. A successful import registers
``torch.ops.pof_fast.*`` and, here, their fake kernels so that ``torch.compile`` can trace them.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Optional

import torch

from ._types import HALF_DTYPES, empty_search_tensors, gram_cheaper
from ._types import accumulation_dtype as _accumulation

__all__ = ["available", "reason", "cuda_compiled", "compiled_ops", "ops"]

_module: Optional[ModuleType] = None
_error: Optional[BaseException] = None
_tried = False


def _register_fakes() -> None:
    """Shape/dtype-only kernels for torch.compile (FakeTensor tracing); nothing is computed."""
    lib = "pof_fast::"

    @torch.library.register_fake(lib + "line_stats")
    def _line_stats(logits, direction, target, steps, ignore_index):
        return logits.new_empty((3, steps.shape[0]), dtype=_accumulation(logits.dtype))

    @torch.library.register_fake(lib + "head_gradient")
    def _head_gradient(features, weight, bias, target, ignore_index, normalized):
        acc = _accumulation(features.dtype)
        n, classes = features.shape[0], weight.shape[0]
        logits = features.new_empty((n, classes))
        # csrc/common.h stores_16bit_lines: large 16-bit heads keep R in the input dtype.
        stored = features.dtype if features.dtype in HALF_DTYPES and not gram_cheaper(n, features.shape[1], classes) \
            else acc
        residual = features.new_empty((n, classes), dtype=stored)
        grad_weight = features.new_empty((classes, features.shape[1]), dtype=acc)
        grad_bias = features.new_empty((classes if bias is not None else 0,), dtype=acc)
        return logits, residual, grad_weight, grad_bias, features.new_empty((), dtype=acc), features.new_empty((), dtype=acc)

    @torch.library.register_fake(lib + "direction_logits")
    def _direction_logits(features, grad_weight, grad_bias, scale, residual):
        n, classes = features.shape[0], grad_weight.shape[0]
        gram = residual is not None and gram_cheaper(n, features.shape[1], classes)
        return features.new_empty((n, classes), dtype=features.dtype if features.dtype in HALF_DTYPES and not gram
                                  else grad_weight.dtype)

    @torch.library.register_fake(lib + "search")
    def _search(logits, direction, target, method, init_step, max_step, partitions, ignore_index,
                newton_iterations, newton_points):
        acc = _accumulation(logits.dtype)
        scalar = logits.new_empty((), dtype=acc)
        return scalar, scalar.clone(), scalar.clone(), logits.new_empty((), dtype=torch.bool)

    @torch.library.register_fake(lib + "line_search")
    def _line_search(features, weight, bias, target, *plan):
        return tuple(empty_search_tensors(features, weight, bias))


def _load() -> Optional[ModuleType]:
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            module = importlib.import_module("pof_fast._C")
            _register_fakes()
            _module = module
        except Exception as exc:  # not built, built for another torch, missing libraries, ...
            _error = exc
            warnings.warn(
                f"pof_fast: compiled extension unavailable ({reason()}); using the 'torch' backend. "
                "Build it with `pip install --no-build-isolation .`.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _module


def available() -> bool:
    """Whether ``pof_fast._C`` imported (tries once)."""
    return _load() is not None


def reason() -> str:
    """Why the extension is unavailable ('' when it is available)."""
    _load()
    if _error is None:
        return ""
    first = str(_error).splitlines()[0] if str(_error) else ""
    return f"{type(_error).__name__}: {first}"


def cuda_compiled() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    module = _load()
    return bool(module is not None and getattr(module, "cuda", False))


def cuda_launch() -> tuple[int, int]:
    """The CUDA kernels' launch settings ``(row_threads, scorer_warps)`` (``csrc/common.h`` ``CudaLaunch``)."""
    return tuple(_cuda_module()._cuda_launch())


def set_cuda_launch(row_threads: int, scorer_warps: int) -> None:
    """Set the CUDA launch settings for the calls that follow (``benchmarks/sweep.py``; process-wide)."""
    _cuda_module()._set_cuda_launch(row_threads, scorer_warps)


def _cuda_module() -> ModuleType:
    if not cuda_compiled():
        raise RuntimeError(f"pof_fast._C was built without CUDA kernels ({reason() or 'CPU-only build'})")
    return _module


def compiled_ops() -> str:
    """'none', 'CPU' or 'CPU+CUDA': what ``pof_fast.backends()`` reports."""
    if not available():
        return "none"
    return "CPU+CUDA" if cuda_compiled() else "CPU"


def ops():
    """``torch.ops.pof_fast``, after loading the extension (raises if it is unavailable)."""
    if not available():
        raise RuntimeError(f"pof_fast._C is unavailable: {reason()}")
    return torch.ops.pof_fast
