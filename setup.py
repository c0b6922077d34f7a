"""Build script: the pure-Python package always, the compiled extension ``pof_fast._C`` when possible.

``kernels/`` ships as the subpackage ``pof_fast.kernels`` (never as a top-level ``kernels``).

Environment (all optional):
  POF_FAST_BUILD_EXT=0      pure-Python install, no compiled extension.
  POF_FAST_BUILD_CUDA=0/1   force the CUDA kernels off/on (default: on when torch is a CUDA build and nvcc is found).
  TORCH_CUDA_ARCH_LIST      GPU architectures (default: the visible GPU's, else DEFAULT_CUDA_ARCHS).
  MAX_JOBS                  parallel compile jobs (ninja).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The source tree's kernels/ folder (shipped as pof_fast.kernels) must not shadow an installed top-level `kernels`:
# Hugging Face's `kernels` package (a Transformers dependency) registers a setuptools egg_info writer that imports
# it while this build runs, and `python setup.py` puts this folder first on sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
# CUDA 13 supports sm_75 and newer; PTX of the newest lets later GPUs JIT-compile the kernels.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def _say(message):
    sys.stderr.write(f"pof_fast setup: {message}\n")


def _flag(name):
    """None when unset, else whether the variable is truthy."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.strip().lower() not in ("0", "false", "no", "off")


def _want_cuda(torch, cpp_extension):
    forced = _flag("POF_FAST_BUILD_CUDA")
    has_toolkit = cpp_extension.CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    )
    if forced is False:
        return False
    if forced is True:
        if torch.version.cuda is None:
            raise RuntimeError("POF_FAST_BUILD_CUDA=1 but the installed torch is not a CUDA build")
        if not has_toolkit:
            raise RuntimeError("POF_FAST_BUILD_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit")
        return True
    return torch.version.cuda is not None and has_toolkit


def extensions():
    """Compiled extension modules and the build command that makes them; ([], {}) for a pure-Python install."""
    if _flag("POF_FAST_BUILD_EXT") is False:
        _say("POF_FAST_BUILD_EXT=0: installing the pure-Python package (backend 'torch' only)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch missing at build time: the package still installs
        _say(f"torch is not importable at build time ({exc}); installing without pof_fast._C. "
             "Install torch first and use `pip install --no-build-isolation .` to build the extension.")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _say("no C++ compiler found; installing without pof_fast._C (backend 'torch' only)")
        return [], {}

    cuda = _want_cuda(torch, cpp_extension)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    flags = {"cxx": ["-O3", "-ffp-contract=off", "-Wno-psabi"]}
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is OpenMP inline in ATen's headers: without -fopenmp it runs on one thread. The
        # libgomp.so.1 it needs is the one torch has already loaded.
        flags["cxx"].append("-fopenmp")
        link.append("-fopenmp")
    macros = []
    if cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        macros.append(("POF_FAST_WITH_CUDA", None))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        flags["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    make = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    ext = make("pof_fast._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], define_macros=macros,
               extra_compile_args=flags, extra_link_args=link)
    _say(f"building pof_fast._C ({'CPU + CUDA' if cuda else 'CPU only'})")
    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = extensions()

setup(
    packages=["pof_fast", "pof_fast.backends", "pof_fast.bench", "pof_fast.cli", "pof_fast.integrations",
              "pof_fast.kernels", "pof_fast.training"],
    package_dir={"pof_fast": "pof_fast", "pof_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
