#!/usr/bin/env bash
# GPU check, part 2 of 3: the headline timings, every timed target of issue 27 but the Trainer step's split.
#   OUT=/some/folder bash benchmarks/gpu/part2.sh      (DRY_RUN=1: the stages and their limits; docs/gpu-check.md)
#
# The search on SPEC cases A-C and D: every backend against the reference loop, eager and torch.compile, each
# backend's floor, CUDA graph replays on A-C (benchmarks/run.py; A-C on its short budget: 50 ms of do_bench
# repeats per row, hundreds of calls at these sizes). Then the WRN-28-10 step with and without PoF
# (benchmarks/step.py). Each run prints its targets; `python benchmarks/gpu/judge.py FOLDER` judges them all.
# Files in $OUT: part2.json part2.log bench_abc.json speedup_cuda.png bench_d.json step.json (build.log
# gpu-ext.tar.gz on a machine that had to build).
# shellcheck source=benchmarks/gpu/lib.sh
. "$(dirname "$0")/lib.sh"
STEP=()
[ "$DEVICE" = cuda ] || STEP=(--quick)  # the CPU rehearsal: WRN-10-2, short budgets

part_begin 2 "headline timings: A-C and D against the loop, eager, compile and the floor; the WRN-28-10 step"
ensure_build
stage bench_abc 65 part2.log "$PY" benchmarks/run.py --device "$DEVICE" --cases A,B,C --quick \
  --json "$OUT/bench_abc.json" --plot "$OUT/speedup_$DEVICE.png"
stage bench_d 100 part2.log "$PY" benchmarks/run.py --device "$DEVICE" --cases D --json "$OUT/bench_d.json"
stage step 33 part2.log "$PY" benchmarks/step.py --device "$DEVICE" "${STEP[@]}" --json "$OUT/step.json"
part_end
