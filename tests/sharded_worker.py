"""One rank of tests/test_sharded_heads.py: PoF on an LM head sharded by FSDP2 and/or tensor parallelism (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node N tests/sharded_worker.py OUT_DIR LAYOUT...

LAYOUT: ``fsdp`` (1-D mesh, FSDP2 on every decoder layer and the model), ``tp`` (``ColwiseParallel`` head, the same
tokens on every rank), ``fsdp_tp`` (2 x 2: FSDP2 over ``dp``, the head ``ColwiseParallel`` over ``tp``), ``hsdp``
(2 x 2: replicate x shard), ``refusals`` (the refused cases' one-line errors), ``checkpoint`` (FSDP2 and
torch.distributed.checkpoint). Each writes OUT_DIR/LAYOUT.rank{r}.json. The oracle is the single-process float64
search on every rank's rows gathered and the head gathered (``full_tensor()``, here only). The searches are made by
the pieces of PoFCallback (``on_train_begin``, ``on_step_begin``), with raw ``fully_shard`` (Accelerate enables FSDP
only with an accelerator).
"""
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import repo_path  # noqa: E402,F401  (first: pof_fast imported, then the repository root off sys.path)
from lm import VOCAB, extractor_params, tiny_lm  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import Replicate  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module  # noqa: E402

import pof_fast  # noqa: E402
from pof_fast import distributed, plans  # noqa: E402
from pof_fast._types import SearchPlan  # noqa: E402
from pof_fast.integrations.transformers import PoFCallback, search_rows, check_lm_head  # noqa: E402
from transformers import TrainerControl, TrainerState  # noqa: E402

STEPS = 3
BATCH, LENGTH = 4, 16


