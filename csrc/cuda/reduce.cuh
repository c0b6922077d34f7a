// Warp and block helpers shared by csrc/cuda/*.cu: fixed-order (deterministic) reductions.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace pof_fast {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

// The accumulation type of a stored type: double for double, float for float, Half and BFloat16.
template <typename Z>
using acc_t = std::conditional_t<std::is_same_v<Z, double>, double, float>;

template <typename T>
__device__ __forceinline__ T fast_exp(T x);
template <>
__device__ __forceinline__ float fast_exp<float>(float x) { return __expf(x); }
template <>
__device__ __forceinline__ double fast_exp<double>(double x) { return exp(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
  return v;  // lane 0 holds the sum
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v = fmax(v, __shfl_down_sync(kFullMask, v, off));
  return v;
}

// Sum (or max) over the block, the result broadcast to every thread. scratch: >= 32 elements of shared memory.
template <typename T, bool kMax>
__device__ __forceinline__ T block_reduce(T v, T* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? scratch[lane] : (kMax ? -INFINITY : T(0));
    w = kMax ? warp_max(w) : warp_sum(w);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  return scratch[0];
}

// Rows not ignored, counted by the whole block (every thread gets m).
__device__ __forceinline__ int64_t count_rows(const int64_t* y, int64_t n, int64_t ignore_index, int64_t* scratch) {
  int64_t m = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m += y[i] != ignore_index;
  return block_reduce<int64_t, false>(m, scratch);
}

}  // namespace cuda
}  // namespace pof_fast
