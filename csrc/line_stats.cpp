// CPU line statistics: l(t_k), l'(t_k), l''(t_k) of the mean cross-entropy along z(t) = z0 - t d.
//
// For each counted row i and candidate t (SPEC section 4), with x_c = z0_ic - t d_ic:
//   1. mx = max_c x_c
//   2. s0 = sum_c e_c, s1 = sum_c e_c d_ic, s2 = sum_c e_c d_ic^2, with e_c = exp(x_c - mx)
//   3. loss = mx + log s0 - z0_iy + t d_iy,  slope = d_iy - s1/s0,  curvature = s2/s0 - (s1/s0)^2
// Rows are split into fixed blocks run with torch::stable::parallel_for; block sums are added in block order.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"
#include "cpu_kernels.h"
#include "cpu_vec.h"

namespace pof_fast {
namespace cpu {

namespace {

template <typename S, typename T>
void load_row(const void* src, T* out, int64_t C, int64_t Cp, T pad) {
  const S* s = static_cast<const S*>(src);
  for (int64_t c = 0; c < C; ++c) out[c] = static_cast<T>(s[c]);
  for (int64_t c = C; c < Cp; ++c) out[c] = pad;
}

// The sums of candidates steps[0:G] over one row: m = max_c x_c, s0, s1, s2 (step 2 above), written to
// sums[0:G], sums[k:k+G], sums[2k:2k+G], sums[3k:3k+G] (sums and steps offset by the caller). z, d: padded rows of
// length Cp (z padded with a large negative value, d with 0). The G candidates share every load of z and d: two
// passes over the row (max, then exp and sums) per group. Without kDerivatives only m and s0 (the loss) are formed,
// s1 and s2 written as NaN: 3 of the ~20 vector operations per class and candidate saved.
template <int G, bool kDerivatives>
__attribute__((always_inline)) inline void group_sums(const float* __restrict z, const float* __restrict d,
                                                      int64_t Cp, const float* steps, int k, float* sums) {
  vfloat mx[G];
  for (int g = 0; g < G; ++g) mx[g] = splat(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < Cp; c += kLanes) {
    const vfloat zc = vload(z + c), dc = vload(d + c);
    for (int g = 0; g < G; ++g) {
      const vfloat x = zc - steps[g] * dc;
      mx[g] = x > mx[g] ? x : mx[g];
    }
  }
  float m[G], lanes[kLanes];
  for (int g = 0; g < G; ++g) {
    std::memcpy(lanes, &mx[g], sizeof(vfloat));
    m[g] = lane_max(lanes);
  }
  vfloat s0[G] = {}, s1[G] = {}, s2[G] = {};
  for (int64_t c = 0; c < Cp; c += kLanes) {
    const vfloat zc = vload(z + c), dc = vload(d + c);
    for (int g = 0; g < G; ++g) {
      const vfloat e = vexp_nonpositive(zc - steps[g] * dc - m[g]);
      s0[g] += e;
      if constexpr (kDerivatives) {
        const vfloat ed = e * dc;
        s1[g] += ed;
        s2[g] += ed * dc;
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    sums[g] = m[g];
    const vfloat* parts[3] = {&s0[g], &s1[g], &s2[g]};
    for (int r = 0; r < 3; ++r) {
      std::memcpy(lanes, parts[r], sizeof(vfloat));
      sums[(r + 1) * k + g] = r == 0 || kDerivatives ? lane_sum(lanes) : std::numeric_limits<float>::quiet_NaN();
    }
  }
}

template <int G>
__attribute__((always_inline)) inline void group_sums(const float* z, const float* d, int64_t Cp, const float* steps,
                                                      int k, float* sums, bool derivatives) {
  if (derivatives) {
    group_sums<G, true>(z, d, Cp, steps, k, sums);
  } else {
    group_sums<G, false>(z, d, Cp, steps, k, sums);
  }
}

// The sums of k candidates over one row (group_sums), in groups of 4 candidates, then 2, then 1; the derivative sums
// only for the groups that hold a candidate j >= first_derivative (0: every group). Multiply-adds
// contract to FMA here (POF_CONTRACT: an exact product in the exponent's argument and the polynomial) and nowhere
// else: the loss, slope and curvature are formed from the sums in uncontracted code, where a fused m*m - s2/s0
// would cancel differently. Groups of 4 and FMA: the bracket_grid scoring of a 1024 x 151936 bf16 LM head (24
// candidates) took 1.63 s per 1024 rows, against 1.69 s one candidate at a time with FMA and 2.32 s without, one
// thread on the 2-core AMD EPYC (AVX-512) dev box.
POF_CLONES POF_CONTRACT void row_sums(const float* __restrict z, const float* __restrict d, int64_t Cp,
                                      const float* steps, int k, int first_derivative, float* sums) {
  int j = 0;
  for (; j + 4 <= k; j += 4) group_sums<4>(z, d, Cp, steps + j, k, sums + j, j + 4 > first_derivative);
  for (; j + 2 <= k; j += 2) group_sums<2>(z, d, Cp, steps + j, k, sums + j, j + 2 > first_derivative);
  for (; j < k; ++j) group_sums<1>(z, d, Cp, steps + j, k, sums + j, j + 1 > first_derivative);
}

// Adds one row's loss/slope/curvature for k candidates to acc[0:k], acc[k:2k], acc[2k:3k] (step 3 above).
inline void score_row_impl(const float* z, const float* d, int64_t Cp, float zy, float dy, const float* steps, int k,
                           int first_derivative, float* acc) {
  float sums[4 * kLanes];
  row_sums(z, d, Cp, steps, k, first_derivative, sums);
  for (int j = 0; j < k; ++j) {
    const float m = sums[j], S0 = sums[k + j], mean = sums[2 * k + j] / S0, var = sums[3 * k + j] / S0 - mean * mean;
    acc[j] += m + std::log(S0) - zy + steps[j] * dy;
    acc[k + j] += dy - mean;
    acc[2 * k + j] += var;
  }
}

// Narrow heads (C <= kNarrow): the lanes hold candidates instead of classes, so one pass over the
// row's classes scores up to kLanes candidates at once (same three steps, summed over c in order).
// 32: on the 2-core AMD EPYC (AVX-512) dev box, case A (C = 10) searched in 0.45 ms instead of 0.72 ms
// this way, while case B (C = 100) was faster with class lanes (1.8 ms vs 2.4 ms).
constexpr int64_t kNarrow = 32;

__attribute__((always_inline)) inline void score_row_impl_narrow(const float* __restrict z,
                                                                 const float* __restrict d, int64_t C, float zy,
                                                                 float dy, const float* steps, int k, float* acc) {
  float lanes[4][kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[0][j] = j < k ? steps[j] : 0.0f;
  const vfloat t = vload(lanes[0]);
  vfloat mx = splat(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < C; ++c) {
    const vfloat x = z[c] - t * d[c];
    mx = x > mx ? x : mx;
  }
  vfloat s0{}, s1{}, s2{};
  for (int64_t c = 0; c < C; ++c) {
    const vfloat e = vexp_nonpositive(z[c] - t * d[c] - mx);
    const vfloat ed = e * d[c];
    s0 += e;
    s1 += ed;
    s2 += ed * d[c];
  }
  std::memcpy(lanes[0], &mx, sizeof(mx));
  std::memcpy(lanes[1], &s0, sizeof(s0));
  std::memcpy(lanes[2], &s1, sizeof(s1));
  std::memcpy(lanes[3], &s2, sizeof(s2));
  for (int j = 0; j < k; ++j) {
    const float mean = lanes[2][j] / lanes[1][j];
    acc[j] += lanes[0][j] + std::log(lanes[1][j]) - zy + steps[j] * dy;
    acc[k + j] += dy - mean;
    acc[2 * k + j] += lanes[3][j] / lanes[1][j] - mean * mean;
  }
}

// The float64 path: same steps, scalar, std::exp.
inline void score_row_impl(const double* z, const double* d, int64_t Cp, double zy, double dy,
                           const double* steps, int k, int, double* acc) {
  for (int j = 0; j < k; ++j) {
    const double t = steps[j];
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t c = 0; c < Cp; ++c) m = std::max(m, z[c] - t * d[c]);
    double s0 = 0, s1 = 0, s2 = 0;
    for (int64_t c = 0; c < Cp; ++c) {
      const double e = std::exp(z[c] - t * d[c] - m);
      s0 += e;
      s1 += e * d[c];
      s2 += e * d[c] * d[c];
    }
    const double mean = s1 / s0;
    acc[j] += m + std::log(s0) - zy + t * dy;
    acc[k + j] += dy - mean;
    acc[2 * k + j] += s2 / s0 - mean * mean;
  }
}

// C: the row length, Cp: padded; k <= kLanes candidates; derivatives from candidate first_derivative on (narrow rows
// and float64 form them all).
POF_CLONES void score_row(const float* z, const float* d, int64_t C, int64_t Cp, float zy, float dy,
                          const float* steps, int k, int first_derivative, float* acc) {
  if (C <= kNarrow) {
    score_row_impl_narrow(z, d, C, zy, dy, steps, k, acc);
  } else {
    score_row_impl(z, d, Cp, zy, dy, steps, k, first_derivative, acc);
  }
}

void score_row(const double* z, const double* d, int64_t, int64_t Cp, double zy, double dy, const double* steps,
               int k, int first_derivative, double* acc) {
  score_row_impl(z, d, Cp, zy, dy, steps, k, first_derivative, acc);
}

}  // namespace

int64_t count_rows(const int64_t* target, int64_t n, int64_t ignore_index) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) m += target[i] != ignore_index;
  return m;
}

template <typename T>
LoadRow<T> row_loader(ScalarType source) {
  LoadRow<T> load = nullptr;
  dispatch_stored(source, [&](auto stored) { load = &load_row<decltype(stored), T>; });
  return load;
}

template LoadRow<float> row_loader<float>(ScalarType);
template LoadRow<double> row_loader<double>(ScalarType);

template <typename T>
LineScorer<T>::LineScorer(const Tensor& logits, const Tensor& direction, const Tensor& target, int64_t ignore_index,
                          bool last_derivatives_only)
    : z_(static_cast<const char*>(logits.data_ptr())),
      d_(static_cast<const char*>(direction.data_ptr())),
      y_(target.const_data_ptr<int64_t>()),
      z_row_bytes_(logits.size(1) * logits.element_size()),
      d_row_bytes_(direction.size(1) * direction.element_size()),
      n_(logits.size(0)),
      C_(logits.size(1)),
      Cp_(padded(logits.size(1))),
      ignore_index_(ignore_index),
      load_z_(row_loader<T>(logits.scalar_type())),
      load_d_(row_loader<T>(direction.scalar_type())),
      last_derivatives_only_(last_derivatives_only),
      in_place_(Cp_ == C_ && logits.scalar_type() == direction.scalar_type() && logits.element_size() == sizeof(T)) {
  // Row blocks of ~8k padded elements (a few microseconds of work, well above parallel_for's
  // overhead on the dev box): small heads stay on one thread, large ones spread over all cores.
  rows_per_block_ = std::max<int64_t>(1, std::min<int64_t>(256, 8192 / Cp_));
  blocks_ = (n_ + rows_per_block_ - 1) / rows_per_block_;
  inv_m_ = T(1) / T(std::max<int64_t>(count_rows(y_, n_, ignore_index_), 1));
}

template <typename T>
void LineScorer<T>::operator()(const T* steps, int k, T* loss, T* slope, T* curv) {
  STD_TORCH_CHECK(k <= kLanes, "pof_fast: at most ", kLanes, " candidates per scorer call, got ", k);
  partial_.assign(static_cast<size_t>(blocks_) * 3 * k, T(0));
  const T pad = T(-1e30);
  const int first_derivative = last_derivatives_only_ ? k - 1 : 0;
  torch::stable::parallel_for(0, blocks_, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> zbuf(in_place_ ? 0 : Cp_), dbuf(in_place_ ? 0 : Cp_);
    for (int64_t b = b0; b < b1; ++b) {
      T* acc = partial_.data() + b * 3 * k;
      const int64_t end = std::min(n_, (b + 1) * rows_per_block_);
      for (int64_t i = b * rows_per_block_; i < end; ++i) {
        const int64_t y = y_[i];
        if (y == ignore_index_) continue;
        if (y < 0 || y >= C_) {  // a counted label outside [0, C): NaN, as every backend gives
          for (int j = 0; j < 3 * k; ++j) acc[j] = std::numeric_limits<T>::quiet_NaN();
          continue;
        }
        const T* z = reinterpret_cast<const T*>(z_ + i * z_row_bytes_);
        const T* d = reinterpret_cast<const T*>(d_ + i * d_row_bytes_);
        if (!in_place_) {
          load_z_(z, zbuf.data(), C_, Cp_, pad);
          load_d_(d, dbuf.data(), C_, Cp_, T(0));
          z = zbuf.data();
          d = dbuf.data();
        }
        score_row(z, d, C_, Cp_, z[y], d[y], steps, k, first_derivative, acc);
      }
    }
  });
  for (int j = 0; j < k; ++j) {
    T s[3] = {T(0), T(0), T(0)};
    for (int64_t b = 0; b < blocks_; ++b)
      for (int r = 0; r < 3; ++r) s[r] += partial_[(b * 3 + r) * k + j];
    loss[j] = s[0] * inv_m_;
    slope[j] = s[1] * inv_m_;
    curv[j] = s[2] * inv_m_;
  }
}

template class LineScorer<float>;
template class LineScorer<double>;

}  // namespace cpu

