// Head gradient on the search batch (SPEC section 2, steps 2-4) and the direction logits.
//
//   z0  = h W0^T + b0                          (ATen linear, input dtype)
//   R   = (softmax(z0) - onehot(y)) / max(m,1)  ignored rows zero          (fused row kernel)
//   g_W = R^T h,  g_b = colsum(R),  ||g|| = sqrt(||g_W||^2 + ||g_b||^2)
//   scale = 1/||g|| (normalized) or 1 (raw), 0 when g = 0
//   d   = (h g_W^T + g_b) * scale,  or (h h^T) R when that product is cheaper (SPEC section 4)
// Large 16-bit heads (stores_16bit_lines): R and d in the input dtype, d = h u16^T + u_b from u_W rounded to it.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu_kernels.h"
#include "cpu_vec.h"

namespace pof_fast {

namespace {

using cpu::kLanes;
using cpu::lane_max;
using cpu::lane_sum;
using cpu::splat;
using cpu::vexp_nonpositive;
using cpu::vfloat;
using cpu::vload;
using cpu::vstore;

// One counted row in place on a buffer padded to Cp with a large negative value:
// r = (softmax(r) - onehot(y)) * inv_m. float: kLanes at a time (max, exp and sum, scale).
POF_CLONES void residual_row(float* r, int64_t Cp, int64_t y, float inv_m) {
  vfloat mx = splat(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < Cp; c += kLanes) {
    const vfloat x = vload(r + c);
    mx = x > mx ? x : mx;
  }
  float lanes[kLanes];
  std::memcpy(lanes, &mx, sizeof(mx));
  const float m = lane_max(lanes);
  vfloat s{};
  for (int64_t c = 0; c < Cp; c += kLanes) {
    const vfloat e = vexp_nonpositive(vload(r + c) - m);
    vstore(r + c, e);
    s += e;
  }
  std::memcpy(lanes, &s, sizeof(s));
  const float f = inv_m / lane_sum(lanes);
  for (int64_t c = 0; c < Cp; c += kLanes) vstore(r + c, vload(r + c) * f);
  r[y] -= inv_m;
}

void residual_row(double* r, int64_t Cp, int64_t y, double inv_m) {
  double m = r[0];
  for (int64_t c = 1; c < Cp; ++c) m = std::max(m, r[c]);
  double s = 0;
  for (int64_t c = 0; c < Cp; ++c) {
    r[c] = std::exp(r[c] - m);
    s += r[c];
  }
  const double f = inv_m / s;
  for (int64_t c = 0; c < Cp; ++c) r[c] *= f;
  r[y] -= inv_m;
}

// out[n, C] = R: rows loaded (converted to T) into a padded per-thread buffer, residual_row, copied out (converted
// to O); ignored rows zero, rows with a label outside [0, C) NaN.
template <typename T, typename O>
void residual_rows(const char* z, int64_t z_row_bytes, cpu::LoadRow<T> load, const int64_t* y, int64_t n,
                   int64_t C, int64_t ignore_index, O* out) {
  const T inv_m = T(1) / T(std::max<int64_t>(cpu::count_rows(y, n, ignore_index), 1));
  const int64_t Cp = cpu::padded(C);
  const int64_t grain = std::max<int64_t>(1, 16384 / Cp);
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    std::vector<T> buf(Cp);
    for (int64_t i = i0; i < i1; ++i) {
      O* r = out + i * C;
      if (y[i] == ignore_index) {
        std::fill(r, r + C, O(0));
        continue;
      }
      if (y[i] < 0 || y[i] >= C) {  // a counted label outside [0, C): a NaN row, as every backend gives
        std::fill(r, r + C, O(std::numeric_limits<T>::quiet_NaN()));
        continue;
      }
      load(z + i * z_row_bytes, buf.data(), C, Cp, T(-1e30));
      residual_row(buf.data(), Cp, y[i], inv_m);
      std::copy(buf.data(), buf.data() + C, r);
    }
  });
}

at::Tensor head_residual(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                         at::ScalarType out_dtype) {
#ifdef POF_FAST_WITH_CUDA
  if (logits.is_cuda()) return head_residual_cuda(logits, target, ignore_index, out_dtype);
#endif
  return head_residual_cpu(logits, target, ignore_index, out_dtype);
}

