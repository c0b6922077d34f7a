"""The Triton backend: fused K-candidate line statistics, fused head gradient, logits-free large heads.

Kernels live in the top-level ``kernels/`` folder, installed as ``pof_fast.kernels`` (``setup.py``
``package_dir``). From a source checkout (``kernels/`` beside ``pof_fast/``, nothing installed),
:func:`load_kernels` registers that folder as ``pof_fast.kernels`` on first use, so both layouts
import the same way and ``import pof_fast`` itself never imports Triton.

Runs on CUDA tensors; on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``, which
must be set before the kernels are first imported). float64 inputs go to the reference ops (the
kernels accumulate in fp32).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import drivers, reference
from .._types import (HeadGradient, SearchOutcome, SearchPlan, SearchTensors, accumulation_dtype, assemble,
                      gram_cheaper)
from .base import Backend, BackendUnavailable, register_search_op

__all__ = ["TritonBackend", "load_kernels", "interpreting", "LOGITS_FREE_ELEMENTS", "RESIDUAL_CHUNK_ELEMENTS"]

# line_search switches to the logits-free path when n * C exceeds this: storing z0, d (fp32) and R
# would then take >= 1.5 GiB. Chosen for memory, not tuned for speed (no sweep of this threshold was run; on
# the H200, BENCHMARKS.md, the stored path searched cases A-C and the logits-free path full-size case D): below
# it, cuBLAS products plus the stored-logits kernels do less arithmetic than recomputing tiles per call.
LOGITS_FREE_ELEMENTS = 1 << 27
# The logits-free gradient materialises z0 and R for at most this many elements at once (64 MiB of
# fp32 R per chunk); not tuned, chosen to bound memory while keeping each g_W += R^T h product large.
RESIDUAL_CHUNK_ELEMENTS = 1 << 24


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load_kernels() -> ModuleType:
    """``pof_fast.kernels``: the installed subpackage, or the source tree's ``kernels/`` folder."""
    name = "pof_fast.kernels"
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        folder = os.path.join(os.path.dirname(package), "kernels")
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"pof_fast.kernels is not installed and {folder} has no kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(sys.modules["pof_fast"], "kernels", module)
    for sub in ("line_stats", "head_residual", "logits_free"):
        importlib.import_module(f"{name}.{sub}")
    return sys.modules[name]


def _on_kernels(*tensors: Tensor) -> bool:
    """Whether the kernels take these tensors: all of one dtype among theirs (others go to the reference ops)."""
    dtypes = {t.dtype for t in tensors}
    return len(dtypes) == 1 and dtypes <= set(load_kernels().line_stats.FLOAT_DTYPES)


