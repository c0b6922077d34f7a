"""One rank of tests/test_sharded_heads.py: PoF on an LM head sharded by FSDP2 and/or tensor parallelism (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node N tests/sharded_worker.py OUT_DIR LAYOUT...

LAYOUT: ``fsdp`` (1-D mesh, FSDP2 on every decoder layer and the model), ``tp`` (``ColwiseParallel`` head, the same
tokens on every rank), ``fsdp_tp`` (2 x 2: FSDP2 over ``dp``, the head ``ColwiseParallel`` over ``tp``), ``hsdp``
(2 x 2: replicate x shard), ``refusals`` (the refused cases' one-line errors), ``checkpoint`` (FSDP2 and
torch.distributed.checkpoint). Each writes OUT_DIR/LAYOUT.rank{r}.json. The oracle is the single-process float64
search on every rank's rows gathered and the head gathered (``full_tensor()``, here only).
"""
import json
import os
import sys

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
from pof_fast import distributed  # noqa: E402
from pof_fast._types import SearchPlan  # noqa: E402
from pof_fast.integrations.transformers import _search_rows, check_lm_head  # noqa: E402

STEPS = 3
BATCH, LENGTH = 4, 16


def build(layout, rank):
    """(model, token_rank): the sharded tiny Llama, and the index that picks this rank's tokens."""
    model = tiny_lm(tied=False, seed=0)  # the same weights on every rank
    if layout == "tp":
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
    model, token_rank = build(layout, rank)
    head = check_lm_head(model)  # FSDP2 / TP: accepted, not "tied"
    pof = pof_fast.PoF(extractor_params(model), torch.optim.AdamW, head=head, lr=1e-3, seed=rank)  # rank 0's wins
    theta0 = full(head.weight).detach().clone()
    logit_calls = []
    head.register_forward_hook(lambda *_: logit_calls.append(1))
    captured = {}
    head.register_forward_pre_hook(lambda m, args: captured.update(h=args[0]))
    out = dict(steps=[], collectives=[])
    for step in range(STEPS):
        features, target = _search_rows(model, tokens(step, token_rank, 1), -100)
        searched_without_logits = not logit_calls
        every = [torch.cat(gathered(features.reshape(-1, features.shape[-1]))),
                 torch.cat(gathered(target.reshape(-1).contiguous()))]
        counter = count_collectives()
        result = pof.perturb(features, target)
        calls = counter.stop()
        want = pof_fast.line_search(every[0].double(), theta0.double(), None, every[1], backend="torch")
        perturbed = full(head.weight).detach()
        applied = torch.where(want.capped, 0.0, want.step)  # on_capped="skip"
        expected = theta0.double() - pof.last.gamma * applied * want.weight_direction
        # the training loss through the perturbed head (FSDP2's forward gathers it) against the loss by hand
        batch = tokens(step, token_rank, 0)
        loss = model(**batch).loss
        hand = F.cross_entropy((full(captured["h"]).double() @ expected.t())[:, :-1].reshape(-1, VOCAB),
                               batch["labels"][:, 1:].reshape(-1))
        loss.backward()
        pof.step()
        pof.zero_grad()
        out["steps"].append(dict(
            same_on_ranks=bool(same_on_ranks(result.step) and same_on_ranks(pof.last.gamma)),
            step=(float(result.step), float(want.step)),
            head_error=float((perturbed.double() - expected).abs().max()),
            perturbation=float((perturbed.double() - theta0.double()).abs().max()),
            loss=(float(loss.detach()), float(hand)),
            capped=(bool(result.capped), bool(want.capped)),
            restored=bool(torch.equal(full(head.weight), theta0)),
            no_logits=searched_without_logits,
            same_features=bool(same_on_ranks(features)),
            losses=(float(result.loss0), float(result.loss), float(want.loss0), float(want.loss), float(result.grad_norm), float(want.grad_norm)),
        ))
        logit_calls.clear()
        out["collectives"].append((calls, distributed.collectives(SearchPlan(), layout=pof._head.layout)))
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


def main(out_dir, layouts):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for layout in layouts:
        result = run_layout(layout, rank)
        with open(os.path.join(out_dir, f"{layout}.rank{rank}.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
