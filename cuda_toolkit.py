"""Where the CUDA build of ``pof_fast._C`` finds nvcc, the CUDA runtime headers and ``libcudart`` (read by setup.py).

It imports neither torch nor setuptools and compiles nothing, so tests/test_setup_cuda.py runs it on fake folder
trees. :func:`find` looks, in this order, for a ``cuda_runtime_api.h`` of torch's CUDA major and the ``libcudart``
beside it:

1. ``CUDA_HOME``, else ``CUDA_PATH``: ``include/`` and ``targets/<arch>/include/``;
2. the toolkit behind the nvcc found (``$CUDA_HOME/bin/nvcc``, else the first ``nvcc`` on ``PATH``, else
   ``/usr/local/cuda/bin/nvcc``): a symlink or a wrapper script is followed by asking nvcc itself where it runs
   from (``nvcc --dryrun`` prints the real toolkit's ``TOP`` and ``INCLUDES``; failing that, the symlink is
   resolved and a script's ``exec .../bin/nvcc`` line read), then ``include/`` and ``targets/<arch>/include/`` there;
3. the CUDA packages that torch's pip wheel depends on: ``site-packages/nvidia/cu<major>/`` (CUDA 13 and later)
   and ``site-packages/nvidia/cuda_runtime/`` (CUDA 12).

nvcc's CUDA major must be torch's. What is missing is raised as :class:`Missing`, one sentence, before anything is
compiled.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

HEADER = "cuda_runtime_api.h"
DEFAULT_NVCC = "/usr/local/cuda/bin/nvcc"  # torch.utils.cpp_extension's last guess too


class Missing(Exception):
    """The CUDA build cannot go ahead: the message says what is missing and where it was looked for."""


@dataclass(frozen=True)
class Nvcc:
    """An nvcc that runs: ``home`` is the toolkit folder holding the real ``bin/nvcc`` (the ``CUDA_HOME`` that
    torch.utils.cpp_extension needs: it runs ``$CUDA_HOME/bin/nvcc``), ``found`` the path it was found at."""

    found: str
    home: str
    version: Tuple[int, int]
    include_dirs: Tuple[str, ...]


@dataclass(frozen=True)
class Toolkit:
    """What the build adds: nvcc, the folder holding ``cuda_runtime_api.h`` and the one holding ``libcudart``."""

    nvcc: Nvcc
    include_dir: str
    library_dir: str
    cudart: str  # file name in library_dir: libcudart.so, or only the versioned libcudart.so.<major> of a pip package
    source: str  # where the headers were found: "CUDA_HOME", "CUDA_PATH", "nvcc" or "torch's CUDA packages"

    def link_args(self) -> list:
        """Linker arguments for libcudart (``-l:`` names the versioned file when there is no ``libcudart.so``)."""
        name = "cudart" if self.cudart == "libcudart.so" else ":" + self.cudart
        return ["-L" + self.library_dir, "-l" + name]


def _major(version: str) -> int:
    return int(version.split(".")[0])


def _run(argv: Sequence[str]) -> Optional[str]:
    """stdout + stderr of a command, or None when it cannot run or fails."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout + done.stderr if done.returncode == 0 else None


def locate_nvcc(env: Mapping[str, str]) -> Optional[str]:
    """The nvcc the build would run: ``$CUDA_HOME/bin/nvcc`` (or ``CUDA_PATH``), else ``nvcc`` on ``PATH``, else
    ``/usr/local/cuda/bin/nvcc``; None when there is none."""
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    on_path = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    candidates += [on_path] if on_path else []
    candidates.append(DEFAULT_NVCC)
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def query_nvcc(path: str) -> Nvcc:
    """Ask an nvcc (a wrapper script or a symlink too) for its release and the toolkit it runs from."""
    text = _run([path, "--version"])
    release = re.search(r"release (\d+)\.(\d+)", text or "")
    if release is None:
        raise Missing(f"nvcc at {path} does not run or print its release (`{path} --version`)")
    # nvcc --dryrun prints its settings (TOP, INCLUDES) as "#$ NAME=value" lines and runs nothing.
    dryrun = _run([path, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull]) or ""
    top = re.search(r"^#\$ TOP=(.*)$", dryrun, re.M)
    includes = re.search(r"^#\$ INCLUDES=(.*)$", dryrun, re.M)
    home = os.path.normpath(top.group(1).strip()) if top else os.path.dirname(os.path.dirname(_behind(path)))
    include_dirs = tuple(os.path.normpath(p) for p in re.findall(r'"?-I"?([^"\s]+)', includes.group(1))) \
        if includes else ()
    return Nvcc(found=path, home=home, version=(int(release.group(1)), int(release.group(2))),
                include_dirs=include_dirs)


