"""Where setup.py's CUDA build finds nvcc, the CUDA headers and libcudart (cuda_toolkit.py), on fake folder trees.

Each fake nvcc is a shell script that answers ``--version`` and ``--dryrun`` as nvcc does (the real one prints its
toolkit as ``#$ TOP=`` and ``#$ INCLUDES=`` lines); nothing is compiled. The real build under a CUDA torch, with nvcc
behind a wrapper script and neither CUDA_HOME nor CPATH set, is .ci/ext-cuda-compile.sh.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from repo_path import ROOT

_spec = importlib.util.spec_from_file_location("cuda_toolkit", os.path.join(ROOT, "cuda_toolkit.py"))
cuda_toolkit = sys.modules["cuda_toolkit"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(cuda_toolkit)


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _toolkit(root: Path, release: str = "13.0", headers: bool = True, layout: str = "targets",
             dryrun: bool = True) -> Path:
    """A fake CUDA toolkit: bin/nvcc, and (``headers``) cuda_runtime_api.h and libcudart.so under
    targets/x86_64-linux/ (``layout="targets"``, nvcc's INCLUDES point there) or include/ and lib64/."""
    major, minor = release.split(".")
    sub = root / "targets" / "x86_64-linux" if layout == "targets" else root
    include = sub / "include"
    report = (f'echo "#\\$ TOP={root}/bin/.."\necho \'#$ INCLUDES="-I{root}/bin/../targets/x86_64-linux/include"  \'\n'
              if dryrun else "")
    _script(root / "bin" / "nvcc", f'case "$1" in\n--version) echo "Cuda compilation tools, release {release}, '
                                    f'V{release}.88";;\n--dryrun) {report or "exit 1"};;\nesac\n')
    if headers:
        include.mkdir(parents=True)
        (include / "cuda_runtime_api.h").write_text(f"#define CUDART_VERSION {int(major) * 1000 + int(minor) * 10}\n")
        lib = sub / ("lib" if layout == "targets" else "lib64")
        lib.mkdir(parents=True)
        (lib / "libcudart.so").write_text("")
    return root


def _pip_runtime(site: Path, major: int) -> Path:
    """torch's pip CUDA runtime: nvidia/cu13/{include,lib} (CUDA 13) or nvidia/cuda_runtime/... (CUDA 12), with only
    the versioned libcudart.so.<major>."""
    base = site / "nvidia" / (f"cu{major}" if major >= 13 else "cuda_runtime")
    (base / "include").mkdir(parents=True)
    (base / "include" / "cuda_runtime_api.h").write_text(f"#define CUDART_VERSION {major * 1000 + 80}\n")
    (base / "lib").mkdir()
    (base / "lib" / f"libcudart.so.{major}").write_text("")
    return base


@pytest.fixture(autouse=True)
def no_default_toolkit(monkeypatch, tmp_path):
    """The machine's own /usr/local/cuda stays out of every search here."""
    monkeypatch.setattr(cuda_toolkit, "DEFAULT_NVCC", str(tmp_path / "no-default" / "nvcc"))


def _env(tmp_path: Path, **extra: str) -> dict:
    return {"PATH": str(tmp_path / "bin"), **extra}


def test_a_wrapper_script_on_path_leads_to_its_toolkit(tmp_path):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    _script(tmp_path / "bin" / "nvcc", f'exec {toolkit}/bin/nvcc "$@"\n')  # as /usr/local/bin/nvcc here
    found = cuda_toolkit.find("13.0", _env(tmp_path), [])
    target = toolkit / "targets" / "x86_64-linux"
    assert found.nvcc.home == str(toolkit) and found.nvcc.version == (13, 0), found
    assert found.nvcc.found == str(tmp_path / "bin" / "nvcc")
    assert (found.source, found.include_dir, found.library_dir) == ("nvcc", str(target / "include"), str(target / "lib"))
    assert found.link_args() == [f"-L{target / 'lib'}", "-lcudart"]


def test_a_symlinked_nvcc_that_prints_no_settings_is_resolved_by_its_real_path(tmp_path):
    toolkit = _toolkit(tmp_path / "cuda-13.1", release="13.1", layout="include", dryrun=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    found = cuda_toolkit.find("13.0", _env(tmp_path), [])
    assert found.nvcc.home == str(toolkit) and found.nvcc.version == (13, 1)
    assert (found.include_dir, found.library_dir) == (str(toolkit / "include"), str(toolkit / "lib64"))


def test_a_wrapper_script_of_an_nvcc_that_prints_no_settings_is_read_for_its_exec_line(tmp_path):
    toolkit = _toolkit(tmp_path / "cuda-13.0", layout="include", dryrun=False)
    _script(tmp_path / "bin" / "nvcc", f'exec "{toolkit}/bin/nvcc" "$@"\n')
    found = cuda_toolkit.find("13.0", _env(tmp_path), [])
    assert found.nvcc.home == str(toolkit) and found.include_dir == str(toolkit / "include"), found


def test_cuda_home_comes_first_and_its_nvcc_is_the_one_run(tmp_path):
    on_path = _toolkit(tmp_path / "path-cuda")
    _script(tmp_path / "bin" / "nvcc", f'exec {on_path}/bin/nvcc "$@"\n')
    home = _toolkit(tmp_path / "home-cuda", release="13.2", layout="include")
    found = cuda_toolkit.find("13.0", _env(tmp_path, CUDA_HOME=str(home)), [])
    assert found.source == "CUDA_HOME" and found.include_dir == str(home / "include")
    assert found.nvcc.found == str(home / "bin" / "nvcc") and found.nvcc.version == (13, 2)
    # CUDA_PATH when CUDA_HOME is unset
    found = cuda_toolkit.find("13.0", _env(tmp_path, CUDA_PATH=str(home)), [])
    assert found.source == "CUDA_PATH" and found.nvcc.home == str(home)


def test_a_cuda_home_without_headers_falls_through_to_nvcc_then_to_torchs_packages(tmp_path):
    toolkit = _toolkit(tmp_path / "cuda", headers=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    _script(tmp_path / "bin" / "nvcc", f'exec {toolkit}/bin/nvcc "$@"\n')
    site = tmp_path / "site-packages"
    runtime = _pip_runtime(site, 13)
    found = cuda_toolkit.find("13.0", _env(tmp_path, CUDA_HOME=str(empty)), [str(site)])
    assert found.nvcc.home == str(toolkit), found  # CUDA_HOME has no bin/nvcc: the one on PATH
    assert (found.source, found.include_dir) == ("torch's CUDA packages", str(runtime / "include"))
    assert found.cudart == "libcudart.so.13"
    assert found.link_args() == [f"-L{runtime / 'lib'}", "-l:libcudart.so.13"]


def test_cuda_12_from_pip_packages_alone(tmp_path):
    """The CUDA 12 wheel's build here: nvcc from nvidia-cuda-nvcc-cu12, headers from nvidia-cuda-runtime-cu12."""
    site = tmp_path / "site-packages"
    nvcc_home = _toolkit(site / "nvidia" / "cuda_nvcc", release="12.8", headers=False, dryrun=False)
    runtime = _pip_runtime(site, 12)
    found = cuda_toolkit.find("12.8", {"PATH": str(nvcc_home / "bin")}, [str(site)])
    assert found.nvcc.home == str(nvcc_home) and found.include_dir == str(runtime / "include")
    assert found.link_args()[-1] == "-l:libcudart.so.12"


def test_headers_of_another_cuda_major_are_passed_over(tmp_path):
    old = _toolkit(tmp_path / "cuda-12", release="12.8", layout="include")
    toolkit = _toolkit(tmp_path / "cuda-13", headers=False)
    _script(tmp_path / "bin" / "nvcc", f'exec {toolkit}/bin/nvcc "$@"\n')
    site = tmp_path / "site-packages"
    runtime = _pip_runtime(site, 13)
    env = _env(tmp_path, CUDA_PATH=str(old))
    env["PATH"] = str(tmp_path / "bin")  # CUDA_PATH's nvcc is CUDA 12: the PATH one must not be shadowed by it
    # CUDA_PATH's own nvcc is run first (it is the toolkit named): a CUDA 12 nvcc for a CUDA 13 torch
    with pytest.raises(cuda_toolkit.Missing, match=r"^nvcc at .*cuda-12/bin/nvcc is CUDA 12\.8, not CUDA 13$"):
        cuda_toolkit.find("13.0", env, [str(site)])
    (old / "bin" / "nvcc").unlink()  # a headers-only CUDA_PATH: its CUDA 12 headers are skipped
    found = cuda_toolkit.find("13.0", env, [str(site)])
    assert found.include_dir == str(runtime / "include"), found


def test_a_header_without_its_libcudart_is_passed_over(tmp_path):
    toolkit = _toolkit(tmp_path / "cuda", layout="include")
    (toolkit / "lib64" / "libcudart.so").unlink()
    _script(tmp_path / "bin" / "nvcc", f'exec {toolkit}/bin/nvcc "$@"\n')
    with pytest.raises(cuda_toolkit.Missing) as missing:
        cuda_toolkit.find("13.0", _env(tmp_path), [])
    assert f"{toolkit / 'include'} (no libcudart.so or libcudart.so.13 in ../lib64 or ../lib)" in str(missing.value)


def test_what_is_missing_is_said_in_one_sentence(tmp_path):
    (tmp_path / "bin").mkdir()
    with pytest.raises(cuda_toolkit.Missing, match=r"^no nvcc: none at \$CUDA_HOME/bin, on PATH or at "):
        cuda_toolkit.find("13.0", _env(tmp_path), [])
    _script(tmp_path / "bin" / "nvcc", "exec /nowhere/nvcc \"$@\"\n")
    with pytest.raises(cuda_toolkit.Missing, match=r"nvcc at .*/bin/nvcc does not run or print its release"):
        cuda_toolkit.find("13.0", _env(tmp_path), [])
    toolkit = _toolkit(tmp_path / "cuda", headers=False)
    _script(tmp_path / "bin" / "nvcc", f'exec {toolkit}/bin/nvcc "$@"\n')
    site = tmp_path / "site-packages"
    (site / "nvidia").mkdir(parents=True)
    with pytest.raises(cuda_toolkit.Missing) as missing:
        cuda_toolkit.find("13.0", _env(tmp_path), [str(site)])
    message = str(missing.value)
    assert message.startswith("no CUDA 13 cuda_runtime_api.h with its libcudart (looked in: "), message
    for folder in (toolkit / "targets" / "x86_64-linux" / "include", toolkit / "include",
                   site / "nvidia" / "cu13" / "include", site / "nvidia" / "cuda_runtime" / "include"):
        assert str(folder) in message, (folder, message)
    assert message.endswith(f"nvcc at {tmp_path / 'bin' / 'nvcc'} runs from {toolkit})"), message
    assert "\n" not in message
