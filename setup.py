"""Build script: the pure-Python package always, the compiled extension ``pof_fast._C`` when possible.

``kernels/`` ships as the subpackage ``pof_fast.kernels`` (never as a top-level ``kernels``).

Environment (all optional):
  POF_FAST_BUILD_EXT=0      pure-Python install, no compiled extension.
  POF_FAST_BUILD_CUDA=0/1   force the CUDA kernels off/on. Unset: on when torch is a CUDA build; when nvcc, the CUDA
                            headers or libcudart of torch's CUDA major are not found (cuda_toolkit.py says where it
                            looks), the CPU kernels are built with one warning; with 1 that is an error instead.
  CUDA_HOME / CUDA_PATH     the CUDA toolkit to build with (default: the toolkit behind the nvcc on PATH).
  TORCH_CUDA_ARCH_LIST      GPU architectures (default: the visible GPU's, else DEFAULT_CUDA_ARCHS).
  POF_FAST_LOCAL_VERSION    a local version label for release wheels, e.g. cu13 -> 0.1.0+cu13 (.ci/build-wheels.sh).
  MAX_JOBS                  parallel compile jobs (ninja).

The extension is built on the LibTorch stable ABI for torch STABLE_ABI_TARGET and on Python's limited API, so one
binary (wheel tag cp310-abi3) serves every torch from 2.10 on and every CPython from 3.10 on (csrc/torch_calls.h).
"""
import glob
import importlib.util
import os
import platform
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The source tree's kernels/ folder (shipped as pof_fast.kernels) must not shadow an installed top-level `kernels`:
# Hugging Face's `kernels` package (a Transformers dependency) registers a setuptools egg_info writer that imports
# it while this build runs, and `python setup.py` puts this folder first on sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
# The oldest torch the compiled extension loads in: its stable ABI is all the C++ sources may use.
STABLE_ABI_TARGET = (2, 10)
# The oldest CPython the extension module loads in (Python's limited API; the wheel's abi3 tag).
LIMITED_API = (3, 10)
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


