// CUDA head gradient pieces (SPEC section 2): fused residual rows, g_b + ||g|| + scale on the device,
// and the direction epilogue reading the scale from device memory. No host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common.h"
#include "reduce.cuh"

namespace pof_fast {
namespace cuda {
namespace {

// Not tuned (ran on an H200, see BENCHMARKS.md, but never swept): 256 threads per grid-stride block (the residual
// kernel's threads per row are CudaLaunch::row_threads, 256 unless benchmarks/sweep.py sets them); kNormBlocks partial
// sums of squares, a fixed count so that ||g|| is the same run after run.
constexpr int kThreads = 256;
constexpr int kNormBlocks = 512;

// residual: one block per row i of z0 [n, C] (row stride C).
//   1. mx = max_c z_ic   2. s = sum_c exp(z_ic - mx)   3. r_ic = exp(z_ic - mx) / s / max(m, 1) - [c = y_i] / max(m, 1)
// count: device int64 m (rows not ignored); out: [n, C] in O (the accumulation dtype T, or 16-bit); ignored rows
// are zero, out-of-range labels give a NaN row (no device assert: the launch must not kill the context).
template <typename Z, typename T, typename O>
__global__ void residual_kernel(const Z* __restrict__ z, const int64_t* __restrict__ y,
                                const int64_t* __restrict__ count, int64_t C, int64_t ignore_index,
                                O* __restrict__ out) {
  __shared__ T scratch[kWarpSize];
  const int64_t row = blockIdx.x;
  const Z* zr = z + row * C;
  O* r = out + row * C;
  const int64_t label = y[row];
  if (label == ignore_index) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) r[c] = O(0);
    return;
  }
  T mx = -INFINITY;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) mx = fmax(mx, static_cast<T>(zr[c]));
  mx = block_reduce<T, true>(mx, scratch);
  T s = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += fast_exp(static_cast<T>(zr[c]) - mx);
  s = block_reduce<T, false>(s, scratch);
  const int64_t m = *count;
  const T inv_m = T(1) / T(m > 1 ? m : 1);
  const bool valid = label >= 0 && label < C;
  const T f = valid ? inv_m / s : T(NAN);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    r[c] = static_cast<O>(fast_exp(static_cast<T>(zr[c]) - mx) * f - (c == label ? inv_m : T(0)));
}

// g_b[c] = sum_i R[i, c] in T: one thread per class, rows in order.
template <typename R_t, typename T>
__global__ void colsum_kernel(const R_t* __restrict__ R, int64_t n, int64_t C, T* __restrict__ grad_bias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<T>(R[i * C + c]);
  grad_bias[c] = s;
}

// partial[b] = sum of squares of g_W [CD] and g_b [C] (nb = 0 without bias) over block b's grid-stride share.
template <typename T>
__global__ void sumsq_kernel(const T* __restrict__ gw, int64_t nw, const T* __restrict__ gb, int64_t nb,
                             T* __restrict__ partial) {
  __shared__ T scratch[kWarpSize];
  T s = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < nw + nb; e += stride) {
    const T v = e < nw ? gw[e] : gb[e - nw];
    s += v * v;
  }
  s = block_reduce<T, false>(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// One block: ||g|| = sqrt(sum partial), scale = 1/||g|| (normalized) or 1 (raw), 0 when g = 0.
template <typename T>
__global__ void norm_scale_kernel(const T* __restrict__ partial, int blocks, bool normalized, T* __restrict__ norm,
                                  T* __restrict__ scale) {
  __shared__ T scratch[kWarpSize];
  T s = 0;
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) s += partial[b];
  s = block_reduce<T, false>(s, scratch);
  if (threadIdx.x == 0) {
    const T g = sqrt(s);
    *norm = g;
    *scale = g > T(0) ? (normalized ? T(1) / g : T(1)) : T(0);
  }
}

