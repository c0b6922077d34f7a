"""Shared set-up of the Triton tests: where the kernels run and how they are loaded.

With a CUDA GPU the kernels run there. Without one they run under Triton's CPU interpreter, which
Triton selects from ``TRITON_INTERPRET=1`` when a function is decorated with ``@triton.jit`` --
including Triton's own ``tl`` helpers, decorated when ``triton`` is first imported. So on a CPU-only
machine this module, imported at collection, imports ``triton`` with the variable set and then
restores the environment; the ``triton_kernels`` fixture sets it again only while a Triton test
module runs (kernel modules are re-imported under it) and restores it afterwards. Other test
modules therefore see ``TRITON_INTERPRET`` exactly as the caller set it. Running pytest with
``TRITON_INTERPRET=1`` exported works too.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if DEVICE.type == "cpu" and "triton" not in sys.modules:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved


def _forget_kernels() -> None:
    for name in [m for m in sys.modules if m == "pof_fast.kernels" or m.startswith("pof_fast.kernels.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def triton_kernels():
    """The ``pof_fast.kernels`` package, loaded so that it runs on :data:`DEVICE`."""
    triton = pytest.importorskip("triton")
    from pof_fast import backend_triton

    if DEVICE.type == "cuda":
        yield backend_triton.load_kernels()
        return
    if "Interpreted" not in type(triton.language.zeros).__name__:
        pytest.fail("triton was imported before the tests could select its CPU interpreter: "
                    "run pytest with TRITON_INTERPRET=1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        _forget_kernels()
        yield backend_triton.load_kernels()
    _forget_kernels()


@pytest.fixture(scope="module")
def triton_backend(triton_kernels):
    """A :class:`TritonBackend` usable on :data:`DEVICE`, also the one ``backend="triton"`` resolves to.

    Dispatch caches each backend's status on first use, possibly from a module that ran without the
    interpreter; this module's backend replaces that entry while it runs.
    """
    from pof_fast import dispatch
    from pof_fast.backend_triton import TritonBackend

    backend = TritonBackend()
    assert backend.status() is True
    assert backend.handles(DEVICE)
    saved = dispatch._loaded.get("triton")
    dispatch._loaded["triton"] = backend
    yield backend
    if saved is None:
        dispatch._loaded.pop("triton", None)
    else:
        dispatch._loaded["triton"] = saved
