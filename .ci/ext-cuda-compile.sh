#!/usr/bin/env bash
# Build the CUDA extension the way a user does, on a machine without a GPU (nothing CUDA runs), so that a broken
# csrc/cuda/*.cu file or a build that cannot find its CUDA headers fails CI:
#
# 1. A fresh venv that sees a CUDA build of torch (torch==2.14.1+cu130 from the local package index, ~5.5 GB, kept in
#    CUDA_TORCH_VENV and reused), nvcc on PATH through a wrapper script (`exec <toolkit>/bin/nvcc "$@"`, as
#    /usr/local/bin/nvcc is here), neither CUDA_HOME nor CPATH set: `pip install --no-build-isolation .`, exactly as
#    docs/install.md tells a user. setup.py must find the toolkit behind the wrapper (cuda_toolkit.py).
# 2. The result is on the LibTorch stable ABI (no C++ symbol of torch imported) and loads with its CUDA kernels
#    registered with torch's dispatcher (.ci/wheel-load-check.py cu13).
# 3. With the CUDA headers made unfindable (nvcc on PATH is a wrapper of a bare nvcc outside any toolkit, and torch's
#    nvidia/cu13/include is hidden by a bind mount in a private mount namespace), the install says so once before
#    compiling anything: a warning and a CPU build decision, or with POF_FAST_BUILD_CUDA=1 an error.
#
# Environment: CUDA_TORCH_VENV (default /tmp/pof-fast-cuda-venv), CUDA_TOOLKIT (the toolkit the wrapper leads to;
# default /usr/local/cuda-13.0), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CUDA_TORCH_VENV:-/tmp/pof-fast-cuda-venv}"
TOOLKIT="${CUDA_TOOLKIT:-/usr/local/cuda-13.0}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
unset CUDA_HOME CUDA_PATH CPATH POF_FAST_BUILD_CUDA
start=$SECONDS

if ! "$VENV/bin/python" -c "import torch, tqdm, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch==2.14.1 ninja setuptools wheel numpy tqdm
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# A fresh venv seeing the CUDA torch (its site-packages through a .pth file: no second 5.5 GB copy), and a checkout
# copy without build outputs.
fresh_venv() {
  rm -rf "$WORK/venv"
  python3 -m venv "$WORK/venv"
  echo "$SITE" > "$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/cuda_torch.pth"
}
mkdir "$WORK/src"
git -C "$ROOT" ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && xargs -0 cp --parents -t "$WORK/src")
mkdir "$WORK/bin"
printf '#!/bin/sh\nexec %s/bin/nvcc "$@"\n' "$TOOLKIT" > "$WORK/bin/nvcc"
chmod +x "$WORK/bin/nvcc"

# --- 1. the user's build ---
fresh_venv
(cd "$WORK/src" && PATH="$WORK/bin:$PATH" nice -n 19 "$WORK/venv/bin/pip" install -v --no-build-isolation . \
  > "$WORK/install.log" 2>&1) || { grep -E 'pof_fast setup|error' "$WORK/install.log" | tail -30; exit 1; }
grep 'pof_fast setup' "$WORK/install.log" | sort -u
grep -q "pof_fast setup: building pof_fast._C (CPU + CUDA" "$WORK/install.log"
SO="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')/pof_fast/_C.abi3.so"

# --- 2. stable ABI, linked, CUDA kernels registered ---
# Stable ABI: torch is reached through its C shims only; a mangled c10::/at::/torch:: symbol would tie the binary to
# this torch.
if nm -D --undefined-only "$SO" | grep -E ' _ZN[KRO]*(3c10|2at|5torch)'; then
  echo "ext-cuda-compile: $SO imports C++ symbols of torch (above): not on the stable ABI" >&2
  exit 1
