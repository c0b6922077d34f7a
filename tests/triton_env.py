"""Where the Triton tests run, and the child processes that run them when they cannot run here.

Triton picks its CPU interpreter from ``TRITON_INTERPRET=1`` once per process, when functions are
decorated with ``@triton.jit`` -- Triton's own ``tl`` helpers included, decorated when ``triton`` is
first imported. An interpreted import cannot be undone in a process (``triton.compile`` then fails on
the interpreted helpers), so the tests never change that variable or ``sys.modules``: a test that
needs another mode runs in a child ``python -m pytest`` started with an explicit environment.

Two kinds of tests run in a child (see ``conftest.py``, which selects them, and
``test_triton_processes.py``, the one test per kind that starts the child and checks its exit code):

- ``interpret``: tests marked ``pytest.mark.triton`` (Triton kernels on CPU tensors) on a machine
  without CUDA, in a child with ``TRITON_INTERPRET=1``. With CUDA they run in the main process.
- ``aot``: tests marked ``pytest.mark.triton_aot`` (ahead-of-time compiles for a GPU target, no GPU
  needed), always in a child whose environment has no ``TRITON_INTERPRET``.

Either way the result does not depend on the caller's ``TRITON_INTERPRET`` or on which test module
imported Triton first. The fixtures ``triton_kernels`` and ``triton_backend`` below are offered to
every test module by ``conftest.py``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# kind -> the marker its tests carry.
MARKERS = {"interpret": "triton", "aot": "triton_aot"}
# Command-line option telling a child pytest which kind it runs (and that it is a child).
OPTION = "--triton-process"
# The node ids the main process handed to each kind of child (conftest fills it in at collection).
HANDED_OVER = pytest.StashKey[dict]()
RUNNER = Path(__file__).resolve().with_name("test_triton_processes.py")


def child_env(kind: str) -> dict:
    """The child's environment: this process's, with ``TRITON_INTERPRET`` set to 1 or removed."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "PYTEST_CURRENT_TEST") and not k.startswith("PYTEST_XDIST")}
    if kind == "interpret":
        env["TRITON_INTERPRET"] = "1"
    # The child imports the same pof_fast as this process: its parent folder goes first on the child's path.
    from repo_path import child_env as with_package

    return with_package(env)


def check_child_mode(kind: str) -> None:
    """In a child: its environment must be the one its kind needs (else the results would mislead)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if kind == "interpret" and not interpreted:
        raise pytest.UsageError(f"{OPTION}=interpret needs TRITON_INTERPRET=1 in the environment")
    if kind == "aot" and "TRITON_INTERPRET" in os.environ:
        raise pytest.UsageError(f"{OPTION}=aot needs an environment without TRITON_INTERPRET")
    if kind == "interpret":
        _check_interpreter_numpy()


def _parse(text: str) -> tuple:
    """(major, minor) of a version string such as ``3.9.0`` or ``2.13.0+cpu``."""
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def _check_interpreter_numpy() -> None:
    """Triton < 3.7's interpreter turns scalar kernel arguments into 1-element arrays and calls int() on
    them in ``range(0, C, BLOCK)``, which numpy >= 2.4 refuses: say so once instead of failing every test."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_version = _parse(version("triton"))
    except PackageNotFoundError:
        return
    import numpy

    if triton_version < (3, 7) and _parse(numpy.__version__) >= (2, 4):
        raise pytest.UsageError(f"Triton {version('triton')}'s CPU interpreter needs numpy < 2.4 (found "
                                f"{numpy.__version__}); install numpy<2.4 or Triton >= 3.7")


def run_child(config: pytest.Config, kind: str, node_ids: list, basetemp: Path, timeout: float) -> tuple[int, str]:
    """Run ``python -m pytest`` on ``node_ids`` (or, when empty, every test of the kind under tests/).

    Returns (exit code, stdout and stderr; 124 when it ran past ``timeout`` seconds). The child selects
    only tests marked for its kind and fails with exit code 5 when it collects none.
    """
    targets = list(node_ids) or [str(Path(__file__).parent)]
    cmd = [sys.executable, "-m", "pytest", f"{OPTION}={kind}", "-q", "-rfEs", "--tb=short",
           "-p", "no:cacheprovider", f"--basetemp={basetemp}", f"--rootdir={config.rootpath}"]
    if config.inipath is not None:
        cmd += ["-c", str(config.inipath)]
    try:
        proc = subprocess.run(cmd + targets, cwd=config.rootpath, env=child_env(kind), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        partial = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else (exc.output or "")
        return 124, f"{partial}\n(the child pytest was stopped after {timeout:.0f} s)"
    return proc.returncode, proc.stdout


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def triton_kernels():
    """The ``pof_fast.kernels`` package (Triton imported in this process's one mode)."""
    pytest.importorskip("triton")
    from pof_fast.backends.triton import interpreting, load_kernels

    if DEVICE.type == "cpu" and not interpreting():
        pytest.fail("a Triton kernel test ran on the CPU without TRITON_INTERPRET=1: on a machine without "
                    "CUDA, tests marked 'triton' must run through tests/test_triton_processes.py")
    return load_kernels()


@pytest.fixture(scope="module")
def triton_backend(triton_kernels):
    """The registered ``"triton"`` backend, as ``backend="triton"`` resolves it on :data:`DEVICE`."""
    from pof_fast import dispatch
    from pof_fast.backends.base import Backend

    backend = dispatch.load("triton")
    assert isinstance(backend, Backend), f"the triton backend did not load: {backend}"
    assert backend.handles(DEVICE)
    return backend


def handed_over(config: pytest.Config, kind: str) -> Optional[list]:
    """The node ids this session moved to a ``kind`` child; None when the session moved nothing there."""
    return config.stash.get(HANDED_OVER, {}).get(kind)
