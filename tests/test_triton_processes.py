"""The Triton tests that cannot run in this process, run in a child ``python -m pytest`` (see ``triton_env``).

``interpret``: the tests marked ``triton``, on a machine without CUDA, with ``TRITON_INTERPRET=1``.
``aot``: the tests marked ``triton_aot`` (compiles for sm_90), with no ``TRITON_INTERPRET`` at all.
Each child gets the node ids this session deselected for it (``conftest.py``); when the session selected
none (this file run on its own), it runs every test of its kind under ``tests/``. A child that fails,
crashes or collects nothing fails this test, which then shows the end of the child's output (the last
test checks the "collects nothing" part).
"""
from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from triton_env import RUNNER, handed_over, run_child, tail

# The interpreter runs the kernels' arithmetic in numpy: minutes on a 2-core machine, not seconds.
CHILD_TIMEOUT_S = 3600


@pytest.mark.parametrize("kind", ["interpret", "aot"])
def test_triton_tests_pass_in_their_own_process(request, tmp_path, kind):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if kind == "interpret" and torch.cuda.is_available():
        pytest.skip("with CUDA the tests marked 'triton' run in the main process")
    node_ids = handed_over(request.config, kind) or []
    code, output = run_child(request.config, kind, node_ids, tmp_path / "child", CHILD_TIMEOUT_S)
    request.node.add_report_section("call", f"{kind} child pytest", tail(output, 5))  # shown by -rP
    assert code == 0, f"the {kind} child pytest exited with {code}; the end of its output:\n{tail(output)}"
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) > 0, f"the {kind} child passed nothing:\n{tail(output)}"


def test_a_child_that_collects_nothing_fails(request, tmp_path):
    """Given only tests of no kind (this file's), the child deselects them all and exits with 5, not 0."""
    code, output = run_child(request.config, "aot", [str(RUNNER)], tmp_path / "child", 300)
    assert code == 5, f"exit code {code}:\n{tail(output)}"
    assert "deselected" in output and "passed" not in output, tail(output)