fi
# manylinux_2_28 (the release wheels, .ci/build-wheels.sh): no glibc symbol version above 2.28 (csrc/glibc_compat.h).
too_new="$(objdump -T "$SO" | grep -oE '\(GLIBC_2\.[0-9]+' | sort -u | awk -F. '$2 > 28')"
if [ -n "$too_new" ]; then
  objdump -T "$SO" | grep -E "$(echo "$too_new" | tr '\n' '|' | sed 's/(/\\(/g; s/|$//')"
  echo "ext-cuda-compile: $SO needs glibc symbol versions newer than 2.28 (above): not manylinux_2_28" >&2
  exit 1
fi
(cd "$WORK" && "$WORK/venv/bin/python" "$ROOT/.ci/wheel-load-check.py" cu13)
echo "ext-cuda-compile: built and loaded ($SO, CUDA arch $TORCH_CUDA_ARCH_LIST, $((SECONDS - start)) s)"

# --- 3. the headers made unfindable: one warning, or one error, before anything compiles ---
mkdir -p "$WORK/bare/bin" "$WORK/empty" "$WORK/bin-bare"
# A bare nvcc outside any toolkit: it prints its release, nothing else (a wrapper of the real one would name the real
# toolkit in its --dryrun).
printf '#!/bin/sh\ncase "$1" in --version) exec %s/bin/nvcc --version;; esac\nexit 1\n' "$TOOLKIT" > "$WORK/bare/bin/nvcc"
chmod +x "$WORK/bare/bin/nvcc"
printf '#!/bin/sh\nexec %s/bare/bin/nvcc "$@"\n' "$WORK" > "$WORK/bin-bare/nvcc"
chmod +x "$WORK/bin-bare/nvcc"
hidden() {  # hidden COMMAND...: run with torch's CUDA headers hidden and the bare nvcc first on PATH
  unshare --mount --map-root-user sh -c 'mount --bind "$0" "$1" && shift && exec "$@"' \
    "$WORK/empty" "$SITE/nvidia/cu13/include" env PATH="$WORK/bin-bare:$PATH" "$@"
}
fresh_venv
for forced in "" 1; do
  # Unforced, the decision is the install's first step (pip's metadata step runs setup.py): --dry-run stops there
  # instead of compiling the CPU kernels. Forced, the real install must stop with the error.
  if [ -n "$forced" ]; then mode=(env POF_FAST_BUILD_CUDA=1); else mode=(env --); fi
  set +e
  (cd "$WORK/src" && hidden "${mode[@]}" "$WORK/venv/bin/pip" install -v --no-build-isolation --no-deps \
    $([ -n "$forced" ] || echo --dry-run) . > "$WORK/hidden.log" 2>&1)
  status=$?
  set -e
  said="$(grep -E 'pof_fast setup: (WARNING|error)' "$WORK/hidden.log" | sort -u)"
  echo "ext-cuda-compile: headers hidden${forced:+, POF_FAST_BUILD_CUDA=1}: exit $status; $said"
  [ "$(printf '%s\n' "$said" | grep -c .)" = 1 ] || { tail -40 "$WORK/hidden.log"; exit 1; }
  grep -q 'no CUDA 13 cuda_runtime_api.h with its libcudart' <<< "$said"
  grep -q "CUDA_HOME=(unset)" <<< "$said"
  if [ -n "$forced" ]; then
    [ "$status" != 0 ] && grep -q 'pof_fast setup: error: POF_FAST_BUILD_CUDA=1 and torch' <<< "$said"
  else
    [ "$status" = 0 ] && grep -q 'WARNING: building the CPU kernels only' <<< "$said" \
      && grep -q 'POF_FAST_BUILD_CUDA=1 makes this an error' <<< "$said"
  fi
  ! grep -qE '^\[[0-9]+/[0-9]+\]|c\+\+ |nvcc .*-c ' "$WORK/hidden.log" || { echo "compiled before saying so" >&2; exit 1; }
done
echo "ext-cuda-compile: OK ($((SECONDS - start)) s)"
