// The whole line search on the CPU in one native call: the drivers of pof_fast/drivers.py
// (csrc/search_driver.h) on the CPU line scorer, with no Python per candidate.
#include "common.h"
#include "cpu_kernels.h"
#include "search_driver.h"

namespace pof_fast {

Method parse_method(c10::string_view method) {
  if (method == "newton") return kNewton;
  if (method == "bracket_grid") return kBracketGrid;
  if (method == "grid") return kGrid;
  TORCH_CHECK_VALUE(false, "pof_fast: method must be one of ['newton', 'bracket_grid', 'grid'], got '",
              std::string(method), "'");
}

Plan make_plan(c10::string_view method, double init_step, double max_step, int64_t partitions,
               int64_t newton_iterations, int64_t newton_points) {
  TORCH_CHECK_VALUE(init_step > 0 && max_step > 0, "pof_fast: init_step and max_step must be positive, got ", init_step,
              " and ", max_step);
  TORCH_CHECK_VALUE(partitions > 0, "pof_fast: partitions must be positive, got ", partitions);
  TORCH_CHECK_VALUE(newton_iterations >= 0, "pof_fast: newton_iterations must be >= 0, got ", newton_iterations);
  TORCH_CHECK_VALUE(newton_points >= 1 && newton_points <= kChunk, "pof_fast: newton_points must be in [1, ", kChunk,
              "], got ", newton_points);
  return Plan{parse_method(method), init_step, max_step, static_cast<int>(partitions),
              static_cast<int>(newton_iterations), static_cast<int>(newton_points)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> search_cpu(
    const at::Tensor& logits, const at::Tensor& direction, const at::Tensor& target, c10::string_view method,
    double init_step, double max_step, int64_t partitions, int64_t ignore_index, int64_t newton_iterations,
    int64_t newton_points) {
  const at::Tensor y = check_line_inputs(logits, direction, target);
  const Plan plan = make_plan(method, init_step, max_step, partitions, newton_iterations, newton_points);
  const at::ScalarType acc = accumulation_type(logits.scalar_type());
  const at::Tensor z = logits.contiguous(), d = direction.contiguous();
  const auto options = logits.options().dtype(acc);
  at::Tensor step = at::empty({}, options), loss0 = at::empty({}, options), loss = at::empty({}, options);
  at::Tensor capped = at::empty({}, options.dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(acc, "pof_fast.search", [&] {
    cpu::LineScorer<scalar_t> score(z, d, y, ignore_index);
    const Outcome<scalar_t> out = run_search<scalar_t>(score, plan);
    step.fill_(out.step);
    loss0.fill_(out.loss0);
    loss.fill_(out.loss);
    capped.fill_(out.capped);
  });
  return {step, loss0, loss, capped};
}

}  // namespace pof_fast
