"""Runs ``examples/NAME.py``'s ``main(ARGS)`` in a child process (e.g. under torchrun) with the test session's
``sys.path`` (tests/repo_path.py: this session's pof_fast, the repository root off the path, so that its
``kernels/`` folder does not shadow the ``kernels`` package Transformers imports).

    python -m torch.distributed.run --nproc_per_node 2 tests/example_runner.py fsdp2_pof --steps 2
"""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import repo_path  # noqa: E402

sys.path.insert(0, os.path.join(repo_path.ROOT, "examples"))

if __name__ == "__main__":
    importlib.import_module(sys.argv[1]).main(sys.argv[2:])
