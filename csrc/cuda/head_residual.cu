// CUDA head gradient pieces (SPEC section 2): fused residual rows, g_b + ||g|| + scale on the device,
// and the direction epilogue reading the scale from device memory. No host synchronisation.
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
// count: device int64 m (rows not ignored, count_kernel); out: [n, C] in O (the accumulation dtype T, or 16-bit);
// ignored rows are zero, out-of-range labels give a NaN row (no device assert: the launch must not kill the context).
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

// *count = m, the rows not ignored (one block).
__global__ void count_kernel(const int64_t* __restrict__ y, int64_t n, int64_t ignore_index,
                             int64_t* __restrict__ count) {
  __shared__ int64_t scratch[kWarpSize];
  const int64_t m = count_rows(y, n, ignore_index, scratch);
  if (threadIdx.x == 0) *count = m;
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

Tensor head_residual_cuda(const Tensor& logits, const Tensor& target, int64_t ignore_index, ScalarType out_dtype) {
  const torch::stable::accelerator::DeviceGuard guard(logits.get_device_index());
  const Tensor z = as_contiguous(logits);
  const Tensor y = as_contiguous(as_dtype(target, ScalarType::Long));
  STD_TORCH_CHECK(out_dtype == z.scalar_type() || out_dtype == accumulation_type(z.scalar_type()),
                  "pof_fast: the residual is stored in the logits' dtype or their accumulation dtype, got ", out_dtype);
  Tensor out = torch::stable::new_empty(z, z.sizes(), out_dtype);
  const int64_t n = z.size(0), C = z.size(1);
  if (n == 0) return out;
  const cudaStream_t stream = aten::current_cuda_stream(z.get_device_index());
  Tensor count = torch::stable::new_empty(y, {}, ScalarType::Long);
  cuda::count_kernel<<<1, cuda::kThreads, 0, stream>>>(y.const_data_ptr<int64_t>(), n, ignore_index,
                                                       count.mutable_data_ptr<int64_t>());
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  dispatch_stored(z.scalar_type(), [&](auto stored) {
    using Z = decltype(stored);
    using T = cuda::acc_t<Z>;
    const auto launch = [&](auto* o) {
      cuda::residual_kernel<Z, T><<<static_cast<unsigned>(n), cuda_launch().row_threads, 0, stream>>>(
          z.const_data_ptr<Z>(), y.const_data_ptr<int64_t>(), count.const_data_ptr<int64_t>(), C, ignore_index, o);
    };
    if (out_dtype == z.scalar_type()) {
      launch(out.mutable_data_ptr<Z>());
    } else {
      launch(out.mutable_data_ptr<T>());
    }
  });
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<Tensor, Tensor, Tensor> grad_finish_cuda(const Tensor& residual, const Tensor& grad_weight, bool with_bias,
                                                    bool normalized) {
  const torch::stable::accelerator::DeviceGuard guard(residual.get_device_index());
  const Tensor R = as_contiguous(residual), gw = as_contiguous(grad_weight);
  const int64_t n = R.size(0), C = R.size(1);
  const cudaStream_t stream = aten::current_cuda_stream(R.get_device_index());
  Tensor grad_bias = with_bias ? torch::stable::new_empty(gw, {C}) : Tensor();
  Tensor norm = torch::stable::new_empty(gw, {}), scale = torch::stable::new_empty(gw, {});
  Tensor partial = torch::stable::new_empty(gw, {cuda::kNormBlocks});
  dispatch_accumulation(gw.scalar_type(), [&](auto type) {
    using T = decltype(type);
    if (with_bias) {
      dispatch_stored(R.scalar_type(), [&](auto stored) {
        using S = decltype(stored);
        cuda::colsum_kernel<S, T><<<cuda::blocks_for(C), cuda::kThreads, 0, stream>>>(
            R.const_data_ptr<S>(), n, C, grad_bias.mutable_data_ptr<T>());
      });
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    }
    cuda::sumsq_kernel<T><<<cuda::kNormBlocks, cuda::kThreads, 0, stream>>>(
        gw.const_data_ptr<T>(), gw.numel(), with_bias ? grad_bias.const_data_ptr<T>() : nullptr, with_bias ? C : 0,
        partial.mutable_data_ptr<T>());
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    cuda::norm_scale_kernel<T><<<1, cuda::kThreads, 0, stream>>>(partial.const_data_ptr<T>(), cuda::kNormBlocks,
                                                                 normalized, norm.mutable_data_ptr<T>(),
                                                                 scale.mutable_data_ptr<T>());
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_bias, norm, scale};
}

void direction_epilogue_cuda(const Tensor& d, const std::optional<Tensor>& grad_bias, const Tensor& scale) {
  const torch::stable::accelerator::DeviceGuard guard(d.get_device_index());
  STD_TORCH_CHECK(d.is_contiguous(), "pof_fast: direction logits must be contiguous");
  const Tensor s = as_contiguous(as_dtype(scale, d.scalar_type()));
  const Tensor gb = grad_bias.has_value() ? as_contiguous(as_dtype(*grad_bias, d.scalar_type())) : Tensor();
  const cudaStream_t stream = aten::current_cuda_stream(d.get_device_index());
  dispatch_accumulation(d.scalar_type(), [&](auto type) {
    using T = decltype(type);
    cuda::direction_epilogue_kernel<T><<<cuda::blocks_for(d.numel()), cuda::kThreads, 0, stream>>>(
        d.mutable_data_ptr<T>(), d.numel(), d.size(1), gb.defined() ? gb.const_data_ptr<T>() : nullptr,
        s.const_data_ptr<T>());
  });
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pof_fast
