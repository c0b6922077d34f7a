"""Fused head-gradient pieces: residual R, bias gradient g_b, ||g|| and the direction scale, on device.

``head_residual`` writes R = (softmax(z0) - onehot(y)) / m with ignored rows zero and rows whose
counted label is outside [0, C) NaN (one launch, an online log-sum-exp over class tiles so any C
works). After g_W = R^T h (a cuBLAS product done by the caller), ``gradient_norm`` forms
g_b = colsum(R), per-program partial sums of ||g_W||^2 + ||g_b||^2, and a one-program finish that
writes ||g|| and the scale u = scale * g (1/||g|| normalized, 1 raw, 0 when g = 0) to device memory,
where the consumers read it: no host synchronisation anywhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .line_stats import FLOAT_DTYPES

__all__ = ["head_residual", "gradient_norm"]

# Not tuned: these block sizes were never swept on a GPU (BENCHMARKS.md times the whole search on an
# H200 with these values, nothing per kernel). Chosen so a [BLOCK_N, BLOCK_C] tile is 4096 values and a
# row block of a C <= 256 head is read in one tile.
RES_BLOCK_N = 16
RES_MAX_BLOCK_C = 256
# Not tuned (not swept); the norm kernel walks R and g_W for NORM_BLOCK_C classes per program.
NORM_BLOCK_C = 32
NORM_BLOCK_N = 64
NORM_BLOCK_D = 128
FINISH_BLOCK_P = 256


@triton.jit
def _residual_kernel(
    z_ptr, y_ptr, count_ptr, r_ptr,
    n, C, stride_zn, stride_zc, stride_rn, stride_rc, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """R for BLOCK_N rows.

    z_ptr:     [n, C] z0 (fp32/bf16/fp16), strides (stride_zn, stride_zc).
    y_ptr:     [n] int64 targets, contiguous; a counted label outside [0, C) gives a NaN row of R
               (``reference.label_rows``). Labels are only compared with column indices, never gathered.
    count_ptr: [1] int64 m, the number of counted rows in the whole batch (not just this chunk).
    r_ptr:     [n, C] fp32 output R, strides (stride_rn, stride_rc).
    Grid: (cdiv(n, BLOCK_N),).
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    counted = (y != ignore_index) & row_ok
    bad = counted & ((y < 0) | (y >= C))
    # 1. Row weight 1/m for counted rows, 0 for ignored ones, NaN for bad labels (m read from device memory).
    m = tl.maximum(tl.load(count_ptr).to(tl.float32), 1.0)
    w = tl.where(bad, float("nan"), tl.where(counted, 1.0 / m, 0.0))
    # 2. Online log-sum-exp of z0 over the class tiles.
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < C
        z = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :] * stride_zc,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    # 3. R = (softmax(z0) - onehot(y)) * w, written tile by tile.
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :] * stride_zc,
                    mask=mask, other=0.0).to(tl.float32)
        onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
        r = (tl.exp(z - lse[:, None]) - onehot) * w[:, None]
        tl.store(r_ptr + rows[:, None] * stride_rn + cols[None, :] * stride_rc, r, mask=mask)


