"""The head PoF holds fixed: theta0, the perturbation and the restore, on the whole head or this rank's rows.

A plain ``nn.Linear`` is written as it is. A head whose weight is a DTensor sharded by classes (FSDP2's
``fully_shard``, ``ColwiseParallel``, 2-D meshes) keeps theta0 as this rank's rows ``[C_r, D]`` and writes the
perturbation into the local rows in place: FSDP2's next all-gather hands the forward the perturbed head, and
nothing gathers the head here. The layout is read once, at construction (:func:`pof_fast.distributed.head_layout`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from .distributed import HeadLayout, head_layout, is_dtensor

__all__ = ["FixedHead", "check_not_partitioned"]


def check_not_partitioned(head: nn.Module) -> None:
    """Refuse a DeepSpeed ZeRO-3 partitioned head: its weight is an empty placeholder (``ds_shape`` the real one)."""
    weight = getattr(head, "weight", None)
    if weight is not None and (hasattr(weight, "ds_id") or hasattr(weight, "ds_shape")) and weight.numel() == 0:
        raise ValueError(
            f"the head's weight is a DeepSpeed ZeRO-3 partitioned placeholder (shape {list(weight.shape)}, real shape "
            f"{list(getattr(weight, 'ds_shape', []))}): PoF needs the head's rows. Shard the model with FSDP2 "
            "(fully_shard; Trainer: fsdp_config={'fsdp_version': 2}), which PoF searches without gathering the head, "
            "or use DeepSpeed ZeRO-2 (the parameters are not partitioned)")


def _write_perturbed(param: Tensor, theta0: Tensor, coef: Tensor, direction: Tensor) -> None:
    """``param <- theta0 - coef * direction`` (coef 0-d), the value of that expression bit for bit.

    Where the three share a dtype it is written in place, -(coef u) + theta0, with no ``[C, D]`` temporary (an LM
    head's two fresh temporaries cost more than the arithmetic on the CPU); otherwise through the promoted expression,
    rounded once into ``param``.
    """
    if param.dtype == theta0.dtype == direction.dtype:
        torch.mul(direction, coef.to(direction.dtype), out=param)
        param.neg_().add_(theta0)
    else:
        param.copy_(theta0 - coef * direction)


class FixedHead:
    """theta0 of ``head`` and the writes into it (this rank's rows when the weight is a DTensor; see the module)."""

    def __init__(self, head: nn.Linear) -> None:
        self.module = head
        self.layout: Optional[HeadLayout] = None
        if is_dtensor(head.weight):
            self.layout = head_layout(head.weight, head.bias, bool(getattr(head, "_distribute_module_applied", False)))
        elif is_dtensor(head.bias):
            raise ValueError("the head's bias is a DTensor but its weight is not: shard both by classes, or neither")
        weight, bias = self.local()
        self.theta0_weight = weight.detach().clone()
        self.theta0_bias = None if bias is None else bias.detach().clone()

    @property
    def classes(self) -> int:
        """C, the head's classes (all ranks' rows together)."""
        return self.theta0_weight.shape[0] if self.layout is None else self.layout.classes

    def local(self) -> tuple[Tensor, Optional[Tensor]]:
        """The head's weight and bias as they are now, this rank's rows of a sharded head (plain tensors)."""
        weight, bias = self.module.weight, self.module.bias
        if self.layout is None:
            return weight, bias
        if not self.layout.matches(weight):
            raise RuntimeError(
                "the head's weight is no longer this rank's rows as they were when PoF was built (FSDP2 keeps a root's "
                "parameters gathered after a forward that no backward followed, e.g. a search forward): a perturbation "
                "written into the rows would not reach the next forward. Call model.reshard() on the FSDP2 module "
                "holding the head first (or fully_shard(model.lm_head) on its own)")
        with torch.no_grad():
            return weight.to_local(), None if bias is None else bias.to_local()

    @torch.no_grad()
    def write(self, coef: Tensor, weight_direction: Tensor, bias_direction: Optional[Tensor]) -> None:
        """theta0 - coef * u into the head (its local rows), in place."""
        weight, bias = self.local()
        _write_perturbed(weight, self.theta0_weight, coef, weight_direction)
        if bias is not None:
            _write_perturbed(bias, self.theta0_bias, coef, bias_direction)

    @torch.no_grad()
    def restore(self) -> None:
        """The head back to theta0, bit-exactly."""
        weight, bias = self.local()
        weight.copy_(self.theta0_weight)
        if bias is not None:
            bias.copy_(self.theta0_bias)

    @torch.no_grad()
    def retake(self) -> None:
        """theta0 anew from the head as it is now."""
        weight, bias = self.local()
        self.theta0_weight.copy_(weight)
        if bias is not None:
            self.theta0_bias.copy_(bias)

    def moved(self) -> bool:
        """Whether the head (this rank's rows) differs from theta0 (one host read)."""
        weight, bias = self.local()
        return not torch.equal(weight, self.theta0_weight) or (bias is not None and not torch.equal(bias, self.theta0_bias))

    def nonfinite(self) -> Optional[str]:
        """The name of the head's first parameter with a NaN or inf (this rank's rows), or None (host reads)."""
        weight, bias = self.local()
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None and not bool(torch.isfinite(p).all()):
                return name
        return None

    # -- checkpoints: a sharded theta0 as DTensors laid out as the head, so torch.distributed.checkpoint saves shards

    def state(self) -> Dict[str, Any]:
        return {"theta0_weight": self._global(self.theta0_weight.clone()),
                "theta0_bias": None if self.theta0_bias is None else self._global(self.theta0_bias.clone())}

    def _global(self, rows: Tensor) -> Tensor:
        """This rank's ``rows`` as a DTensor laid out as the head (its whole shape C x ...)."""
        if self.layout is None:
            return rows
        from torch.distributed.tensor import DTensor

        shape = torch.Size([self.layout.classes, *rows.shape[1:]])
        return DTensor.from_local(rows, self.layout.mesh, self.layout.placements, run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def loadable(self, name: str, value: Tensor) -> Tensor:
        """This rank's part of a saved theta0 ``value`` (a DTensor laid out as the head, or a plain tensor)."""
        own = self.theta0_weight if name == "theta0_weight" else self.theta0_bias
        if self.layout is None:
            if is_dtensor(value):
                raise ValueError(f"state_dict['{name}'] is a DTensor but this PoF's head is not sharded")
            return value
        if not is_dtensor(value):
            raise ValueError(f"state_dict['{name}'] is a plain tensor but this PoF's head is sharded: load the "
                             "checkpoint with torch.distributed.checkpoint into pof.state_dict() (DTensors)")
        if value.device_mesh != self.layout.mesh or tuple(value.placements) != self.layout.placements:
            raise ValueError(f"state_dict['{name}'] is laid out as {tuple(value.placements)} on {value.device_mesh}, "
                             f"this head as {self.layout.placements} on {self.layout.mesh}: load it on the same mesh")
        value = value.to_local()
        if value.shape != own.shape:
            raise ValueError(f"state_dict['{name}'] holds {list(value.shape)} rows here, the head {list(own.shape)}")
        return value
