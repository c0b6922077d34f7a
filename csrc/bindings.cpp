// pof_fast._C: the op schemas (STABLE_TORCH_LIBRARY), their CPU kernels, and a small limited-API Python module.
//
// Loading pof_fast._C registers torch.ops.pof_fast.* from the static initializers below; CUDA kernels register
// here too when the extension is built with CUDA. Fake (meta) kernels for torch.compile live in pof_fast/_ext.py.
// The module itself uses only Python's limited API (one binary for every CPython >= 3.10): the build line, the
// `cuda` flag and, in CUDA builds, the launch settings of benchmarks/sweep.py.
#include <Python.h>

#include <torch/csrc/stable/library.h>

#include "common.h"

// What this binary is, read by pof_fast/_ext.py: from the module when it loads, from the file's bytes when it cannot
// (so a wheel installed under the wrong torch still says which torch it was built against). TORCH_VERSION: the
// torch whose headers compiled it; abi: the oldest torch it loads in (TORCH_TARGET_VERSION); cuda: CUDART_VERSION.
#define POF_FAST_STR_(x) #x
#define POF_FAST_STR(x) POF_FAST_STR_(x)
#ifdef POF_FAST_WITH_CUDA
#define POF_FAST_CUDA_BUILD POF_FAST_STR(CUDART_VERSION)
#else
#define POF_FAST_CUDA_BUILD "none"
#endif
static const char kBuild[] = "pof_fast._C build: torch=" TORCH_VERSION "; abi=" POF_FAST_STR(
    POF_FAST_ABI_MAJOR) "." POF_FAST_STR(POF_FAST_ABI_MINOR) "; cuda=" POF_FAST_CUDA_BUILD ";";
static_assert(TORCH_TARGET_VERSION == ((0ULL + POF_FAST_ABI_MAJOR) << 56 | (0ULL + POF_FAST_ABI_MINOR) << 48),
              "setup.py passes one ABI target: TORCH_TARGET_VERSION and POF_FAST_ABI_MAJOR/MINOR must agree");

#ifdef __libc_single_threaded
// csrc/glibc_compat.h: the "no threads" flag libstdc++ reads, never set (as in any process with threads).
extern "C" {
char __libc_single_threaded = 0;
}
#endif

STABLE_TORCH_LIBRARY(pof_fast, m) {
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

STABLE_TORCH_LIBRARY_IMPL(pof_fast, CPU, m) {
  m.impl("line_stats", TORCH_BOX(&pof_fast::line_stats_cpu));
  m.impl("head_gradient", TORCH_BOX(&pof_fast::head_gradient));
  m.impl("direction_logits", TORCH_BOX(&pof_fast::direction_logits));
  m.impl("search", TORCH_BOX(&pof_fast::search_cpu));
  m.impl("line_search", TORCH_BOX(&pof_fast::line_search));
}

#ifdef POF_FAST_WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(pof_fast, CUDA, m) {
  m.impl("line_stats", TORCH_BOX(&pof_fast::line_stats_cuda));
  m.impl("head_gradient", TORCH_BOX(&pof_fast::head_gradient));
  m.impl("direction_logits", TORCH_BOX(&pof_fast::direction_logits));
  m.impl("search", TORCH_BOX(&pof_fast::search_cuda));
  m.impl("line_search", TORCH_BOX(&pof_fast::line_search));
}

namespace {

// For benchmarks/sweep.py only: the CUDA launch settings (row_threads, scorer_warps), read and set.
PyObject* get_cuda_launch(PyObject*, PyObject*) {
  const pof_fast::CudaLaunch& launch = pof_fast::cuda_launch();
  return Py_BuildValue("(ii)", launch.row_threads, launch.scorer_warps);
}

PyObject* set_cuda_launch(PyObject*, PyObject* args) {
  int row_threads = 0, scorer_warps = 0;
  if (!PyArg_ParseTuple(args, "ii", &row_threads, &scorer_warps)) return nullptr;
  if (row_threads < 32 || row_threads > 1024 || row_threads % 32 != 0) {
    return PyErr_Format(PyExc_ValueError, "pof_fast: row_threads must be a multiple of 32 in [32, 1024], got %d",
                        row_threads);
  }
  if (scorer_warps != 2 && scorer_warps != 4 && scorer_warps != 8) {
    return PyErr_Format(PyExc_ValueError, "pof_fast: scorer_warps must be 2, 4 or 8, got %d", scorer_warps);
  }
  pof_fast::cuda_launch() = {row_threads, scorer_warps};
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"_cuda_launch", get_cuda_launch, METH_NOARGS, "The CUDA launch settings (row_threads, scorer_warps)."},
    {"_set_cuda_launch", set_cuda_launch, METH_VARARGS, "Set the CUDA launch settings (process-wide)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
#define POF_FAST_METHODS kMethods
#else
#define POF_FAST_METHODS nullptr
#endif

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "pof_fast._C",
                               "pof_fast compiled kernels; the ops are torch.ops.pof_fast.*", -1, POF_FAST_METHODS};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef POF_FAST_WITH_CUDA
  const long cuda = 1;
#else
  const long cuda = 0;
#endif
  if (PyModule_AddStringConstant(m, "build", kBuild) < 0 || PyModule_AddObject(m, "cuda", PyBool_FromLong(cuda)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