// Classes of u_W rounded and multiplied per chunk in direction_logits_16bit: 2^22 elements, so that the 16-bit copy
// of a chunk (8 MiB) stays small next to the two [n, C] arrays of the search.
constexpr int64_t kRoundChunkElements = int64_t(1) << 22;

}  // namespace

at::Tensor head_residual_cpu(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                             at::ScalarType out_dtype) {
  const at::Tensor z = logits.contiguous();
  const at::Tensor y = target.to(at::kLong).contiguous();
  const at::ScalarType acc = accumulation_type(z.scalar_type());
  at::Tensor out = at::empty(z.sizes(), z.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES(acc, "pof_fast.head_residual", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "pof_fast.head_residual_out", [&] {
      residual_rows<T, scalar_t>(static_cast<const char*>(z.data_ptr()), z.size(1) * z.element_size(),
                                 cpu::row_loader<T>(z.scalar_type()), y.data_ptr<int64_t>(), z.size(0), z.size(1),
                                 ignore_index, out.data_ptr<scalar_t>());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_gradient(
    const at::Tensor& features, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, bool normalized) {
  POF_CHECK_DIM(features, 2, "features");
  POF_CHECK_DIM(weight, 2, "weight");
  POF_CHECK_FLOAT(features, "features");
  POF_CHECK_FLOAT(weight, "weight");
  TORCH_CHECK_VALUE(weight.size(1) == features.size(1), "pof_fast: weight must have shape [C, ", features.size(1),
              "] to match features, got ", weight.sizes());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == features.size(0), "pof_fast: target must have shape [",
              features.size(0), "], got ", target.sizes());
  POF_CHECK_SAME_DEVICE(weight, features, "weight", "features");
  POF_CHECK_SAME_DEVICE(target, features, "target", "features");
  const bool with_bias = bias.has_value() && bias->defined();
  if (with_bias) {
    POF_CHECK_DIM(*bias, 1, "bias");
    POF_CHECK_SAME_DEVICE(*bias, features, "bias", "features");
    TORCH_CHECK_VALUE(bias->size(0) == weight.size(0), "pof_fast: bias must have shape [", weight.size(0), "], got ",
                bias->sizes());
  }
  // 1. z0 = h W0^T + b0, in the input dtype as the reference computes it.
  const at::Tensor logits = at::linear(features, weight, with_bias ? *bias : at::Tensor());
  // 2. R, fused: softmax, one-hot and 1/m in one pass per row; stored in the input dtype for large 16-bit heads.
  const at::ScalarType acc = accumulation_type(features.scalar_type());
  const at::Tensor residual = head_residual(
      logits, target, ignore_index, stores_16bit_lines(features, weight.size(0)) ? features.scalar_type() : acc);
  // 3. g_W = R^T h, accumulated in fp32/fp64. 16-bit features on CUDA: tensor cores, R in the input dtype with
  // fp32 output (cuBLAS); elsewhere (CPU, fp32/fp64) in the accumulation dtype.
  const at::Tensor grad_weight = tensor_core_gemms(features)
                                     ? at::mm(residual.t().to(features.scalar_type()), features, at::kFloat)
                                     : at::mm(residual.t().to(acc), features.to(acc));
  at::Tensor grad_bias, norm, scale;
#ifdef POF_FAST_WITH_CUDA
  if (features.is_cuda()) {
    // 4. g_b, ||g|| and the scale on the device (csrc/cuda/head_residual.cu), no host synchronisation.
    std::tie(grad_bias, norm, scale) = grad_finish_cuda(residual, grad_weight, with_bias, normalized);
    if (!with_bias) grad_bias = at::empty({0}, grad_weight.options());
    return {logits, residual, grad_weight, grad_bias, norm, scale};
  }
#endif
  // 4. ||g|| as the norm of the row norms: square().sum() would write a [C, D] temporary (10x slower on
  // case D), and one flat linalg_vector_norm accumulates fp32 too loosely on ATen's CPU kernel (relative
  // error 2.6e-4 on a 1000 x 2560 head, 1.8e-3 on 32000 x 1024; the two-level form: 1e-9 and 3e-7).
  norm = at::linalg_vector_norm(at::linalg_vector_norm(grad_weight, 2, at::IntArrayRef{1}), 2);
  if (with_bias) {
    grad_bias = at::sum(residual, {0}, false, acc);
    norm = at::linalg_vector_norm(at::stack({norm, at::linalg_vector_norm(grad_bias)}));
  } else {
    grad_bias = at::empty({0}, grad_weight.options());
  }
  const at::Tensor positive = norm > 0;
  scale = normalized ? at::where(positive, norm.reciprocal(), at::zeros_like(norm)) : positive.to(norm.scalar_type());
  return {logits, residual, grad_weight, grad_bias, norm, scale};
}

at::Tensor direction_logits(const at::Tensor& features, const at::Tensor& grad_weight,
                            const c10::optional<at::Tensor>& grad_bias, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& residual) {
  POF_CHECK_DIM(features, 2, "features");
  POF_CHECK_DIM(grad_weight, 2, "grad_weight");
  TORCH_CHECK_VALUE(grad_weight.size(1) == features.size(1), "pof_fast: grad_weight must have shape [C, ",
              features.size(1), "], got ", grad_weight.sizes());
  POF_CHECK_SAME_DEVICE(grad_weight, features, "grad_weight", "features");
  POF_CHECK_SAME_DEVICE(scale, features, "scale", "features");
  const int64_t n = features.size(0), D = features.size(1), C = grad_weight.size(0);
  const bool gram = residual.has_value() && residual->defined() && gram_cheaper(n, D, C);
  const bool with_bias = grad_bias.has_value() && grad_bias->defined() && grad_bias->numel() > 0;
  if (!gram && is_16bit(features)) {  // the 16-bit d of u = scale g, formed in copies (g is the caller's)
    at::Tensor unit_weight = grad_weight.clone();
    return direction_logits_16bit(features, unit_weight,
                                  with_bias ? c10::optional<at::Tensor>(grad_bias->clone()) : c10::nullopt, scale);
  }
  const at::Tensor h = features.to(grad_weight.scalar_type());
  // h g_W^T = h h^T R: n^2 (D + C) multiply-adds instead of n D C when n is small.
  at::Tensor d =
      gram ? at::mm(at::mm(h, h.t()), residual->to(grad_weight.scalar_type())) : at::mm(h, grad_weight.t());
#ifdef POF_FAST_WITH_CUDA
  if (d.is_cuda()) {
    direction_epilogue_cuda(d, with_bias ? grad_bias : c10::nullopt, scale);
    return d;
  }
#endif
  if (with_bias) d.add_(*grad_bias);
  return d.mul_(scale);
}

at::Tensor direction_logits_16bit(const at::Tensor& features, at::Tensor& grad_weight,
                                  const c10::optional<at::Tensor>& grad_bias, const at::Tensor& scale) {
  const at::ScalarType dtype = features.scalar_type();
  const int64_t C = grad_weight.size(0);
  const int64_t chunk = std::max<int64_t>(1, kRoundChunkElements / std::max<int64_t>(1, grad_weight.size(1)));
  at::Tensor bias;
  if (grad_bias.has_value()) {
    bias = grad_bias->mul_(scale).to(dtype);
    grad_bias->copy_(bias);
  }
  at::Tensor d = at::empty({features.size(0), C}, features.options());
  for (int64_t c0 = 0; c0 < C; c0 += chunk) {
    const int64_t c1 = std::min(C, c0 + chunk);
    at::Tensor u = grad_weight.slice(0, c0, c1).mul_(scale);  // u = scale g, a chunk at a time (one pass over g)
    const at::Tensor rounded = u.to(dtype);
    u.copy_(rounded);
    // d[:, c0:c1] = h u^T + u_b: 16-bit operands, fp32 accumulation (tensor cores on a GPU), one rounding at the
    // end, written in place (leading dimension C).
    at::Tensor columns = d.slice(1, c0, c1);
    if (bias.defined()) {
      at::addmm_out(columns, bias.slice(0, c0, c1), features, rounded.t());
    } else {
      at::mm_out(columns, features, rounded.t());
    }
  }
  return d;
}

}  // namespace pof_fast
