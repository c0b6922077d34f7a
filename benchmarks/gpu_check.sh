#!/usr/bin/env bash
# One-shot GPU check for a lent H100/H200: build, GPU tests, search benchmark, step benchmark.
# Run from the repository root:  OUT=/some/folder bash benchmarks/gpu_check.sh
# Writes at most 8 files to $OUT: env.txt build.log tests.log bench_abc.txt bench_abc.json
# speedup_cuda.png bench_d.txt bench_d.json (step results go to env.txt). Every stage has its own
# timeout; a stage that fails or times out is recorded in env.txt and the next one still runs.
# The GPU-marked tests (pytest -m "cuda or triton") run in two halves: the Triton ones while the extension
# compiles (they do not use it), the rest once it is built; then the CPU suites that load the fresh build.
# The A-C benchmark also times each backend's search as a CUDA graph replay; the last stage sweeps the Triton
# kernels' block sizes and the CUDA kernels' launch settings (benchmarks/sweep.py). STEP=0 skips the step
# benchmark, LM=0 the language-model stages, SWEEP=0 the sweep.
# Worst case 13.75 minutes (the stage limits; SWEEP=0 LM=0: 10.25); on an H200 the whole script took about 6 before
# the floor and graph rows, the split test stages, the language-model stages and the sweep.
set -u
OUT=${OUT:?set OUT to the folder whose files come back}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
stage() {  # stage NAME SECONDS LOG CMD...: run CMD under timeout, append to LOG, note the status in env.txt
  local name=$1 secs=$2 log=$3; shift 3
  local start=$SECONDS
  echo "=== $name" >> "$log"
  timeout -k 5 "$secs" "$@" >> "$log" 2>&1
  echo "stage $name: exit $? after $((SECONDS - start)) s (limit $secs s)" | tee -a "$OUT/env.txt"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  ${CXX:-c++} --version | head -1; nproc
} > "$OUT/env.txt" 2>&1

stage build 120 "$OUT/build.log" env POF_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
  $PY setup.py build_ext --inplace &
build=$!
# 8 test workers on 16 cores: two OpenMP threads each (torch's and the cpp kernels'), not 16 each.
stage tests_triton 110 "$OUT/tests.log" env OMP_NUM_THREADS=2 $PY -m pytest -q -rfE -p no:cacheprovider -n 8 -m "triton or triton_aot" tests
wait $build
$PY -c "import pof_fast; print('backends', pof_fast.backends()); import pof_fast._C;
print('libstdc++ loaded:', sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l}))" >> "$OUT/env.txt" 2>&1

# Diagnosis of a crash seen on the H200 (README, Known problems): does any C++ exception crash here, or only ours?
for probe in "torch.zeros(2) + torch.zeros(3)" \
    "import pof_fast._C; torch.ops.pof_fast.line_stats(torch.zeros(4, 6), torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), torch.zeros(1), -100)"; do
  $PY -c "import torch
try:
    $probe
except Exception as e:
    print(type(e).__name__)" > /dev/null 2>&1
  echo "C++ exception probe exit $? (0: raised cleanly, 139: segfault): $probe" >> "$OUT/env.txt"
done

# The other half of pytest -m "cuda or triton" (the Triton half ran during the build).
stage tests_cuda 45 "$OUT/tests.log" env OMP_NUM_THREADS=2 $PY -m pytest -q -rfE -p no:cacheprovider -n 8 \
  -m "cuda and not triton" tests
stage tests_ext 60 "$OUT/tests.log" env OMP_NUM_THREADS=2 $PY -m pytest -q -rfE -p no:cacheprovider -n 8 \
  tests/test_cpp.py tests/test_line_search.py tests/test_optim.py tests/test_package.py

stage bench_abc 150 "$OUT/bench_abc.txt" $PY benchmarks/run.py --device cuda --cases A,B,C \
  --json "$OUT/bench_abc.json" --plot "$OUT/speedup_cuda.png"
stage bench_d 150 "$OUT/bench_d.txt" $PY benchmarks/run.py --device cuda --cases D --json "$OUT/bench_d.json"
# Large 16-bit heads: u and ||g|| against the float64 oracle (README, Backends).
stage accuracy 40 "$OUT/bench_d.txt" $PY benchmarks/accuracy_16bit.py --backend cuda

if [ "${STEP:-1}" != 0 ]; then
  stage step 60 "$OUT/env.txt" $PY benchmarks/step.py --device cuda --model wrn-28-10
fi
# Language models: a D-shaped LM-head search against that head's fwd+bwd (time, memory in 16-bit [n, C] arrays),
# and a Trainer step of a random Llama with a 128256 vocabulary in bf16, with and without PoF, with the split
# (the step only where Transformers is installed: find_spec, since importing it from the root would meet kernels/).
if [ "${LM:-1}" != 0 ]; then
  stage lm_head 45 "$OUT/env.txt" $PY benchmarks/lm_head.py --device cuda --tokens 4096 --dim 4096 --classes 128256 \
    --budget 3
  if $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('transformers') is None)"; then
    stage lm_step 75 "$OUT/env.txt" $PY benchmarks/lm_step.py --device cuda --vocab 128256 --hidden 2048 --layers 4 \
      --seq 1024 --batch 4 --bf16
  else
    echo "lm_step: transformers is not installed here" >> "$OUT/env.txt"
  fi
fi
# Block-size sweep of the Triton kernels and launch-setting sweep of the CUDA ones (its table goes to bench_d.txt:
# $OUT brings back 8 files at most).
if [ "${SWEEP:-1}" != 0 ]; then
  stage sweep 90 "$OUT/bench_d.txt" $PY benchmarks/sweep.py
fi
echo "total ${SECONDS} s" >> "$OUT/env.txt"
