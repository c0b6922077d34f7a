// CUDA line statistics and the whole search in one launch (SPEC section 4).
//
// Scoring: one warp per row; every lane walks its classes once and keeps, for up to kRegs candidates
// at a time in registers, an online log-sum-exp (running max m, s0 = sum e, s1 = sum e d, s2 = sum e d^2
// with e = exp(z0 - t d - m)); lanes merge by shuffles in a fixed order. Blocks add their warps in warp
// order and write one partial per block; the partials are added in block order (deterministic).
//
// Search: a cooperative launch of co-resident blocks runs the drivers of csrc/search_driver.h in every
// thread; each scorer call is "partials, grid barrier, every block adds the partials in the same order",
// so all threads take identical decisions and t*, l(0), l(t*), capped land in device memory.
#include <cooperative_groups.h>

#include <type_traits>

#include "../common.h"
#include "../search_driver.h"
#include "reduce.cuh"

namespace pof_fast {
namespace cuda {
namespace {

// Not tuned (measured on an H200, see BENCHMARKS.md, but never swept): kRegs x 4 accumulators stay in
// registers (compile-time: not in the sweep); 8 warps per block keep the per-block partials few for the n = 256
// cases of SPEC section 5. Rows (warps) per block are a template parameter, kWarps unless the launch settings
// say otherwise (CudaLaunch::scorer_warps, swept by benchmarks/sweep.py; 2 and 4 are built for fp32 heads only,
// to bound the build time).
constexpr int kRegs = 8;  // candidates held in registers per pass over a row
constexpr int kWarps = 8;
constexpr int kFinalThreads = 256;  // the one-block finalize kernel

// Adds row (z, d, label y) for candidates st[0:kc] to acc (valid in lane 0). Z, Dir: the stored dtypes of z0 and d
// (d is 16-bit beside 16-bit z0 for large heads, else T); T: the accumulation dtype.
template <typename Z, typename Dir, typename T>
__device__ __forceinline__ void warp_row(const Z* __restrict__ z, const Dir* __restrict__ d, int64_t C, int64_t y,
                                         const T (&st)[kRegs], int kc, T (&acc)[3][kRegs]) {
  const int lane = threadIdx.x % kWarpSize;
  T m[kRegs], s0[kRegs], s1[kRegs], s2[kRegs];
#pragma unroll
  for (int j = 0; j < kRegs; ++j) {
    m[j] = -INFINITY;
    s0[j] = s1[j] = s2[j] = T(0);
  }
  // 1. online log-sum-exp per lane over classes lane, lane + 32, ...
  for (int64_t c = lane; c < C; c += kWarpSize) {
    const T zc = static_cast<T>(z[c]), dc = static_cast<T>(d[c]);
#pragma unroll
    for (int j = 0; j < kRegs; ++j) {
      if (j < kc) {
        const T x = zc - st[j] * dc;
        if (x > m[j]) {
          const T r = fast_exp(m[j] - x);
          s0[j] *= r;
          s1[j] *= r;
          s2[j] *= r;
          m[j] = x;
        }
        const T e = fast_exp(x - m[j]), ed = e * dc;
        s0[j] += e;
        s1[j] += ed;
        s2[j] += ed * dc;
      }
    }
  }
  // 2. merge lanes (fixed shuffle-down tree; lane 0 ends with the row)
#pragma unroll
  for (int j = 0; j < kRegs; ++j) {
    for (int off = kWarpSize / 2; off > 0; off >>= 1) {
      const T om = __shfl_down_sync(kFullMask, m[j], off);
      const T o0 = __shfl_down_sync(kFullMask, s0[j], off);
      const T o1 = __shfl_down_sync(kFullMask, s1[j], off);
      const T o2 = __shfl_down_sync(kFullMask, s2[j], off);
      const T nm = fmax(m[j], om);
      const T a = m[j] == -INFINITY ? T(0) : fast_exp(m[j] - nm);
      const T b = om == -INFINITY ? T(0) : fast_exp(om - nm);
      s0[j] = s0[j] * a + o0 * b;
      s1[j] = s1[j] * a + o1 * b;
      s2[j] = s2[j] * a + o2 * b;
      m[j] = nm;
    }
  }
  // 3. loss = lse - z_y + t d_y, slope = d_y - E[d], curvature = Var[d]; a bad label gives NaN
  if (lane == 0) {
    const bool valid = y >= 0 && y < C;
    const T zy = valid ? static_cast<T>(z[y]) : T(NAN), dy = valid ? static_cast<T>(d[y]) : T(NAN);
#pragma unroll
    for (int j = 0; j < kRegs; ++j) {
      if (j < kc) {
        const T mean = s1[j] / s0[j];
        acc[0][j] += m[j] + log(s0[j]) - zy + st[j] * dy;
        acc[1][j] += dy - mean;
        acc[2][j] += s2[j] / s0[j] - mean * mean;
      }
    }
  }
}

// This block's rows (warp w takes rows block * Warps + w, then strides by the grid) for steps[0:k],
// k <= kChunk; writes partial[(block * 3 + r) * stride + j]. red: shared [Warps][3][kRegs].
template <int Warps, typename Z, typename Dir, typename T>
__device__ void block_partial(const Z* z, const Dir* d, const int64_t* y, int64_t n, int64_t C, int64_t ignore_index,
                              const T* steps, int k, T* partial, int stride, T (*red)[3][kRegs]) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int k0 = 0; k0 < k; k0 += kRegs) {
    const int kc = k - k0 < kRegs ? k - k0 : kRegs;
    T st[kRegs], acc[3][kRegs];
#pragma unroll
    for (int j = 0; j < kRegs; ++j) {
      st[j] = j < kc ? steps[k0 + j] : T(0);
      acc[0][j] = acc[1][j] = acc[2][j] = T(0);
    }
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * Warps + warp; row < n;
         row += static_cast<int64_t>(gridDim.x) * Warps) {
      const int64_t label = y[row];
      if (label == ignore_index) continue;
      warp_row(z + row * C, d + row * C, C, label, st, kc, acc);
    }
    if (lane == 0)
      for (int r = 0; r < 3; ++r)
        for (int j = 0; j < kRegs; ++j) red[warp][r][j] = acc[r][j];
    __syncthreads();
    if (threadIdx.x < 3 * kc) {
      const int r = threadIdx.x / kc, j = threadIdx.x % kc;
      T s = 0;
      for (int w = 0; w < Warps; ++w) s += red[w][r][j];
      partial[(static_cast<int64_t>(blockIdx.x) * 3 + r) * stride + k0 + j] = s;
    }
    __syncthreads();
  }
}