def build(layout, rank):
    """(model, token_rank): the sharded tiny Llama, and the index that picks this rank's tokens."""
    model = tiny_lm(tied=False, seed=0)  # the same weights on every rank
    if layout == "tp":
        distributed.CHUNK_ELEMENTS = 1024  # this run scores in blocks of rows too (a large vocabulary's path)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
        parallelize_module(model.lm_head, mesh, ColwiseParallel(output_layouts=Replicate()))
        return model, 0
    if layout == "fsdp_tp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model.lm_head, mesh["tp"], ColwiseParallel(output_layouts=Replicate()))
        shard_mesh, token_rank = mesh["dp"], mesh.get_coordinate()[0]
    elif layout == "hsdp":
        shard_mesh, token_rank = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")), rank
    else:
        shard_mesh, token_rank = init_device_mesh("cpu", (dist.get_world_size(),)), rank
    for layer in model.model.layers:
        fully_shard(layer, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    return model, token_rank


def tokens(step, token_rank, search):
    g = torch.Generator().manual_seed(1000 * step + 10 * token_rank + search)
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def gathered(x):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


def same_on_ranks(x):
    parts = gathered(x)
    return all(torch.equal(parts[0], p) for p in parts[1:])


def full(t):
    return t.full_tensor() if distributed.is_dtensor(t) else t


def run_layout(layout, rank):
    """STEPS PoF steps, each search made by PoFCallback.on_step_begin (its search forward under FSDP2's hooks)."""
    model, token_rank = build(layout, rank)
    head = check_lm_head(model)  # FSDP2 / TP: accepted, not "tied"
    pof = pof_fast.PoF(extractor_params(model), torch.optim.AdamW, head=head, lr=1e-3, seed=rank)  # rank 0's wins
    callback = PoFCallback([tokens(step, token_rank, 1) for step in range(STEPS)])
    callback.on_train_begin(SimpleNamespace(per_device_train_batch_size=BATCH), TrainerState(), TrainerControl(),
                            model=model, optimizer=pof)
    theta0 = full(head.weight).detach().clone()
    logit_calls, captured, searched = [], {}, []
    head.register_forward_hook(lambda *_: logit_calls.append(1))
    head.register_forward_pre_hook(lambda m, args: captured.update(h=args[0]))
    perturb = pof.perturb

    def counted_perturb(features, target):
        counter = count_collectives()
        result = perturb(features, target)
        searched.append((features, target, counter.stop()))
        return result

    pof.perturb = counted_perturb
    out = dict(steps=[], collectives=[], process_group=pof.process_group is not None)
    for step in range(STEPS):
        callback.on_step_begin(None, TrainerState(global_step=step), TrainerControl(), model=model, optimizer=pof)
        features, target, calls = searched[-1]
        searched_without_logits = not logit_calls
        every = [torch.cat(gathered(features.reshape(-1, features.shape[-1]))),
                 torch.cat(gathered(target.reshape(-1).contiguous()))]
        want = pof_fast.line_search(every[0].double(), theta0.double(), None, every[1], backend="torch")
        perturbed = full(head.weight).detach()
        applied = torch.where(want.capped, 0.0, want.step)  # on_capped="skip"
        expected = theta0.double() - pof.last.gamma * applied * want.weight_direction
        # the training loss through the perturbed head (FSDP2's forward gathers it) against the loss by hand
        batch = tokens(step, token_rank, 0)
        loss = model(**batch).loss
        hand = F.cross_entropy((full(captured["h"]).detach().double() @ expected.t())[:, :-1].reshape(-1, VOCAB),
                               batch["labels"][:, 1:].reshape(-1))
        loss.backward()
        pof.step()
        pof.zero_grad()
        out["steps"].append(dict(
            same_on_ranks=bool(same_on_ranks(pof.last.step) and same_on_ranks(pof.last.gamma)),
            step=(float(pof.last.step), float(want.step)),
            capped=(bool(pof.last.capped), bool(want.capped)),
            head_error=float((perturbed.double() - expected).abs().max()),
            perturbation=float((perturbed.double() - theta0.double()).abs().max()),
            loss=(float(loss.detach()), float(hand)),
            restored=bool(torch.equal(full(head.weight), theta0)),
            no_logits=searched_without_logits,
        ))
        logit_calls.clear()
        out["collectives"].append((calls, distributed.collectives(plans.resolve(SearchPlan(), "torch"), layout=pof._head.layout)))
    return out


class count_collectives:
    """Counts the collectives pof_fast.distributed calls until stop()."""

    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single")

    def __init__(self):
        self.n, self.originals = 0, {name: getattr(dist, name) for name in self.names}
        for name, original in self.originals.items():
            setattr(dist, name, lambda *a, _o=original, **k: (setattr(self, "n", self.n + 1), _o(*a, **k))[1])

    def stop(self):
        for name, original in self.originals.items():
            setattr(dist, name, original)
        return self.n


def one_line_error(call):
    """The error ``call`` raises, as (type name, message); ("none", "") when it raises nothing."""
    try:
        call()
    except (TypeError, ValueError, RuntimeError) as e:
        return type(e).__name__, str(e)
    return "none", ""


def run_refusals(rank):
    from torch import nn
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    extractor = nn.Linear(4, 8)
    out = {}
    by_features = nn.Linear(8, 6, bias=False)
    by_features.weight = nn.Parameter(distribute_tensor(by_features.weight.detach(), mesh, [Shard(1)]))
    out["head_sharded_on_dim_1"] = one_line_error(
        lambda: pof_fast.PoF(extractor.parameters(), torch.optim.SGD, head=by_features, lr=0.1))
    head = nn.Linear(8, 6, bias=False)
    fully_shard(head, mesh=mesh)
    pof = pof_fast.PoF(extractor.parameters(), torch.optim.SGD, head=head, lr=0.1)
    h, y = torch.randn(5, 8), torch.randint(0, 6, (5,))
    out["partial_features"] = one_line_error(lambda: pof.perturb(DTensor.from_local(h, mesh, [Partial()]), y))
    out["features_dim_sharded"] = one_line_error(lambda: pof.perturb(DTensor.from_local(h, mesh, [Shard(1)]), y))
    other = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("a", "b"))
    out["features_on_another_mesh"] = one_line_error(
        lambda: pof.perturb(DTensor.from_local(h, other, [Replicate(), Replicate()]), y))
    out["line_search_dtensor"] = one_line_error(lambda: pof_fast.line_search(h, head.weight, None, y))
    # FSDP2's root keeps its parameters gathered after a forward no backward followed: perturb says so
    model = tiny_lm(tied=False, seed=0)
    fully_shard(model, mesh=mesh)
    pof = pof_fast.PoF(extractor_params(model), torch.optim.SGD, head=model.lm_head, lr=0.1)
    with torch.no_grad():
        model(**tokens(0, rank, 1))
    out["head_unsharded"] = one_line_error(lambda: pof.perturb(torch.randn(4, 32), torch.randint(0, VOCAB, (4,))))
    model.reshard()
    out["after_reshard"] = one_line_error(lambda: pof.perturb(torch.randn(4, 32), torch.randint(0, VOCAB, (4,))))
    return out


