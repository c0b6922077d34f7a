#!/usr/bin/env bash
# The GPU check: build, GPU tests and benchmarks on a lent H100/H200, in three parts of under 4 minutes each, so that
# each fits one call of the device tool and a part that fails can be run again alone (docs/gpu-check.md).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh 1    correctness: build, every GPU-marked test, 16-bit accuracy
#   OUT=/some/folder bash benchmarks/gpu_check.sh 2    headline timings: A-C, D, the WRN-28-10 step
#   OUT=/some/folder bash benchmarks/gpu_check.sh 3    language models and sweeps
#   OUT=/some/folder bash benchmarks/gpu_check.sh      all three in order (a GPU of one's own: over 8 files in $OUT)
#   DRY_RUN=1 bash benchmarks/gpu_check.sh             each part's stages, their limits and the part's bound
#
# The parts are benchmarks/gpu/part1.sh, part2.sh and part3.sh (their environment: benchmarks/gpu/lib.sh).
set -u
here=$(dirname "$0")/gpu
parts=("$@")
[ "${#parts[@]}" -gt 0 ] || parts=(1 2 3)
for part in "${parts[@]}"; do
  case $part in
    1 | 2 | 3) bash "$here/part$part.sh" ;;
    *) echo "usage: OUT=FOLDER bash benchmarks/gpu_check.sh [1|2|3]..." >&2; exit 2 ;;
  esac
done
