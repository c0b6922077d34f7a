// The search drivers of pof_fast/drivers.py (the search specification), step for step, for host C++
// and CUDA device code.
//
// A driver sees the problem only through a scorer `stats(steps, k, loss, slope, curv)` that fills
// l(t), l'(t), l''(t) for k <= kChunk candidate steps. Candidates are formed with the same float
// operations, in the same order and the same dtype T as the torch drivers (no fused multiply-add),
// so both backends score the same points and pick the same one up to rounding of the losses. They
// score the same candidates too (l(0) in the first call of newton and bracket_grid, every newton
// round, every bracket candidate), so drivers.evaluations() is exact here; the only difference is
// that a call of more than kChunk candidates is made as several calls.
// On the GPU every thread of the launch runs the driver redundantly on identical scorer outputs.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define POF_HD __host__ __device__ __forceinline__
// The drivers are host+device templates calling a device-only scorer inside CUDA kernels.
#define POF_HD_TEMPLATE _Pragma("nv_exec_check_disable")
#else
#define POF_HD inline
#define POF_HD_TEMPLATE
#endif

namespace pof_fast {

constexpr int kChunk = 16;  // candidates per scorer call; newton_points must not exceed it

struct Plan {
  int method;  // Method in common.h: 0 newton, 1 bracket_grid, 2 grid
  double init_step;
  double max_step;
  int partitions;
  int newton_iterations;
  int newton_points;
};

template <typename T>
struct Outcome {
  T step;
  T loss0;
  T loss;
  bool capped;
};

// Rounded, uncontracted arithmetic: a*b and a+b exactly as two separate torch ops compute them.
#if defined(__CUDA_ARCH__)
POF_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
POF_HD double mul_rn(double a, double b) { return __dmul_rn(a, b); }
POF_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
POF_HD double add_rn(double a, double b) { return __dadd_rn(a, b); }
#else
template <typename T>
POF_HD T mul_rn(T a, T b) { volatile T r = a * b; return r; }
template <typename T>
POF_HD T add_rn(T a, T b) { volatile T r = a + b; return r; }
#endif
template <typename T>
POF_HD T sub_rn(T a, T b) { return add_rn(a, -b); }
template <typename T>
POF_HD T max_nan(T a, T b) { return (a != a || a > b) ? a : b; }  // torch.maximum: NaN wins
template <typename T>
POF_HD T min_nan(T a, T b) { return (a != a || a < b) ? a : b; }

template <typename T>
struct Scored {
  T steps[kChunk];
  T loss[kChunk];
  T slope[kChunk];
  T curv[kChunk];
};

// _grid_pick: score end * k / P for k = 1..P; (t*, l(t*), argmin is the last point, slope at the last).
POF_HD_TEMPLATE
template <typename T, typename Stats>
POF_HD void grid_pick(Stats& stats, T end, int partitions, T& best_t, T& best_loss, bool& last, T& slope_last) {
  Scored<T> s;
  int best = -1;
  for (int k0 = 0; k0 < partitions; k0 += kChunk) {
    const int k = partitions - k0 < kChunk ? partitions - k0 : kChunk;
    for (int j = 0; j < k; ++j) s.steps[j] = mul_rn(end, T(k0 + j + 1) / T(partitions));
    stats(s.steps, k, s.loss, s.slope, s.curv);
    for (int j = 0; j < k; ++j) {
      // torch.argmin: the first minimum, a NaN counts as the minimum
      const bool nan = s.loss[j] != s.loss[j];
      const bool best_nan = best >= 0 && best_loss != best_loss;
      if (best < 0 || (!best_nan && (nan || s.loss[j] < best_loss))) {
        best = k0 + j;
        best_t = s.steps[j];
        best_loss = s.loss[j];
      }
    }
    if (k0 + k == partitions) slope_last = s.slope[k - 1];
  }
  last = best == partitions - 1;
}

POF_HD_TEMPLATE
template <typename T, typename Stats>
POF_HD Outcome<T> bracket_grid(Stats& stats, const Plan& plan) {
  // The scored candidates init * 2^j while the doubled value stays below max_step (drivers.bracket_steps).
  int scored = 1;
  double last = plan.init_step;
  while (last * 2.0 < plan.max_step) {
    last *= 2.0;
    ++scored;
  }
  const double kept_end = last * 2.0;
  Scored<T> s;
  T loss0 = T(0);
  bool rose = false;
  T end = T(kept_end);
  double t = plan.init_step;
  // t = 0, then the bracket, kChunk at a time: l(0) comes in the same scorer call as the first doublings.
  for (int i0 = 0; i0 <= scored; i0 += kChunk) {
    const int k = scored + 1 - i0 < kChunk ? scored + 1 - i0 : kChunk;
    for (int j = 0; j < k; ++j) {
      if (i0 + j == 0) {
        s.steps[j] = T(0);
      } else {
        s.steps[j] = T(t);
        t *= 2.0;
      }
    }
    stats(s.steps, k, s.loss, s.slope, s.curv);
    if (i0 == 0) loss0 = s.loss[0];
    for (int j = i0 == 0 ? 1 : 0; j < k && !rose; ++j) {
      if (s.loss[j] > loss0) {
        rose = true;
        end = s.steps[j];
      }
    }
  }
  Outcome<T> out{T(0), loss0, T(0), false};
  bool at_last = false;
  T slope_last = T(0);
  grid_pick(stats, end, plan.partitions, out.step, out.loss, at_last, slope_last);
  out.loss0 = loss0;
  out.capped = !rose && at_last && slope_last < T(0);
  return out;
}

POF_HD_TEMPLATE
template <typename T, typename Stats>
POF_HD Outcome<T> grid(Stats& stats, const Plan& plan, T loss0) {
  Outcome<T> out{T(0), loss0, T(0), false};
  bool at_last = false;
  T slope_last = T(0);
  grid_pick(stats, T(plan.max_step), plan.partitions, out.step, out.loss, at_last, slope_last);
  out.loss0 = loss0;
  out.capped = at_last && slope_last < T(0);
  return out;
}

POF_HD_TEMPLATE
template <typename T, typename Stats>
POF_HD Outcome<T> newton(Stats& stats, const Plan& plan) {
  Scored<T> s;
  s.steps[0] = T(0);
  s.steps[1] = T(plan.max_step);
  stats(s.steps, 2, s.loss, s.slope, s.curv);
  const T zero = T(0), cap = T(plan.max_step);
  const T loss0 = s.loss[0], slope0 = s.slope[0], loss_max = s.loss[1];
  const bool capped = s.slope[1] < zero;
  T lo = zero, hi = cap;
  T best_t = zero, best_loss = s.loss[0], best_slope = slope0, best_curv = s.curv[0];
  const int k = plan.newton_points;
  const T tiny = std::numeric_limits<T>::min();
  for (int it = 0; it < plan.newton_iterations; ++it) {
    const T curv = best_curv != best_curv ? best_curv : (best_curv > tiny ? best_curv : tiny);  // clamp_min
    T nt = sub_rn(best_t, best_slope / curv);
    if (!(nt - nt == T(0))) nt = add_rn(lo, hi) / T(2);  // not finite
    nt = min_nan(max_nan(nt, lo), hi);
    s.steps[0] = nt;
    const T width = sub_rn(hi, lo);
    // the safeguard lo + (hi - lo) (j / k)^2 (drivers.newton): j^2 and k^2 exact, one rounded division
    for (int j = 1; j < k; ++j) s.steps[j] = add_rn(lo, mul_rn(width, T(j * j) / T(k * k)));
    stats(s.steps, k, s.loss, s.slope, s.curv);
    T lo_new = lo, hi_new = hi;
    int best = 0;
    for (int j = 0; j < k; ++j) {
      const bool falling = s.slope[j] < zero;
      lo_new = max_nan(lo_new, falling ? s.steps[j] : lo);
      hi_new = min_nan(hi_new, falling ? hi : s.steps[j]);
      const T a = s.slope[j] < zero ? -s.slope[j] : s.slope[j];
      const T b = s.slope[best] < zero ? -s.slope[best] : s.slope[best];
      if (j > 0 && (a < b || (a != a && b == b))) best = j;
    }
    lo = max_nan(lo, lo_new);
    hi = min_nan(hi, hi_new);
    const T a = s.slope[best] < zero ? -s.slope[best] : s.slope[best];
    const T b = best_slope < zero ? -best_slope : best_slope;
    if (a < b) {
      best_t = s.steps[best];
      best_loss = s.loss[best];
      best_slope = s.slope[best];
      best_curv = s.curv[best];
    }
  }
  const bool descent = slope0 < zero;
  Outcome<T> out{zero, loss0, zero, false};
  out.step = capped ? cap : (descent ? best_t : zero);
  out.loss = capped ? loss_max : (descent ? best_loss : loss0);
  out.loss0 = loss0;
  out.capped = capped;
  return out;
}

// The plan's method. newton and bracket_grid score l(0) in their first scorer call; grid on its own.
POF_HD_TEMPLATE
template <typename T, typename Stats>
POF_HD Outcome<T> run_search(Stats& stats, const Plan& plan) {
  if (plan.method == 1) return bracket_grid<T>(stats, plan);
  if (plan.method == 0) return newton<T>(stats, plan);
  T zero[1] = {T(0)}, loss[1], slope[1], curv[1];
  stats(zero, 1, loss, slope, curv);
  return grid(stats, plan, loss[0]);
}

}  // namespace pof_fast
