// Head gradient on the search batch (SPEC section 2, steps 2-4) and the direction logits.
//
//   z0  = h W0^T + b0                          (aten::linear, input dtype)
//   R   = (softmax(z0) - onehot(y)) / max(m,1)  ignored rows zero          (fused row kernel)
//   g_W = R^T h,  g_b = colsum(R),  ||g|| = sqrt(||g_W||^2 + ||g_b||^2)
//   scale = 1/||g|| (normalized) or 1 (raw), 0 when g = 0
//   d   = (h g_W^T + g_b) * scale,  or (h h^T) R when that product is cheaper (SPEC section 4)
// Large 16-bit heads (stores_16bit_lines): R and d in the input dtype, d = h u16^T + u_b from u_W rounded to it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
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

// One counted row in place on a buffer padded to Cp with a large negative value: r <- exp(r - max r); returns the
// factor f = inv_m / sum_c r_c, so that (softmax(r) - onehot(y)) * inv_m = f r - inv_m onehot(y). float: kLanes at a
// time (max, then exp and sum).
POF_CLONES POF_CONTRACT float residual_row(float* r, int64_t Cp, float inv_m) {
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
  return inv_m / lane_sum(lanes);
}

double residual_row(double* r, int64_t Cp, double inv_m) {
  double m = r[0];
  for (int64_t c = 1; c < Cp; ++c) m = std::max(m, r[c]);
  double s = 0;
  for (int64_t c = 0; c < Cp; ++c) {
    r[c] = std::exp(r[c] - m);
    s += r[c];
  }
  return inv_m / s;
}

// out[0:C] = BFloat16(row[c] * f), kLanes at a time; with widened, also widened[0:C] = float(out[0:C]).
POF_CLONES void write_scaled_bf16(const float* row, int64_t C, float f, BFloat16* out, float* widened) {
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    const vfloat stored = cpu::vstore_bf16(out + c, vload(row + c) * f);
    if (widened != nullptr) vstore(widened + c, stored);
  }
  for (; c < C; ++c) {
    out[c] = static_cast<BFloat16>(row[c] * f);
    if (widened != nullptr) widened[c] = static_cast<float>(out[c]);
  }
}

// out[0:C] = O(row[c] * f); with widened, also widened[0:C] = float(out[0:C]) (widened may be row itself).
template <typename T, typename O>
void write_scaled(const T* row, int64_t C, T f, O* out, T* widened = nullptr) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<O, BFloat16>) {
    write_scaled_bf16(row, C, f, out, widened);
  } else {
    for (int64_t c = 0; c < C; ++c) {
      out[c] = static_cast<O>(row[c] * f);
      if (widened != nullptr) widened[c] = static_cast<T>(out[c]);
    }
  }
}

// u[0:count] <- O(scale u) in place and in out[0:count], O a 16-bit dtype: one pass for what mul_, to() and copy_ do
// in three, with the same values (one fp32 product, one rounding to nearest even). CPU memory.
template <typename O>
void round_scaled(float* u, int64_t count, float scale, O* out) {
  torch::stable::parallel_for(0, count, int64_t(1) << 16, [&](int64_t a, int64_t b) {
    write_scaled(u + a, b - a, scale, out + a, u + a);
  });
}

// out[n, C] = R: rows loaded (converted to T) into a padded per-thread buffer, residual_row, written out scaled (converted
// to O); ignored rows zero, rows with a label outside [0, C) NaN.
template <typename T, typename O>
void residual_rows(const char* z, int64_t z_row_bytes, cpu::LoadRow<T> load, const int64_t* y, int64_t n,
                   int64_t C, int64_t ignore_index, O* out) {
  const T inv_m = T(1) / T(std::max<int64_t>(cpu::count_rows(y, n, ignore_index), 1));
  const int64_t Cp = cpu::padded(C);
  const int64_t grain = std::max<int64_t>(1, 16384 / Cp);
  torch::stable::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
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
      const T f = residual_row(buf.data(), Cp, inv_m);
      write_scaled(buf.data(), C, f, r);  // scaled as it is written out
      r[y[i]] = static_cast<O>(buf[y[i]] * f - inv_m);
    }
  });
}

Tensor head_residual(const Tensor& logits, const Tensor& target, int64_t ignore_index, ScalarType out_dtype) {
#ifdef POF_FAST_WITH_CUDA
  if (logits.is_cuda()) return head_residual_cuda(logits, target, ignore_index, out_dtype);
#endif
  return head_residual_cpu(logits, target, ignore_index, out_dtype);
}

