"""What PoF costs in a Transformers Trainer step of a causal LM: with PoF against without, and the split.

Model: a random Llama built from its config (default 4 layers, hidden 512, vocabulary 32000, sequences of 256
tokens; nothing downloaded), untied head, AdamW. Both runs take the same training batches (per-device batch
``--batch``); the PoF run adds ``PoFCallback`` with a search batch of the same size:

    plain:          Trainer step with AdamW (forward + backward + step)
    pof:            Trainer step with PoF: the callback's search forward and search, then the same step
    search forward: the decoder on the search batch without gradients (the callback's forward), timed alone
    search:         PoF.perturb on those hidden states (B x T tokens against the whole vocabulary), timed alone

Trainer steps are timed between ``on_step_begin`` and ``on_step_end`` (median over the steps after
``--warmup``); the two parts with ``pof_fast.bench.timing.time_call``.

    python benchmarks/lm_step.py --threads 2 --json lm_step_cpu.json
    python benchmarks/lm_step.py --device cuda --vocab 128256 --bf16      # on a GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

# Appended, not prepended: the repository's kernels/ folder must not shadow the `kernels` package Transformers imports.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pof_fast  # noqa: E402
from pof_fast.bench.environment import write_json  # noqa: E402
from pof_fast.bench.timing import synchronize, time_call  # noqa: E402


def build(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pof_fast.integrations.transformers import untie_lm_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.seq,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).to(args.device)
    return model, untie_lm_head(model)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, rows, seq, vocab):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (rows, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_steps(model, optimizer, args, callbacks):
    """Seconds of every Trainer step (on_step_begin of the first callback to on_step_end)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    device = args.device

    class Clock(TrainerCallback):
        def __init__(self):
            self.start, self.steps = None, []

        def on_step_begin(self, *a, **k):
            synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            synchronize(device)
            self.steps.append(time.perf_counter() - self.start)

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
                                  report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=device == "cpu",
                                  bf16=args.bf16, logging_steps=10**6, dataloader_num_workers=0)
        Trainer(model=model, args=targs, train_dataset=Tokens(args.batch * (args.warmup + args.steps), args.seq,
                                                              args.vocab),
                optimizers=(optimizer, None), callbacks=[clock, *callbacks]).train()
    return clock.steps[args.warmup:]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--method", default="newton", help="PoF's search method (its default: newton)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pof_fast.integrations.transformers import PoFCallback, _mixed_precision, _search_rows

    model, head = build(args)
    params = [p for p in model.parameters() if p is not head.weight]
    plain = trainer_steps(model, torch.optim.AdamW(params, lr=1e-5), args, [])
    model, head = build(args)
    pof = pof_fast.PoF([p for p in model.parameters() if p is not head.weight], torch.optim.AdamW, head=head,
                       lr=1e-5, seed=0, method=args.method)
    with_pof = trainer_steps(model, pof, args, [PoFCallback(seed=0)])
    ids = Tokens(args.batch, args.seq, args.vocab).ids.to(args.device)
    batch = {"input_ids": ids, "labels": ids}
    model.train()

    def forward():
        with _mixed_precision():
            return _search_rows(model, batch, -100)

    features, target = forward()
    parts = {"search forward": time_call(forward, args.device, 5.0).median,
             "search": time_call(lambda: pof.perturb(features, target), args.device, 5.0).median}
    pof.restore()
    rows = {"plain step": statistics.median(plain), "pof step": statistics.median(with_pof), **parts}
    tokens = args.batch * args.seq
    print(f"model: random Llama, {args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}, {args.seq} "
          f"tokens x batch {args.batch} ({tokens} tokens per training and per search batch), "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.device}, threads {torch.get_num_threads()}, PoF method "
          f"{args.method}")
    for name, seconds in rows.items():
        print(f"{name:<16}{seconds * 1e3:>10.1f} ms{seconds / rows['plain step']:>8.2f}x plain")
    print(f"PoF step - plain step = {(rows['pof step'] - rows['plain step']) * 1e3:.1f} ms; "
          f"search forward + search = {(parts['search forward'] + parts['search']) * 1e3:.1f} ms")
    return write_json(args.json, args.device, args=vars(args), seconds=rows, plain_steps=plain, pof_steps=with_pof)


if __name__ == "__main__":
    main()
