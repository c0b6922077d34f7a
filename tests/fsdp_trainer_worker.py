"""One rank of tests/test_fsdp_trainer.py: a Transformers Trainer with FSDP2 (fsdp_version 2) and PoFCallback (CUDA).

    python -m torch.distributed.run --standalone --nproc_per_node N tests/fsdp_trainer_worker.py OUT_DIR

PoF is built by Trainer after Accelerate has sharded the model (``optimizer_cls_and_kwargs``), so its head is the
DTensor ``lm_head``. Writes OUT_DIR/rank{r}.json: t* and gamma of every step, whether every training forward saw
a perturbed head (gathered by FSDP2 from the rows PoF wrote) and whether the head's rows are theta0 at the end.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import repo_path  # noqa: E402,F401  (first: pof_fast imported, then the repository root off sys.path)
from lm import Examples, collate, tiny_lm  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import pof_fast  # noqa: E402
from pof_fast.distributed import is_dtensor  # noqa: E402
from pof_fast.integrations.transformers import PoFCallback, find_pof  # noqa: E402

STEPS = 3


class Record(TrainerCallback):
    def __init__(self, model):
        self.rows, self.perturbed_forwards, self.pof = [], [], None
        model.lm_head.register_forward_hook(self._forward)

    def _forward(self, module, args, output):
        if self.pof is not None and torch.is_grad_enabled():  # a training forward: the head FSDP2 gathered
            weight = module.weight.full_tensor() if is_dtensor(module.weight) else module.weight
            rows = self.pof._head.layout
            local = weight[rows.first: rows.first + rows.rows] if rows is not None else weight
            self.perturbed_forwards.append(not torch.equal(local, self.pof.theta0_weight))

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.pof = find_pof(optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        self.rows.append([float(self.pof.last.step), float(self.pof.last.gamma)])


def main(out: str) -> None:
    model = tiny_lm(tied=False, seed=0)
    model.lm_head.requires_grad_(False)
    record = Record(model)
    args = TrainingArguments(os.path.join(out, "run"), per_device_train_batch_size=4, max_steps=STEPS, report_to=[],
                             save_strategy="no", disable_tqdm=True, seed=0, fsdp="full_shard auto_wrap",
                             fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    kwargs = dict(base_optimizer=torch.optim.AdamW, head=model.lm_head, lr=1e-3, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Examples(), data_collator=collate,
                      optimizer_cls_and_kwargs=(pof_fast.PoF, kwargs), callbacks=[PoFCallback(), record])
    trainer.train()
    pof = find_pof(trainer.optimizer)
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = {"searches": record.rows, "sharded": pof._head.layout is not None,
              "perturbed_forwards": record.perturbed_forwards,
              "head_is_theta0": bool(torch.equal(model.lm_head.weight.to_local(), pof.theta0_weight))}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
