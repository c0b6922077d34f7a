"""Argument checks shared by the public functions: clear errors that name the argument.

Shape, dtype and device checks cost nothing. The public functions check the data (NaN/inf, labels out
of range, every label ignored) by one host read of their own result; only when that fails does
:func:`data` read the inputs to name the bad argument.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._types import DIRECTIONS, FLOAT_DTYPES, METHODS


def tensor(name: str, value: object, ndim: int) -> Tensor:
    """``value`` must be a float tensor of rank ``ndim``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float64/float16/bfloat16), got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    return value


def row_features(name: str, value: object) -> Tensor:
    """``value`` must be a float tensor ``[..., D]`` of rank >= 2 (rows over its leading dimensions)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() < 2:
        raise ValueError(f"{name} must have shape [n, D] or [..., D] (rows over the leading dimensions), "
                         f"got shape {tuple(value.shape)}")
    return tensor(name, value, value.dim())


def target_tensor(target: object, rows: "int | tuple[int, ...]") -> Tensor:
    """``target`` must be an integer tensor of shape ``[rows]`` (or the given leading shape) with no zero size;
    returned as int64 ``[prod(shape)]``, a view where the layout allows."""
    shape = (rows,) if isinstance(rows, int) else tuple(rows)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor (int64 class indices), got {target.dtype}")
    if tuple(target.shape) != shape:
        raise ValueError(f"target must have shape {list(shape)} (one label per row), got {tuple(target.shape)}")
    if target.numel() == 0:
        raise ValueError("the batch is empty: features/logits and target have 0 rows")
    return target.reshape(-1).long()


def same_device(**tensors: Optional[Tensor]) -> torch.device:
    """All given tensors on one device; returns it."""
    named = [(k, v) for k, v in tensors.items() if v is not None]
    device = named[0][1].device
    for name, value in named[1:]:
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but {named[0][0]} is on {device}: put them on one device")
    return device


def integer(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def shape(name: str, value: Tensor, expected: tuple, meaning: str) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(f"{name} must have shape {list(expected)} ({meaning}), got {list(value.shape)}")


def choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def positive(name: str, value: object, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite {'integer' if integer else 'number'}, got {value!r}")


def search_options(method: object, direction: object, init_step: object, max_step: object, partitions: object,
                   ignore_index: object) -> None:
    """The search's hyperparameters, as :func:`pof_fast.line_search` and :class:`pof_fast.PoF` take them."""
    choice("method", method, METHODS)
    choice("direction", direction, DIRECTIONS)
    positive("init_step", init_step)
    positive("max_step", max_step)
    positive("partitions", partitions, integer=True)
    integer("ignore_index", ignore_index)


def data(
    floats: dict, target: Tensor, classes: int, ignore_index: int, allow_all_ignored: bool
) -> None:
    """NaN/inf in any of ``floats``, labels outside [0, classes) other than ignore_index, and
    (unless allowed) every label ignored, with one host synchronisation for all of them."""
    names = [k for k, v in floats.items() if v is not None]
    counted = target != ignore_index
    flags = [~torch.isfinite(floats[k]).all() for k in names]
    flags.append((counted & ((target < 0) | (target >= classes))).any())
    flags.append(~counted.any())
    bad = torch.stack(flags).tolist()
    for name, is_bad in zip(names, bad):
        if is_bad:
            raise ValueError(f"{name} contains NaN or inf")
    if bad[-2]:
        lo, hi = int(target[counted].min()), int(target[counted].max())
        raise ValueError(
            f"target has labels outside [0, {classes}) (min {lo}, max {hi}) that are not ignore_index={ignore_index}"
        )
    if bad[-1] and not allow_all_ignored:
        raise ValueError(f"every label in target equals ignore_index={ignore_index}: the mean loss is undefined")
