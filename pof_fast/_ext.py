"""The only module that imports the compiled extension ``pof_fast._C``.

``pof_fast._C`` is built on the LibTorch stable ABI (csrc/torch_calls.h): one binary loads in every torch from its
ABI target on. Its build line (the torch it was compiled against, that target, CUDA) is read from the module, or,
when it cannot load, from the file itself, so that the failure names the torch it was built for.

The import is tried once, on first use; a failure is kept (``reason()``) and reported with one
warning, and every caller falls back to the ``"torch"`` backend; with ``POF_FAST_REQUIRE_EXT=1`` in the
environment it raises :class:`Required` instead, in any process. A successful import registers
``torch.ops.pof_fast.*`` and, here, their fake kernels so that ``torch.compile`` can trace them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional

import torch

from ._types import HALF_DTYPES, empty_search_tensors, gram_cheaper
from ._types import accumulation_dtype as _accumulation

__all__ = ["REQUIRE_ENV", "Required", "available", "reason", "build", "describe", "cuda_compiled", "compiled_ops",
           "ops"]

REQUIRE_ENV = "POF_FAST_REQUIRE_EXT"
# csrc/bindings.cpp kBuild: "pof_fast._C build: torch=2.13.0; abi=2.10; cuda=none;" (cuda: CUDART_VERSION, e.g. 13000).
_BUILD_PREFIX = "pof_fast._C build: "

_module: Optional[ModuleType] = None
_error: Optional[BaseException] = None
_tried = False


class Required(ImportError):
    """``POF_FAST_REQUIRE_EXT=1`` and ``pof_fast._C`` cannot load: raised at first use instead of falling back."""


class CudaMismatch(ImportError):
    """``pof_fast._C`` holds CUDA kernels of another CUDA major than torch's (or torch is no CUDA build): it is not
    loaded; the message names the wheel to take."""


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


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


def _parse_build(line: str) -> Dict[str, str]:
    """``{"torch": ..., "abi": ..., "cuda": ...}`` from a build line."""
    fields = (item.split("=", 1) for item in line[len(_BUILD_PREFIX):].split(";") if "=" in item)
    return {key.strip(): value.strip() for key, value in fields}


def _file_build() -> Optional[Dict[str, str]]:
    """The build line compiled into the ``pof_fast._C`` file on the path (a module that cannot load cannot be asked),
    or None when there is no such file or it has none (not built, or built before the stable ABI)."""
    try:
        spec = importlib.util.find_spec("pof_fast._C")
        data = Path(spec.origin).read_bytes() if spec is not None and spec.origin else b""
    except (ImportError, OSError, ValueError):
        return None
    start = data.find(_BUILD_PREFIX.encode())
    if start < 0:
        return None
    end = data.find(b"\0", start)
    return _parse_build(data[start:end if end > 0 else None].decode("ascii", "replace"))


def _check_cuda_major() -> None:
    """Raise :class:`CudaMismatch` before loading a file whose CUDA kernels are of another CUDA major than torch's
    (its libcudart.so.<major> is not torch's; one that happened to load would run with a second CUDA runtime)."""
    built = (_file_build() or {}).get("cuda", "none")
    if not built.isdigit():
        return
    major, ours = int(built) // 1000, torch.version.cuda
    if ours is not None and int(ours.split(".")[0]) == major:
        return
    from . import __version__

    base = __version__.split("+")[0]
    if ours is None:
        have, take = "is not a CUDA build", f"the CPU wheel (pof_fast-{base}-cp310-abi3-manylinux_2_28_x86_64.whl)"
    else:
        want = ours.split(".")[0]
        have = f"is a CUDA {ours} build"
        take = f"the CUDA {want} wheel (pof_fast-{base}+cu{want}-cp310-abi3-manylinux_2_28_x86_64.whl)"
    raise CudaMismatch(f"pof_fast._C holds CUDA {major} kernels but torch {torch.__version__} {have}: take {take}")


def _load() -> Optional[ModuleType]:
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            _check_cuda_major()
            module = importlib.import_module("pof_fast._C")
            _register_fakes()
            _module = module
        except Exception as exc:  # not built, a torch older than its ABI target, missing libraries, ...
            _error = exc
            if not _required():
                warnings.warn(f"{_why()}; using the 'torch' backend ({_fix()})", RuntimeWarning, stacklevel=3)
    if _error is not None and _required():
        raise Required(f"{REQUIRE_ENV}=1 and {_why()}") from _error
    return _module


def _why() -> str:
    """The failure kept by _load, as one sentence."""
    if isinstance(_error, CudaMismatch):
        return str(_error)
    first = str(_error).splitlines()[0] if str(_error) else ""
    error = f"{type(_error).__name__}: {first}"
    if isinstance(_error, ModuleNotFoundError) and _error.name == "pof_fast._C":
        return f"pof_fast._C is not built ({error})"
    build = _file_build()
    if build is None:
        return f"pof_fast._C cannot load in torch {torch.__version__}: {error}"
    return (f"pof_fast._C was built against torch {build.get('torch', '?')} (stable ABI, supports torch >= "
            f"{build.get('abi', '?')}); it cannot load in torch {torch.__version__}: {error}")


def _fix() -> str:
    build = "build it with `pip install --no-build-isolation .`"
    if isinstance(_error, ModuleNotFoundError):
        return build
    if isinstance(_error, CudaMismatch):
        return f"or {build} under this torch; {REQUIRE_ENV}=1 makes this an error"
    return f"use a torch it supports, or {build} under this one; {REQUIRE_ENV}=1 makes this an error"


def available() -> bool:
    """Whether ``pof_fast._C`` imported (tries once; raises :class:`Required` under ``POF_FAST_REQUIRE_EXT=1``)."""
    return _load() is not None


def reason() -> str:
    """Why the extension is unavailable ('' when it is available)."""
    return "" if available() else _why()


def build() -> Dict[str, str]:
    """The loaded extension's build line: ``torch`` (the torch it was compiled against), ``abi`` (its stable-ABI
    target: the oldest torch it loads in), ``cuda`` (the CUDA runtime version of its kernels, e.g. 13000, or
    ``none``)."""
    return _parse_build(_loaded().build)


def describe() -> str:
    """One line on the compiled extension: what it was built for, or why it is not there (``backends()``, ``pof-fast
    bench``)."""
    if not available():
        return _why()
    info = build()
    cuda = info.get("cuda", "none")
    kernels = "CPU kernels" if cuda == "none" else f"CPU and CUDA {int(cuda) // 1000}.{int(cuda) % 1000 // 10} kernels"
    return (f"pof_fast._C built against torch {info.get('torch', '?')}, stable ABI: loads in torch >= "
            f"{info.get('abi', '?')}; {kernels}")


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


def _loaded() -> ModuleType:
    """The extension module (raises if it is unavailable)."""
    if not available():
        raise RuntimeError(f"pof_fast._C is unavailable: {reason()}")
    return _module


def ops():
    """``torch.ops.pof_fast``, after loading the extension (raises if it is unavailable)."""
    _loaded()
    return torch.ops.pof_fast