// d[i, c] = (d[i, c] + g_b[c]) * scale[0], in place; g_b may be null.
template <typename T>
__global__ void direction_epilogue_kernel(T* __restrict__ d, int64_t total, int64_t C, const T* __restrict__ gb,
                                          const T* __restrict__ scale) {
  const T s = *scale;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride)
    d[e] = (gb != nullptr ? d[e] + gb[e % C] : d[e]) * s;
}

int blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

}  // namespace
}  // namespace cuda

CudaLaunch& cuda_launch() {
  static CudaLaunch launch;
  return launch;
}

at::Tensor head_residual_cuda(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                              at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous();
  const at::Tensor y = target.to(at::kLong).contiguous();
  const at::Tensor count = y.ne(ignore_index).sum();
  TORCH_CHECK(out_dtype == z.scalar_type() || out_dtype == accumulation_type(z.scalar_type()),
              "pof_fast: the residual is stored in the logits' dtype or their accumulation dtype, got ", out_dtype);
  at::Tensor out = at::empty(z.sizes(), z.options().dtype(out_dtype));
  const int64_t n = z.size(0), C = z.size(1);
  if (n == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "pof_fast.head_residual_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto launch = [&](auto* o) {
      cuda::residual_kernel<scalar_t, T><<<static_cast<unsigned>(n), cuda_launch().row_threads, 0, stream>>>(
          z.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), count.data_ptr<int64_t>(), C, ignore_index, o);
    };
    if (out_dtype == z.scalar_type()) {
      launch(out.data_ptr<scalar_t>());
    } else {
      launch(out.data_ptr<T>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_finish_cuda(const at::Tensor& residual,
                                                                const at::Tensor& grad_weight, bool with_bias,
                                                                bool normalized) {
  const c10::cuda::CUDAGuard guard(residual.device());
  const at::Tensor R = residual.contiguous(), gw = grad_weight.contiguous();
  const int64_t n = R.size(0), C = R.size(1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad_bias = with_bias ? at::empty({C}, gw.options()) : at::Tensor();
  at::Tensor norm = at::empty({}, gw.options()), scale = at::empty({}, gw.options());
  at::Tensor partial = at::empty({cuda::kNormBlocks}, gw.options());
  AT_DISPATCH_FLOATING_TYPES(gw.scalar_type(), "pof_fast.grad_finish_cuda", [&] {
    using T = scalar_t;
    if (with_bias) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, R.scalar_type(), "pof_fast.colsum_cuda", [&] {
        cuda::colsum_kernel<scalar_t, T><<<cuda::blocks_for(C), cuda::kThreads, 0, stream>>>(
            R.data_ptr<scalar_t>(), n, C, grad_bias.data_ptr<T>());
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    cuda::sumsq_kernel<T><<<cuda::kNormBlocks, cuda::kThreads, 0, stream>>>(
        gw.data_ptr<T>(), gw.numel(), with_bias ? grad_bias.data_ptr<T>() : nullptr, with_bias ? C : 0,
        partial.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda::norm_scale_kernel<T><<<1, cuda::kThreads, 0, stream>>>(partial.data_ptr<T>(), cuda::kNormBlocks, normalized,
                                                                 norm.data_ptr<T>(), scale.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_bias, norm, scale};
}

void direction_epilogue_cuda(at::Tensor& d, const c10::optional<at::Tensor>& grad_bias, const at::Tensor& scale) {
  const c10::cuda::CUDAGuard guard(d.device());
  TORCH_CHECK(d.is_contiguous(), "pof_fast: direction logits must be contiguous");
  const at::Tensor s = scale.to(d.scalar_type()).contiguous();
  const at::Tensor gb = grad_bias.has_value() ? grad_bias->to(d.scalar_type()).contiguous() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "pof_fast.direction_epilogue_cuda", [&] {
    cuda::direction_epilogue_kernel<scalar_t><<<cuda::blocks_for(d.numel()), cuda::kThreads, 0, stream>>>(
        d.data_ptr<scalar_t>(), d.numel(), d.size(1), gb.defined() ? gb.data_ptr<scalar_t>() : nullptr,
        s.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pof_fast