def _compile_errors() -> tuple:
    """Triton's errors that mean its kernels cannot be built for this device (not a runtime failure)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    errors = [CompilationError, OutOfResources]
    try:
        from triton.runtime.errors import PTXASError
        errors.append(PTXASError)
    except ImportError:  # older Triton has no PTXASError
        pass
    return tuple(errors)


@register_search_op
class TritonBackend(Backend):
    """Triton kernels behind the :class:`pof_fast.backends.base.Backend` ops.

    ``compose`` stores z0 and d (``[n, C]``) unless n * C > :data:`LOGITS_FREE_ELEMENTS`, or
    ``plan.logits_free=True`` forces it (``False`` forbids it); the logits-free path returns a
    ``HeadGradient`` whose ``logits`` and ``residual`` are None.
    """

    name = "triton"

    def status(self) -> Union[bool, str]:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton not installed"
        if not torch.cuda.is_available() and not interpreting():
            return "no GPU (set TRITON_INTERPRET=1 to run on the CPU)"
        load_kernels()
        return True

    def handles(self, device: torch.device) -> bool:
        device = torch.device(device)
        return device.type == "cuda" or (device.type == "cpu" and interpreting())

    def plan_path(self, features: Tensor, weight: Tensor, plan: SearchPlan) -> str:
        if not _on_kernels(features, weight):
            return "torch"  # the reference ops under the Python driver
        return "triton-logits-free" if self._logits_free(features, weight, plan) else "triton"

    def line_path(self, logits: Tensor, direction: Tensor) -> str:
        kinds = load_kernels().line_stats.FLOAT_DTYPES
        return "triton" if logits.dtype in kinds and direction.dtype in kinds else "torch"

    @staticmethod
    def _logits_free(features: Tensor, weight: Tensor, plan: SearchPlan) -> bool:
        """``plan.logits_free``, or (None) whether n * C exceeds :data:`LOGITS_FREE_ELEMENTS`."""
        if plan.logits_free is not None:
            return plan.logits_free
        return features.shape[0] * weight.shape[0] > LOGITS_FREE_ELEMENTS

    def line_stats(
        self, logits: Tensor, direction: Tensor, target: Tensor, steps: Tensor, ignore_index: int
    ) -> Tensor:
        kinds = load_kernels().line_stats.FLOAT_DTYPES
        if logits.dtype not in kinds or direction.dtype not in kinds:  # the kernel mixes the two float dtypes
            return super().line_stats(logits, direction, target, steps, ignore_index)
        return load_kernels().line_stats.line_stats(logits, direction, target, steps, ignore_index)

    def head_gradient(
        self, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
        ignore_index: int, normalized: bool,
    ) -> HeadGradient:
        """z0 and g_W by cuBLAS; R, g_b, ||g|| and the scale by the fused kernels (no host sync)."""
        if not _on_kernels(features, weight):
            return super().head_gradient(features, weight, bias, target, ignore_index, normalized)
        k = load_kernels()
        logits = F.linear(features, weight, bias)
        count = reference.count_rows(target, ignore_index)
        residual = k.head_residual.head_residual(logits, target, count, ignore_index)
        grad_weight = residual.t() @ features.float()
        grad_bias, grad_norm, scale = k.head_residual.gradient_norm(
            residual, grad_weight, None, bias is not None, normalized
        )
        return HeadGradient(logits, residual, grad_weight, grad_bias, grad_norm, scale)

    def direction_logits(self, features: Tensor, grad: HeadGradient) -> Tensor:
        """``[n, C]`` fp32 d = (h u_W^T + u_b), the scale applied from device memory."""
        return self._raw_direction(features, grad) * grad.scale

    @staticmethod
    def _raw_direction(features: Tensor, grad: HeadGradient) -> Tensor:
        """``[n, C]`` fp32 h g_W^T + g_b, unscaled.

        Gram form (SPEC section 4) when n < D C / (D + C): (h h^T) R + g_b costs n^2 (D + C)
        multiply-adds against n D C for h g_W^T (g_W = R^T h is needed either way). Needs R.
        """
        h = features.to(grad.grad_weight.dtype)
        n, dim = h.shape
        classes = grad.grad_weight.shape[0]
        if grad.residual is not None and gram_cheaper(n, dim, classes):
            d = (h @ h.t()) @ grad.residual
        else:
            d = h @ grad.grad_weight.t()
        return d + grad.grad_bias if grad.grad_bias is not None else d

    def compose(
        self, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, plan: SearchPlan
    ) -> SearchTensors:
        """Gradient then the plan's driver (the direction scale applied inside the kernels), assembled.

        A kernel Triton cannot build for this device raises :class:`BackendUnavailable`.
        """
        try:
            return assemble(*self._search(features, weight, bias, target, plan))
        except _compile_errors() as exc:
            raise BackendUnavailable(f"Triton cannot build its kernels here ({type(exc).__name__}: {exc})") from exc

    def _search(
        self, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, plan: SearchPlan
    ) -> tuple[HeadGradient, SearchOutcome]:
        if not _on_kernels(features, weight):
            grad = self.head_gradient(features, weight, bias, target, plan.ignore_index, plan.normalized)
            return grad, self.search(grad.logits, self.direction_logits(features, grad), target, plan)
        if self._logits_free(features, weight, plan):
            return self._line_search_logits_free(features, weight, bias, target, plan)
        grad = self.head_gradient(features, weight, bias, target, plan.ignore_index, plan.normalized)
        direction = self._raw_direction(features, grad)
        scorer = load_kernels().line_stats.line_stats

        def stats(steps: Tensor) -> Tensor:
            return scorer(grad.logits, direction, target, steps, plan.ignore_index, scale=grad.scale)

        return grad, drivers.run(stats, plan, features.device, accumulation_dtype(features.dtype))

    def _line_search_logits_free(
        self, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, plan: SearchPlan
    ) -> tuple[HeadGradient, SearchOutcome]:
        """No ``[n, C]`` buffer: g_W from row chunks of R, then every candidate pass on recomputed tiles."""
        k = load_kernels()
        n, dim = features.shape
        classes = weight.shape[0]
        count = reference.count_rows(target, plan.ignore_index)
        h = features.float()
        grad_weight = torch.zeros(classes, dim, device=features.device, dtype=torch.float32)
        grad_bias = torch.zeros(classes, device=features.device, dtype=torch.float32) if bias is not None else None
        rows = max(1, RESIDUAL_CHUNK_ELEMENTS // classes)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            logits = F.linear(features[start:stop], weight, bias)
            residual = k.head_residual.head_residual(logits, target[start:stop], count, plan.ignore_index)
            grad_weight.addmm_(residual.t(), h[start:stop])
            if grad_bias is not None:
                grad_bias += residual.sum(0)
        grad_bias, grad_norm, scale = k.head_residual.gradient_norm(
            None, grad_weight, grad_bias, bias is not None, plan.normalized
        )
        # 16-bit inputs: d is formed on tensor cores from g_W in the input dtype, so that rounded g_W is
        # the direction searched along and the one returned (||g|| stays the fp32 one); rounded in place, so
        # that the only [C, D] array beside the returned one is the 16-bit copy the scorer reads. fp32: no-ops.
        rounded = grad_weight.to(features.dtype)
        grad_weight.copy_(rounded)
        grad = HeadGradient(None, None, grad_weight, grad_bias, grad_norm, scale)  # type: ignore[arg-type]
        scorer = k.logits_free.line_stats_logits_free

        def stats(steps: Tensor) -> Tensor:
            return scorer(features, weight, bias, rounded, grad_bias, scale, target, steps, plan.ignore_index)

        return grad, drivers.run(stats, plan, features.device, accumulation_dtype(features.dtype))

