#!/usr/bin/env bash
# GPU check, part 3 of 3: language models and sweeps.
#   OUT=/some/folder bash benchmarks/gpu/part3.sh      (DRY_RUN=1: the stages and their limits; docs/gpu-check.md)
#
# A Trainer step of a random Llama (bf16, vocabulary 128256) with and without PoF (each search mode), and its split
# (benchmarks/lm_step.py); a D-shaped LM-head search against that head's forward+backward, with its memory in
# 16-bit [n, C] arrays (benchmarks/lm_head.py); the Triton kernels' block sizes and the CUDA kernels' launch
# settings (benchmarks/sweep.py); the Newton plans of each GPU path (benchmarks/plan_sweep.py, which writes its JSON
# as it goes: last, so a cut loses least).
# Files in $OUT: part3.json part3.log lm_step.json lm_head.json sweep.json plan_sweep.json (build.log
# gpu-ext.tar.gz on a machine that had to build).
# shellcheck source=benchmarks/gpu/lib.sh
. "$(dirname "$0")/lib.sh"
LM_STEP=(--vocab 128256 --hidden 2048 --layers 4 --seq 1024 --batch 4 --bf16)
LM_HEAD=(--tokens 4096 --dim 4096 --classes 128256 --budget 3)
SWEEP=("$PY" benchmarks/sweep.py --device "$DEVICE")
# Every search mode that has landed: lm_step.py's --search (issue 24's previous-batch search) runs both in one run.
SEARCH=()
if grep -q -- '"--search"' benchmarks/lm_step.py; then
  SEARCH=(--search "fresh,previous")
fi
if [ "$DEVICE" != cuda ]; then  # the CPU rehearsal: the same commands on small sizes
  LM_STEP=(--vocab 512 --hidden 64 --layers 1 --seq 32 --batch 2 --steps 1 --warmup 1)
  LM_HEAD=(--tokens 64 --dim 32 --classes 1000 --budget 0.1)
  SWEEP=(env TRITON_INTERPRET=1 "${SWEEP[@]}" --quick)  # the Triton kernels in Triton's interpreter
fi

part_begin 3 "language models and sweeps: the Trainer step's split, the LM head, launch sweeps, Newton plans"
ensure_build
stage lm_step 72 part3.log "$PY" benchmarks/lm_step.py --device "$DEVICE" "${LM_STEP[@]}" "${SEARCH[@]}" \
  --json "$OUT/lm_step.json"
stage lm_head 28 part3.log "$PY" benchmarks/lm_head.py --device "$DEVICE" "${LM_HEAD[@]}" --json "$OUT/lm_head.json"
stage sweep 64 part3.log "${SWEEP[@]}" --json "$OUT/sweep.json"
# plan_sweep.py comes with branch i24 (issue 24's search plans); the root on PYTHONPATH for its imports of the tree.
stage plan_sweep 32 part3.log env PYTHONPATH="$PWD" "$PY" benchmarks/plan_sweep.py --device "$DEVICE" \
  --json "$OUT/plan_sweep.json"
part_end
