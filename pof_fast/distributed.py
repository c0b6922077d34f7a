"""The search on the union of every rank's search batch, and on class-sharded heads (torch.distributed).

Union search (``process_group=g``): every rank computes its head-gradient pieces and, per scoring round,
its candidates' loss/slope/curvature sums; one all-reduce each makes them global, so every rank runs the
same search driver on the same numbers and gets bit-identical t*, direction and perturbation, equal (up to
fp32 rounding of the sums) to the single-process search on the concatenated batch. Collectives: one for
the gradient (g_W, g_b and the row count in one buffer), one per scoring round (:func:`collectives`). A
collective cannot run inside a kernel, so here the rounds are separate scorer launches with an all-reduce
between: the ``cuda`` backend's single-launch search is replaced by its scorer under the Python driver.

Class-sharded heads (``sharded_classes=True``: each rank holds rows ``W0[c0:c1]`` of a tensor-parallel head,
every rank the same search rows and labels): log-sum-exps, softmax moments and ``||g||`` are made global
across ranks; each rank gets its slice of the direction and the same t*. The per-rank pieces use the plain
PyTorch ops (accumulation in fp32, or fp64 for fp64 inputs).

DTensor heads (FSDP2's ``fully_shard``, tensor parallelism's ``ColwiseParallel``, both on 2-D meshes): the
layout (:class:`HeadLayout`) is read once from the weight's placements: the mesh, this rank's rows and first
class, the group of ranks holding the other rows, and which mesh dimensions bring their own tokens.
:func:`gather_rows` gathers the search rows (never the head) over those, then the class-sharded search runs on
the local rows. The search itself sees local tensors only.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import drivers, reference
from ._types import HeadGradient, SearchPlan, SearchTensors, accumulation_dtype, assemble
from .backends.base import Backend

__all__ = ["collectives", "class_range", "union_search", "sharded_search", "HeadLayout", "head_layout", "is_dtensor",
           "gather_rows", "local_rows", "group_of"]

ProcessGroup = dist.ProcessGroup
# Class-sharded scoring forms [k, n_b, C_r] candidate logits in blocks of at most this many elements.
CHUNK_ELEMENTS = 1 << 22


def collectives(plan: SearchPlan, sharded_classes: bool = False, layout: Optional["HeadLayout"] = None,
                gathered: Optional[bool] = None) -> int:
    """All-reduces/gathers one distributed search makes (a count, not a host sync).

    ``layout``: the search of ``PoF.perturb`` on a DTensor head: the row counts and the rows gathered (2, when
    ``gathered``; None: when the layout's token dims hold more than one rank, as with plain-tensor features and no
    explicit process group), then the class-sharded search with the class offsets known from the layout.
    """
    rounds = 2 if plan.method != "newton" else 1 + drivers.newton_rounds(plan)[0]
    if layout is not None:
        if gathered is None:
            gathered = any(layout.mesh.size(d) > 1 for d in layout.token_dims)
        return 2 * gathered + 2 + 1 + 1 + 2 * rounds
    if sharded_classes:
        return 1 + 2 + 1 + 1 + 2 * rounds  # class offsets, log-sum-exp (max, sum), ||g||, target terms, rounds
    return 1 + rounds


def union_search(backend: Backend, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                 plan: SearchPlan, group: ProcessGroup) -> SearchTensors:
    """The search on the union of the ranks' batches with ``backend``'s ops; see the module docstring."""
    acc = accumulation_dtype(weight.dtype)
    local = backend.head_gradient(features, weight, bias, target, plan.ignore_index, plan.normalized)
    m_local = reference.count_rows(target, plan.ignore_index).to(acc)
    # 1. One all-reduce: m_local g (sums over the rank's counted rows) and m_local.
    pieces = [local.grad_weight.reshape(-1), local.grad_bias] if bias is not None else [local.grad_weight.reshape(-1)]
    buffer = torch.cat([p * m_local for p in pieces] + [m_local.reshape(1)])
    dist.all_reduce(buffer, group=group)
    m = buffer[-1].clamp_min(1)
    classes, dim = weight.shape
    grad_weight = (buffer[: classes * dim] / m).view(classes, dim)
    grad_bias = buffer[classes * dim: -1] / m if bias is not None else None
    grad_norm = reference.squared_norm(grad_weight, grad_bias).sqrt()
    grad = HeadGradient(local.logits, None, grad_weight, grad_bias, grad_norm,
                        reference.direction_scale(grad_norm, plan.normalized))
    # 2. This rank's direction logits along the global u (residual None: the Gram form would use the local R).
    direction = backend.direction_logits(features, grad)

    def stats(steps: Tensor) -> Tensor:  # 3. one all-reduce per scoring round
        sums = backend.line_stats(local.logits, direction, target, steps, plan.ignore_index) * m_local
        dist.all_reduce(sums, group=group)
        return sums / m

    return assemble(grad, drivers.run(stats, plan, features.device, acc))


def class_range(classes: int, device: torch.device, group: ProcessGroup) -> tuple[int, int]:
    """(c0, C_total): this rank's first class and the head's size, from one all-gather of the slice sizes."""
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([classes], dtype=torch.int64, device=device), group=group)
    sizes = torch.cat(counts).tolist()
    return int(sum(sizes[: dist.get_rank(group)])), int(sum(sizes))


def _global_lse(z: Tensor, group: ProcessGroup) -> Tensor:
    """log-sum-exp over the last dim of the class-sharded ``z`` (``[..., C_r]``) across ranks: two all-reduces."""
    top = z.amax(-1)
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = (z - top[..., None]).exp().sum(-1)
    dist.all_reduce(total, group=group)
    return total.log() + top


def sharded_search(features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, plan: SearchPlan,
                   group: ProcessGroup, offsets: Optional[tuple[int, int]] = None) -> SearchTensors:
    """The search on a class-sharded head: this rank holds ``W0[c0:c1]``, every rank all rows and labels.

    offsets: ``(c0, C_total)`` when known (a DTensor's layout); None gathers the slice sizes (slices in rank order).
    """
    acc = accumulation_dtype(weight.dtype)
    h = features.to(acc)
    w, b = weight.to(acc), None if bias is None else bias.to(acc)
    classes = weight.shape[0]
    offset, total_classes = offsets if offsets is not None else class_range(classes, features.device, group)
    # Labels: global indices; a counted label outside [0, C_total) makes its row NaN (reference.label_rows).
    safe, row_weight = reference.label_rows(target, total_classes, plan.ignore_index, acc)
    owned = (safe >= offset) & (safe < offset + classes) & (row_weight != 0)
    local_label = torch.where(owned, safe - offset, 0)[:, None]
    # 1. Residual with the global log-sum-exp (the owned labels' entries less one); g_W, g_b of this slice; ||g||.
    z0 = torch.nn.functional.linear(h, w, b)
    residual = (z0 - _global_lse(z0, group)[:, None]).exp_()
    residual.scatter_add_(1, local_label, -owned[:, None].to(acc))
    residual.mul_(row_weight[:, None])
    grad_weight = residual.t() @ h
    grad_bias = residual.sum(0) if bias is not None else None
    del residual  # [n, C_r]: not kept
    squares = reference.squared_norm(grad_weight, grad_bias)
    dist.all_reduce(squares, group=group)
    grad_norm = squares.sqrt()
    scale = reference.direction_scale(grad_norm, plan.normalized)
    d = reference.direction_logits(h, grad_weight, grad_bias, scale)
    # 2. The target logit and its direction entry, from the rank that owns the label.
    target_terms = torch.where(owned, torch.stack([z0.gather(1, local_label)[:, 0], d.gather(1, local_label)[:, 0]]), 0)
    dist.all_reduce(target_terms, group=group)
    z_y, d_y = target_terms
    rows = z0.shape[0]

    def blocks(count: int):
        """(candidates, rows) slices of at most CHUNK_ELEMENTS candidate logits [k, n_b, C_r] each."""
        row_block = max(1, CHUNK_ELEMENTS // max(1, classes))
        if row_block >= rows:  # whole rows, several candidates a block
            per = max(1, CHUNK_ELEMENTS // max(1, z0.numel()))
            return [(slice(k, k + per), slice(None)) for k in range(0, count, per)]
        return [(slice(k, k + 1), slice(r, r + row_block)) for k in range(count) for r in range(0, rows, row_block)]

    def stats(steps: Tensor) -> Tensor:  # 3. two all-reduces per scoring round (the max, then the sums)
        parts = blocks(steps.shape[0])
        top = z0.new_empty(steps.shape[0], rows)
        for ks, rs in parts:
            top[ks, rs] = (z0[None, rs] - steps[ks, None, None] * d[None, rs]).amax(-1)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        moments = z0.new_empty(3, steps.shape[0], rows)
        for ks, rs in parts:
            e = (z0[None, rs] - steps[ks, None, None] * d[None, rs] - top[ks, rs, None]).exp_()
            moments[0, ks, rs] = e.sum(-1)
            moments[1, ks, rs] = (e * d[None, rs]).sum(-1)
            moments[2, ks, rs] = (e * d[None, rs].square()).sum(-1)
        dist.all_reduce(moments, group=group)
        mass, first, second = moments
        mean_d = first / mass
        loss = mass.log() + top - z_y + steps[:, None] * d_y
        return torch.stack([loss, d_y - mean_d, second / mass - mean_d.square()]) @ row_weight  # [3, K]

    grad = HeadGradient(z0, None, grad_weight, grad_bias, grad_norm, scale)
    return assemble(grad, drivers.run(stats, plan, features.device, acc))



# -- DTensor heads ------------------------------------------------------------------------------------------------

def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a DTensor (without importing ``torch.distributed.tensor``: nothing is one before it is)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


_GROUPS: dict = {}


def _ranks(mesh: Any, dims: Sequence[int]) -> list[int]:
    """The global ranks of this rank's block of ``mesh`` along ``dims`` (the other coordinates fixed)."""
    coordinate = mesh.get_coordinate()
    index = tuple(slice(None) if d in dims else c for d, c in enumerate(coordinate))
    return sorted(mesh.mesh[index].reshape(-1).tolist())


def group_of(mesh: Any, dims: Sequence[int]) -> Optional[ProcessGroup]:
    """One process group over ``dims`` of ``mesh`` (this rank's block); None for no dims or a block of one rank."""
    if not dims or all(mesh.size(d) == 1 for d in dims):
        return None
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    ranks = tuple(_ranks(mesh, dims))
    if ranks not in _GROUPS:  # only the block's ranks take part (no call on the ranks of other blocks)
        _GROUPS[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _GROUPS[ranks]


def _dims_ranks(mesh: Any) -> list[list[int]]:
    return [sorted(dist.get_process_group_ranks(mesh.get_group(d))) for d in range(mesh.ndim)]


@dataclass(frozen=True)
class HeadLayout:
    """Where a DTensor head's rows lie, read once from its placements.

    mesh, placements: the weight's. first, classes: this rank's first class and the head's C (rows ``[first,
    first + rows)`` are local). class_group: the ranks holding the other rows (the mesh dims that shard the classes).
    token_dims: the mesh dims whose ranks bring their own search tokens (gathered); the others share them (tensor
    parallel). mesh_group: every rank of the mesh's block (None on one rank).
    """

    mesh: Any
    placements: tuple
    first: int
    rows: int
    classes: int
    class_group: Optional[ProcessGroup]
    token_dims: tuple
    mesh_group: Optional[ProcessGroup]

    def matches(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is a DTensor laid out as the head read at construction."""
        return (is_dtensor(tensor) and tensor.device_mesh == self.mesh and tuple(tensor.placements) == self.placements
                and tensor.to_local().shape[0] == self.rows)


def _class_dim(placement: Any) -> Optional[bool]:
    """True: shards the rows (classes); False: replicates; raises for anything else."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(placement, Replicate):
        return False
    if isinstance(placement, (Shard, _StridedShard)) and placement.dim == 0:
        return True
    if isinstance(placement, (Shard, _StridedShard)):
        raise ValueError(
            f"the head's weight is sharded on dim {placement.dim} ({placement}): PoF needs a head sharded by classes "
            "(its rows, Shard(0)), as FSDP2's fully_shard (by default) and ColwiseParallel shard it; RowwiseParallel "
            "or a shard_placement_fn on another dim is not supported for the head")
    raise ValueError(
        f"the head's weight has placement {placement} (partial sums or unknown): PoF needs a head sharded by classes "
        "(Shard(0)) or replicated; redistribute it first, e.g. weight.redistribute(placements=[Shard(0)])")


def head_layout(weight: Tensor, bias: Optional[Tensor], tensor_parallel: bool) -> HeadLayout:
    """The :class:`HeadLayout` of a DTensor ``weight`` ``[C, D]`` (and ``bias`` ``[C]``, laid out the same).

    tensor_parallel: the head module was parallelized (``parallelize_module``): its mesh's last dim (FSDP2 puts the
    tensor-parallel mesh last) shares the tokens; every other dim brings its own.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    sharded = [_class_dim(p) for p in placements]
    if not any(sharded):
        raise ValueError("the head's weight is a DTensor replicated on every mesh dim: pass weight.to_local() as a "
                         "plain head (nothing is sharded), or shard it by classes (Shard(0))")
    shape, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    local = weight.to_local()
    if tuple(local.shape) != tuple(shape) or shape[1] != weight.shape[1]:
        raise ValueError(f"the head's local rows {list(local.shape)} do not match its placements {placements} "
                         f"(expected {list(shape)}): PoF needs each rank's rows as one contiguous block of classes")
    if bias is not None:
        if not is_dtensor(bias) or bias.device_mesh != mesh or tuple(bias.placements) != placements:
            raise ValueError(
                f"the head's bias is {'a DTensor on another mesh or placements' if is_dtensor(bias) else 'a plain tensor'}"
                f" while its weight is a DTensor {placements} on {mesh}: the bias must be sharded like the weight's rows")
        bias_shape, bias_offset = compute_local_shape_and_global_offset(bias.shape, mesh, placements)
        if bias_shape[0] != shape[0] or bias_offset[0] != offset[0]:
            raise ValueError("the head's bias rows are not the weight's rows on this rank: shard both alike")
    shared = {mesh.ndim - 1} if tensor_parallel else set()
    class_dims = [d for d, s in enumerate(sharded) if s]
    return HeadLayout(mesh, placements, int(offset[0]), int(shape[0]), int(weight.shape[0]),
                      group_of(mesh, class_dims), tuple(d for d in range(mesh.ndim) if d not in shared),
                      group_of(mesh, list(range(mesh.ndim))))


def _feature_token_dims(layout: HeadLayout, features: Tensor) -> tuple:
    """The head-mesh dims whose ranks hold different tokens, as the DTensor ``features`` says (see local_rows)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    head_dims = _dims_ranks(layout.mesh)
    own = set(layout.token_dims)
    for k, (ranks, placement) in enumerate(zip(_dims_ranks(features.device_mesh), features.placements)):
        if ranks not in head_dims:
            raise ValueError(
                f"search_features is a DTensor on mesh {features.device_mesh}, whose dim {k} (ranks {ranks}) is no "
                f"dim of the head's mesh {layout.mesh}: give features on the head's mesh or one of its sub-meshes "
                "(e.g. mesh['tp']), or plain local tensors")
        d = head_dims.index(ranks)
        if isinstance(placement, Replicate):
            own.discard(d)
        elif isinstance(placement, (Shard, _StridedShard)) and placement.dim % features.ndim < features.ndim - 1:
            own.add(d)
        else:
            raise ValueError(
                f"search_features is a DTensor with placement {placement} on mesh dim {k}: PoF understands Replicate "
                "(every rank the same tokens) and Shard on a token dim (each rank its own tokens, e.g. sequence "
                "parallel Shard(1)); redistribute it first, e.g. features.redistribute(placements=[Replicate()])")
    return tuple(sorted(own))


def local_rows(layout: HeadLayout, features: Tensor, target: Tensor) -> tuple[Tensor, Tensor, tuple]:
    """``(features, target, token_dims)``: this rank's search rows as plain tensors and the mesh dims to gather over.

    Plain features are this rank's tokens (shared on the tensor-parallel dim). DTensor features say themselves:
    Replicate on a dim shares the tokens, Shard on a token dim splits them; ``target`` is a DTensor laid out alike,
    a plain tensor of the local rows, or of the whole (global) rows, of which this rank's part is taken.
    """
    if not is_dtensor(features):
        if is_dtensor(target):
            raise TypeError("search_target is a DTensor but search_features is not: give both as DTensors or both "
                            "as this rank's plain tensors")
        return features, target, layout.token_dims
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dims = _feature_token_dims(layout, features)
    local = features.to_local()
    if is_dtensor(target):
        if target.device_mesh != features.device_mesh or tuple(target.placements) != tuple(features.placements):
            raise ValueError(f"search_target is a DTensor with placements {tuple(target.placements)}, search_features "
                             f"{tuple(features.placements)}: lay them out alike")
        return local, target.to_local(), dims
    if tuple(target.shape) == tuple(features.shape[:-1]) != tuple(local.shape[:-1]):  # global labels: take ours
        shape, offset = compute_local_shape_and_global_offset(features.shape, features.device_mesh,
                                                              features.placements)
        target = target[tuple(slice(o, o + s) for o, s in zip(offset[:-1], shape[:-1]))]
    return local, target, dims


def gather_rows(features: Tensor, target: Tensor, group: Optional[ProcessGroup], ignore_index: int
                ) -> tuple[Tensor, Tensor]:
    """Every rank's rows of ``group`` (``[n_r, D]``, ``[n_r]``) concatenated in rank order: two all-gathers.

    The first gathers the row counts (one host read, so that ranks may bring different numbers of tokens); the
    second the rows, features and labels packed as bytes in one buffer, each rank's padded to the largest count
    with ``ignore_index`` rows (they count in no sum).
    """
    if group is None:
        return features, target
    world = dist.get_world_size(group)
    features = features.reshape(-1, features.shape[-1])
    target = target.reshape(-1).to(torch.int64)
    counts = torch.zeros(world, dtype=torch.int64, device=features.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(counts, torch.full((1,), target.shape[0], dtype=torch.int64, device=features.device),
                                group=group)
    most = int(counts.max())
    dim, dtype = features.shape[1], features.dtype
    padded_h = features.new_zeros(most, dim)
    padded_h[: features.shape[0]] = features
    padded_y = target.new_full((most,), ignore_index)
    padded_y[: target.shape[0]] = target
    packed = torch.cat([padded_h.view(torch.uint8).reshape(most, -1), padded_y.view(torch.uint8).reshape(most, 8)], 1)
    out = packed.new_empty(world * most, packed.shape[1])
    gather(out, packed, group=group)
    width = packed.shape[1] - 8
    return out[:, :width].contiguous().view(dtype), out[:, width:].contiguous().view(torch.int64).reshape(-1)
