// Shared by every translation unit of pof_fast._C: argument checks, dtype dispatch, the op declarations per device.
#pragma once

#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>

#include "search_driver.h"
#include "torch_calls.h"

namespace pof_fast {

// "[4, 5]", "cpu", "cuda:0", "Float": the pieces of an argument error.
std::string shape_of(const Tensor& t);
std::string device_of(const Tensor& t);

template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

}  // namespace pof_fast

// A bad argument: RuntimeError in Python, with this message. A stable-ABI kernel's C++ exception reaches Python as
// RuntimeError on every torch (2.10-2.14 would turn std::invalid_argument into ValueError, 2.15 does not), so the
// ops raise RuntimeError everywhere; the public API checks its arguments first, with ValueError and TypeError.
#define POF_CHECK(cond, ...) \
  if (!(cond)) throw std::runtime_error(pof_fast::message("pof_fast: ", __VA_ARGS__))
#define POF_CHECK_DIM(x, d, name) \
  POF_CHECK((x).dim() == (d), name, " must have ", d, " dimension(s), got shape ", pof_fast::shape_of(x))
#define POF_CHECK_FLOAT(x, name) \
  POF_CHECK(pof_fast::is_float((x).scalar_type()), name,                                              \
            " must be a float32/float64/float16/bfloat16 tensor, got ", (x).scalar_type())
#define POF_CHECK_SAME_DEVICE(x, y, xname, yname)                                                        \
  POF_CHECK(pof_fast::device_of(x) == pof_fast::device_of(y), xname, " is on ", pof_fast::device_of(x), " but ", \
            yname, " is on ", pof_fast::device_of(y), ": put them on one device")

