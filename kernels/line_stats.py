"""K-candidate line statistics: l(t_k), l'(t_k), l''(t_k) for z(t) = z0 - t d, in one pass over z0 and d.

Every program owns ``BLOCK_N`` rows and ``BLOCK_K`` candidates. It walks the classes in tiles of
``BLOCK_C``, loading each tile of z0 and d once and updating, for every candidate at once, an online
log-sum-exp plus the softmax moments of d (so C of any size works). Rows are summed per program
into ``partials``; one tiny second launch adds the programs in a fixed order and divides by the
number m of counted rows, so the result is deterministic and never leaves the device.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["FLOAT_DTYPES", "line_stats", "candidate_tile", "row_block", "row_finish", "store_partials"]

# The dtypes every kernel here takes (fp32 accumulation); the backend sends others to the reference ops.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Not tuned: these block sizes were never swept on a GPU (BENCHMARKS.md times the whole search on an
# H200 with these values, nothing per kernel). Chosen so that the [BLOCK_N, BLOCK_K, BLOCK_C] candidate
# tile holds 8192 fp32 values (32 per thread with 8 warps) and the common K <= 16 needs one candidate
# block, i.e. z0 and d are read exactly once.
BLOCK_N = 16
MAX_BLOCK_K = 16
TILE_ELEMENTS = 8192
MAX_BLOCK_C = 256
NUM_WARPS = 8
# Not tuned (not swept); the reduction reads a [BLOCK_P, BLOCK_K] slab of per-program partials per step.
REDUCE_BLOCK_P = 64


@triton.jit
def candidate_tile(zs, dv, valid, t, run_max, run_sum, run_first, run_second):
    """Fold one class tile into the running statistics of every (row, candidate).

    zs:  [BN, BC] fp32 z0 - z0_y (the row's target logit subtracted; softmax does not change).
    dv:  [BN, BC] fp32 d - d_y (likewise), already scaled.
    valid: [BC] bool, the class exists.   t: [BK] fp32 candidate steps.
    run_*: [BN, BK] fp32 running max, sum of e, sum of e dv, sum of e dv^2 with e = exp(z - max).
    """
    # 1. z(t) - z_y(t) = zs - t dv for every candidate: a [BN, BK, BC] tile; missing classes -> -inf.
    zt = zs[:, None, :] - t[None, :, None] * dv[:, None, :]
    zt = tl.where(valid[None, None, :], zt, float("-inf"))
    # 2. Online log-sum-exp: rescale the old sums to the new running max.
    new_max = tl.maximum(run_max, tl.max(zt, axis=2))
    alpha = tl.exp(run_max - new_max)
    e = tl.exp(zt - new_max[:, :, None])
    dv3 = dv[:, None, :]
    # 3. Moments of dv under the unnormalised softmax e.
    run_sum = run_sum * alpha + tl.sum(e, axis=2)
    run_first = run_first * alpha + tl.sum(e * dv3, axis=2)
    run_second = run_second * alpha + tl.sum(e * dv3 * dv3, axis=2)
    return new_max, run_sum, run_first, run_second


@triton.jit
def row_finish(run_max, run_sum, run_first, run_second, counted, bad, t, zs_y, dv_y):
    """Loss, slope, curvature summed over the counted rows: three [BK] vectors.

    counted: [BN] rows that exist and whose label is not ignore_index; bad: [BN] counted rows whose
    label is outside [0, C): their weight is NaN, so the sums are NaN (``reference.label_rows``).

    With p = softmax(z(t)), zs = z0 - a, dv = d - c for row constants a, c (softmax is unchanged):
    l = logsumexp(zs - t dv) - (zs_y - t dv_y), l' = dv_y - E_p[dv], l'' = Var_p[dv]. The shift by
    the row's own target entries (zs_y = dv_y = 0 when a, c are read from the same memory as the
    tiles) keeps the moments small, so the variance loses no precision to cancellation.
    zs_y, dv_y: [BN] target entries of the shifted tiles.   t: [BK].
    """
    w = tl.where(bad, float("nan"), tl.where(counted, 1.0, 0.0))[:, None]
    mean = run_first / run_sum
    loss = run_max + tl.log(run_sum) - (zs_y[:, None] - t[None, :] * dv_y[:, None])
    curvature = run_second / run_sum - mean * mean
    return tl.sum(w * loss, axis=0), tl.sum(w * (dv_y[:, None] - mean), axis=0), tl.sum(w * curvature, axis=0)


@triton.jit
def row_block(t_ptr, y_ptr, n, C, K, ignore_index, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's rows and candidates (grid (row blocks, candidate blocks)).

    Returns rows [BN] int64, row_ok [BN], ks [BK] int64, t [BK] fp32 steps, counted [BN] (row exists
    and its label is not ignore_index), bad [BN] (counted, label outside [0, C)) and y_safe [BN] (the
    label where it is in [0, C), else class 0: every gather with it stays inside the row).
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    t = tl.load(t_ptr + ks, mask=ks < K, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    counted = (y != ignore_index) & row_ok
    bad = counted & ((y < 0) | (y >= C))
    return rows, row_ok, ks, t, counted, bad, tl.where(counted & ~bad, y, 0)


@triton.jit
def store_partials(partial_ptr, count_ptr, ks, K, loss, slope, curvature, counted):
    """Write this row block's sums into partial[P, 3, K] and its counted rows into count[P]."""
    pid_n = tl.program_id(0).to(tl.int64)
    k_ok = ks < K
    out = partial_ptr + pid_n * 3 * K + ks
    tl.store(out, loss, mask=k_ok)
    tl.store(out + K, slope, mask=k_ok)
    tl.store(out + 2 * K, curvature, mask=k_ok)
    tl.store(count_ptr + pid_n, tl.sum(tl.where(counted, 1.0, 0.0), axis=0))


