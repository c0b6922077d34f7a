"""K-candidate line statistics for large heads, never storing the ``[n, C]`` logits or direction.

Each program owns ``BLOCK_N`` rows and ``BLOCK_K`` candidates. For every class tile it forms
z0 = h W0^T + b0 and d = scale (h g_W^T + g_b) with ``tl.dot`` over feature chunks, then folds the
tile into the same online log-sum-exp of all candidates as :mod:`line_stats` (shared helpers), so
memory beyond the inputs is O(programs x K). The per-program sums go through the same
deterministic reduction. The gradient g_W = R^T h for this path is assembled by the caller
(``pof_fast.backends.triton``) from bounded row chunks of R (see ``head_residual``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .line_stats import FLOAT_DTYPES, candidate_tile, reduce_partials, row_block, row_finish, store_partials

__all__ = ["line_stats_logits_free"]

# Not tuned: these block sizes were never swept on a GPU (BENCHMARKS.md times the whole search on an
# H200 with these values, nothing per kernel); tl.dot needs every block >= 16. BLOCK_N x BLOCK_K x BLOCK_C
# keeps the candidate tile at 8192 fp32 values as in line_stats; BLOCK_D = 64 keeps the operand tiles
# [32, 64] + 2 x [64, 32] small enough for registers with 8 warps.
LF_BLOCK_N = 32
LF_MAX_BLOCK_K = 16
LF_BLOCK_C = 32
LF_BLOCK_D = 64
LF_NUM_WARPS = 8


@triton.jit
def _logits_free_kernel(
    h_ptr, w_ptr, b_ptr, gw_ptr, gb_ptr, scale_ptr, y_ptr, t_ptr, partial_ptr, count_ptr,
    n, C, D, K,
    stride_hn, stride_hd, stride_wc, stride_wd, stride_gc, stride_gd,
    ignore_index,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per-program sums of l, l', l'' over BLOCK_N rows for BLOCK_K candidates.

    h_ptr:     [n, D] features h (fp32/bf16/fp16), strides (stride_hn, stride_hd).
    w_ptr:     [C, D] W0, same dtype as h, strides (stride_wc, stride_wd).
    b_ptr:     [C] b0 contiguous (read when HAS_BIAS).
    gw_ptr:    [C, D] g_W: fp32 when DOT_FP32, else the dtype of h, strides (stride_gc, stride_gd).
    gb_ptr:    [C] fp32 g_b contiguous (read when HAS_BIAS).
    scale_ptr: [1] fp32 u = scale * g.
    y_ptr:     [n] int64 targets (W0, g_W, b0, g_b are gathered only at labels in [0, C); a counted
               label outside makes the sums NaN).   t_ptr: [K] fp32 steps.
    partial_ptr: [P, 3, K] fp32 output.   count_ptr: [P] fp32 output.
    Grid: (P = cdiv(n, BLOCK_N), cdiv(K, BLOCK_K)).
    z0 and d tiles use tl.dot in the input dtype with fp32 accumulation (tensor cores), or, when
    DOT_FP32, on operands upcast to fp32 with input_precision="ieee" (never tf32).
    """
    rows, row_ok, ks, t, counted, bad, y_safe = row_block(t_ptr, y_ptr, n, C, K, ignore_index, BLOCK_N, BLOCK_K)
    scale = tl.load(scale_ptr)
    # 1. Row shifts: z0_y = h_i . W0[y_i] + b0[y_i] and d_y (unscaled) by a gathered dot over D. They
    #    differ from the tl.dot tiles' target entries by rounding, so those entries are tracked too.
    z_y = tl.zeros([BLOCK_N], tl.float32)
    d_y = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_ok[:, None] & (ds < D)[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ds[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
        wy = tl.load(w_ptr + y_safe[:, None] * stride_wc + ds[None, :] * stride_wd, mask=mask, other=0.0)
        gy = tl.load(gw_ptr + y_safe[:, None] * stride_gc + ds[None, :] * stride_gd, mask=mask, other=0.0)
        z_y += tl.sum(h * wy.to(tl.float32), axis=1)
        d_y += tl.sum(h * gy.to(tl.float32), axis=1)
    if HAS_BIAS:
        z_y += tl.load(b_ptr + y_safe, mask=row_ok, other=0.0).to(tl.float32)
        d_y += tl.load(gb_ptr + y_safe, mask=row_ok, other=0.0)
    run_max = tl.full([BLOCK_N, BLOCK_K], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    run_first = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    run_second = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    zs_y = tl.zeros([BLOCK_N], tl.float32)
    dv_y = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < C
        # 2. Tiles z = h W0^T and g = h g_W^T over feature chunks (operands loaded as [BD, BC]).
        z = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        g = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            d_ok = ds < D
            h = tl.load(h_ptr + rows[:, None] * stride_hn + ds[None, :] * stride_hd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + cols[None, :] * stride_wc + ds[:, None] * stride_wd,
                         mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            gt = tl.load(gw_ptr + cols[None, :] * stride_gc + ds[:, None] * stride_gd,
                         mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_FP32:
                z = tl.dot(h.to(tl.float32), wt.to(tl.float32), z, input_precision="ieee")
                g = tl.dot(h.to(tl.float32), gt.to(tl.float32), g, input_precision="ieee")
            else:  # tensor cores: g_W comes in the input dtype
                z = tl.dot(h, wt, z)
                g = tl.dot(h, gt, g)
        # 3. Bias terms, then shift by the target column: zs = z0 - z0_y, dv = scale (d - d_y).
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            g += tl.load(gb_ptr + cols, mask=col_ok, other=0.0)[None, :]
        zs = z - z_y[:, None]
        dv = (g - d_y[:, None]) * scale
        is_y = cols[None, :] == y_safe[:, None]
        zs_y += tl.sum(tl.where(is_y, zs, 0.0), axis=1)
        dv_y += tl.sum(tl.where(is_y, dv, 0.0), axis=1)
        # 4. The K-candidate online log-sum-exp shared with the stored-logits kernel.
        run_max, run_sum, run_first, run_second = candidate_tile(
            zs, dv, col_ok, t, run_max, run_sum, run_first, run_second)
    # 5. Per-row l, l', l'' measured against the tiles' own target entries, summed over counted rows.
    loss, slope, curvature = row_finish(run_max, run_sum, run_first, run_second, counted, bad, t, zs_y, dv_y)
    store_partials(partial_ptr, count_ptr, ks, K, loss, slope, curvature, counted)


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """fp32 input, or bf16 under Triton's CPU interpreter, whose bf16 tl.dot returns wrong values
    (Triton 3.9, seen while writing the tests). bf16 products are exact in fp32, so upcasting gives
    the tensor-core result up to summation order."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1")


def line_stats_logits_free(
    features: Tensor, weight: Tensor, bias: Optional[Tensor], grad_weight: Tensor, grad_bias: Optional[Tensor],
    scale: Tensor, target: Tensor, steps: Tensor, ignore_index: int,
) -> Tensor:
    """``[3, K]`` fp32 l, l', l'' along z(t) = z0 - t d with z0 = h W0^T + b0, d = scale (h g_W^T + g_b).

    features ``[n, D]``, weight ``[C, D]`` (same float dtype), bias ``[C]`` or None, grad_weight
    ``[C, D]`` fp32 or the features' dtype, grad_bias ``[C]`` fp32 (given iff bias is), scale 1-element
    fp32, target ``[n]`` int64, steps ``[K]``. A counted label outside [0, C) makes every entry NaN
    (never an out-of-range read). For 16-bit inputs d is formed on tensor cores from g_W
    rounded to the input dtype (pass it rounded to avoid a cast per call). No ``[n, C]`` buffer is
    allocated; two launches (three with that cast), no host synchronisation.
    """
    if features.dim() != 2 or weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(f"features [n, D] and weight [C, D] expected, got {list(features.shape)}, {list(weight.shape)}")
    if features.dtype not in FLOAT_DTYPES or weight.dtype != features.dtype:
        raise TypeError(f"features and weight must share a float32/bfloat16/float16 dtype, got {features.dtype}, {weight.dtype}")
    n, D = features.shape
    C = weight.shape[0]
    if grad_weight.shape != (C, D) or grad_weight.dtype not in (torch.float32, features.dtype):
        raise ValueError(f"grad_weight must be [{C}, {D}] in float32 or {features.dtype}, "
                         f"got {grad_weight.dtype} {list(grad_weight.shape)}")
    if (bias is None) != (grad_bias is None):
        raise ValueError("grad_bias must be given exactly when bias is")
    if bias is not None and (bias.shape != (C,) or grad_bias.shape != (C,) or grad_bias.dtype != torch.float32):
        raise ValueError(f"bias and float32 grad_bias must be [{C}]")
    if target.shape != (n,) or target.dtype != torch.int64:
        raise ValueError(f"target must be int64 [{n}], got {target.dtype} {list(target.shape)}")
    K = steps.numel()
    device = features.device
    if K == 0 or n == 0:
        return torch.zeros(3, K, device=device, dtype=torch.float32)
    t = steps.to(device=device, dtype=torch.float32).contiguous()
    has_bias = bias is not None
    dot_fp32 = _dot_in_fp32(features.dtype)
    if not dot_fp32:
        grad_weight = grad_weight.to(features.dtype)
    block_k = min(triton.next_power_of_2(K), LF_MAX_BLOCK_K)
    P = triton.cdiv(n, LF_BLOCK_N)
    partials = torch.empty(P, 3, K, device=device, dtype=torch.float32)
    counts = torch.empty(P, device=device, dtype=torch.float32)
    _logits_free_kernel[(P, triton.cdiv(K, block_k))](
        features, weight, bias.contiguous() if has_bias else t, grad_weight,
        grad_bias.contiguous() if has_bias else t, scale.reshape(1).to(torch.float32),
        target.contiguous(), t, partials, counts,
        n, C, D, K,
        features.stride(0), features.stride(1), weight.stride(0), weight.stride(1),
        grad_weight.stride(0), grad_weight.stride(1),
        ignore_index,
        HAS_BIAS=has_bias, DOT_FP32=dot_fp32,
        BLOCK_N=LF_BLOCK_N, BLOCK_K=block_k, BLOCK_C=LF_BLOCK_C, BLOCK_D=LF_BLOCK_D,
        num_warps=LF_NUM_WARPS,
    )
    return reduce_partials(partials, counts)
