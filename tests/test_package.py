"""Packaging contract: cheap import, lazy backends, backend reporting, CLI, sdist contents."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

import pof_fast


def test_import_is_cheap_and_lazy():
    code = (
        "import sys, time, torch; t = time.perf_counter(); import pof_fast; "
        "print(time.perf_counter() - t); "
        "print(any(m == 'triton' or m.startswith('triton.') for m in sys.modules)); "
        "print('pof_fast._C' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 0.5, f"import pof_fast took {out[0]} s beyond torch"
    assert out[1:] == ["False", "False"], "import pof_fast loaded triton or the extension"


def test_backends_reports_every_backend():
    report = pof_fast.backends()
    assert set(report) == {"torch", "triton", "cpp", "cuda"}
    assert report["torch"] is True
    assert all(v is True or (isinstance(v, str) and v) for v in report.values())
    if not torch.cuda.is_available():
        assert report["cuda"] is not True


def test_cli_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "pof_fast", "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out and "bench" in out


def test_sdist_carries_every_extension_source(tmp_path):
    """An sdist built here must hold all of csrc/ (headers and CUDA sources too), or installing it fails."""
    root = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"  # a copy, so egg-info and dist/ are not written into the checkout
    shutil.copytree(root, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".pytest_cache", ".benchmarks"))
    env = dict(os.environ, POF_FAST_BUILD_CUDA="0")
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree,
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("pof_fast-*.tar.gz")
    with tarfile.open(sdist) as archive:
        shipped = {Path(*Path(name).parts[1:]).as_posix() for name in archive.getnames()}
    sources = {p.relative_to(root).as_posix() for p in (root / "csrc").rglob("*") if p.is_file()}
    assert sources and sources <= shipped, sorted(sources - shipped)
