// CPU building blocks shared by csrc/line_stats.cpp, csrc/head_residual.cpp and csrc/search.cpp.
#pragma once

#include <cstdint>
#include <vector>

#include "torch_calls.h"

namespace pof_fast {
namespace cpu {

// Rows are copied, converted to the accumulation type T, into buffers padded to a multiple of
// kLanes; every inner loop then runs over kLanes independent lanes (SIMD-friendly, and the summation
// order does not depend on the instruction set, so results are the same on every x86 machine).
constexpr int64_t kLanes = 16;

inline int64_t padded(int64_t c) { return (c + kLanes - 1) / kLanes * kLanes; }

// m: the rows whose label is not ignore_index (a label outside [0, C) counts, and makes its row NaN).
int64_t count_rows(const int64_t* target, int64_t n, int64_t ignore_index);

// out[0:C] = T(src[0:C]), out[C:Cp] = pad.
template <typename T>
using LoadRow = void (*)(const void* src, T* out, int64_t C, int64_t Cp, T pad);

template <typename T>
LoadRow<T> row_loader(ScalarType source);

// Scores k candidate steps on counted rows of z0 and d; a thread-count independent, deterministic
// sum over fixed row blocks, divided by max(m, 1).
template <typename T>
class LineScorer {
 public:
  // logits, direction: [n, C] any float dtype, contiguous; target: [n] int64 contiguous. last_derivatives_only: the
  // slope and curvature only of each call's last candidate (the others NaN on wide fp32 rows), for drivers that read
  // no other (bracket_grid and grid read the slope of the grid's last point, for the capped flag).
  LineScorer(const Tensor& logits, const Tensor& direction, const Tensor& target, int64_t ignore_index,
             bool last_derivatives_only = false);
  void operator()(const T* steps, int k, T* loss, T* slope, T* curv);

 private:
  const char* z_;
  const char* d_;
  const int64_t* y_;
  int64_t z_row_bytes_, d_row_bytes_;
  int64_t n_, C_, Cp_, ignore_index_, rows_per_block_, blocks_;
  T inv_m_;
  LoadRow<T> load_z_, load_d_;
  bool last_derivatives_only_;
  bool in_place_;  // rows of T whose length is a multiple of kLanes are read where they are, not copied
  std::vector<T> partial_;
};

}  // namespace cpu
}  // namespace pof_fast
