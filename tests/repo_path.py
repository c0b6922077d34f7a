"""``sys.path`` for the tests and the processes they start, imported first by each.

``pof_fast`` is imported from wherever the test session finds it (installed, or the source tree of an in-place
build); then the repository root leaves ``sys.path``, where ``python -m`` and ``python -c`` put it: its ``kernels/``
folder (installed as ``pof_fast.kernels``) would shadow the top-level ``kernels`` package that Transformers imports.
A child process started from a test gets :data:`PACKAGE_PARENT` on its ``PYTHONPATH`` (:func:`child_env`) and a
working directory outside the repository, so it runs the same ``pof_fast`` as the test session.
"""
import os
import sys

import pof_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(pof_fast.__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]


def child_env(env: dict) -> dict:
    """``env`` for a child process that imports this session's ``pof_fast``: PACKAGE_PARENT first on PYTHONPATH."""
    path = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path}
