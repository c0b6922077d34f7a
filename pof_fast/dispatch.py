"""Backend registry: which implementation runs an op, and why the others cannot.

A backend is a :class:`Backend` subclass registered under a name. ``backend="auto"`` takes the
first available backend in :data:`PREFERENCE` that handles the tensors' device; a backend that
fails to load or to launch is reported once with a one-line warning and the call falls back to
``"torch"``. Nothing here imports Triton or the compiled extension until a backend is asked for.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from . import drivers, reference
from .drivers import SearchOutcome, SearchPlan
from .reference import HeadGradient

# Fastest first, per device type.
# On the CPU, Triton is chosen only where the caller set TRITON_INTERPRET=1 (see its handles()).
PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("triton", "cpp", "torch")}
# name -> "module:Class", imported on first use so that ``import pof_fast`` stays cheap.
REGISTRY = {
    "torch": "pof_fast.dispatch:TorchBackend",
    "triton": "pof_fast.backend_triton:TritonBackend",
    "cpp": "pof_fast.backend_cpp:CppBackend",
    "cuda": "pof_fast.backend_cpp:CudaBackend",
}


class Backend:
    """The ops one implementation provides. Subclasses override what they accelerate.

    The defaults are the plain PyTorch reference, so a backend may accelerate a single op.
    """

    name = "base"

    def status(self) -> Union[bool, str]:
        """True when usable, else a short reason (e.g. ``"no GPU"``)."""
        return True

    def handles(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` may be given to this backend."""
        return True

    def line_stats(
        self, logits: Tensor, direction: Tensor, target: Tensor, steps: Tensor, ignore_index: int
    ) -> Tensor:
        """``[3, K]`` loss, slope, curvature at each step; see :func:`reference.line_stats`."""
        return reference.line_stats(logits, direction, target, steps, ignore_index)

    def head_gradient(
        self, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
        ignore_index: int, normalized: bool,
    ) -> HeadGradient:
        return reference.head_gradient(features, weight, bias, target, ignore_index, normalized)

    def direction_logits(self, features: Tensor, grad: HeadGradient) -> Tensor:
        """``[n, C]`` d = h u_W^T + u_b."""
        return reference.direction_logits(features, grad.grad_weight, grad.grad_bias, grad.scale)

    def search(self, logits: Tensor, direction: Tensor, target: Tensor, plan: SearchPlan) -> SearchOutcome:
        """Run the plan's method over stored z0 and d with this backend's ``line_stats``."""
        def stats(steps: Tensor) -> Tensor:
            return self.line_stats(logits, direction, target, steps, plan.ignore_index)

        return drivers.run(stats, plan, logits.device)

    def line_search(
        self, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, plan: SearchPlan
    ) -> tuple[HeadGradient, SearchOutcome]:
        """Gradient, direction logits and the search, composed from the ops above.

        The HeadGradient's tensors must be fresh (no aliasing of the inputs or of anything kept): the
        public API scales ``grad_weight`` and ``grad_bias`` into the directions in place.
        """
        grad = self.head_gradient(features, weight, bias, target, plan.ignore_index, plan.normalized)
        direction = self.direction_logits(features, grad)
        return grad, self.search(grad.logits, direction, target, plan)


class TorchBackend(Backend):
    """Vectorised eager PyTorch (all candidates broadcast at once): runs everywhere."""

    name = "torch"


_loaded: Dict[str, Union[Backend, str]] = {}
_warned: set = set()


def _load(name: str) -> Union[Backend, str]:
    """The backend object, or the reason it is unavailable (cached)."""
    if name not in _loaded:
        try:
            module, cls = REGISTRY[name].split(":")
            backend = getattr(importlib.import_module(module), cls)()
            status = backend.status()
            _loaded[name] = backend if status is True else str(status)
        except Exception as exc:  # a broken optional backend must never break the package
            _loaded[name] = f"failed to load: {type(exc).__name__}: {exc}"
    return _loaded[name]


def backends() -> Dict[str, Union[bool, str]]:
    """``{name: True or the reason it is unavailable}`` for every known backend."""
    return {name: (True if isinstance(_load(name), Backend) else _load(name)) for name in REGISTRY}


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend object for a request; ``"auto"`` picks the fastest usable one for ``device``."""
    if backend != "auto" and backend not in REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(REGISTRY)}, got {backend!r}")
    candidates = PREFERENCE.get(device.type, ("torch",)) if backend == "auto" else (backend,)
    for name in candidates:
        if name not in REGISTRY:
            continue
        loaded = _load(name)
        if isinstance(loaded, Backend) and loaded.handles(device):
            return loaded
        if backend != "auto":
            reason = loaded if isinstance(loaded, str) else f"does not handle {device.type} tensors"
            warn_once(f"{name}:{reason}", f"pof_fast: backend {name!r} unavailable ({reason}); using 'torch'")
    return _load("torch")  # type: ignore[return-value]


def fallback(backend: Backend, exc: Exception) -> Backend:
    """After ``backend`` failed at launch: mark it unavailable, warn once, return ``torch``."""
    reason = f"failed at launch: {type(exc).__name__}: {exc}".splitlines()[0]
    _loaded[backend.name] = reason
    warn_once(f"{backend.name}:launch", f"pof_fast: backend {backend.name!r} {reason}; using 'torch'")
    return _load("torch")  # type: ignore[return-value]
