"""One rank of tests/test_transformers_ddp.py: a Trainer with PoFCallback under torchrun (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf_ddp_worker.py OUT_DIR [previous]

Each rank builds PoF without a process group and with its own random gamma seed, trains a few steps on its share
of the data, and writes OUT_DIR/rank{r}.json: t*, gamma and ||g|| of every step, its search batches' token sums,
whether PoF got a process group, and a float64 checksum of the feature extractor and of the head. With
``previous``: PoFCallback(search_data="previous"), and OUT_DIR/rank{r}.pt holds the rows it recorded at every step.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import repo_path  # noqa: E402,F401  (first: pof_fast imported, then the repository root off sys.path)
from lm import Examples, collate, extractor_params, tiny_lm  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import pof_fast  # noqa: E402
from pof_fast.integrations.transformers import PoFCallback, untie_lm_head  # noqa: E402

STEPS = 3


class Record(TrainerCallback):
    def __init__(self, pof):
        self.pof, self.rows = pof, []

    def on_step_end(self, args, state, control, **kwargs):
        last = self.pof.last
        self.rows.append([float(last.step), float(last.gamma), float(last.grad_norm)])


def main(out: str, search_data=None) -> None:
    torch.set_num_threads(1)
    model = tiny_lm(tied=True, seed=0)
    pof = pof_fast.PoF(extractor_params(model), torch.optim.AdamW, head=untie_lm_head(model), lr=1e-3, seed=None)
    record = Record(pof)
    sums = []
    perturb = pof.perturb
    pof.perturb = lambda *batch: sums.append(int((batch or pof.recorded)[1].clamp_min(0).sum())) or perturb(*batch)
    recorded = []
    keep = pof.record
    pof.record = lambda features, target: recorded.append((features.detach().clone(), target.clone())) or keep(
        features, target)
    args = TrainingArguments(os.path.join(out, "run"), per_device_train_batch_size=4, max_steps=STEPS, report_to=[],
                             use_cpu=True, ddp_backend="gloo", save_strategy="no", disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=Examples(), data_collator=collate, optimizers=(pof, None),
            callbacks=[PoFCallback(search_data), record]).train()
    rank = dist.get_rank()
    result = {
        "world": dist.get_world_size(), "searches": record.rows, "search_label_sums": sums,
        "process_group": pof.process_group is not None,
        "extractor": sum(float(p.detach().double().sum()) for p in extractor_params(model)),
        "head_is_theta0": torch.equal(model.get_output_embeddings().weight, pof.theta0_weight),
    }
    if search_data == "previous":
        torch.save({"recorded": recorded, "theta0": pof.theta0_weight}, os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()  # before exit: a gloo group left to the interpreter's teardown can abort the process


if __name__ == "__main__":
    main(*sys.argv[1:3])