std::string shape_of(const Tensor& t) {
  std::ostringstream out;
  out << '[';
  for (int64_t i = 0; i < t.dim(); ++i) out << (i ? ", " : "") << t.size(i);
  out << ']';
  return out.str();
}

std::string device_of(const Tensor& t) { return t.is_cuda() ? message("cuda:", t.get_device_index()) : "cpu"; }

Tensor check_line_inputs(const Tensor& logits, const Tensor& direction, const Tensor& target) {
  POF_CHECK_DIM(logits, 2, "logits");
  POF_CHECK_DIM(direction, 2, "direction");
  POF_CHECK_FLOAT(logits, "logits");
  POF_CHECK_FLOAT(direction, "direction");
  POF_CHECK(direction.size(0) == logits.size(0) && direction.size(1) == logits.size(1),
            "direction must have the shape of logits ", shape_of(logits), ", got ", shape_of(direction));
  POF_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "target must have shape [", logits.size(0),
            "] (one label per row), got ", shape_of(target));
  POF_CHECK(!is_float(target.scalar_type()) && target.scalar_type() != ScalarType::Bool,
            "target must be an integer tensor, got ", target.scalar_type());
  POF_CHECK(logits.size(0) > 0 && logits.size(1) > 0, "logits must have at least one row and one class, got ",
            shape_of(logits));
  POF_CHECK_SAME_DEVICE(direction, logits, "direction", "logits");
  POF_CHECK_SAME_DEVICE(target, logits, "target", "logits");
  return as_contiguous(as_dtype(target, ScalarType::Long));
}

Tensor line_stats_cpu(const Tensor& logits, const Tensor& direction, const Tensor& target, const Tensor& steps,
                      int64_t ignore_index) {
  const Tensor y = check_line_inputs(logits, direction, target);
  POF_CHECK_DIM(steps, 1, "steps");
  const ScalarType acc = accumulation_type(logits.scalar_type());
  const Tensor z = as_contiguous(logits), d = as_contiguous(direction);
  const Tensor t = as_contiguous(as_dtype(steps, acc));
  const int64_t K = t.size(0);
  Tensor out = torch::stable::new_empty(logits, {3, K}, acc);
  dispatch_accumulation(acc, [&](auto type) {
    using T = decltype(type);
    cpu::LineScorer<T> score(z, d, y, ignore_index);
    T* o = out.mutable_data_ptr<T>();
    const T* s = t.const_data_ptr<T>();
    for (int64_t k0 = 0; k0 < K; k0 += cpu::kLanes) {
      const int k = static_cast<int>(std::min<int64_t>(cpu::kLanes, K - k0));
      score(s + k0, k, o + k0, o + K + k0, o + 2 * K + k0);
    }
  });
  return out;
}

}  // namespace pof_fast
