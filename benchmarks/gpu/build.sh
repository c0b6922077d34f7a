#!/usr/bin/env bash
# The extension pof_fast._C, built in place for the GPU check only when the tree holds no build of these sources.
#
#   bash benchmarks/gpu/build.sh           build when needed; with OUT set, also write $OUT/gpu-ext.tar.gz
#   bash benchmarks/gpu/build.sh --check   print the machine; exit 0 when the tree holds a build of these sources
#
# "A build of these sources": build/gpu-ext.stamp holds the hash of setup.py, csrc/, torch's and CUDA's versions,
# the architecture list and DEVICE, and pof_fast._C loads (with its CUDA kernels for DEVICE=cuda). Where the tree
# holds no such build, a build/gpu-ext.tar.gz carried from an earlier part's $OUT (the module and its stamp) is
# unpacked, so a fresh machine with the same image skips the compile. A rebuild on a machine that keeps build/ is
# incremental (ninja).
# In place, not `pip install`: the tests and benchmarks/*.py import the tree's pof_fast (the repository root comes
# first on their sys.path), so that is the copy that must hold the extension.
set -u
cd "$(dirname "$0")/../.." || exit 1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
ARCHS=${TORCH_CUDA_ARCH_LIST:-9.0}  # sm_90: the lent H100 and H200
STAMP=build/gpu-ext.stamp
CARRIED=build/gpu-ext.tar.gz
unset POF_FAST_REQUIRE_EXT  # the check reports a missing extension; it must not raise

# machine: the date, GPU, compiler, cores, versions and the extension as the tree's pof_fast sees it. Its last
# line is "torch VERSION cuda VERSION built 0|1", what the stamp and the check read.
machine() {
  date -u
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  fi
  "${CXX:-c++}" --version 2> /dev/null | head -1
  echo "cores $(nproc)"
  "$PY" -c "
import sys, importlib.util, torch
from pof_fast import _ext, backends
triton = importlib.util.find_spec('triton') and __import__('triton').__version__
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton,
      'gpu', gpu)
print('backends', backends())
built = _ext.cuda_compiled() if '$DEVICE' == 'cuda' else _ext.available()
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'built', int(built))
"
}

sources_hash() {  # $1: the "torch VERSION cuda VERSION" of this machine
  {
    cat setup.py
    find csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 cat
    echo "$1 archs $ARCHS device $DEVICE"
  } | sha256sum | cut -c1-64
}

# probe: print the machine; LAST: its last line, WANT: the stamp a build of these sources has here.
probe() {
  local out
  out=$(machine)
  echo "$out"
  LAST=$(tail -n 1 <<< "$out")
  WANT=$(sources_hash "${LAST% built *}")
}
built() { [ "${LAST##* built }" = 1 ]; }
stamped() { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; }

probe
if built && stamped; then
  echo "build: up to date (stamp $WANT)"
  [ "${1:-}" = --check ] && exit 0
elif [ -f "$CARRIED" ] && tar -xzf "$CARRIED" && probe && built && stamped; then
  echo "build: unpacked from $CARRIED (stamp $WANT)"
  [ "${1:-}" = --check ] && exit 0
else
  [ "${1:-}" = --check ] && exit 1
  start=$SECONDS
  cuda=0
  [ "$DEVICE" = cuda ] && cuda=1
  POF_FAST_BUILD_CUDA=$cuda TORCH_CUDA_ARCH_LIST=$ARCHS MAX_JOBS=${MAX_JOBS:-8} "$PY" setup.py build_ext --inplace \
    || exit
  echo "build: compiled in $((SECONDS - start)) s"
  probe
  built || { echo "build: pof_fast._C does not load after the build (above)"; exit 1; }
  mkdir -p build
  echo "$WANT" > "$STAMP"
fi
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/gpu-ext.tar.gz" pof_fast/_C*.so "$STAMP" && ls -l "$OUT/gpu-ext.tar.gz"
fi