namespace pof_fast {

inline bool is_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// float64 stays float64; every other float dtype accumulates in float32 (as pof_fast.reference).
inline ScalarType accumulation_type(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

inline bool is_16bit(const Tensor& t) {
  return t.scalar_type() == ScalarType::Half || t.scalar_type() == ScalarType::BFloat16;
}

// f(T{}) for the accumulation dtype t (float or double).
template <typename F>
void dispatch_accumulation(ScalarType t, F&& f) {
  if (t == ScalarType::Double) {
    f(double{});
  } else {
    f(float{});
  }
}

// f(S{}) for a float dtype s as it is stored: float, double, Half or BFloat16.
template <typename F>
void dispatch_stored(ScalarType s, F&& f) {
  switch (s) {
    case ScalarType::Float: return f(float{});
    case ScalarType::Double: return f(double{});
    case ScalarType::Half: return f(Half{});
    case ScalarType::BFloat16: return f(BFloat16{});
    default: POF_CHECK(false, "unsupported dtype ", s, " (use float32/float64/float16/bfloat16)");
  }
}

// 16-bit features on a GPU: the g_W and d products run on tensor cores (16-bit operands, fp32 output).
inline bool tensor_core_gemms(const Tensor& features) { return features.is_cuda() && is_16bit(features); }

// d = h g_W^T as (h h^T) R: n^2 (D + C) multiply-adds instead of n D C, cheaper when n is small.
inline bool gram_cheaper(int64_t n, int64_t D, int64_t C) { return n * (D + C) < D * C; }

// 16-bit features and d formed as h u_W^T (large heads, every device): R and d are stored in the input dtype, so
// that the search's peak holds two 16-bit [n, C] arrays (z0 and R, then z0 and d), and d is formed from u_W rounded
// to that dtype (the rounded u_W is the direction returned).
inline bool stores_16bit_lines(const Tensor& features, int64_t classes) {
  return is_16bit(features) && !gram_cheaper(features.size(0), features.size(1), classes);
}

// Checks shared by the line_stats and search ops; returns target as contiguous int64.
Tensor check_line_inputs(const Tensor& logits, const Tensor& direction, const Tensor& target);

// Ops, CPU implementations (csrc/*.cpp).
Tensor line_stats_cpu(const Tensor& logits, const Tensor& direction, const Tensor& target, const Tensor& steps,
                      int64_t ignore_index);
// R in out_dtype: the accumulation dtype, or the 16-bit dtype of the logits (stores_16bit_lines).
Tensor head_residual_cpu(const Tensor& logits, const Tensor& target, int64_t ignore_index, ScalarType out_dtype);
std::tuple<Tensor, Tensor, Tensor, Tensor> search_cpu(const Tensor& logits, const Tensor& direction,
                                                      const Tensor& target, std::string_view method, double init_step,
                                                      double max_step, int64_t partitions, int64_t ignore_index,
                                                      int64_t newton_iterations, int64_t newton_points);

// Device-independent composites (csrc/head_residual.cpp): matrix products through ATen, the rest fused.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> head_gradient(const Tensor& features, const Tensor& weight,
                                                                         const std::optional<Tensor>& bias,
                                                                         const Tensor& target, int64_t ignore_index,
                                                                         bool normalized);
Tensor direction_logits(const Tensor& features, const Tensor& grad_weight, const std::optional<Tensor>& grad_bias,
                        const Tensor& scale, const std::optional<Tensor>& residual);
// The same, written into `into` (a contiguous [n, C] array of d's dtype whose values are spent, e.g. R once g_W is
// formed) where d is the product h g_W^T; the Gram form (which reads R) forms a new array and leaves `into` alone.
Tensor direction_logits_into(const Tensor& features, const Tensor& grad_weight, const std::optional<Tensor>& grad_bias,
                             const Tensor& scale, const std::optional<Tensor>& residual,
                             const std::optional<Tensor>& into);
// d = h u_W^T + u_b as a 16-bit [n, C] array (stores_16bit_lines), written into `into` when given (a contiguous
// [n, C] array of the features' dtype whose values are spent). grad_weight and grad_bias (fp32 g; grad_bias nullopt
// without a bias) become u = scale g rounded to the features' dtype, in place, and d is formed from the values they
// then hold.
Tensor direction_logits_16bit(const Tensor& features, const Tensor& grad_weight, const std::optional<Tensor>& grad_bias,
                              const Tensor& scale, const std::optional<Tensor>& into);

// The whole search (csrc/line_search.cpp): step, u_W, u_b ([0] without bias), ||g||, l(0), l(t*), capped, ||u||
// (pof_fast._types.SearchTensors).
using SearchTensors = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
SearchTensors line_search(const Tensor& features, const Tensor& weight, const std::optional<Tensor>& bias,
                          const Tensor& target, std::string_view method, bool normalized, double init_step,
                          double max_step, int64_t partitions, int64_t ignore_index, int64_t newton_iterations,
                          int64_t newton_points, std::optional<bool> logits_free);

#ifdef POF_FAST_WITH_CUDA
// Launch settings of the CUDA kernels that benchmarks/sweep.py varies at run time (pof_fast._C._set_cuda_launch;
// process-wide, set between calls, never during one); the defaults are the shipped values.
struct CudaLaunch {
  int row_threads = 256;  // threads per block of the one-block-per-row residual kernel
  int scorer_warps = 8;   // rows (warps) per block of the line scorer and the one-launch search: 2, 4 or 8
};
CudaLaunch& cuda_launch();

// CUDA ops and pieces (csrc/cuda/*.cu).
Tensor line_stats_cuda(const Tensor& logits, const Tensor& direction, const Tensor& target, const Tensor& steps,
                       int64_t ignore_index);
std::tuple<Tensor, Tensor, Tensor, Tensor> search_cuda(const Tensor& logits, const Tensor& direction,
                                                       const Tensor& target, std::string_view method, double init_step,
                                                       double max_step, int64_t partitions, int64_t ignore_index,
                                                       int64_t newton_iterations, int64_t newton_points);
Tensor head_residual_cuda(const Tensor& logits, const Tensor& target, int64_t ignore_index, ScalarType out_dtype);
// (g_b or undefined, ||g||, scale) in g_W's dtype from residual (any float dtype) and g_W, all on the device, no
// host synchronisation.
std::tuple<Tensor, Tensor, Tensor> grad_finish_cuda(const Tensor& residual, const Tensor& grad_weight, bool with_bias,
                                                    bool normalized);
// d <- (d + g_b) * scale in place, scale read from device memory.
void direction_epilogue_cuda(const Tensor& d, const std::optional<Tensor>& grad_bias, const Tensor& scale);
#endif

// Search methods, in the order of pof_fast.drivers.METHODS.
enum Method : int { kNewton = 0, kBracketGrid = 1, kGrid = 2 };
Method parse_method(std::string_view method);
// The search op's arguments checked (ValueError naming the bad one) and packed (csrc/search.cpp).
Plan make_plan(std::string_view method, double init_step, double max_step, int64_t partitions,
               int64_t newton_iterations, int64_t newton_points);

}  // namespace pof_fast
