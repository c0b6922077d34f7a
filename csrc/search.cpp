// The whole line search on the CPU in one native call: the drivers of pof_fast/drivers.py
// (csrc/search_driver.h) on the CPU line scorer, with no Python per candidate.
#include "common.h"
#include "cpu_kernels.h"
#include "search_driver.h"

namespace pof_fast {

Method parse_method(std::string_view method) {
  if (method == "newton") return kNewton;
  if (method == "bracket_grid") return kBracketGrid;
  if (method == "grid") return kGrid;
  throw std::runtime_error(
      message("pof_fast: method must be one of ['newton', 'bracket_grid', 'grid'], got '", method, "'"));
}

Plan make_plan(std::string_view method, double init_step, double max_step, int64_t partitions,
               int64_t newton_iterations, int64_t newton_points) {
  POF_CHECK(init_step > 0 && max_step > 0, "init_step and max_step must be positive, got ", init_step, " and ",
            max_step);
  POF_CHECK(partitions > 0, "partitions must be positive, got ", partitions);
  POF_CHECK(newton_iterations >= 0, "newton_iterations must be >= 0, got ", newton_iterations);
  POF_CHECK(newton_points >= 1 && newton_points <= kChunk, "newton_points must be in [1, ", kChunk, "], got ",
            newton_points);
  return Plan{parse_method(method), init_step, max_step, static_cast<int>(partitions),
              static_cast<int>(newton_iterations), static_cast<int>(newton_points)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> search_cpu(const Tensor& logits, const Tensor& direction,
                                                      const Tensor& target, std::string_view method, double init_step,
                                                      double max_step, int64_t partitions, int64_t ignore_index,
                                                      int64_t newton_iterations, int64_t newton_points) {
  const Tensor y = check_line_inputs(logits, direction, target);
  const Plan plan = make_plan(method, init_step, max_step, partitions, newton_iterations, newton_points);
  const ScalarType acc = accumulation_type(logits.scalar_type());
  const Tensor z = as_contiguous(logits), d = as_contiguous(direction);
  Outcome<double> out{};
  dispatch_accumulation(acc, [&](auto type) {
    using T = decltype(type);
    cpu::LineScorer<T> score(z, d, y, ignore_index, /*last_derivatives_only=*/plan.method != kNewton);
    const Outcome<T> found = run_search<T>(score, plan);
    out = {found.step, found.loss0, found.loss, found.capped};
  });
  // 0-dim results filled on creation (one C shim call each); float values round-trip exactly through double.
  const auto scalar = [&](double value, ScalarType dtype) {
    return torch::stable::full({}, value, dtype, std::nullopt, logits.device());
  };
  return {scalar(out.step, acc), scalar(out.loss0, acc), scalar(out.loss, acc),
          scalar(out.capped ? 1.0 : 0.0, ScalarType::Bool)};
}

}  // namespace pof_fast
