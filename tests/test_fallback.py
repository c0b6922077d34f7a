"""Dispatch falls back only where a backend cannot run at all; every other error is raised as it is."""
import warnings

import pytest
import torch

import pof_fast
from pof_fast import dispatch
from pof_fast.backends.base import Backend, BackendUnavailable
from problems import head_problem


class Injected(Backend):
    """A backend whose whole search raises ``error`` (a fresh instance per error kind)."""

    name = "injected"

    def __init__(self, error: BaseException):
        self.error = error
        self.calls = 0

    def line_search(self, *args):
        self.calls += 1
        raise self.error

    def line_stats(self, *args):
        self.calls += 1
        raise self.error


@pytest.fixture
def install(monkeypatch):
    """Put a backend first in the CPU preference, with a clean warning record."""
    monkeypatch.setattr(dispatch, "_warned", set())

    def put(backend: Backend):
        monkeypatch.setitem(dispatch.REGISTRY, backend.name, "tests:unused")
        monkeypatch.setitem(dispatch._loaded, backend.name, backend)
        monkeypatch.setitem(dispatch.PREFERENCE, "cpu", (backend.name, "torch"))
        return backend

    return put


def search(**kwargs):
    h, w, b, y = head_problem(16, 8, 5, seed=1)
    return pof_fast.line_search(h, w, b, y, method="bracket_grid", **kwargs)


def test_a_backend_that_cannot_build_its_kernels_falls_back_once_with_one_warning(install):
    broken = install(Injected(BackendUnavailable("no kernels for this GPU")))
    with pytest.warns(RuntimeWarning, match="'injected' unavailable \\(no kernels for this GPU\\); using 'torch'"):
        got = search()
    expected = search(backend="torch")
    assert torch.equal(got.step, expected.step) and torch.equal(got.weight_direction, expected.weight_direction)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search()  # no second warning, and the broken backend is not tried again
    assert broken.calls == 1
    assert pof_fast.backends()["injected"] == "no kernels for this GPU"


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("an illegal memory access was encountered"),
    ValueError("pof_fast: target must have shape [16]"),
])
def test_a_runtime_error_is_raised_as_it_is_and_disables_nothing(install, error):
    broken = install(Injected(error))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(type(error)) as raised:
            search()
        assert raised.value is error
        with pytest.raises(type(error)):
            search()
    assert broken.calls == 2  # tried again: nothing was disabled
    assert pof_fast.backends()["injected"] is True


def test_line_losses_falls_back_only_when_unavailable(install):
    install(Injected(BackendUnavailable("triton cannot compile here")))
    z, d = torch.randn(4, 3), torch.randn(4, 3)
    y, steps = torch.tensor([0, 1, 2, 0]), torch.tensor([0.0, 1.0])
    with pytest.warns(RuntimeWarning, match="unavailable"):
        got = pof_fast.line_losses(z, d, y, steps)
    assert torch.equal(got, pof_fast.line_losses(z, d, y, steps, backend="torch"))


def test_explicit_unavailable_backend_warns_and_uses_torch(monkeypatch):
    monkeypatch.setitem(dispatch._loaded, "cuda", "no GPU")
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="'cuda' unavailable \\(no GPU\\)"):
        got = search(backend="cuda")
    expected = search(backend="torch")
    assert torch.equal(got.step, expected.step)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        search(backend="nonexistent")