template <int Warps, typename Z, typename Dir, typename T>
__global__ void __launch_bounds__(Warps * kWarpSize) line_stats_kernel(const Z* __restrict__ z, const Dir* __restrict__ d,
                                                              const int64_t* __restrict__ y, int64_t n, int64_t C,
                                                              int64_t ignore_index, const T* __restrict__ steps,
                                                              int K, T* __restrict__ partial) {
  __shared__ T red[Warps][3][kRegs];
  for (int k0 = 0; k0 < K; k0 += kChunk) {
    const int k = K - k0 < kChunk ? K - k0 : kChunk;
    block_partial<Warps>(z, d, y, n, C, ignore_index, steps + k0, k, partial + k0, K, red);
  }
}

// out[r, j] = sum over blocks of partial[(b * 3 + r) * K + j] / max(m, 1), one block.
template <typename T>
__global__ void finalize_kernel(const T* __restrict__ partial, int blocks, int K, const int64_t* __restrict__ y,
                                int64_t n, int64_t ignore_index, T* __restrict__ out) {
  __shared__ int64_t scratch[kWarpSize];
  const int64_t m = count_rows(y, n, ignore_index, scratch);
  const T inv_m = T(1) / T(m > 1 ? m : 1);
  for (int e = threadIdx.x; e < 3 * K; e += blockDim.x) {
    const int r = e / K, j = e % K;
    T s = 0;
    for (int b = 0; b < blocks; ++b) s += partial[(static_cast<int64_t>(b) * 3 + r) * K + j];
    out[e] = s * inv_m;
  }
}

// The scorer the drivers call inside search_kernel: partials, grid barrier, identical sums in every block.
template <int Warps, typename Z, typename Dir, typename T>
struct GridScorer {
  const Z* z;
  const Dir* d;
  const int64_t* y;
  int64_t n, C, ignore_index;
  T* partial;  // [2][gridDim.x][3][kChunk], alternating so one barrier per call suffices
  T inv_m;
  int parity;
  T (*red)[3][kRegs];
  T (*sums)[kChunk];  // shared [3][kChunk]