// d[i, c] <- (d[i, c] + g_b[c]) * scale in place (bias may be null): add_ then mul_, each rounded (no contraction).
template <typename T>
void direction_epilogue_cpu(T* d, int64_t n, int64_t C, const T* bias, T scale) {
  torch::stable::parallel_for(0, n, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* row = d + i * C;
      if (bias != nullptr) {
        for (int64_t c = 0; c < C; ++c) row[c] = (row[c] + bias[c]) * scale;
      } else {
        for (int64_t c = 0; c < C; ++c) row[c] *= scale;
      }
    }
  });
}

// Classes of g_W formed (grad_weight_16bit_cpu), and of u_W rounded and multiplied (direction_logits_16bit), per
// chunk: 2^22 elements, so that the 16-bit copy of a chunk (8 MiB) stays small next to the two [n, C] arrays of the
// search.
constexpr int64_t kRoundChunkElements = int64_t(1) << 22;

// Rows of width `width` in one chunk.
inline int64_t chunk_rows(int64_t width) {
  return std::max<int64_t>(1, kRoundChunkElements / std::max<int64_t>(1, width));
}

// g_W = R^T h on the CPU from a 16-bit R and 16-bit features: ATen's CPU product has no 16-bit x 16-bit -> fp32
// form (aten::mm.dtype is CUDA-only), so the classes go in chunks of kRoundChunkElements: a 16-bit product (fp32
// accumulation inside, oneDNN) into one 16-bit chunk buffer, widened into the fp32 g_W. One rounding of g_W to 16
// bits; no fp32 copy of R (a [C, n] fp32 array is two 16-bit [n, C] arrays) and no fp32 product (2.3x slower here:
// 3.66 s against 1.59 s for a 1024 x 151936 x 896 bf16 head, one thread, on the 2-core AMD EPYC dev box).
Tensor grad_weight_16bit_cpu(Tensor residual_t, const Tensor& features) {
  const int64_t C = residual_t.size(0), D = features.size(1);
  const int64_t chunk = std::min(C, chunk_rows(D));
  Tensor grad_weight = torch::stable::new_empty(features, {C, D}, ScalarType::Float);
  Tensor rows16 = torch::stable::new_empty(features, {chunk, D});
  for (int64_t c0 = 0; c0 < C; c0 += chunk) {
    const int64_t rows = std::min(chunk, C - c0);
    const Tensor out = torch::stable::narrow(rows16, 0, 0, rows);
    aten::mm_out(out, torch::stable::narrow(residual_t, 0, c0, rows), features);
    Tensor into = torch::stable::narrow(grad_weight, 0, c0, rows);
    torch::stable::copy_(into, out);
  }
  return grad_weight;
}

}  // namespace

