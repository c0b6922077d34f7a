// The one surface through which pof_fast._C speaks to torch: the LibTorch stable ABI.
//
// setup.py compiles every source with TORCH_TARGET_VERSION = torch 2.10 (STABLE_ABI_TARGET), so the headers
// offer only what torch 2.10 provides, and the binary links only torch's C shims: one build loads in every
// torch from 2.10 on. No ATen, c10 or pybind11 type crosses this boundary.
//
// Stable wrappers used as they are (torch/csrc/stable/{ops,tensor,accelerator}.h, all in 2.10):
//   new_empty, new_zeros, full, to, contiguous, transpose, narrow, select, copy_, clone, sum,
//   parallel_for (at::parallel_for behind a C call: torch's intra-op threads, set by torch.set_num_threads),
//   accelerator::DeviceGuard, STD_CUDA_CHECK / STD_CUDA_KERNEL_LAUNCH_CHECK.
//
// Calls with no stable wrapper at 2.10, made here and nowhere else (each symbol and op checked present in 2.10):
//   call                                   | made through                                   | used for
//   aten::linear, aten::mm, aten::stack,   | torch_call_dispatcher (torch >= 2.10)          | z0, g_W, d, ||g||
//   aten::mul_.Tensor                      |                                                |
//   aten::norm.ScalarOpt_dim (p = None)    | torch_call_dispatcher: ATen's linalg_vector_norm(x, 2, dim), with no
//                                          | Scalar to pass (StableIValue has none at 2.10) | ||g|| (CPU)
//   aten::mm.dtype (16-bit in, fp32 out)   | torch_call_dispatcher                          | g_W on tensor cores
//   aten::where.self, gt.Tensor,           | torch_call_dispatcher                          | the GPU result assembly
//   logical_and, mul.Tensor                |                                                | (no host sync)
//   addmm.out (beta = alpha = 1), mm.out   | AOTI C shims aoti_torch_{cpu,cuda}_addmm_out,  | 16-bit d in class chunks
//                                          | _mm_out (addmm's Scalars cannot go through the dispatcher call)
//   the current CUDA stream                | AOTI C shim aoti_torch_get_current_cuda_stream | every CUDA launch
// A failure inside a dispatcher or shim call reaches Python as RuntimeError naming the call (torch >= 2.13 would
// add the inner message; at 2.10 torch prints it to stderr).
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#ifdef POF_FAST_WITH_CUDA
#include <cuda_runtime_api.h>
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cuda.h>
#endif

#include <array>
#include <optional>
#include <vector>

#if !defined(TORCH_TARGET_VERSION) || TORCH_TARGET_VERSION != TORCH_VERSION_2_10_0
#error "pof_fast._C is built for the stable ABI of torch 2.10: setup.py passes -DTORCH_TARGET_VERSION"
#endif

namespace pof_fast {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

namespace aten {
namespace detail {

// op(args...) through the dispatcher, boxed; the first return (an in-place op's is its self, dropped by callers).
template <typename... Args>
Tensor call(const char* op, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

}  // namespace detail

inline Tensor linear(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  return detail::call("aten::linear", "", input, weight, bias);
}

inline Tensor mm(const Tensor& a, const Tensor& b) { return detail::call("aten::mm", "", a, b); }

// a b with the product accumulated and returned in out_dtype (16-bit operands on tensor cores, fp32 out).
inline Tensor mm(const Tensor& a, const Tensor& b, ScalarType out_dtype) {
  return detail::call("aten::mm", "dtype", a, b, out_dtype);
}

// ||x||_2 over dim: ATen's linalg_vector_norm(x, 2, dim), bit for bit.
inline Tensor vector_norm(const Tensor& x, int64_t dim) {
  return detail::call("aten::norm", "ScalarOpt_dim", x, std::nullopt, std::vector<int64_t>{dim}, false);
}

inline Tensor stack(const std::vector<Tensor>& tensors) { return detail::call("aten::stack", "", tensors, int64_t(0)); }

inline void mul_(const Tensor& self, const Tensor& other) { detail::call("aten::mul_", "Tensor", self, other); }
inline Tensor mul(const Tensor& a, const Tensor& b) { return detail::call("aten::mul", "Tensor", a, b); }
inline Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  return detail::call("aten::where", "self", cond, a, b);
}
inline Tensor gt(const Tensor& a, const Tensor& b) { return detail::call("aten::gt", "Tensor", a, b); }
inline Tensor logical_and(const Tensor& a, const Tensor& b) { return detail::call("aten::logical_and", "", a, b); }

// out = bias + a b (out may be a strided view, e.g. a column block of a wider matrix).
inline void addmm_out(const Tensor& out, const Tensor& bias, const Tensor& a, const Tensor& b) {
#ifdef POF_FAST_WITH_CUDA
  if (out.is_cuda()) {
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_addmm_out(out.get(), bias.get(), a.get(), b.get(), 1.0, 1.0));
    return;
  }
#endif
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_addmm_out(out.get(), bias.get(), a.get(), b.get(), 1.0, 1.0));
}

// out = a b.
inline void mm_out(const Tensor& out, const Tensor& a, const Tensor& b) {
#ifdef POF_FAST_WITH_CUDA
  if (out.is_cuda()) {
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_mm_out(out.get(), a.get(), b.get()));
    return;
  }
#endif
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_mm_out(out.get(), a.get(), b.get()));
}

#ifdef POF_FAST_WITH_CUDA
inline cudaStream_t current_cuda_stream(int32_t device_index) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}
#endif

}  // namespace aten

// The stable conversions, skipped (no dispatcher round trip) when they would return the tensor itself.
inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }
inline Tensor as_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

}  // namespace pof_fast