  __device__ void operator()(const T* steps, int k, T* loss, T* slope, T* curv) {
    T* buf = partial + static_cast<int64_t>(parity) * gridDim.x * 3 * kChunk;
    parity ^= 1;
    block_partial<Warps>(z, d, y, n, C, ignore_index, steps, k, buf, kChunk, red);
    if (gridDim.x > 1) {
      cooperative_groups::this_grid().sync();
    }
    if (threadIdx.x < 3 * k) {
      const int r = threadIdx.x / k, j = threadIdx.x % k;
      T s = 0;
      for (unsigned b = 0; b < gridDim.x; ++b) s += __ldcg(buf + (static_cast<int64_t>(b) * 3 + r) * kChunk + j);
      sums[r][j] = s * inv_m;
    }
    __syncthreads();
    for (int j = 0; j < k; ++j) {
      loss[j] = sums[0][j];
      slope[j] = sums[1][j];
      curv[j] = sums[2][j];
    }
    __syncthreads();
  }
};

template <int Warps, typename Z, typename Dir, typename T>
__global__ void __launch_bounds__(Warps * kWarpSize) search_kernel(const Z* __restrict__ z, const Dir* __restrict__ d,
                                                          const int64_t* __restrict__ y, int64_t n, int64_t C,
                                                          int64_t ignore_index, Plan plan, T* __restrict__ partial,
                                                          T* __restrict__ result, bool* __restrict__ capped) {
  __shared__ T red[Warps][3][kRegs];
  __shared__ T sums[3][kChunk];
  __shared__ int64_t scratch[kWarpSize];
  const int64_t m = count_rows(y, n, ignore_index, scratch);
  GridScorer<Warps, Z, Dir, T> score{z, d, y, n, C, ignore_index, partial, T(1) / T(m > 1 ? m : 1), 0, red, sums};
  const Outcome<T> out = run_search<T>(score, plan);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    result[0] = out.step;
    result[1] = out.loss0;
    result[2] = out.loss;
    *capped = out.capped;
  }
}

// d as the kernels read it: a 16-bit d beside 16-bit z0 as it is (no [n, C] fp32 copy), else in the accumulation
// dtype.
Tensor stored_direction(const Tensor& logits, const Tensor& direction) {
  return direction.scalar_type() == logits.scalar_type()
             ? as_contiguous(direction)
             : as_contiguous(as_dtype(direction, accumulation_type(logits.scalar_type())));
}

// f(d's data pointer) typed as stored_direction stored it: Z (16-bit beside 16-bit z0) or T.
template <typename Z, typename T, typename F>
void with_direction(const Tensor& d, F&& f) {
  if (d.scalar_type() == torch::headeronly::CppTypeToScalarType<Z>::value) {
    f(d.const_data_ptr<Z>());
  } else {
    f(d.const_data_ptr<T>());
  }
}

// f(std::integral_constant<int, Warps>) for the rows per block of the launch settings: 8 for every dtype; 2 and 4
// (the sweep's other values) are built for fp32 z0 and d only.
template <typename Z, typename Dir, typename F>
void with_warps(F&& f) {
  if constexpr (std::is_same_v<Z, float> && std::is_same_v<Dir, float>) {
    switch (cuda_launch().scorer_warps) {
      case 2:
        return f(std::integral_constant<int, 2>{});
      case 4:
        return f(std::integral_constant<int, 4>{});
      default:
        break;
    }
  }
  f(std::integral_constant<int, kWarps>{});
}

// The device's SM count (the launches below size their grids by it).
int multiprocessors(int device) {
  int count = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

}  // namespace
}  // namespace cuda

