#!/usr/bin/env bash
# One CPU wheel for every torch from 2.10 on (pof_fast._C on the LibTorch stable ABI, csrc/torch_calls.h).
#
# 1. Builds the CPU wheel once, under torch 2.13.0+cpu, from the sdist (the checkout is left alone), and repairs it
#    to a manylinux_2_28 tag with auditwheel; torch's own libraries stay out of the wheel (.ci/build-wheels.sh cpu).
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

# --- 1. build once under torch 2.13.0+cpu, then repair and check it (.ci/build-wheels.sh) ---
WHEELS_OUT="$WORK/dist" WHEELS_WORK="$WORK/wheels" POF_FAST_WHEELS_BUILD_ONLY=1 bash "$ROOT/.ci/build-wheels.sh" cpu
WHEEL="$(ls "$WORK"/dist/pof_fast-*.whl)"
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
