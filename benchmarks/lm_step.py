"""What PoF costs in a Transformers Trainer step of a causal LM: with PoF against without, and the split.

Model: a random Llama built from its config (default 4 layers, hidden 512, vocabulary 32000, sequences of 256
tokens; nothing downloaded), untied head, AdamW. Both runs take the same training batches (per-device batch
``--batch``); the PoF run adds ``PoFCallback`` with a search batch of the same size:

    plain:          Trainer step with AdamW (forward + backward + step)
    pof M fresh:    Trainer step with PoF (method M): the callback's search forward and search, then the same step
    pof M previous: the same with PoFCallback(search_data="previous"): the search on the last training batch's
                    recorded rows, no search forward
    search forward: the decoder on the search batch without gradients (the callback's forward), timed alone
    search:         PoF.perturb on those hidden states (B x T tokens against the whole vocabulary), timed alone

Trainer steps are timed between ``on_step_begin`` and ``on_step_end`` (median over the steps after
``--warmup``; "x plain" is the median over rounds of each run's median against that round's plain run); the two
parts with ``pof_fast.bench.timing.time_call``.

    python benchmarks/lm_step.py --threads 2 --json lm_step_cpu.json
    python benchmarks/lm_step.py --threads 2 --method newton,bracket_grid --search fresh,previous --rounds 2
    python benchmarks/lm_step.py --threads 2 --method newton,bracket_grid --split --rounds 5   # parts, alternated
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


def variants(args):
    """``(name, method, search)`` of every timed run: the plain step, then PoF for each method and search mode."""
    return [("plain", None, None)] + [(f"pof {method} {search}", method, search)
                                      for method in args.method.split(",") for search in args.search.split(",")]


def timed_run(args, method, search):
    """Seconds of the Trainer steps after the warm-up: plain AdamW (method None) or PoF with PoFCallback."""
    from pof_fast.integrations.transformers import PoFCallback

    model, head = build(args)
    params = [p for p in model.parameters() if p is not head.weight]
    if method is None:
        return trainer_steps(model, torch.optim.AdamW(params, lr=1e-5), args, []), model, None
    pof = pof_fast.PoF(params, torch.optim.AdamW, head=head, lr=1e-5, seed=0, method=method)
    callback = PoFCallback(search_data="previous" if search == "previous" else None, seed=0)
    return trainer_steps(model, pof, args, [callback]), model, pof


def once(fn, device) -> float:
    """Seconds of one call of ``fn``."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def split(args) -> dict:
    """``--split``: the parts of a step timed round after round in one process (robust to a loaded machine's drift):
    a plain training step (forward, backward, AdamW step; no Trainer), the search forward and each method's search.
    Per round, PoF's step over the plain one is estimated as 1 + (search forward + search) / plain with the fresh
    search and 1 + search / plain with the previous batch's (no search forward); medians and ranges over rounds."""
    from pof_fast.integrations.transformers import search_rows

    model, head = build(args)
    params = [p for p in model.parameters() if p is not head.weight]
    adamw = torch.optim.AdamW(params, lr=1e-5)
    pof = pof_fast.PoF(params, torch.optim.SGD, head=head, lr=0.0, seed=0)
    ids = Tokens(args.batch, args.seq, args.vocab).ids.to(args.device)
    batch = {"input_ids": ids, "labels": ids}
    model.train()

    def plain():
        adamw.zero_grad()
        model(**batch).loss.backward()
        adamw.step()

    features, target = search_rows(model, batch, -100)

    def search(method):
        pof.search_kwargs["method"] = method
        pof.perturb(features, target)
        pof.restore()

    calls = {"plain": plain, "search forward": lambda: search_rows(model, batch, -100),
             **{f"search {m}": (lambda m=m: search(m)) for m in args.method.split(",")}}
    for fn in calls.values():  # warm-up
        fn()
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: once(fn, args.device) for name, fn in calls.items()})
    estimates = {}
    for m in args.method.split(","):
        for search_mode, forward in (("fresh", 1), ("previous", 0)):
            ratios = [1 + (forward * r["search forward"] + r[f"search {m}"]) / r["plain"] for r in rounds]
            estimates[f"pof {m} {search_mode}"] = ratios
    print(f"model: random Llama, {args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}, {args.seq} "
          f"tokens x batch {args.batch}, fp32, {args.device}, threads {torch.get_num_threads()}, {args.rounds} rounds")
    for name in calls:
        values = [r[name] for r in rounds]
        low, high = min(values) * 1e3, max(values) * 1e3
        print(f"{name:<26}{statistics.median(values) * 1e3:>10.1f} ms ({low:.0f}-{high:.0f})")
    for name, ratios in estimates.items():
        print(f"{name:<26} x plain {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
    return write_json(args.json, args.device, args=vars(args), rounds=rounds, estimates=estimates)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of every run (>= 1: the previous-batch "
                                                             "search draws a fresh batch at the first)")
    parser.add_argument("--method", default="newton", help="PoF's search method(s), comma-separated (default newton)")
    parser.add_argument("--search", default="fresh", help="search batch(es), comma-separated: fresh (PoFCallback's "
                                                          "default), previous (search_data='previous')")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of all variants, alternated (A, B, A, B, ...)")
    parser.add_argument("--split", action="store_true", help="time the parts alone, alternated in rounds (see split)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not set(args.search.split(",")) <= {"fresh", "previous"} or args.warmup < 1:
        parser.error("--search takes fresh and/or previous; --warmup must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.split:
        return split(args)
    from pof_fast.integrations.transformers import _mixed_precision, search_rows

    steps = {name: [] for name, _, _ in variants(args)}
    ratios = {name: [] for name in steps}
    for _ in range(args.rounds):
        plain = None
        for name, method, search in variants(args):
            model = pof = None  # the last run's model freed before the next is built
            seconds, model, pof = timed_run(args, method, search)
            steps[name] += seconds
            plain = statistics.median(seconds) if method is None else plain
            ratios[name].append(statistics.median(seconds) / plain)
    ids = Tokens(args.batch, args.seq, args.vocab).ids.to(args.device)
    batch = {"input_ids": ids, "labels": ids}
    model.train()

    def forward():
        with _mixed_precision():
            return search_rows(model, batch, -100)

    features, target = forward()
    parts = {"search forward": time_call(forward, args.device, 5.0).median}
    for method in args.method.split(","):
        pof.search_kwargs["method"] = method
        parts[f"search {method}"] = time_call(lambda: pof.perturb(features, target), args.device, 5.0).median
    pof.restore()
    rows = {name: statistics.median(values) for name, values in steps.items()}
    tokens = args.batch * args.seq
    print(f"model: random Llama, {args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}, {args.seq} "
          f"tokens x batch {args.batch} ({tokens} tokens per training and per search batch), "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.device}, threads {torch.get_num_threads()}, "
          f"{args.rounds} round(s) of {args.steps} steps per variant, alternated")
    for name, seconds in rows.items():
        spread = f"{min(ratios[name]):.2f}-{max(ratios[name]):.2f}" if len(ratios[name]) > 1 else ""
        print(f"{name:<26}{seconds * 1e3:>10.1f} ms  x plain {statistics.median(ratios[name]):.2f} {spread}")
    for name, seconds in parts.items():
        print(f"{name:<26}{seconds * 1e3:>10.1f} ms  (alone)")
    return write_json(args.json, args.device, args=vars(args), seconds=rows, steps=steps, ratios=ratios, parts=parts)


if __name__ == "__main__":
    main()