@triton.jit
def _line_stats_kernel(
    z_ptr, d_ptr, y_ptr, t_ptr, scale_ptr, partial_ptr, count_ptr,
    n, C, K,
    stride_zn, stride_zc, stride_dn, stride_dc,
    ignore_index,
    HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-program sums of l, l', l'' over BLOCK_N rows for BLOCK_K candidates.

    z_ptr:       [n, C] z0 (fp32/bf16/fp16), strides (stride_zn, stride_zc).
    d_ptr:       [n, C] d, same dtype family, strides (stride_dn, stride_dc).
    y_ptr:       [n] int64 targets, contiguous; ``ignore_index`` rows do not count; a counted label
                 outside [0, C) is never used as an index and makes the sums NaN.
    t_ptr:       [K] fp32 candidate steps, contiguous.
    scale_ptr:   [1] fp32 factor applied to d when HAS_SCALE (1/||g|| read on device).
    partial_ptr: [P, 3, K] fp32 output, contiguous, P = number of row programs.
    count_ptr:   [P] fp32 output: counted rows of each row program.
    Grid: (P, cdiv(K, BLOCK_K)).
    """
    # 1. Rows, candidates, targets; z0_y and d_y gathered once per row (rows that do not count, and rows
    #    whose label is outside [0, C), gather class 0; the latter come out NaN in step 3).
    rows, row_ok, ks, t, counted, bad, y_safe = row_block(t_ptr, y_ptr, n, C, K, ignore_index, BLOCK_N, BLOCK_K)
    z_y = tl.load(z_ptr + rows * stride_zn + y_safe * stride_zc, mask=row_ok, other=0.0).to(tl.float32)
    d_y = tl.load(d_ptr + rows * stride_dn + y_safe * stride_dc, mask=row_ok, other=0.0).to(tl.float32)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr)
    run_max = tl.full([BLOCK_N, BLOCK_K], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    run_first = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    run_second = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    # 2. One read of every class tile of z0 and d, shared by all BLOCK_K candidates.
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :] * stride_zc, mask=mask, other=0.0)
        d = tl.load(d_ptr + rows[:, None] * stride_dn + cols[None, :] * stride_dc, mask=mask, other=0.0)
        zs = z.to(tl.float32) - z_y[:, None]
        dv = (d.to(tl.float32) - d_y[:, None]) * scale
        run_max, run_sum, run_first, run_second = candidate_tile(
            zs, dv, col_ok, t, run_max, run_sum, run_first, run_second)
    # 3. Sum the counted rows of this program (NaN if one has a label outside [0, C)).
    zero = tl.zeros([BLOCK_N], tl.float32)
    loss, slope, curvature = row_finish(run_max, run_sum, run_first, run_second, counted, bad, t, zero, zero)
    store_partials(partial_ptr, count_ptr, ks, K, loss, slope, curvature, counted)


@triton.jit
def _reduce_kernel(partial_ptr, count_ptr, out_ptr, P, K, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[j, k] = sum_p partial[p, j, k] / max(sum_p count[p], 1), programs added in a fixed order.

    partial_ptr: [P, 3, K] fp32 contiguous.  count_ptr: [P] fp32.  out_ptr: [3, K] fp32 contiguous.
    Grid: (cdiv(K, BLOCK_K),).
    """
    pid = tl.program_id(0).to(tl.int64)
    ks = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    acc_loss = tl.zeros([BLOCK_K], tl.float32)
    acc_slope = tl.zeros([BLOCK_K], tl.float32)
    acc_curv = tl.zeros([BLOCK_K], tl.float32)
    acc_count = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_ok = ps < P
        mask = p_ok[:, None] & k_ok[None, :]
        base = partial_ptr + ps[:, None] * 3 * K + ks[None, :]
        acc_loss += tl.sum(tl.load(base, mask=mask, other=0.0), axis=0)
        acc_slope += tl.sum(tl.load(base + K, mask=mask, other=0.0), axis=0)
        acc_curv += tl.sum(tl.load(base + 2 * K, mask=mask, other=0.0), axis=0)
        acc_count += tl.load(count_ptr + ps, mask=p_ok, other=0.0)
    m = tl.maximum(tl.sum(acc_count, axis=0), 1.0)
    tl.store(out_ptr + ks, acc_loss / m, mask=k_ok)
    tl.store(out_ptr + K + ks, acc_slope / m, mask=k_ok)
    tl.store(out_ptr + 2 * K + ks, acc_curv / m, mask=k_ok)


def candidate_blocks(K: int, C: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_C) for K candidates and C classes under the TILE_ELEMENTS budget."""
    block_k = min(triton.next_power_of_2(max(K, 1)), MAX_BLOCK_K)
    block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C, max(1, TILE_ELEMENTS // (BLOCK_N * block_k)))
    return block_k, block_c


def reduce_partials(partials: Tensor, counts: Tensor) -> Tensor:
    """``[3, K]`` fp32 from ``[P, 3, K]`` per-program sums and ``[P]`` counted rows (one launch)."""
    P, _, K = partials.shape
    out = torch.empty(3, K, device=partials.device, dtype=torch.float32)
    block_k = min(triton.next_power_of_2(max(K, 1)), 128)
    _reduce_kernel[(triton.cdiv(K, block_k),)](partials, counts, out, P, K, BLOCK_P=REDUCE_BLOCK_P, BLOCK_K=block_k)
    return out


def line_stats(
    logits: Tensor, direction: Tensor, target: Tensor, steps: Tensor, ignore_index: int,
    scale: Optional[Tensor] = None,
) -> Tensor:
    """``[3, K]`` fp32 l, l', l'' at each step along z0 - t (scale * d); see ``pof_fast.reference.line_stats``.

    logits z0 and direction d ``[n, C]`` in fp32/bf16/fp16 (any strides), target ``[n]`` int64,
    steps ``[K]``, scale an optional 1-element fp32 device tensor multiplying d (default 1).
    Means are over the counted rows, divided by max(m, 1). A counted label outside [0, C) (not
    ``ignore_index``) makes every entry NaN and is never read through. Two launches, no host synchronisation.
    """
    if logits.dim() != 2 or direction.shape != logits.shape:
        raise ValueError(f"logits and direction must both be [n, C], got {list(logits.shape)} and {list(direction.shape)}")
    if logits.dtype not in FLOAT_DTYPES or direction.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits/direction must be float32, bfloat16 or float16, got {logits.dtype}, {direction.dtype}")
    n, C = logits.shape
    if target.shape != (n,) or target.dtype != torch.int64:
        raise ValueError(f"target must be int64 [{n}], got {target.dtype} {list(target.shape)}")
    if steps.dim() != 1:
        raise ValueError(f"steps must be 1-D, got {list(steps.shape)}")
    K = steps.numel()
    device = logits.device
    if K == 0 or n == 0 or C == 0:
        return torch.zeros(3, K, device=device, dtype=torch.float32)
    t = steps.to(device=device, dtype=torch.float32).contiguous()
    y = target.contiguous()
    scale_arg = scale.reshape(1).to(torch.float32) if scale is not None else t
    block_k, block_c = candidate_blocks(K, C)
    P = triton.cdiv(n, BLOCK_N)
    partials = torch.empty(P, 3, K, device=device, dtype=torch.float32)
    counts = torch.empty(P, device=device, dtype=torch.float32)
    _line_stats_kernel[(P, triton.cdiv(K, block_k))](
        logits, direction, y, t, scale_arg, partials, counts,
        n, C, K,
        logits.stride(0), logits.stride(1), direction.stride(0), direction.stride(1),
        ignore_index,
        HAS_SCALE=scale is not None,
        BLOCK_N=BLOCK_N, BLOCK_K=block_k, BLOCK_C=block_c,
        num_warps=NUM_WARPS,
    )
    return reduce_partials(partials, counts)
