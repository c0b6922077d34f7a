#!/usr/bin/env bash
# Compile and link the CUDA build of pof_fast._C (no GPU needed, nothing runs), so that a broken
# csrc/cuda/*.cu file fails CI on machines without a GPU. It is built the way every build is: on the LibTorch
# stable ABI (TORCH_TARGET_VERSION 2.10) and Python's limited API, and checked to import no C++ symbol of torch.
#
# A second venv gets the CUDA build of torch from the local package index (torch==2.14.1, ~5.5 GB,
# installed from local disk); its nvidia/cu13/include provides the CUDA library headers (cusparse,
# cublas, ...) and CUDA_HOME provides nvcc. The build happens in a scratch copy of the sources, so
# the working tree and its in-place CPU build are left alone.
#
# Environment: CUDA_TORCH_VENV (default /tmp/pof-fast-cuda-venv; reused when it already has the
# CUDA torch), CUDA_HOME (default /usr/local/cuda-13.0), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CUDA_TORCH_VENV:-/tmp/pof-fast-cuda-venv}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda-13.0}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export POF_FAST_BUILD_CUDA=1
export PATH="$CUDA_HOME/bin:$PATH"
start=$SECONDS

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch==2.14.1 ninja setuptools wheel numpy
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CU_INCLUDE="$SITE/nvidia/cu13/include"
if [ -d "$CU_INCLUDE" ]; then
  export CPATH="$CU_INCLUDE${CPATH:+:$CPATH}"
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/csrc" "$ROOT/pof_fast" "$ROOT/kernels" "$WORK/"
[ -f "$ROOT/README.md" ] && cp "$ROOT/README.md" "$WORK/"
find "$WORK/pof_fast" -name '*.so' -delete
cd "$WORK"
"$VENV/bin/python" setup.py build_ext --inplace
SO=pof_fast/_C.abi3.so
# Stable ABI: torch is reached through its C shims only; a mangled c10::/at::/torch:: symbol would tie the binary to
# this torch.
if nm -D --undefined-only "$SO" | grep -E ' _ZN[KRO]*(3c10|2at|5torch)'; then
  echo "ext-cuda-compile: $SO imports C++ symbols of torch (above): not on the stable ABI" >&2
  exit 1
fi
# Linked: the module loads (every symbol resolves; no GPU is needed to load it) with CUDA kernels registered.
"$VENV/bin/python" - <<'PY'
import torch
import pof_fast._C as ext
assert ext.cuda, "pof_fast._C was built without its CUDA kernels"
assert "; abi=2.10; cuda=13" in ext.build, ext.build
for op in ("line_stats", "head_gradient", "direction_logits", "search"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pof_fast::{op}", "CUDA"), f"no CUDA kernel for {op}"
# The launch settings of benchmarks/sweep.py (host state only: no GPU needed).
assert ext._cuda_launch() == (256, 8), ext._cuda_launch()
ext._set_cuda_launch(512, 4)
assert ext._cuda_launch() == (512, 4), ext._cuda_launch()
try:
    ext._set_cuda_launch(256, 3)
except (ValueError, RuntimeError) as exc:
    assert "scorer_warps" in str(exc), exc
else:
    raise AssertionError("scorer_warps=3 was accepted")
assert ext._cuda_launch() == (512, 4)
PY
echo "ext-cuda-compile: OK ($SO, CUDA arch $TORCH_CUDA_ARCH_LIST, $((SECONDS - start)) s)"
