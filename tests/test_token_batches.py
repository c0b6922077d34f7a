"""Token batches in the core API: features [..., D] with targets [...], causal_lm_rows, and PoF's warning when
steps are taken without a perturbation."""
import os
import warnings

import pytest
import torch
from problems import head_problem

import pof_fast
from pof_fast import _ext


def token_problem(batch=3, tokens=7, dim=12, classes=9, seed=0):
    h, w, b, y = head_problem(batch * tokens, dim, classes, seed=seed, spread=3.0)
    return h.reshape(batch, tokens, dim), w, b, y.reshape(batch, tokens)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("method", ["newton", "bracket_grid"])
def test_token_batches_search_the_rows_of_their_leading_dimensions(backend, method):
    if backend == "cpp" and not _ext.available() and not os.environ.get("POF_FAST_REQUIRE_EXT"):
        pytest.skip(f"pof_fast._C not built ({_ext.reason()})")
    h, w, b, y = token_problem()
    y[0, :4] = -100
    tokens = pof_fast.line_search(h, w, b, y, method=method, backend=backend)
    rows = pof_fast.line_search(h.reshape(-1, 12).clone(), w, b, y.reshape(-1).clone(), method=method, backend=backend)
    for name in ("step", "weight_direction", "bias_direction", "grad_norm", "loss0", "loss"):
        assert torch.equal(getattr(tokens, name), getattr(rows, name)), name


def test_non_contiguous_token_batches_equal_their_contiguous_copy():
    h, w, b, y = token_problem(tokens=8)
    sliced, target = h[:, :-1], y[:, 1:]  # views with gaps between the rows
    assert not sliced.is_contiguous()
    a = pof_fast.line_search(sliced, w, b, target, backend="torch")
    c = pof_fast.line_search(sliced.contiguous(), w, b, target.contiguous(), backend="torch")
    assert torch.equal(a.step, c.step) and torch.equal(a.weight_direction, c.weight_direction)


@pytest.mark.parametrize("make,error,message", [
    (lambda h, y: (h[0, 0], y), ValueError, "features must have shape \\[n, D\\] or \\[..., D\\]"),
    (lambda h, y: (h, y[:, :-1]), ValueError, "target must have shape \\[3, 7\\]"),
    (lambda h, y: (h, y.reshape(-1)), ValueError, "target must have shape \\[3, 7\\]"),
    (lambda h, y: (h[:, :0], y[:, :0]), ValueError, "empty"),
    (lambda h, y: (h, y.float()), TypeError, "target must be an integer tensor"),
])
def test_token_batches_with_mismatched_shapes_are_refused(make, error, message):
    h, w, b, y = token_problem()
    features, target = make(h, y)
    with pytest.raises(error, match=message):
        pof_fast.line_search(features, w, b, target)


def test_perturb_takes_token_batches_as_their_flattened_rows():
    h, w, b, y = token_problem()
    heads = []
    for features, target in ((h, y), (h.reshape(-1, 12), y.reshape(-1))):
        head = torch.nn.Linear(12, 9)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        opt = pof_fast.PoF([torch.nn.Parameter(torch.zeros(1))], torch.optim.SGD, head=head, lr=0.1, seed=4)
        opt.perturb(features, target)
        heads.append((head.weight.detach().clone(), head.bias.detach().clone()))
    assert torch.equal(heads[0][0], heads[1][0]) and torch.equal(heads[0][1], heads[1][1])
    assert not torch.equal(heads[0][0], w)
    with pytest.raises(ValueError, match="search_features must have shape \\[..., 12\\]"):
        opt.perturb(h[..., :11], y)
    with pytest.raises(ValueError, match="target must have shape \\[3, 7\\]"):
        opt.perturb(h, y[:, 1:])


def test_causal_lm_rows_pair_each_position_with_the_next_token():
    hidden = torch.randn(2, 5, 4)
    labels = torch.tensor([[-100, -100, 7, 8, 9], [1, 2, 3, -100, -100]], dtype=torch.int32)
    before = labels.clone()
    features, target = pof_fast.causal_lm_rows(hidden, labels)
    assert features is hidden  # no copy
    assert target.dtype == torch.int64 and torch.equal(labels, before)  # the caller's labels untouched
    assert target.tolist() == [[-100, 7, 8, 9, -100], [2, 3, -100, -100, -100]]
    assert pof_fast.causal_lm_rows(hidden, labels, ignore_index=-1)[1][:, -1].tolist() == [-1, -1]


@pytest.mark.parametrize("hidden,labels,error,message", [
    (torch.randn(5, 4), torch.zeros(5, dtype=torch.long), ValueError, "hidden_states must have shape \\[B, T, D\\]"),
    (torch.randn(2, 5, 4), torch.zeros(2, 4, dtype=torch.long), ValueError, "target must have shape \\[2, 5\\]"),
    (torch.randn(2, 5, 4), torch.zeros(2, 5), TypeError, "integer"),
    (torch.randn(2, 5, 4).long(), torch.zeros(2, 5, dtype=torch.long), TypeError, "hidden_states must be a floating"),
    (torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.long, device="meta"), ValueError, "labels is on meta"),
])
def test_causal_lm_rows_refuse_bad_input(hidden, labels, error, message):
    with pytest.raises(error, match=message):
        pof_fast.causal_lm_rows(hidden, labels)


def _sgd_pof():
    phi = torch.nn.Linear(4, 12)
    head = torch.nn.Linear(12, 9)
    return phi, pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, lr=0.1, seed=0)


def test_steps_without_any_perturbation_warn_once():
    phi, opt = _sgd_pof()
    x = torch.randn(8, 4)
    with pytest.warns(RuntimeWarning, match="perturb\\(\\) was never called") as caught:
        for _ in range(3):
            opt.head(phi(x)).sum().backward()
            opt.step()
    assert len([w for w in caught if "never called" in str(w.message)]) == 1


def test_steps_after_a_perturbation_do_not_warn():
    phi, opt = _sgd_pof()
    x, y = torch.randn(8, 4), torch.randint(0, 9, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.perturb(phi(x).detach(), y)
        opt.head(phi(x)).sum().backward()
        opt.step()
