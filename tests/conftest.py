"""Test session set-up: CUDA-only tests are skipped without a GPU; Triton tests go where they can run.

Tests marked ``triton`` run the Triton kernels: in this process with CUDA, else in a child process
under Triton's CPU interpreter. Tests marked ``triton_aot`` compile kernels for a GPU target and always
run in a child without ``TRITON_INTERPRET``. Tests moved to a child are deselected here (not skipped)
and run by ``test_triton_processes.py``, which this session then always runs (see ``triton_env``).

The repository root leaves ``sys.path`` once ``pof_fast`` is imported (:mod:`repo_path`).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import repo_path  # noqa: E402,F401  (first: pof_fast imported, then the repository root off sys.path)

from triton_env import HANDED_OVER, MARKERS, OPTION, RUNNER, check_child_mode  # noqa: E402
from triton_env import triton_backend, triton_kernels  # noqa: E402,F401  (fixtures of every test module)


def pytest_addoption(parser):
    parser.addoption(OPTION, choices=sorted(MARKERS), default=None,
                     help="run as the child process of test_triton_processes.py: only the tests of this kind")


def pytest_configure(config):
    kind = config.getoption(OPTION)
    if kind is not None:
        check_child_mode(kind)


def _skip_cuda(items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _kind(item):
    """The child kind an item belongs to, or None when it runs in the main process."""
    if item.get_closest_marker(MARKERS["aot"]) is not None:
        return "aot"
    if item.get_closest_marker(MARKERS["interpret"]) is not None and not torch.cuda.is_available():
        return "interpret"
    return None


def _deselect(config, items, drop):
    if drop:
        config.hook.pytest_deselected(items=drop)
        ids = {id(item) for item in drop}
        items[:] = [item for item in items if id(item) not in ids]


def _runner_kind(item):
    """The kind of child a runner item starts, or None for any other item."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("kind") if callspec is not None and item.path.resolve() == RUNNER else None


def _runner_items(session, kinds):
    """The runner's items for ``kinds``, collected afresh (when -k/-m or the paths given left them out)."""
    module = pytest.Module.from_parent(session, path=RUNNER)
    return [item for item in module.collect() if isinstance(item, pytest.Item) and _runner_kind(item) in kinds]


def pytest_report_collectionfinish(config, items):
    handed = config.stash.get(HANDED_OVER, {})
    where = {"interpret": "with TRITON_INTERPRET=1", "aot": "without TRITON_INTERPRET"}
    return [f"{len(ids)} tests marked {MARKERS[kind]!r} deselected here: they run in a child pytest {where[kind]}"
            for kind, ids in sorted(handed.items())]


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: hand over only what the caller selected
def pytest_collection_modifyitems(session, config, items):
    _skip_cuda(items)
    child = config.getoption(OPTION)
    if child is not None:
        _deselect(config, items, [item for item in items if _kind(item) != child])
        return
    handed = {}
    for item in items:
        kind = _kind(item)
        if kind is not None:
            handed.setdefault(kind, []).append(item)
    config.stash[HANDED_OVER] = {kind: [item.nodeid for item in moved] for kind, moved in handed.items()}
    _deselect(config, items, [item for moved in handed.values() for item in moved])
    missing = set(handed) - {_runner_kind(item) for item in items}
    if missing:
        items.extend(_runner_items(session, missing))