Tensor head_residual_cpu(const Tensor& logits, const Tensor& target, int64_t ignore_index, ScalarType out_dtype) {
  const Tensor z = as_contiguous(logits);
  const Tensor y = as_contiguous(as_dtype(target, ScalarType::Long));
  const ScalarType acc = accumulation_type(z.scalar_type());
  Tensor out = torch::stable::new_empty(z, z.sizes(), out_dtype);
  dispatch_accumulation(acc, [&](auto accumulated) {
    using T = decltype(accumulated);
    dispatch_stored(out_dtype, [&](auto stored) {
      using O = decltype(stored);
      residual_rows<T, O>(static_cast<const char*>(z.data_ptr()), z.size(1) * z.element_size(),
                          cpu::row_loader<T>(z.scalar_type()), y.const_data_ptr<int64_t>(), z.size(0), z.size(1),
                          ignore_index, out.mutable_data_ptr<O>());
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> head_gradient(const Tensor& features, const Tensor& weight,
                                                                         const std::optional<Tensor>& bias,
                                                                         const Tensor& target, int64_t ignore_index,
                                                                         bool normalized) {
  POF_CHECK_DIM(features, 2, "features");
  POF_CHECK_DIM(weight, 2, "weight");
  POF_CHECK_FLOAT(features, "features");
  POF_CHECK_FLOAT(weight, "weight");
  POF_CHECK(weight.size(1) == features.size(1), "weight must have shape [C, ", features.size(1),
            "] to match features, got ", shape_of(weight));
  POF_CHECK(target.dim() == 1 && target.size(0) == features.size(0), "target must have shape [", features.size(0),
            "], got ", shape_of(target));
  POF_CHECK_SAME_DEVICE(weight, features, "weight", "features");
  POF_CHECK_SAME_DEVICE(target, features, "target", "features");
  const bool with_bias = bias.has_value() && bias->defined();
  if (with_bias) {
    POF_CHECK_DIM(*bias, 1, "bias");
    POF_CHECK_SAME_DEVICE(*bias, features, "bias", "features");
    POF_CHECK(bias->size(0) == weight.size(0), "bias must have shape [", weight.size(0), "], got ", shape_of(*bias));
  }
  // 1. z0 = h W0^T + b0, in the input dtype as the reference computes it.
  const Tensor logits = aten::linear(features, weight, with_bias ? bias : std::nullopt);
  // 2. R, fused: softmax, one-hot and 1/m in one pass per row; stored in the input dtype for large 16-bit heads.
  const ScalarType acc = accumulation_type(features.scalar_type());
  const Tensor residual = head_residual(
      logits, target, ignore_index, stores_16bit_lines(features, weight.size(0)) ? features.scalar_type() : acc);
  // 3. g_W = R^T h in fp32/fp64. 16-bit features on CUDA: tensor cores, R in the input dtype with fp32 output
  // (cuBLAS); on the CPU, a 16-bit R (large heads) in 16-bit products by class chunks; else in the accumulation dtype.
  const Tensor residual_t = torch::stable::transpose(residual, 0, 1);
  Tensor grad_weight;
  if (tensor_core_gemms(features)) {
    grad_weight = aten::mm(as_dtype(residual_t, features.scalar_type()), features, ScalarType::Float);
  } else if (is_16bit(residual)) {  // the CPU's large 16-bit heads (stores_16bit_lines)
    grad_weight = grad_weight_16bit_cpu(residual_t, features);
  } else {
    grad_weight = aten::mm(as_dtype(residual_t, acc), as_dtype(features, acc));
  }
  Tensor grad_bias, norm, scale;
#ifdef POF_FAST_WITH_CUDA
  if (features.is_cuda()) {
    // 4. g_b, ||g|| and the scale on the device (csrc/cuda/head_residual.cu), no host synchronisation.
    std::tie(grad_bias, norm, scale) = grad_finish_cuda(residual, grad_weight, with_bias, normalized);
    if (!with_bias) grad_bias = torch::stable::new_empty(grad_weight, {0});
    return {logits, residual, grad_weight, grad_bias, norm, scale};
  }
#endif
  // 4. ||g|| as the norm of the row norms: square().sum() would write a [C, D] temporary (10x slower on
  // case D), and one flat linalg_vector_norm accumulates fp32 too loosely on ATen's CPU kernel (relative
  // error 2.6e-4 on a 1000 x 2560 head, 1.8e-3 on 32000 x 1024; the two-level form: 1e-9 and 3e-7).
  norm = aten::vector_norm(aten::vector_norm(grad_weight, 1), 0);
  if (with_bias) {
    const int64_t rows = 0;
    grad_bias = torch::stable::sum(residual, torch::headeronly::IntHeaderOnlyArrayRef(rows), false, acc);
    norm = aten::vector_norm(aten::stack({norm, aten::vector_norm(grad_bias, 0)}), 0);
  } else {
    grad_bias = torch::stable::new_empty(grad_weight, {0});
  }
  // 5. scale = 1/||g|| (normalized) or 1 (raw), 0 when g = 0 (or NaN): read on the host, where ||g|| is.
  dispatch_accumulation(acc, [&](auto type) {
    using T = decltype(type);
    const T g = *norm.const_data_ptr<T>();
    const T s = g > T(0) ? (normalized ? T(1) / g : T(1)) : T(0);
    scale = torch::stable::full({}, static_cast<double>(s), acc, std::nullopt, norm.device());
  });
  return {logits, residual, grad_weight, grad_bias, norm, scale};
}

Tensor direction_logits(const Tensor& features, const Tensor& grad_weight, const std::optional<Tensor>& grad_bias,
                        const Tensor& scale, const std::optional<Tensor>& residual) {
  return direction_logits_into(features, grad_weight, grad_bias, scale, residual, std::nullopt);
}

Tensor direction_logits_into(const Tensor& features, const Tensor& grad_weight, const std::optional<Tensor>& grad_bias,
                             const Tensor& scale, const std::optional<Tensor>& residual,
                             const std::optional<Tensor>& into) {
  POF_CHECK_DIM(features, 2, "features");
  POF_CHECK_DIM(grad_weight, 2, "grad_weight");
  POF_CHECK(grad_weight.size(1) == features.size(1), "grad_weight must have shape [C, ", features.size(1), "], got ",
            shape_of(grad_weight));
  POF_CHECK_SAME_DEVICE(grad_weight, features, "grad_weight", "features");
  POF_CHECK_SAME_DEVICE(scale, features, "scale", "features");
  const int64_t n = features.size(0), D = features.size(1), C = grad_weight.size(0);
  const bool gram = residual.has_value() && residual->defined() && gram_cheaper(n, D, C);
  const bool with_bias = grad_bias.has_value() && grad_bias->defined() && grad_bias->numel() > 0;
  if (!gram && is_16bit(features)) {  // the 16-bit d of u = scale g, formed in copies (g is the caller's)
    return direction_logits_16bit(features, torch::stable::clone(grad_weight),
                                  with_bias ? std::optional<Tensor>(torch::stable::clone(*grad_bias)) : std::nullopt,
                                  scale, into);
  }
  const ScalarType dtype = grad_weight.scalar_type();
  const Tensor h = as_dtype(features, dtype);
  // h g_W^T = h h^T R: n^2 (D + C) multiply-adds instead of n D C when n is small.
  Tensor d;
  if (gram) {
    d = aten::mm(aten::mm(h, torch::stable::transpose(h, 0, 1)), as_dtype(*residual, dtype));
  } else if (into.has_value()) {  // a spent array of the caller's: no fresh [n, C] array to fault in
    d = *into;
    aten::mm_out(d, h, torch::stable::transpose(grad_weight, 0, 1));
  } else {
    d = aten::mm(h, torch::stable::transpose(grad_weight, 0, 1));
  }
#ifdef POF_FAST_WITH_CUDA
  if (d.is_cuda()) {
    direction_epilogue_cuda(d, with_bias ? grad_bias : std::nullopt, scale);
    return d;
  }
#endif
  const Tensor b = with_bias ? as_contiguous(as_dtype(*grad_bias, dtype)) : Tensor();
  const Tensor s = as_dtype(scale, dtype);
  dispatch_accumulation(dtype, [&](auto type) {
    using T = decltype(type);
    direction_epilogue_cpu<T>(d.mutable_data_ptr<T>(), n, C, with_bias ? b.const_data_ptr<T>() : nullptr,
                              *s.const_data_ptr<T>());
  });
  return d;
}

Tensor direction_logits_16bit(const Tensor& features, const Tensor& grad_weight, const std::optional<Tensor>& grad_bias,
                              const Tensor& scale, const std::optional<Tensor>& into) {
  const ScalarType dtype = features.scalar_type();
  const int64_t C = grad_weight.size(0);
  const int64_t chunk = chunk_rows(grad_weight.size(1));
  Tensor bias;
  if (grad_bias.has_value()) {
    Tensor unit_bias = *grad_bias;
    aten::mul_(unit_bias, scale);
    bias = as_dtype(unit_bias, dtype);
    torch::stable::copy_(unit_bias, bias);
  }
  Tensor d = into.has_value() ? *into : torch::stable::new_empty(features, {features.size(0), C});
  Tensor weight = grad_weight;
  const bool cpu = !features.is_cuda();
  Tensor chunk16 = cpu ? torch::stable::new_empty(features, {std::min(chunk, C), grad_weight.size(1)}) : Tensor();
  for (int64_t c0 = 0; c0 < C; c0 += chunk) {
    const int64_t c1 = std::min(C, c0 + chunk);
    Tensor u = torch::stable::narrow(weight, 0, c0, c1 - c0);
    // u = scale g rounded to the input dtype, a chunk at a time (one pass over g), kept in g: the direction returned
    Tensor rounded;
    if (cpu) {
      rounded = torch::stable::narrow(chunk16, 0, 0, c1 - c0);
      const float s = *scale.const_data_ptr<float>();
      dispatch_stored(dtype, [&](auto stored) {
        using O = decltype(stored);
        if constexpr (sizeof(O) == 2) {
          round_scaled(u.mutable_data_ptr<float>(), u.numel(), s, rounded.mutable_data_ptr<O>());
        }
      });
    } else {
      aten::mul_(u, scale);
      rounded = as_dtype(u, dtype);
      torch::stable::copy_(u, rounded);
    }
    // d[:, c0:c1] = h u^T + u_b: 16-bit operands, fp32 accumulation (tensor cores on a GPU), one rounding at the
    // end, written in place (leading dimension C).
    const Tensor columns = torch::stable::narrow(d, 1, c0, c1 - c0);
    const Tensor rounded_t = torch::stable::transpose(rounded, 0, 1);
    if (bias.defined()) {
      aten::addmm_out(columns, torch::stable::narrow(bias, 0, c0, c1 - c0), features, rounded_t);
    } else {
      aten::mm_out(columns, features, rounded_t);
    }
  }
  return d;
}

}  // namespace pof_fast