def run_small(rank):
    """A head with a bias (FSDP2 shards it like the weight's rows), and an explicit process_group (the union)."""
    from torch import nn

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    head, extractor = nn.Linear(8, 11), nn.Linear(4, 8)
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
    fully_shard(head, mesh=mesh)
    g = torch.Generator().manual_seed(rank)
    h, y = torch.randn(40 + 3 * rank, 8, generator=g), torch.randint(0, 11, (40 + 3 * rank,), generator=g)
    y[::6] = -100
    every_h, every_y = torch.cat(gathered_uneven(h)), torch.cat(gathered_uneven(y))
    want = pof_fast.line_search(every_h.double(), weight.double(), bias.double(), every_y, backend="torch")
    out = {}
    for name, group in (("mesh", None), ("explicit_group", dist.group.WORLD)):
        pof = pof_fast.PoF(extractor.parameters(), torch.optim.SGD, head=head, lr=0.1, gamma=1.0,
                           gamma_sampling="fixed", process_group=group)
        result = pof.perturb(h, y)
        applied = 0.0 if bool(want.capped) else float(want.step)
        out[name] = dict(
            step=(float(result.step), float(want.step)),
            weight_error=float((head.weight.full_tensor().double() - (weight - applied * want.weight_direction)
                                ).abs().max()),
            bias_error=float((head.bias.full_tensor().double() - (bias - applied * want.bias_direction)).abs().max()),
            bias_rows=list(result.bias_direction.shape))
        pof.restore()
    return out


def gathered_uneven(x):
    """Every rank's ``x`` (their first dims may differ)."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]]))
    most = int(max(sizes))
    padded = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])])  # gloo gathers equal sizes only
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[: int(n)] for p, n in zip(parts, sizes)]


def run_checkpoint(rank, out_dir):
    """FSDP2: save after two steps with torch.distributed.checkpoint, take a third, load, take it again."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model, token_rank = build("fsdp", rank)
    pof = pof_fast.PoF(extractor_params(model), torch.optim.AdamW, head=model.lm_head, lr=1e-3, seed=rank)

    def step(k):
        result = pof.perturb(*search_rows(model, tokens(k, token_rank, 1), -100))
        loss = model(**tokens(k, token_rank, 0)).loss
        loss.backward()
        pof.step()
        pof.zero_grad()
        weights = torch.cat([p.detach().to_local().reshape(-1) for p in model.parameters()])
        return [float(result.step), float(pof.last.gamma), float(loss.detach())], weights

    def state():
        return {"model": get_model_state_dict(model), "pof": pof.state_dict()}

    step(0), step(1)
    folder = os.path.join(out_dir, "dcp")
    dcp.save(state(), checkpoint_id=folder)
    first, weights = step(2)
    loaded = state()
    dcp.load(loaded, checkpoint_id=folder)
    set_model_state_dict(model, loaded["model"])
    pof.load_state_dict(loaded["pof"])
    again, weights_again = step(2)
    theta0 = pof.state_dict()["theta0_weight"]
    return dict(first=first, again=again, same_weights=bool(torch.equal(weights, weights_again)),
                theta0_is_dtensor=distributed.is_dtensor(theta0),
                theta0_rows=list(theta0.to_local().shape), head_is_theta0=bool(torch.equal(
                    model.lm_head.weight.to_local(), pof.theta0_weight)))


def main(out_dir, layouts):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for layout in layouts:
        if layout == "refusals":
            result = run_refusals(rank)
        elif layout == "small":
            result = run_small(rank)
        elif layout == "checkpoint":
            result = run_checkpoint(rank, out_dir)
        else:
            result = run_layout(layout, rank)
        with open(os.path.join(out_dir, f"{layout}.rank{rank}.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
