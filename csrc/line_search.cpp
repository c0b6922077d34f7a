// The whole PoF line search as one op, CPU and CUDA: head gradient, direction logits, the search
// driver and the result assembly of pof_fast._types.assemble, with no Python between the launches and
// no host synchronisation (so torch.compile and CUDA graph capture see one node).
#include "common.h"

namespace pof_fast {

SearchTensors line_search(const at::Tensor& features, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                          c10::string_view method, bool normalized, double init_step, double max_step,
                          int64_t partitions, int64_t ignore_index, int64_t newton_iterations,
                          int64_t newton_points, c10::optional<bool> logits_free) {
  (void)logits_free;  // no logits-free path here: z0 and d are stored
  // 1. z0, R, g_W, g_b, ||g||, scale (u = scale * g).
  auto [logits, residual, grad_weight, grad_bias, grad_norm, scale] =
      head_gradient(features, weight, bias, target, ignore_index, normalized);
  const bool with_bias = bias.has_value() && bias->defined();
  // 2. d = h u_W^T + u_b, and u = scale * g in place (g is ours).
  at::Tensor direction;
  if (stores_16bit_lines(features, weight.size(0))) {
    // R is spent: freed before d is formed, so that z0 and d are the only [n, C] arrays held. u is rounded to the
    // input dtype in place and d formed from it: the line searched is the line returned (||g|| and the scale stay
    // those of the fp32 g).
    residual = at::Tensor();
    direction = direction_logits_16bit(features, grad_weight,
                                       with_bias ? c10::optional<at::Tensor>(grad_bias) : c10::nullopt, scale);
  } else {
    direction = direction_logits(features, grad_weight,
                                 with_bias ? c10::optional<at::Tensor>(grad_bias) : c10::nullopt, scale, residual);
    grad_weight.mul_(scale);
    grad_bias.mul_(scale);
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
  // 4. The result; g = 0 has no direction, so no step.
  const at::Tensor has_direction = grad_norm > 0;
  return {at::where(has_direction, step, at::zeros_like(step)),
          grad_weight,
          grad_bias,
          grad_norm,
          loss0,
          at::where(has_direction, loss, loss0),
          at::logical_and(capped, has_direction),
          grad_norm * scale};
}

}  // namespace pof_fast
