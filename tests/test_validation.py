"""Bad input gets a ValueError/TypeError that names the argument."""
import pytest
import torch

import pof_fast


def good():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, generator=g), torch.randint(0, 3, (8,), generator=g)


def nan_at(t, idx=0):
    t = t.clone()
    t.view(-1)[idx] = float("nan")
    return t


SEARCH_CASES = [
    (lambda h, w, b, y: (h[0], w, b, y), {}, ValueError, "features"),
    (lambda h, w, b, y: (h, w[:, :4], b, y), {}, ValueError, "weight"),
    (lambda h, w, b, y: (h, w, b[:2], y), {}, ValueError, "bias"),
    (lambda h, w, b, y: (h, w, b, y[:5]), {}, ValueError, "target"),
    (lambda h, w, b, y: (h, w, b, y.float()), {}, TypeError, "target"),
    (lambda h, w, b, y: (h.long(), w, b, y), {}, TypeError, "features"),
    (lambda h, w, b, y: (h.numpy(), w, b, y), {}, TypeError, "features"),
    (lambda h, w, b, y: (h, w, b, y + 3), {}, ValueError, "target has labels outside"),
    (lambda h, w, b, y: (h, w, b, y - 5), {}, ValueError, "target has labels outside"),
    (lambda h, w, b, y: (nan_at(h), w, b, y), {}, ValueError, "features contains NaN"),
    (lambda h, w, b, y: (h, w.clone().fill_(float("inf")), b, y), {}, ValueError, "weight contains NaN or inf"),
    (lambda h, w, b, y: (h, w, nan_at(b), y), {}, ValueError, "bias contains"),
    (lambda h, w, b, y: (h[:0], w, b, y[:0]), {}, ValueError, "empty"),
    (lambda h, w, b, y: (h, w[:0], None, y), {}, ValueError, "weight"),
    (lambda *a: a, dict(max_step=0.0), ValueError, "max_step"),
    (lambda *a: a, dict(max_step=float("inf")), ValueError, "max_step"),
    (lambda *a: a, dict(init_step=-1.0), ValueError, "init_step"),
    (lambda *a: a, dict(partitions=2.5), ValueError, "partitions"),
    (lambda *a: a, dict(method="golden"), ValueError, "method"),
    (lambda *a: a, dict(direction="unit"), ValueError, "direction"),
    (lambda *a: a, dict(backend="jax"), ValueError, "backend"),
    (lambda *a: a, dict(ignore_index=1.5), TypeError, "ignore_index"),
]


@pytest.mark.parametrize("make,kwargs,error,message", SEARCH_CASES)
def test_line_search_rejects(make, kwargs, error, message):
    args = make(*good())
    with pytest.raises(error, match=message):
        pof_fast.line_search(*args, **kwargs)


def test_line_search_rejects_mixed_devices():
    h, w, b, y = good()
    with pytest.raises(ValueError, match="weight is on meta"):
        pof_fast.line_search(h, w.to("meta"), b, y)


def test_ignore_index_labels_are_allowed_out_of_range():
    h, w, b, y = good()
    y[:3] = -1
    res = pof_fast.line_search(h, w, b, y, ignore_index=-1)
    assert torch.isfinite(res.loss)


LOSS_CASES = [
    (lambda z, d, y, s: (z[0], d, y, s), ValueError, "logits"),
    (lambda z, d, y, s: (z, d[:, :2], y, s), ValueError, "direction_logits"),
    (lambda z, d, y, s: (z, d, y, s[None]), ValueError, "steps"),
    (lambda z, d, y, s: (z, d, y, [1.0]), TypeError, "steps"),
    (lambda z, d, y, s: (z, d, y[:3], s), ValueError, "target"),
    (lambda z, d, y, s: (z, d, y.to(torch.int32) + 9, s), ValueError, "target has labels outside"),
    (lambda z, d, y, s: (z, nan_at(d), y, s), ValueError, "direction_logits contains NaN"),
    (lambda z, d, y, s: (z, d, y, nan_at(s)), ValueError, "steps contains NaN"),
    (lambda z, d, y, s: (z, d, torch.full_like(y, -100), s), ValueError, "every label"),
    (lambda z, d, y, s: (z[:0], d[:0], y[:0], s), ValueError, "empty"),
]


@pytest.mark.parametrize("make,error,message", LOSS_CASES)
def test_line_losses_rejects(make, error, message):
    z = torch.randn(6, 4)
    args = make(z, torch.randn(6, 4), torch.randint(0, 4, (6,)), torch.tensor([0.5, 1.0]))
    with pytest.raises(error, match=message):
        pof_fast.line_losses(*args)


def test_perturb_rejects_wrong_feature_width():
    head = torch.nn.Linear(5, 3)
    opt = pof_fast.PoF([torch.nn.Parameter(torch.zeros(1))], torch.optim.SGD, head=head, lr=0.1)
    with pytest.raises(ValueError, match="search_features must have shape"):
        opt.perturb(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
