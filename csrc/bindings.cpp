// pof_fast._C: the op schemas (TORCH_LIBRARY), their CPU kernels, and a small Python module.
//
// Importing pof_fast._C registers torch.ops.pof_fast.*; CUDA kernels register themselves from
// csrc/cuda/*.cu when the extension is built with CUDA. Fake (meta) kernels for torch.compile
// live in pof_fast/_ext.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY(pof_fast, m) {
  m.def("line_stats(Tensor logits, Tensor direction, Tensor target, Tensor steps, int ignore_index) -> Tensor");
  m.def(
      "head_gradient(Tensor features, Tensor weight, Tensor? bias, Tensor target, int ignore_index, "
      "bool normalized) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "direction_logits(Tensor features, Tensor grad_weight, Tensor? grad_bias, Tensor scale, Tensor? residual) "
      "-> Tensor");
  m.def(
      "search(Tensor logits, Tensor direction, Tensor target, str method, float init_step, float max_step, "
      "int partitions, int ignore_index, int newton_iterations, int newton_points) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "line_search(Tensor features, Tensor weight, Tensor? bias, Tensor target, str method, bool normalized, "
      "float init_step, float max_step, int partitions, int ignore_index, int newton_iterations, int newton_points, "
      "bool? logits_free) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pof_fast, CPU, m) {
  m.impl("line_stats", &pof_fast::line_stats_cpu);
  m.impl("head_gradient", &pof_fast::head_gradient);
  m.impl("direction_logits", &pof_fast::direction_logits);
  m.impl("search", &pof_fast::search_cpu);
  m.impl("line_search", &pof_fast::line_search);
}

#ifdef POF_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(pof_fast, CUDA, m) {
  m.impl("line_stats", &pof_fast::line_stats_cuda);
  m.impl("head_gradient", &pof_fast::head_gradient);
  m.impl("direction_logits", &pof_fast::direction_logits);
  m.impl("search", &pof_fast::search_cuda);
  m.impl("line_search", &pof_fast::line_search);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "pof_fast compiled kernels; the ops are torch.ops.pof_fast.*";
#ifdef POF_FAST_WITH_CUDA
  module.attr("cuda") = true;
  // For benchmarks/sweep.py only: the CUDA launch settings (row_threads, scorer_warps), read and set.
  module.def("_cuda_launch", [] {
    const pof_fast::CudaLaunch& launch = pof_fast::cuda_launch();
    return std::make_tuple(launch.row_threads, launch.scorer_warps);
  });
  module.def("_set_cuda_launch", [](int row_threads, int scorer_warps) {
    TORCH_CHECK_VALUE(row_threads >= 32 && row_threads <= 1024 && row_threads % 32 == 0,
                      "pof_fast: row_threads must be a multiple of 32 in [32, 1024], got ", row_threads);
    TORCH_CHECK_VALUE(scorer_warps == 2 || scorer_warps == 4 || scorer_warps == 8,
                      "pof_fast: scorer_warps must be 2, 4 or 8, got ", scorer_warps);
    pof_fast::cuda_launch() = {row_threads, scorer_warps};
  });
#else
  module.attr("cuda") = false;
#endif
}