Tensor line_stats_cuda(const Tensor& logits, const Tensor& direction, const Tensor& target, const Tensor& steps,
                       int64_t ignore_index) {
  const Tensor y = check_line_inputs(logits, direction, target);
  POF_CHECK_DIM(steps, 1, "steps");
  const int device = logits.get_device_index();
  const torch::stable::accelerator::DeviceGuard guard(device);
  const ScalarType acc = accumulation_type(logits.scalar_type());
  const Tensor z = as_contiguous(logits), d = cuda::stored_direction(logits, direction);
  const Tensor t = as_contiguous(torch::stable::to(steps, acc, std::nullopt, logits.device()));
  const int64_t n = z.size(0), C = z.size(1), K = t.size(0);
  Tensor out = torch::stable::new_empty(z, {3, K}, acc);
  if (K == 0) return out;
  const int sms = cuda::multiprocessors(device);
  const cudaStream_t stream = aten::current_cuda_stream(device);
  dispatch_stored(z.scalar_type(), [&](auto stored) {
    using Z = decltype(stored);
    using T = cuda::acc_t<Z>;
    cuda::with_direction<Z, T>(d, [&](const auto* dp) {
      using Dir = std::remove_cv_t<std::remove_pointer_t<decltype(dp)>>;
      cuda::with_warps<Z, Dir>([&](auto warps) {
        constexpr int Warps = decltype(warps)::value;
        const int blocks = static_cast<int>(std::min<int64_t>((n + Warps - 1) / Warps, 4 * sms));
        Tensor partial = torch::stable::new_empty(out, {blocks, 3, K});
        cuda::line_stats_kernel<Warps, Z><<<blocks, Warps * cuda::kWarpSize, 0, stream>>>(
            z.const_data_ptr<Z>(), dp, y.const_data_ptr<int64_t>(), n, C, ignore_index, t.const_data_ptr<T>(),
            static_cast<int>(K), partial.mutable_data_ptr<T>());
        STD_CUDA_KERNEL_LAUNCH_CHECK();
        cuda::finalize_kernel<T><<<1, cuda::kFinalThreads, 0, stream>>>(
            partial.const_data_ptr<T>(), blocks, static_cast<int>(K), y.const_data_ptr<int64_t>(), n, ignore_index,
            out.mutable_data_ptr<T>());
        STD_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> search_cuda(const Tensor& logits, const Tensor& direction,
                                                       const Tensor& target, std::string_view method, double init_step,
                                                       double max_step, int64_t partitions, int64_t ignore_index,
                                                       int64_t newton_iterations, int64_t newton_points) {
  const Tensor y = check_line_inputs(logits, direction, target);
  const Plan plan = make_plan(method, init_step, max_step, partitions, newton_iterations, newton_points);
  const int device = logits.get_device_index();
  const torch::stable::accelerator::DeviceGuard guard(device);
  const ScalarType acc = accumulation_type(logits.scalar_type());
  const Tensor z = as_contiguous(logits), d = cuda::stored_direction(logits, direction);
  const int64_t n = z.size(0), C = z.size(1);
  Tensor result = torch::stable::new_empty(z, {3}, acc);
  Tensor capped = torch::stable::new_empty(z, {}, ScalarType::Bool);
  int cooperative = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  const int sms = cuda::multiprocessors(device);
  const cudaStream_t stream = aten::current_cuda_stream(device);
  dispatch_stored(z.scalar_type(), [&](auto stored) {
    using Z = decltype(stored);
    using T = cuda::acc_t<Z>;
    cuda::with_direction<Z, T>(d, [&](const auto* direction_ptr) {
      using Dir = std::remove_cv_t<std::remove_pointer_t<decltype(direction_ptr)>>;
      cuda::with_warps<Z, Dir>([&](auto warps) {
        constexpr int Warps = decltype(warps)::value;
        auto kernel = cuda::search_kernel<Warps, Z, Dir, T>;
        int per_sm = 0;
        STD_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Warps * cuda::kWarpSize, 0));
        // All blocks must be resident at once for the grid barrier; one block when that cannot be promised.
        const int64_t wanted = (n + Warps - 1) / Warps;
        const int blocks =
            cooperative && per_sm > 0 ? static_cast<int>(std::min<int64_t>(wanted, int64_t(per_sm) * sms)) : 1;
        Tensor partial = torch::stable::new_empty(result, {2, blocks, 3, kChunk});
        const Z* zp = z.const_data_ptr<Z>();
        const Dir* dp = direction_ptr;
        const int64_t* yp = y.const_data_ptr<int64_t>();
        T* pp = partial.mutable_data_ptr<T>();
        T* rp = result.mutable_data_ptr<T>();
        bool* cp = capped.mutable_data_ptr<bool>();
        int64_t rows = n, classes = C, ignore = ignore_index;
        Plan p = plan;
        void* args[] = {&zp, &dp, &yp, &rows, &classes, &ignore, &p, &pp, &rp, &cp};
        if (blocks > 1) {
          STD_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(blocks),
                                                     dim3(Warps * cuda::kWarpSize), args, 0, stream));
        } else {
          kernel<<<1, Warps * cuda::kWarpSize, 0, stream>>>(zp, dp, yp, rows, classes, ignore, p, pp, rp, cp);
          STD_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  });
  return {torch::stable::select(result, 0, 0), torch::stable::select(result, 0, 1), torch::stable::select(result, 0, 2),
          capped};
}

}  // namespace pof_fast
