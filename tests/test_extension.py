"""Loading pof_fast._C: its stable-ABI build line in ``backends()``, and what a user sees when it cannot load.

The failures run in child processes with an explicit environment, on a copy of the package whose ``_C`` is missing
or broken (a file holding only a build line, as a binary built for another torch would): one warning and the
``torch`` backend, or, with ``POF_FAST_REQUIRE_EXT=1``, an error in the user's process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pof_fast
from pof_fast import _ext

# A build line as csrc/bindings.cpp writes it, for a torch this process does not have.
FOREIGN_BUILD = b"pof_fast._C build: torch=9.9.0; abi=2.10; cuda=none;"

CHILD = r"""
import json, sys, warnings
# An editable install's finder maps pof_fast's submodules to the checkout: only the copy may be seen here.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
import torch, pof_fast
h = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
w = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
y = torch.arange(16) % 5
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        got = pof_fast.line_search(h, w, None, y)
        pof_fast.line_search(h, w, None, y)
        report = pof_fast.backends()
    except ImportError as exc:
        print(json.dumps(dict(error=type(exc).__name__ + ": " + str(exc))))
        raise SystemExit(0)
want = pof_fast.line_search(h, w, None, y, backend="torch")
print(json.dumps(dict(
    package=pof_fast.__file__, warnings=[str(c.message) for c in caught if "pof_fast._C" in str(c.message)],
    cpp=report["cpp"], extension=report.extension, same=bool(torch.equal(got.step, want.step)))))
"""


def test_backends_report_the_abi_target():
    if not _ext.available():
        pytest.skip(f"pof_fast._C not built ({_ext.reason()})")
    report = pof_fast.backends()
    build = _ext.build()  # the torch it was compiled against, which need not be this one (.ci/wheel-matrix.sh)
    assert build["abi"] == "2.10" and re.fullmatch(r"\d+\.\d+\.\d+", build["torch"]), build
    assert (build["cuda"] != "none") == _ext.cuda_compiled(), build
    assert report.extension == _ext.describe()
    assert f"built against torch {build['torch']}, stable ABI: loads in torch >= 2.10" in report.extension
    assert report.extension in repr(report) and report["cpp"] is True


def _package_copy(tmp_path: Path, broken: bool, build: bytes = FOREIGN_BUILD) -> Path:
    """pof_fast copied without its compiled extension; ``broken``: with a ``_C`` that cannot load (``build``: its
    build line)."""
    root = tmp_path / "site"
    shutil.copytree(Path(pof_fast.__file__).parent, root / "pof_fast",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if broken:
        (root / "pof_fast" / "_C.abi3.so").write_bytes(b"not a shared object\0" + build + b"\0")
    return root


def _child(root: Path, require: bool, torch_cuda: str = "") -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("POF_FAST_REQUIRE_EXT", "TRITON_INTERPRET", "PYTHONPATH")}
    env["PYTHONPATH"] = str(root)
    if require:
        env["POF_FAST_REQUIRE_EXT"] = "1"
    # torch_cuda: the child's torch poses as a CUDA build of that version (None: as a CPU build) before first use.
    code = (f"import torch; torch.version.cuda = {torch_cuda}\n" if torch_cuda else "") + CHILD
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "package" not in result or result["package"].startswith(str(root)), result
    return result


@pytest.mark.parametrize("broken", [True, False], ids=["built-for-another-torch", "not-built"])
def test_an_extension_that_cannot_load_warns_once_and_falls_back(tmp_path, broken):
    result = _child(_package_copy(tmp_path, broken), require=False)
    assert result["same"], result  # the search ran on the torch backend
    (message,) = result["warnings"]
    if broken:
        expected = (f"pof_fast._C was built against torch 9.9.0 (stable ABI, supports torch >= 2.10); it cannot load "
                    f"in torch {torch.__version__}: ImportError:")
    else:
        expected = "pof_fast._C is not built (ModuleNotFoundError"
    assert message.startswith(expected) and "using the 'torch' backend" in message, message
    assert expected in result["cpp"] and result["extension"].startswith(expected), result


@pytest.mark.parametrize("broken", [True, False], ids=["built-for-another-torch", "not-built"])
def test_require_ext_makes_a_load_failure_an_error_in_a_user_process(tmp_path, broken):
    result = _child(_package_copy(tmp_path, broken), require=True)
    error = result.get("error", "")
    assert error.startswith("Required: POF_FAST_REQUIRE_EXT=1 and pof_fast._C "), result
    assert ("was built against torch 9.9.0" if broken else "is not built") in error


CUDA13_BUILD = b"pof_fast._C build: torch=2.14.1; abi=2.10; cuda=13000;"


@pytest.mark.parametrize("torch_cuda, take", [
    ("None", f"take the CPU wheel (pof_fast-{pof_fast.__version__}-cp310-abi3-manylinux_2_28_x86_64.whl)"),
    ("'12.8'", f"take the CUDA 12 wheel (pof_fast-{pof_fast.__version__}+cu12-cp310-abi3-manylinux_2_28_x86_64.whl)"),
], ids=["cpu-torch", "cuda12-torch"])
def test_a_cuda_wheel_of_another_cuda_major_is_not_loaded_and_names_the_wheel_to_take(tmp_path, torch_cuda, take):
    root = _package_copy(tmp_path, broken=True, build=CUDA13_BUILD)
    result = _child(root, require=False, torch_cuda=torch_cuda)
    assert result["same"], result
    (message,) = result["warnings"]
    have = "is not a CUDA build" if torch_cuda == "None" else "is a CUDA 12.8 build"
    assert message.startswith(f"pof_fast._C holds CUDA 13 kernels but torch {torch.__version__} {have}: {take}; "
                              "using the 'torch' backend"), message
    error = _child(root, require=True, torch_cuda=torch_cuda)["error"]
    assert error.startswith("Required: POF_FAST_REQUIRE_EXT=1 and pof_fast._C holds CUDA 13 kernels") and take in error


def test_a_cuda_wheel_of_torchs_cuda_major_is_loaded(tmp_path):
    """Same major: the file is loaded; here it is no shared object, so the load fails with the usual message."""
    result = _child(_package_copy(tmp_path, broken=True, build=CUDA13_BUILD), require=False, torch_cuda="'13.2'")
    (message,) = result["warnings"]
    assert message.startswith("pof_fast._C was built against torch 2.14.1 (stable ABI, supports torch >= 2.10); it "
                              f"cannot load in torch {torch.__version__}: ImportError:"), message
