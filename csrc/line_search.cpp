// The whole PoF line search as one op, CPU and CUDA: head gradient, direction logits, the search
// driver and the result assembly of pof_fast._types.assemble, with no Python between the launches and
// no host synchronisation (so torch.compile and CUDA graph capture see one node).
#include "common.h"

namespace pof_fast {

namespace {

// (step, l(t*), capped, ||u||) of pof_fast._types.assemble: g = 0 has no direction, so no step.
// On the CPU every input is a host scalar: read and filled in C++, with the same float operations, instead of seven
// dispatcher round trips (each costs more than the arithmetic). On a GPU: device ops, no host synchronisation.
std::tuple<Tensor, Tensor, Tensor, Tensor> assemble(const Tensor& step, const Tensor& loss0, const Tensor& loss,
                                                    const Tensor& capped, const Tensor& grad_norm,
                                                    const Tensor& scale) {
  if (grad_norm.is_cpu()) {
    std::tuple<Tensor, Tensor, Tensor, Tensor> out;
    dispatch_accumulation(grad_norm.scalar_type(), [&](auto type) {
      using T = decltype(type);
      const T norm = *grad_norm.const_data_ptr<T>();
      const bool has_direction = norm > T(0);
      const auto scalar = [&](double value, ScalarType dtype) {
        return torch::stable::full({}, value, dtype, std::nullopt, grad_norm.device());
      };
      const ScalarType dtype = grad_norm.scalar_type();
      out = {scalar(has_direction ? *step.const_data_ptr<T>() : T(0), dtype),
             scalar(*(has_direction ? loss : loss0).const_data_ptr<T>(), dtype),
             scalar(has_direction && *capped.const_data_ptr<bool>(), ScalarType::Bool),
             scalar(norm * *scale.const_data_ptr<T>(), dtype)};
    });
    return out;
  }
  const Tensor has_direction = aten::gt(grad_norm, torch::stable::new_zeros(grad_norm, {}));
  return {aten::where(has_direction, step, torch::stable::new_zeros(step, {})), aten::where(has_direction, loss, loss0),
          aten::logical_and(capped, has_direction), aten::mul(grad_norm, scale)};
}

}  // namespace

SearchTensors line_search(const Tensor& features, const Tensor& weight, const std::optional<Tensor>& bias,
                          const Tensor& target, std::string_view method, bool normalized, double init_step,
                          double max_step, int64_t partitions, int64_t ignore_index, int64_t newton_iterations,
                          int64_t newton_points, std::optional<bool> logits_free) {
  (void)logits_free;  // no logits-free path here: z0 and d are stored
  // 1. z0, R, g_W, g_b, ||g||, scale (u = scale * g).
  auto [logits, residual, grad_weight, grad_bias, grad_norm, scale] =
      head_gradient(features, weight, bias, target, ignore_index, normalized);
  const bool with_bias = bias.has_value() && bias->defined();
  const std::optional<Tensor> bias_direction = with_bias ? std::optional<Tensor>(grad_bias) : std::nullopt;
  // 2. d = h u_W^T + u_b, and u = scale * g in place (g is ours).
  Tensor direction;
  // R is spent once g_W is formed: on the CPU d is written into its array (no fresh [n, C] array to fault in), so
  // that z0 and d are the only [n, C] arrays held; the GPU's d is a new array, R freed first on the 16-bit path.
  const bool cpu = features.is_cpu();
  if (stores_16bit_lines(features, weight.size(0))) {
    // u is rounded to the input dtype in place and d formed from it: the line searched is the line returned (||g||
    // and the scale stay those of the fp32 g).
    const std::optional<Tensor> into = cpu ? std::optional<Tensor>(residual) : std::nullopt;
    residual = Tensor();
    direction = direction_logits_16bit(features, grad_weight, bias_direction, scale, into);
  } else {
    direction = direction_logits_into(features, grad_weight, bias_direction, scale, residual,
                                      cpu ? std::optional<Tensor>(residual) : std::nullopt);
    aten::mul_(grad_weight, scale);
    aten::mul_(grad_bias, scale);
  }
  // 3. The driver over z0 and d.
#ifdef POF_FAST_WITH_CUDA
  auto [step, loss0, loss, capped] =
      features.is_cuda() ? search_cuda(logits, direction, target, method, init_step, max_step, partitions,
                                       ignore_index, newton_iterations, newton_points)
                         : search_cpu(logits, direction, target, method, init_step, max_step, partitions,
                                      ignore_index, newton_iterations, newton_points);
#else
  auto [step, loss0, loss, capped] = search_cpu(logits, direction, target, method, init_step, max_step, partitions,
                                                ignore_index, newton_iterations, newton_points);
#endif
  // 4. The result.
  auto [result_step, result_loss, result_capped, unit_norm] = assemble(step, loss0, loss, capped, grad_norm, scale);
  return {result_step, grad_weight, grad_bias, grad_norm, loss0, result_loss, result_capped, unit_norm};
}

}  // namespace pof_fast
