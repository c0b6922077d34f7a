"""Sharpness-aware minimisation (Foret et al., ICLR 2021): the base optimizer steps with the gradient taken at
``w + rho g / ||g||``, ``g`` the gradient at ``w`` (the norm over all parameters).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor

__all__ = ["SAM"]


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around a base optimizer (Foret et al., 2021).

    ``step(closure)``: the closure zeroes the gradients, computes the loss, calls ``backward()`` and returns the
    loss. SAM calls it at ``w`` (gradient ``g``), moves to ``w + e`` with ``e = rho g / ||g||`` (``||g||`` over
    every parameter), calls it again, moves back to ``w`` and steps the base optimizer with the gradient taken
    at ``w + e``. Returns the loss at ``w``. The closure is told which pass it is in by ``SAM.second_pass``
    (True during the second call), e.g. to keep BatchNorm statistics from moving twice.
    """

    def __init__(self, params: Any, base_optimizer: Type[torch.optim.Optimizer], rho: float = 0.05,
                 **base_kwargs: Any) -> None:
        if not (isinstance(rho, (int, float)) and 0.0 <= rho < math.inf):
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
        super().__init__(params, dict(rho=rho, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.second_pass = False

    @torch.no_grad()
    def _ascend(self) -> List[Tuple[Tensor, Tensor]]:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return []
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
        moved = []
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is not None:
                    e = (p.grad.double() * scale).to(p.dtype)
                    p.add_(e)
                    moved.append((p, e))
        return moved

    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise TypeError("SAM needs a closure: opt.step(closure), where the closure zeroes the gradients, "
                            "computes the loss, calls backward() and returns the loss")
        with torch.enable_grad():
            loss = closure()
        moved = self._ascend()
        self.second_pass = True
        try:
            with torch.enable_grad():
                closure()
        finally:
            self.second_pass = False
            with torch.no_grad():
                for p, e in moved:
                    p.sub_(e)
        self.base_optimizer.step()
        return loss

    def state_dict(self) -> Dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
