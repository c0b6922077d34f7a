"""Backends on the compiled extension ``pof_fast._C`` (csrc/): ``"cpp"`` (CPU) and ``"cuda"``.

The whole search is one native op, ``torch.ops.pof_fast.line_search`` (csrc/line_search.cpp): z0, the
fused residual, g_W, g_b, ||g||, d, the bracket_grid/grid/newton driver and the result assembly, with
no Python in between. The parts are ops too (``line_stats``, ``head_gradient``, ``direction_logits``,
``search``) for the benchmarks' floors and the tests. The extension is loaded through
:mod:`pof_fast._ext` only.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _ext, plans
from .._types import HALF_DTYPES, HeadGradient, SearchOutcome, SearchPlan, SearchTensors, gram_cheaper
from .base import Backend, BackendUnavailable

__all__ = ["CppBackend", "CudaBackend", "NARROW_CLASSES", "stores_16bit_lines"]

# csrc/line_stats.cpp kNarrow: fp32-accumulated rows of at most this many classes put candidates in the SIMD lanes.
NARROW_CLASSES = 32


def stores_16bit_lines(features: Tensor, weight: Tensor) -> bool:
    """csrc/common.h ``stores_16bit_lines``: 16-bit inputs whose d is formed as h u_W^T keep z0 and d in 16 bits."""
    return features.dtype in HALF_DTYPES and not gram_cheaper(*features.shape, weight.shape[0])


def _cpu_scorer_path(classes: int, dtype: torch.dtype, stored_16bit: bool) -> str:
    """The CPU scorer's path (a row of :data:`pof_fast.plans.NEWTON_PLANS`): narrow rows, 16-bit storage, or wide."""
    if dtype != torch.float64 and classes <= NARROW_CLASSES:
        return "cpp-narrow"
    return "cpp-16bit" if stored_16bit else "cpp-wide"


class CppBackend(Backend):
    """The compiled CPU kernels: at::parallel_for over row blocks, vectorised lanes, fp32 accumulation."""

    name = "cpp"
    device_type = "cpu"

    @property
    def op(self):  # type: ignore[override]
        return _ext.ops().line_search

    def status(self) -> Union[bool, str]:
        if not _ext.available():
            return f"extension not built or failed to load ({_ext.reason()})"
        return True

    def handles(self, device: torch.device) -> bool:
        return device.type == self.device_type

    def plan_path(self, features: Tensor, weight: Tensor, plan: SearchPlan) -> str:
        return _cpu_scorer_path(weight.shape[0], features.dtype, stores_16bit_lines(features, weight))

    def line_path(self, logits: Tensor, direction: Tensor) -> str:
        stored_16bit = logits.dtype in HALF_DTYPES and direction.dtype in HALF_DTYPES
        return _cpu_scorer_path(logits.shape[1], logits.dtype, stored_16bit)

    def line_stats(
        self, logits: Tensor, direction: Tensor, target: Tensor, steps: Tensor, ignore_index: int
    ) -> Tensor:
        return _ext.ops().line_stats(logits, direction, target, steps, ignore_index)

    def head_gradient(
        self, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
        ignore_index: int, normalized: bool,
    ) -> HeadGradient:
        logits, residual, grad_weight, grad_bias, grad_norm, scale = _ext.ops().head_gradient(
            features, weight, bias, target, ignore_index, normalized
        )
        return HeadGradient(logits, residual, grad_weight, grad_bias if bias is not None else None, grad_norm, scale)

    def direction_logits(self, features: Tensor, grad: HeadGradient) -> Tensor:
        return _ext.ops().direction_logits(features, grad.grad_weight, grad.grad_bias, grad.scale, grad.residual)

    def search(self, logits: Tensor, direction: Tensor, target: Tensor, plan: SearchPlan) -> SearchOutcome:
        plan = plans.resolve(plan, self.line_path(logits, direction))
        return SearchOutcome(*_ext.ops().search(
            logits, direction, target, plan.method, plan.init_step, plan.max_step, plan.partitions,
            plan.ignore_index, plan.newton_iterations, plan.newton_points,
        ))


class CudaBackend(CppBackend):
    """The compiled CUDA kernels: warp-per-row scoring and the whole search driver in one launch."""

    name = "cuda"
    device_type = "cuda"

    def plan_path(self, features: Tensor, weight: Tensor, plan: SearchPlan) -> str:
        return "cuda"

    def line_path(self, logits: Tensor, direction: Tensor) -> str:
        return "cuda"

    def status(self) -> Union[bool, str]:
        built = super().status()
        if built is not True:
            return built
        if not _ext.cuda_compiled():
            return "extension built without CUDA"
        if not torch.cuda.is_available():
            return "no GPU"
        return True

    def line_search(
        self, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, plan: SearchPlan
    ) -> SearchTensors:
        """The native op; a GPU the extension was not compiled for makes the backend unavailable."""
        try:
            return super().line_search(features, weight, bias, target, plan)
        except RuntimeError as exc:
            if "no kernel image is available" in str(exc):
                raise BackendUnavailable(f"the extension has no kernels for this GPU ({exc})") from exc
            raise
