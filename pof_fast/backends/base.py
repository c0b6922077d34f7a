"""The backend interface: the ops one implementation provides, and its one registered search op.

A backend's whole ``line_search`` (head gradient, direction logits, search driver, result assembly)
is one op registered with ``torch.library`` and given a fake kernel, so ``torch.compile`` and CUDA
graph capture see a single node. The compiled backends' op is native (no Python between its launches);
the ``torch`` and ``triton`` ops run :meth:`Backend.compose` in Python, which a CUDA graph replay skips.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .. import drivers, plans, reference
from .._types import (HeadGradient, SearchOutcome, SearchPlan, SearchTensors, accumulation_dtype, assemble,
                      empty_search_tensors)

__all__ = ["Backend", "BackendUnavailable", "register_search_op"]

# A registered line_search op: (features, weight, bias, target, *the plan's fields) -> 8 tensors.
SearchOp = Callable[..., tuple]


class BackendUnavailable(RuntimeError):
    """The backend cannot run here at all (its kernels cannot load or compile for this device).

    The only error dispatch turns into a fallback; every other error (out of memory, bad input) is raised.
    """


class Backend:
    """The ops one implementation provides. Subclasses override what they accelerate.

    The defaults are the plain PyTorch reference, so a backend may accelerate a single op.
    ``op`` is the backend's registered ``line_search`` op (set by :func:`register_search_op`, or the
    compiled extension's); :meth:`compose` is the same search as plain Python calls, the op's implementation.
    """

    name = "base"
    op: Optional[SearchOp] = None

    def status(self) -> Union[bool, str]:
        """True when usable, else a short reason (e.g. ``"no GPU"``)."""
        return True

    def handles(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` may be given to this backend."""
        return True

    def plan_path(self, features: Tensor, weight: Tensor, plan: SearchPlan) -> str:
        """The row of :data:`pof_fast.plans.NEWTON_PLANS` that this backend's search of these inputs runs on."""
        return "torch"

    def line_path(self, logits: Tensor, direction: Tensor) -> str:
        """The same for a search over stored z0 and d (:meth:`search`)."""
        return "torch"

    def resolve_plan(self, plan: SearchPlan, features: Tensor, weight: Tensor) -> SearchPlan:
        """``plan`` with its path's rounds x points where it leaves them None (:func:`pof_fast.plans.resolve`)."""
        return plans.resolve(plan, self.plan_path(features, weight, plan))

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
        plan = plans.resolve(plan, self.line_path(logits, direction))

        def stats(steps: Tensor) -> Tensor:
            return self.line_stats(logits, direction, target, steps, plan.ignore_index)

        return drivers.run(stats, plan, logits.device, accumulation_dtype(logits.dtype))

    def compose(
        self, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, plan: SearchPlan
    ) -> SearchTensors:
        """Gradient, direction logits, the search and the result, composed from the ops above."""
        grad = self.head_gradient(features, weight, bias, target, plan.ignore_index, plan.normalized)
        direction = self.direction_logits(features, grad)
        return assemble(grad, self.search(grad.logits, direction, target, plan))

    def line_search(
        self, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, plan: SearchPlan
    ) -> SearchTensors:
        """The whole search as one call of the registered op (one graph node), with the plan of its path."""
        assert self.op is not None, f"backend {self.name!r} has no registered line_search op"
        plan = self.resolve_plan(plan, features, weight)
        return SearchTensors(*self.op(
            features, weight, bias, target, plan.method, plan.normalized, plan.init_step, plan.max_step,
            plan.partitions, plan.ignore_index, plan.newton_iterations, plan.newton_points, plan.logits_free,
        ))


def register_search_op(cls: type) -> type:
    """Class decorator: register ``pof_fast::<cls.name>_line_search`` running ``cls().compose`` as ``cls.op``."""
    impl = cls()

    @torch.library.custom_op(f"pof_fast::{cls.name}_line_search", mutates_args=())
    def line_search_op(
        features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, method: str, normalized: bool,
        init_step: float, max_step: float, partitions: int, ignore_index: int, newton_iterations: int,
        newton_points: int, logits_free: Optional[bool],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        plan = SearchPlan(method, normalized, init_step, max_step, partitions, ignore_index, newton_iterations,
                          newton_points, logits_free)
        return tuple(impl.compose(features, weight, bias, target, plan))

    @line_search_op.register_fake
    def _(features, weight, bias, target, *plan):
        return tuple(empty_search_tensors(features, weight, bias))

    cls.op = staticmethod(line_search_op)
    return cls
