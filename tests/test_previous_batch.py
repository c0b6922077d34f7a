"""The previous-batch search in a custom loop: PoF.record(features, target) in the training forward, then
PoF.perturb() with no arguments searches exactly those rows (detached, not copied, dropped once searched), under
torch.compile(fullgraph=True) too, and PoF's state_dict carries them so that a resumed loop continues exactly."""
import copy

import pytest
import torch
from torch import nn

import pof_fast


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh()), nn.Linear(12, 4)


def pof(phi, head, **kwargs):
    return pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, lr=0.1, momentum=0.9, seed=5, **kwargs)


def batches(count, rows=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 6, generator=g), torch.randint(0, 4, (rows,), generator=g)) for _ in range(count)]


def train(opt, phi, head, x, y):
    """One training forward that records the head's input, backward, step; returns the recorded features."""
    opt.zero_grad()
    features = phi(x)
    opt.record(features, y)
    nn.functional.cross_entropy(head(features), y).backward()
    opt.step()
    return features


def test_perturb_without_a_batch_searches_the_last_recorded_training_batch_exactly():
    phi, head = model()
    opt = pof(phi, head)
    theta0 = (head.weight.detach().clone(), head.bias.detach().clone())
    data = batches(5)
    with torch.no_grad():
        opt.perturb(phi(data[0][0]), data[0][1])  # the first step: a fresh search batch
    previous = None
    for x, y in data:
        if previous is not None:
            features, target = previous
            want = pof_fast.line_search(features.detach().clone(), *theta0, target.clone())  # a hand call
            got = opt.perturb()
            for field in ("step", "grad_norm", "loss0", "weight_direction", "bias_direction"):
                assert torch.equal(getattr(got, field), getattr(want, field)), field
            coef = opt.last.gamma.float() * opt.last.applied_step
            assert torch.equal(head.weight, theta0[0] - coef * want.weight_direction)
        features = train(opt, phi, head, x, y)
        recorded = opt.recorded
        assert recorded[0].data_ptr() == features.data_ptr() and not recorded[0].requires_grad  # detached, no copy
        previous = (features, y)
    assert opt.summary()["perturbations"] == 5 and torch.equal(head.weight, theta0[0])


def test_only_the_last_batch_is_kept_and_a_search_drops_it():
    phi, head = model()
    opt = pof(phi, head)
    (x1, y1), (x2, y2) = batches(2)
    with torch.no_grad():
        opt.record(phi(x1), y1)
        opt.record(phi(x2).reshape(2, 8, 12), y2.reshape(2, 8))  # [..., D] token batches too; replaces the first
        want = pof_fast.line_search(phi(x2), opt.theta0_weight, opt.theta0_bias, y2)
    assert torch.equal(opt.perturb().step, want.step)
    assert opt.recorded is None  # nothing kept beyond the batch searched
    opt.restore()
    with pytest.raises(ValueError, match="none was recorded.*first step"):
        opt.perturb()


def test_record_checks_its_arguments_by_name():
    phi, head = model()
    opt = pof(phi, head)
    with pytest.raises(ValueError, match=r"features must have shape \[\.\.\., 12\]"):
        opt.record(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target must have shape"):
        opt.record(torch.randn(3, 12), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="search_features must be a torch.Tensor"):
        opt.perturb(None, torch.zeros(3, dtype=torch.long))
    assert opt.recorded is None


def test_state_dict_carries_the_recorded_batch_so_a_resumed_loop_continues_exactly():
    data = batches(6, seed=3)

    def run(steps, resume=None):
        phi, head = model()
        opt = pof(phi, head)
        if resume is None:
            with torch.no_grad():
                opt.perturb(phi(data[0][0]), data[0][1])
        else:
            phi.load_state_dict(resume[0])
            opt.load_state_dict(resume[1])
            opt.perturb()
        trace = []
        for i, (x, y) in enumerate(steps):
            if i:
                trace.append(opt.perturb().step)
            train(opt, phi, head, x, y)
        return phi, opt, trace

    straight_phi, _, straight = run(data)
    phi, opt, _ = run(data[:3])
    saved = copy.deepcopy((phi.state_dict(), opt.state_dict()))
    assert saved[1]["recorded"] is not None and saved[1]["recorded"][0].shape == (16, 12)
    resumed_phi, _, resumed = run(data[3:], resume=saved)
    assert [float(t) for t in resumed] == [float(t) for t in straight[3:]]
    for a, b in zip(straight_phi.parameters(), resumed_phi.parameters()):
        assert torch.equal(a, b)


def test_a_state_dict_without_a_recorded_batch_loads():
    phi, head = model()
    opt = pof(phi, head)
    state = opt.state_dict()
    assert state["recorded"] is None
    del state["recorded"]  # a checkpoint written before the previous-batch search
    opt.load_state_dict(state)
    assert opt.recorded is None


@pytest.mark.filterwarnings("ignore:pof_fast.PoF.step\\(\\) ran but perturb\\(\\) was never called")  # step 1
def test_the_step_with_the_previous_batch_search_compiles_without_graph_breaks():
    from test_compile import GraphRecorder, op_name, same
    from pof_fast import dispatch

    torch._dynamo.reset()
    phi, head = model()
    phi_c, head_c = copy.deepcopy(phi), copy.deepcopy(head)
    opt, opt_c = pof(phi, head, validate=False), pof(phi_c, head_c, validate=False)
    data = batches(4, seed=1)

    def forward(opt, phi, head, x, y):
        features = phi(x)
        opt.record(features, y)
        return nn.functional.cross_entropy(head(features), y)

    def perturb(opt):
        return opt.perturb()

    recorder = GraphRecorder()
    forward_c = torch.compile(forward, backend=recorder, fullgraph=True)
    perturb_c = torch.compile(perturb, backend=recorder, fullgraph=True)
    try:
        for i, (x, y) in enumerate(data):
            if i:
                perturb(opt)
                perturb_c(opt_c)
                assert same(head.weight, head_c.weight) and torch.equal(opt.last.step, opt_c.last.step)
            for o, p, hd, f in ((opt, phi, head, forward), (opt_c, phi_c, head_c, forward_c)):
                o.zero_grad()
                f(o, p, hd, x, y).backward()
                o.step()
            assert all(same(a, b) for a, b in zip(phi.parameters(), phi_c.parameters()))
        assert recorder.calls_to(op_name(dispatch.resolve("auto", torch.device("cpu")).name)) == 1
        assert len(recorder.graphs) == 2  # one graph each: record() and perturb() break nothing
    finally:
        torch._dynamo.reset()
