"""`pip wheel --no-build-isolation .` builds a wheel holding pof_fast._C; a fresh venv installs it and imports it.

The wheel is tagged for Python's limited API (cp310-abi3) and asks for torch >= 2.10, the stable-ABI target of its
extension (.ci/wheel-matrix.sh installs one such wheel under torch 2.10 and the newest torch).

Building compiles the extension (about 1-3 minutes on 2 cores, less when ./build holds up-to-date objects),
so this test runs only when POF_FAST_TEST_WHEEL=1 (.ci/run sets it).
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not os.environ.get("POF_FAST_TEST_WHEEL"), reason="slow (compiles the extension): set POF_FAST_TEST_WHEEL=1"
)


def run(*cmd: str, cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_wheel_installs_and_imports_the_extension(tmp_path):
    dist = tmp_path / "dist"
    env_build = dict(os.environ, POF_FAST_BUILD_CUDA=os.environ.get("POF_FAST_BUILD_CUDA", "0"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist), str(ROOT)],
        cwd=tmp_path, capture_output=True, text=True, env=env_build,
    )
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (wheel,) = dist.glob("pof_fast-*.whl")
    assert "-cp310-abi3-" in wheel.name, wheel.name
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert "pof_fast/_C.abi3.so" in names, names
    metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode().splitlines()
    assert "Requires-Dist: torch>=2.10" in metadata and "Requires-Python: >=3.10" in metadata, metadata
    assert "pof_fast/kernels/__init__.py" in names and not any(n.startswith("kernels/") for n in names)
    packages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pof_fast").rglob("__init__.py")}
    assert packages <= set(names), f"subpackages missing from the wheel (setup.py packages): {sorted(packages - set(names))}"

    # A fresh venv that reuses this interpreter's torch (via a .pth file) but gets pof_fast only from the wheel.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    # Install first: with the host's site-packages visible, pip would find pof_fast there "already satisfied".
    run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel), cwd=tmp_path)
    (site / "host_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check = (
        "import pof_fast, pof_fast._C, torch; from pof_fast import _ext; "
        "assert pof_fast.__file__.startswith(%r), pof_fast.__file__; "
        "assert _ext.available() and pof_fast.backends()['cpp'] is True; "
        "z = torch.randn(4, 3); print(torch.ops.pof_fast.line_stats(z, z, torch.tensor([0, 1, 2, 0]), torch.zeros(1), -100).shape)"
    ) % str(site)
    assert run(str(python), "-c", check, cwd=tmp_path).strip() == "torch.Size([3, 1])"