def _load_cuda_toolkit():
    """cuda_toolkit.py beside this file, imported by path (this folder is not on sys.path, see above)."""
    spec = importlib.util.spec_from_file_location("cuda_toolkit", os.path.join(ROOT, "cuda_toolkit.py"))
    module = sys.modules["cuda_toolkit"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def _cuda_toolkit(torch):
    """The CUDA toolkit to build the CUDA kernels with (cuda_toolkit.Toolkit), or None for a CPU-only build.

    Decided before anything compiles: what is missing makes one warning (the CPU kernels are built) or, with
    POF_FAST_BUILD_CUDA=1, one error."""
    forced = _flag("POF_FAST_BUILD_CUDA")
    if forced is False:
        return None
    if torch.version.cuda is None:
        if forced:
            raise SystemExit(f"pof_fast setup: POF_FAST_BUILD_CUDA=1 but torch {torch.__version__} is not a CUDA "
                             "build: install a CUDA build of torch first")
        return None
    toolkit = _load_cuda_toolkit()
    torch_site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    site_dirs = [torch_site] + [p for p in sys.path if p and os.path.isdir(os.path.join(p, "nvidia"))]
    try:
        found = toolkit.find(torch.version.cuda, os.environ, site_dirs)
    except toolkit.Missing as missing:
        major = torch.version.cuda.split(".")[0]
        message = (f"torch {torch.__version__} is a CUDA {torch.version.cuda} build, but {missing}. "
                   f"CUDA_HOME={os.environ.get('CUDA_HOME') or '(unset)'}: set it to a CUDA {major} toolkit (the "
                   "folder holding bin/nvcc and include/cuda_runtime_api.h), or put that toolkit's nvcc first on PATH")
        if forced:
            raise SystemExit(f"pof_fast setup: error: POF_FAST_BUILD_CUDA=1 and {message}")
        _say(f"WARNING: building the CPU kernels only, without the CUDA kernels: {message}; POF_FAST_BUILD_CUDA=1 "
             "makes this an error, POF_FAST_BUILD_CUDA=0 a CPU build without this warning")
        return None
    # torch.utils.cpp_extension runs $CUDA_HOME/bin/nvcc and adds $CUDA_HOME/include: the real toolkit, not the
    # folder above a wrapper script's bin/ that it guesses from PATH.
    os.environ["CUDA_HOME"] = found.nvcc.home
    _say(f"CUDA {found.nvcc.version[0]}.{found.nvcc.version[1]}: nvcc in {found.nvcc.home}, {toolkit.HEADER} in "
         f"{found.include_dir} ({found.source}), {found.cudart} in {found.library_dir}")
    return found


def _version(text):
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def extensions():
    """Compiled extension modules, the build command that makes them and setup() options; ([], {}, {}) for a
    pure-Python install."""
    if _flag("POF_FAST_BUILD_EXT") is False:
        _say("POF_FAST_BUILD_EXT=0: installing the pure-Python package (backend 'torch' only)")
        return [], {}, {}
    try:
        import torch
    except Exception as exc:  # torch missing at build time: the package still installs
        _say(f"torch is not importable at build time ({exc}); installing without pof_fast._C. "
             "Install torch first and use `pip install --no-build-isolation .` to build the extension.")
        return [], {}, {}
    if _version(torch.__version__) < STABLE_ABI_TARGET:
        _say(f"torch {torch.__version__} predates the stable ABI of torch {'.'.join(map(str, STABLE_ABI_TARGET))} "
             "that pof_fast._C is built for; installing without it (backend 'torch' only)")
        return [], {}, {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _say("no C++ compiler found; installing without pof_fast._C (backend 'torch' only)")
        return [], {}, {}

    toolkit = _cuda_toolkit(torch)
    cuda = toolkit is not None
    from torch.utils import cpp_extension  # after _cuda_toolkit: it reads CUDA_HOME once, at import
    if cuda:
        cpp_extension.CUDA_HOME = toolkit.nvcc.home
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    major, minor = STABLE_ABI_TARGET
    macros = [
        ("TORCH_TARGET_VERSION", f"0x{major:02x}{minor:02x}000000000000"),
        ("POF_FAST_ABI_MAJOR", str(major)),
        ("POF_FAST_ABI_MINOR", str(minor)),
        ("Py_LIMITED_API", f"0x{LIMITED_API[0]:02X}{LIMITED_API[1]:02X}0000"),
    ]
    # Loadable on glibc 2.28 (manylinux_2_28) whatever glibc compiles it: csrc/glibc_compat.h, included first.
    compat = (["-include", os.path.join(ROOT, "csrc", "glibc_compat.h")]
              if platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc" else [])
    flags = {"cxx": ["-O3", "-ffp-contract=off", "-Wno-psabi"] + compat}
    if cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        # USE_CUDA: the stable headers' CUDA shims (current stream, error messages) are declared under it.
        macros += [("POF_FAST_WITH_CUDA", None), ("USE_CUDA", None)]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        flags["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + compat
    make = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    include_dirs = [os.path.join(ROOT, "csrc")] + ([toolkit.include_dir] if cuda else [])
    ext = make("pof_fast._C", sources, include_dirs=include_dirs, define_macros=macros,
               extra_compile_args=flags, py_limited_api=True)
    if cuda:  # libcudart as found (a pip package has only libcudart.so.<major>), not CUDAExtension's -lcudart
        ext.libraries = [name for name in ext.libraries if name != "cudart"]
        ext.extra_link_args = list(ext.extra_link_args or []) + toolkit.link_args()
    _say(f"building pof_fast._C ({'CPU + CUDA' if cuda else 'CPU only'}; stable ABI: torch >= {major}.{minor}, "
         f"Python >= {LIMITED_API[0]}.{LIMITED_API[1]})")
    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build}, {"bdist_wheel": {"py_limited_api": f"cp{LIMITED_API[0]}{LIMITED_API[1]}"}}


def version():
    """pof_fast.__version__, with POF_FAST_LOCAL_VERSION as its local label (release wheels: 0.1.0+cu13)."""
    with open(os.path.join(ROOT, "pof_fast", "__init__.py"), encoding="utf-8") as init:
        base = re.search(r'^__version__ = "([^"]+)"', init.read(), re.M).group(1)
    local = os.environ.get("POF_FAST_LOCAL_VERSION", "").strip()
    return f"{base}+{local}" if local else base


ext_modules, cmdclass, options = extensions()

setup(
    version=version(),
    packages=["pof_fast", "pof_fast.backends", "pof_fast.bench", "pof_fast.cli", "pof_fast.integrations",
              "pof_fast.kernels", "pof_fast.training"],
    package_dir={"pof_fast": "pof_fast", "pof_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=options,
)
