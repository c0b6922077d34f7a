#!/usr/bin/env bash
# GPU check, part 1 of 3: correctness. Useful on its own: the build and every GPU test.
#   OUT=/some/folder bash benchmarks/gpu/part1.sh      (DRY_RUN=1: the stages and their limits; docs/gpu-check.md)
#
# Side by side: the in-place CUDA build of the extension, and the Triton tests (GPU-marked `triton`, `triton_aot`:
# they do not use the extension). Then, side by side: every other `cuda`-marked test (graph capture, sync-debug,
# fp16 + GradScaler, the fp16 Trainer, the cuda float64 oracle, sharded heads, ...: whatever carries the marker)
# against the fresh build; the CPU suites that load that build; whether a C++ exception crashes there; and the
# large 16-bit heads' error against the float64 oracle (benchmarks/accuracy_16bit.py). Nothing here is a timing.
# Files in $OUT: part1.json part1.log build.log tests.log tests_ext.log accuracy.log gpu-ext.tar.gz (the build, to
# carry to a fresh machine).
# shellcheck source=benchmarks/gpu/lib.sh
. "$(dirname "$0")/lib.sh"
# pytest workers (pytest-xdist, where installed: the lent machine's image has it): 8 of its 16 cores, one OpenMP
# thread each, and half of that for the CPU suites that run beside the other GPU tests.
WORKERS=${WORKERS:-8}
XDIST=() XDIST_HALF=()
if "$PY" -c "import xdist" 2> /dev/null; then
  XDIST=(-n "$WORKERS") XDIST_HALF=(-n "$((WORKERS / 2))")
fi
# A hung test fails alone (pytest-timeout, where installed) instead of taking its stage's whole limit.
TEST_TIMEOUT=()
if "$PY" -c "import pytest_timeout" 2> /dev/null; then
  TEST_TIMEOUT=(--timeout=60)
fi
export OMP_NUM_THREADS=1  # nothing in this part is timed
PYTEST=("$PY" -m pytest -v -rfE -p no:cacheprovider "${TEST_TIMEOUT[@]}")
BACKEND=cuda
[ "$DEVICE" = cuda ] || BACKEND=cpp

part_begin 1 "correctness: the CUDA build, every GPU-marked test, the 16-bit accuracy"
stage_bg build "$BUILD_LIMIT_S" build.log bash benchmarks/gpu/build.sh
# No POF_FAST_REQUIRE_EXT here: these tests never load the extension, which is being built beside them.
stage_bg tests_triton 115 tests.log env -u POF_FAST_REQUIRE_EXT "${PYTEST[@]}" "${XDIST[@]}" \
  -m "triton or triton_aot" tests
stage_wait
stage_bg tests_cuda 100 tests.log "${PYTEST[@]}" "${XDIST[@]}" -m "cuda and not triton" tests
stage_bg tests_ext 70 tests_ext.log "${PYTEST[@]}" "${XDIST_HALF[@]}" tests/test_cpp.py tests/test_line_search.py \
  tests/test_optim.py tests/test_package.py
stage_bg exceptions 30 part1.log "$PY" benchmarks/gpu/exception_probe.py
stage_bg accuracy 60 accuracy.log "$PY" benchmarks/accuracy_16bit.py --backend "$BACKEND"
part_end