@triton.jit
def _norm_kernel(
    r_ptr, gw_ptr, gb_ptr, partial_ptr,
    n, C, D, stride_rn, stride_rc, stride_wc, stride_wd,
    HAS_BIAS: tl.constexpr, FROM_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """g_b for BLOCK_C classes and their share of ||g_W||^2 + ||g_b||^2.

    r_ptr:       [n, C] fp32 R, strides (stride_rn, stride_rc); read only when FROM_RESIDUAL.
    gw_ptr:      [C, D] fp32 g_W, strides (stride_wc, stride_wd).
    gb_ptr:      [C] fp32 g_b, contiguous: written when FROM_RESIDUAL, else read (when HAS_BIAS).
    partial_ptr: [P] fp32 output, P = cdiv(C, BLOCK_C).
    Grid: (P,).
    """
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    sq = tl.zeros([BLOCK_C], tl.float32)
    # 1. g_b = colsum(R) over all rows, in a fixed order.
    if HAS_BIAS:
        if FROM_RESIDUAL:
            gb = tl.zeros([BLOCK_C], tl.float32)
            for r0 in range(0, n, BLOCK_N):
                rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
                r = tl.load(r_ptr + rows[:, None] * stride_rn + cols[None, :] * stride_rc,
                            mask=(rows < n)[:, None] & col_ok[None, :], other=0.0)
                gb += tl.sum(r, axis=0)
            tl.store(gb_ptr + cols, gb, mask=col_ok)
        else:
            gb = tl.load(gb_ptr + cols, mask=col_ok, other=0.0)
        sq += gb * gb
    # 2. ||g_W[cols, :]||^2 over D in chunks.
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        g = tl.load(gw_ptr + cols[:, None] * stride_wc + ds[None, :] * stride_wd,
                    mask=col_ok[:, None] & (ds < D)[None, :], other=0.0)
        sq += tl.sum(g * g, axis=1)
    tl.store(partial_ptr + pid, tl.sum(sq, axis=0))


@triton.jit
def _finish_kernel(partial_ptr, P, norm_ptr, scale_ptr, NORMALIZED: tl.constexpr, BLOCK_P: tl.constexpr):
    """||g|| = sqrt(sum partials) and the direction scale.

    partial_ptr: [P] fp32.  norm_ptr, scale_ptr: [1] fp32 outputs. Grid: (1,).
    """
    acc = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(partial_ptr + ps, mask=ps < P, other=0.0)
    norm = tl.sqrt(tl.sum(acc, axis=0))
    positive = norm > 0
    # u = g / ||g|| (normalized) or u = g (raw); g = 0 gives u = 0, never NaN.
    if NORMALIZED:
        scale = tl.where(positive, 1.0 / tl.where(positive, norm, 1.0), 0.0)
    else:
        scale = tl.where(positive, 1.0, 0.0)
    tl.store(norm_ptr, norm)
    tl.store(scale_ptr, scale)


def head_residual(logits: Tensor, target: Tensor, count: Tensor, ignore_index: int) -> Tensor:
    """``[n, C]`` fp32 R = (softmax(z0) - onehot(y)) / max(m, 1), zero on ignored rows.

    A row whose label is neither ``ignore_index`` nor in [0, C) is NaN (it counts in m, as everywhere).
    logits ``[n, C]`` fp32/bf16/fp16, target ``[n]`` int64, count a 1-element int64 device tensor
    holding m (so a row chunk can be processed with the whole batch's m). One launch.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [n, C], got {list(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    n, C = logits.shape
    if target.shape != (n,) or target.dtype != torch.int64:
        raise ValueError(f"target must be int64 [{n}], got {target.dtype} {list(target.shape)}")
    if count.numel() != 1:
        raise ValueError(f"count must hold one value, got {list(count.shape)}")
    residual = torch.empty(n, C, device=logits.device, dtype=torch.float32)
    if n == 0 or C == 0:
        return residual
    block_c = min(triton.next_power_of_2(C), RES_MAX_BLOCK_C)
    _residual_kernel[(triton.cdiv(n, RES_BLOCK_N),)](
        logits, target.contiguous(), count.reshape(1).to(torch.int64), residual,
        n, C, logits.stride(0), logits.stride(1), residual.stride(0), residual.stride(1), ignore_index,
        BLOCK_N=RES_BLOCK_N, BLOCK_C=block_c,
    )
    return residual


def gradient_norm(
    residual: Optional[Tensor], grad_weight: Tensor, grad_bias: Optional[Tensor], has_bias: bool, normalized: bool,
) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """(g_b or None, ||g|| 0-d, scale 0-d), all fp32 on device; two launches.

    residual ``[n, C]`` fp32 R: when given (and ``has_bias``), g_b = colsum(R) is computed here;
    otherwise ``grad_bias`` ``[C]`` fp32 is taken as g_b. grad_weight ``[C, D]`` fp32 g_W.
    """
    if grad_weight.dim() != 2 or grad_weight.dtype != torch.float32:
        raise TypeError(f"grad_weight must be a float32 [C, D] tensor, got {grad_weight.dtype} {list(grad_weight.shape)}")
    C, D = grad_weight.shape
    device = grad_weight.device
    from_residual = residual is not None
    if from_residual and (residual.dim() != 2 or residual.shape[1] != C or residual.dtype != torch.float32):
        raise ValueError(f"residual must be float32 [n, {C}], got {residual.dtype} {list(residual.shape)}")
    if has_bias and not from_residual and (grad_bias is None or grad_bias.shape != (C,)):
        raise ValueError(f"grad_bias must be [{C}] when no residual is given")
    if has_bias:
        gb = torch.empty(C, device=device, dtype=torch.float32) if from_residual else grad_bias.contiguous()
    else:
        gb = grad_weight
    r = residual if from_residual else grad_weight
    P = triton.cdiv(C, NORM_BLOCK_C)
    partials = torch.empty(P, device=device, dtype=torch.float32)
    _norm_kernel[(P,)](
        r, grad_weight, gb, partials,
        r.shape[0], C, D, r.stride(0), r.stride(1), grad_weight.stride(0), grad_weight.stride(1),
        HAS_BIAS=has_bias, FROM_RESIDUAL=from_residual,
        BLOCK_N=NORM_BLOCK_N, BLOCK_C=NORM_BLOCK_C, BLOCK_D=NORM_BLOCK_D,
    )
    out = torch.empty(2, device=device, dtype=torch.float32)
    _finish_kernel[(1,)](partials, P, out, out[1:], NORMALIZED=normalized, BLOCK_P=FINISH_BLOCK_P)
    return (gb if has_bias else None), out[0], out[1]