def _behind(path: str) -> str:
    """The nvcc that a symlink or a wrapper script (`exec /opt/cuda/bin/nvcc "$@"`) leads to, for an nvcc that does
    not say where it runs from."""
    real = os.path.realpath(path)
    try:
        with open(real, "rb") as script:
            head = script.read(4096)
    except OSError:
        return real
    target = re.search(rb'exec\s+"?(/[^"\s]*/bin/nvcc)\b', head) if head.startswith(b"#!") else None
    return os.path.realpath(target.group(1).decode()) if target else real


def _toolkit_includes(home: str) -> list:
    return [os.path.join(home, "include")] + sorted(glob.glob(os.path.join(home, "targets", "*", "include")))


def _header_major(include_dir: str) -> Optional[int]:
    """The CUDA major of the cuda_runtime_api.h in a folder (its CUDART_VERSION), None when there is none."""
    try:
        with open(os.path.join(include_dir, HEADER), encoding="utf-8", errors="replace") as header:
            version = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", header.read())
    except OSError:
        return None
    return int(version.group(1)) // 1000 if version else None


def _cudart(include_dir: str, major: int) -> Optional[Tuple[str, str]]:
    """(folder, file) of the libcudart beside an include folder: ``../lib64`` or ``../lib``."""
    parent = os.path.dirname(os.path.normpath(include_dir))
    for folder in (os.path.join(parent, "lib64"), os.path.join(parent, "lib")):
        for name in ("libcudart.so", f"libcudart.so.{major}"):
            if os.path.exists(os.path.join(folder, name)):
                return folder, name
    return None


def candidates(env: Mapping[str, str], nvcc: Optional[Nvcc], site_dirs: Sequence[str],
               major: int) -> list:
    """(where, include folder) in search order, duplicates dropped."""
    found = []
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(name):
            found += [(name, d) for d in _toolkit_includes(env[name])]
            break
    if nvcc is not None:
        found += [("nvcc", d) for d in nvcc.include_dirs + tuple(_toolkit_includes(nvcc.home))]
    for site in site_dirs:
        found += [("torch's CUDA packages", os.path.join(site, "nvidia", sub, "include"))
                  for sub in (f"cu{major}", "cuda_runtime")]
    seen, ordered = set(), []
    for where, folder in found:
        key = os.path.realpath(folder)
        if key not in seen:
            seen.add(key)
            ordered.append((where, folder))
    return ordered


def find(torch_cuda: str, env: Mapping[str, str], site_dirs: Sequence[str]) -> Toolkit:
    """nvcc, headers and libcudart for a torch built with CUDA ``torch_cuda`` (e.g. "13.0"); raises
    :class:`Missing`. ``env``: the build's environment (CUDA_HOME, CUDA_PATH, PATH); ``site_dirs``: the folders
    that may hold torch's ``nvidia/`` packages (torch's own site-packages first)."""
    major = _major(torch_cuda)
    path = locate_nvcc(env)
    if path is None:
        raise Missing(f"no nvcc: none at $CUDA_HOME/bin, on PATH or at {DEFAULT_NVCC}")
    nvcc = query_nvcc(path)
    if nvcc.version[0] != major:
        raise Missing(f"nvcc at {path} is CUDA {nvcc.version[0]}.{nvcc.version[1]}, not CUDA {major}")
    looked = []
    for where, folder in candidates(env, nvcc, site_dirs, major):
        header = _header_major(folder)
        if header != major:
            looked.append(folder if header is None else f"{folder} (CUDA {header})")
            continue
        library = _cudart(folder, major)
        if library is None:
            looked.append(f"{folder} (no libcudart.so or libcudart.so.{major} in ../lib64 or ../lib)")
            continue
        return Toolkit(nvcc=nvcc, include_dir=folder, library_dir=library[0], cudart=library[1], source=where)
    raise Missing(f"no CUDA {major} {HEADER} with its libcudart (looked in: {', '.join(looked) or 'nowhere'}; "
                  f"nvcc at {path} runs from {nvcc.home})")
