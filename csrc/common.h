// Shared by every translation unit of pof_fast._C: argument checks, the op declarations per device.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

#include "search_driver.h"

#define POF_CHECK_DIM(x, d, name) \
  TORCH_CHECK_VALUE((x).dim() == (d), "pof_fast: ", name, " must have ", d, " dimension(s), got shape ", (x).sizes())
#define POF_CHECK_FLOAT(x, name)                                                                     \
  TORCH_CHECK_TYPE(at::isFloatingType((x).scalar_type()) && !at::isComplexType((x).scalar_type()),      \
              "pof_fast: ", name, " must be a float32/float64/float16/bfloat16 tensor, got ", (x).scalar_type())
#define POF_CHECK_SAME_DEVICE(x, y, xname, yname)                                                    \
  TORCH_CHECK_VALUE((x).device() == (y).device(), "pof_fast: ", xname, " is on ", (x).device(), " but ", yname, \
              " is on ", (y).device(), ": put them on one device")

namespace pof_fast {

// float64 stays float64; every other float dtype accumulates in float32 (as pof_fast.reference).
inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_16bit(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// 16-bit features on a GPU: the g_W and d products run on tensor cores (16-bit operands, fp32 output).
inline bool tensor_core_gemms(const at::Tensor& features) { return features.is_cuda() && is_16bit(features); }

// d = h g_W^T as (h h^T) R: n^2 (D + C) multiply-adds instead of n D C, cheaper when n is small.
inline bool gram_cheaper(int64_t n, int64_t D, int64_t C) { return n * (D + C) < D * C; }

// 16-bit features and d formed as h u_W^T (large heads, every device): R and d are stored in the input dtype, so
// that the search's peak holds two 16-bit [n, C] arrays (z0 and R, then z0 and d), and d is formed from u_W rounded
// to that dtype (the rounded u_W is the direction returned).
inline bool stores_16bit_lines(const at::Tensor& features, int64_t classes) {
  return is_16bit(features) && !gram_cheaper(features.size(0), features.size(1), classes);
}

// Checks shared by the line_stats and search ops; returns target as contiguous int64.
at::Tensor check_line_inputs(const at::Tensor& logits, const at::Tensor& direction, const at::Tensor& target);

// Ops, CPU implementations (csrc/*.cpp).
at::Tensor line_stats_cpu(const at::Tensor& logits, const at::Tensor& direction, const at::Tensor& target,
                          const at::Tensor& steps, int64_t ignore_index);
// R in out_dtype: the accumulation dtype, or the 16-bit dtype of the logits (stores_16bit_lines).
at::Tensor head_residual_cpu(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                             at::ScalarType out_dtype);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> search_cpu(
    const at::Tensor& logits, const at::Tensor& direction, const at::Tensor& target, c10::string_view method,
    double init_step, double max_step, int64_t partitions, int64_t ignore_index, int64_t newton_iterations,
    int64_t newton_points);

// Device-independent composites (csrc/head_residual.cpp): matrix products through ATen, the rest fused.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_gradient(
    const at::Tensor& features, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, bool normalized);
at::Tensor direction_logits(const at::Tensor& features, const at::Tensor& grad_weight,
                            const c10::optional<at::Tensor>& grad_bias, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& residual);
// d = h u_W^T + u_b as a 16-bit [n, C] array (stores_16bit_lines). grad_weight and grad_bias (fp32 g; grad_bias
// nullopt without a bias) become u = scale g rounded to the features' dtype, in place, and d is formed from the
// values they then hold.
at::Tensor direction_logits_16bit(const at::Tensor& features, at::Tensor& grad_weight,
                                  const c10::optional<at::Tensor>& grad_bias, const at::Tensor& scale);

// The whole search (csrc/line_search.cpp): step, u_W, u_b ([0] without bias), ||g||, l(0), l(t*), capped, ||u||
// (pof_fast._types.SearchTensors).
using SearchTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor>;
SearchTensors line_search(const at::Tensor& features, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                          c10::string_view method, bool normalized, double init_step, double max_step,
                          int64_t partitions, int64_t ignore_index, int64_t newton_iterations,
                          int64_t newton_points, c10::optional<bool> logits_free);

#ifdef POF_FAST_WITH_CUDA
// Launch settings of the CUDA kernels that benchmarks/sweep.py varies at run time (pof_fast._C._set_cuda_launch;
// process-wide, set between calls, never during one); the defaults are the shipped values.
struct CudaLaunch {
  int row_threads = 256;  // threads per block of the one-block-per-row residual kernel
  int scorer_warps = 8;   // rows (warps) per block of the line scorer and the one-launch search: 2, 4 or 8
};
CudaLaunch& cuda_launch();

// CUDA ops and pieces (csrc/cuda/*.cu).
at::Tensor line_stats_cuda(const at::Tensor& logits, const at::Tensor& direction, const at::Tensor& target,
                           const at::Tensor& steps, int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> search_cuda(
    const at::Tensor& logits, const at::Tensor& direction, const at::Tensor& target, c10::string_view method,
    double init_step, double max_step, int64_t partitions, int64_t ignore_index, int64_t newton_iterations,
    int64_t newton_points);
at::Tensor head_residual_cuda(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                              at::ScalarType out_dtype);
// (g_b or undefined, ||g||, scale) in g_W's dtype from residual (any float dtype) and g_W, all on the device, no
// host synchronisation.
std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_finish_cuda(const at::Tensor& residual,
                                                                const at::Tensor& grad_weight, bool with_bias,
                                                                bool normalized);
// d <- (d + g_b) * scale in place, scale read from device memory.
void direction_epilogue_cuda(at::Tensor& d, const c10::optional<at::Tensor>& grad_bias, const at::Tensor& scale);
#endif

// Search methods, in the order of pof_fast.drivers.METHODS.
enum Method : int { kNewton = 0, kBracketGrid = 1, kGrid = 2 };
Method parse_method(c10::string_view method);
// The search op's arguments checked (ValueError naming the bad one) and packed (csrc/search.cpp).
Plan make_plan(c10::string_view method, double init_step, double max_step, int64_t partitions,
               int64_t newton_iterations, int64_t newton_points);

}  // namespace pof_fast
