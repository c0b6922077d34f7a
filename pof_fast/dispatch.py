"""Backend registry: which implementation runs an op, and why the others cannot.

``backend="auto"`` takes the first available backend in :data:`PREFERENCE` that handles the
tensors' device. A backend that cannot load (no extension, no Triton, no GPU) is reported once with a
one-line warning and the call goes to ``"torch"``; so is one whose kernels cannot be built for this
device (it raises :class:`~pof_fast.backends.base.BackendUnavailable` on first use). Every other
error of a backend that loaded (out of memory, bad input) is raised as it is and disables nothing.
Nothing here imports Triton or the compiled extension until a backend is asked for. With
``POF_FAST_REQUIRE_EXT=1`` an extension that cannot load is an error (:class:`pof_fast._ext.Required`), not a fallback.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Dict, TypeVar, Union

import torch

from . import _ext
from .backends.base import Backend, BackendUnavailable

__all__ = ["PREFERENCE", "REGISTRY", "BackendReport", "backends", "load", "resolve", "run", "check_backend"]

# Fastest first, per device type.
# On the CPU, Triton is chosen only where the caller set TRITON_INTERPRET=1 (see its handles()).
PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("triton", "cpp", "torch")}
# name -> "module:Class", imported on first use so that ``import pof_fast`` stays cheap.
REGISTRY = {
    "torch": "pof_fast.backends.torch:TorchBackend",
    "triton": "pof_fast.backends.triton:TritonBackend",
    "cpp": "pof_fast.backends.compiled:CppBackend",
    "cuda": "pof_fast.backends.compiled:CudaBackend",
}

_loaded: Dict[str, Union[Backend, str]] = {}
_warned: set = set()
Result = TypeVar("Result")


def load(name: str) -> Union[Backend, str]:
    """The backend object, or the reason it is unavailable (cached)."""
    if name not in _loaded:
        try:
            module, cls = REGISTRY[name].split(":")
            backend = getattr(importlib.import_module(module), cls)()
            status = backend.status()
            _loaded[name] = backend if status is True else str(status)
        except _ext.Required:  # POF_FAST_REQUIRE_EXT=1: the caller asked for this to fail
            raise
        except Exception as exc:  # a broken optional backend must never break the package
            _loaded[name] = f"failed to load: {type(exc).__name__}: {exc}"
    return _loaded[name]


class BackendReport(dict):
    """``{name: True or the reason it is unavailable}`` for every known backend, and ``extension``: one line on the
    compiled extension (the torch it was built against and its stable-ABI target, the oldest torch it loads in, or
    why it is not there), printed after the statuses."""

    def __init__(self, statuses: Dict[str, Union[bool, str]], extension: str):
        super().__init__(statuses)
        self.extension = extension

    def __repr__(self) -> str:
        return f"{super().__repr__()} ({self.extension})"


def backends() -> BackendReport:
    """``{name: True or the reason it is unavailable}`` for every known backend; ``.extension`` says what
    ``pof_fast._C`` is."""
    statuses = {name: (True if isinstance(load(name), Backend) else load(name)) for name in REGISTRY}
    return BackendReport(statuses, _ext.describe())


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def check_backend(backend: object) -> str:
    """``backend`` must be ``"auto"`` or a registered name (checked without loading anything)."""
    if backend != "auto" and backend not in REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(REGISTRY)}, got {backend!r}")
    return backend  # type: ignore[return-value]


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend object for a request; ``"auto"`` picks the fastest usable one for ``device``."""
    check_backend(backend)
    candidates = PREFERENCE.get(device.type, ("torch",)) if backend == "auto" else (backend,)
    for name in candidates:
        loaded = load(name)
        if isinstance(loaded, Backend) and loaded.handles(device):
            return loaded
        if backend != "auto":
            reason = loaded if isinstance(loaded, str) else f"does not handle {device.type} tensors"
            warn_once(f"{name}:{reason}", f"pof_fast: backend {name!r} unavailable ({reason}); using 'torch'")
    return load("torch")  # type: ignore[return-value]


def run(backend: str, device: torch.device, call: Callable[[Backend], Result]) -> Result:
    """``call(resolved backend)``; if that backend turns out unable to run here at all, mark it so,
    warn once and run ``call`` on ``torch``. Any other error is raised as it is."""
    chosen = resolve(backend, device)
    try:
        return call(chosen)
    except BackendUnavailable as exc:
        reason = str(exc).splitlines()[0]
        _loaded[chosen.name] = reason
        warn_once(f"{chosen.name}:unavailable", f"pof_fast: backend {chosen.name!r} unavailable ({reason}); using 'torch'")
        return call(load("torch"))  # type: ignore[arg-type]
