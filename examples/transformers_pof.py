"""PoF post-training of a causal LM in a Transformers Trainer, against plain fine-tuning from the same weights.

    python examples/transformers_pof.py                      # a small random Llama, pretrained here on synthetic tokens
    python examples/transformers_pof.py --model PATH         # a local checkpoint (from_pretrained, nothing downloaded)
    python examples/transformers_pof.py --lora               # PoF over LoRA adapters (needs peft)
    torchrun --nproc_per_node 2 examples/transformers_pof.py # DDP: every rank searches the union of the search batches
    python examples/transformers_pof.py --search-data previous # search the last training batch (docs/search-data.md)

The data are synthetic token sequences from a fixed random bigram chain (each token has a few likely successors),
so there is something to learn and nothing to download; the first tokens of every sequence act as a prompt the
loss skips (labels -100). Without ``--model`` a random Llama (tied embeddings, as most small LMs) is first trained
with AdamW so that its head is a trained theta0. Then two runs start from those weights: plain fine-tuning (AdamW)
and PoF (AdamW on the decoder, the LM head fixed and perturbed by ``PoFCallback``). The evaluation loss and
perplexity are printed before and after each.
"""
from __future__ import annotations

import argparse
import copy
import math
from typing import Optional

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import pof_fast
from pof_fast.integrations.transformers import PoFCallback, untie_lm_head

PROMPT = 4  # leading tokens of every sequence that the loss skips


class BigramTokens(Dataset):
    """``rows`` sequences of ``length`` tokens drawn from a random bigram chain over ``vocab`` tokens (seeded)."""

    def __init__(self, vocab: int, rows: int, length: int, seed: int, chain_seed: int = 0) -> None:
        chain = torch.Generator().manual_seed(chain_seed)
        successors = torch.randint(0, vocab, (vocab, 4), generator=chain)  # 4 likely next tokens per token
        weights = torch.softmax(2 * torch.randn(vocab, 4, generator=chain), dim=1)
        g = torch.Generator().manual_seed(seed)
        tokens = torch.empty(rows, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (rows,), generator=g)
        for t in range(1, length):
            pick = torch.multinomial(weights[tokens[:, t - 1]], 1, generator=g).squeeze(1)
            tokens[:, t] = successors[tokens[:, t - 1], pick]
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i]}


def collate(examples: list) -> dict:
    ids = torch.stack([e["input_ids"] for e in examples])
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def random_llama(vocab: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config)


def trainer_args(out: str, steps: int, lr: float, cli: argparse.Namespace) -> TrainingArguments:
    return TrainingArguments(out, max_steps=steps, learning_rate=lr, per_device_train_batch_size=cli.batch_size,
                             per_device_eval_batch_size=cli.batch_size, lr_scheduler_type="constant",
                             logging_steps=max(1, steps // 5), report_to=[], save_strategy="no", seed=cli.seed,
                             bf16=cli.bf16, use_cpu=cli.device == "cpu", disable_tqdm=not cli.progress)


def evaluate(model: torch.nn.Module, data: Dataset, cli: argparse.Namespace) -> dict:
    loss = Trainer(model=model, args=trainer_args(cli.out + "/eval", 1, 1e-3, cli), eval_dataset=data,
                   data_collator=collate).evaluate()["eval_loss"]
    return {"loss": loss, "perplexity": math.exp(loss)}


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def post_train(model: torch.nn.Module, data: Dataset, cli: argparse.Namespace, use_pof: bool) -> Optional[dict]:
    """Fine-tune ``model`` for ``cli.steps`` steps, with PoF or plain AdamW; PoF's summary when PoF ran."""
    params = [p for p in model.parameters() if p.requires_grad and p is not model.get_output_embeddings().weight]
    args = trainer_args(cli.out + ("/pof" if use_pof else "/plain"), cli.steps, cli.lr, cli)
    if not use_pof:
        optimizer = torch.optim.AdamW(params, lr=cli.lr)
        Trainer(model=model, args=args, train_dataset=data, data_collator=collate, optimizers=(optimizer, None)).train()
        return None
    pof = pof_fast.PoF(params, torch.optim.AdamW, head=model.get_output_embeddings(), lr=cli.lr, gamma=cli.gamma,
                       seed=cli.seed)
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate, optimizers=(pof, None),
            callbacks=[PoFCallback("previous" if cli.search_data == "previous" else None,
                                   batch_size=cli.search_batch_size, seed=cli.seed)]).train()
    return pof.summary()


def main(argv: Optional[list] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local causal-LM checkpoint folder (default: a random Llama, trained here)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="AdamW steps on the random Llama first")
    parser.add_argument("--steps", type=int, default=100, help="post-training steps of each run")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--gamma", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--search-batch-size", type=int, default=32, help="rows of a fresh search batch")
    parser.add_argument("--search-data", choices=["fresh", "previous"], default="fresh",
                        help="previous: search the last training batch's rows (no search forward)")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--lora", action="store_true", help="post-train LoRA adapters (q_proj, v_proj) instead")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--device", choices=["cpu", "auto"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/transformers_pof")
    parser.add_argument("--progress", action="store_true", help="Trainer's progress bars")
    cli = parser.parse_args(argv)

    if cli.model:
        model = AutoModelForCausalLM.from_pretrained(cli.model, local_files_only=True)
    else:
        model = random_llama(vocab=512, seed=cli.seed)
    vocab = model.config.get_text_config().vocab_size
    train = BigramTokens(vocab, rows=2048, length=cli.length, seed=1)
    held_out = BigramTokens(vocab, rows=256, length=cli.length, seed=2)
    untie_lm_head(model)  # the head gets its own weights: PoF keeps it fixed, the embeddings train
    if not cli.model and cli.pretrain_steps:
        Trainer(model=model, args=trainer_args(cli.out + "/pretrain", cli.pretrain_steps, 3e-3, cli),
                train_dataset=train, data_collator=collate).train()
    results = {"before": evaluate(model, held_out, cli)}
    for name in ("plain", "pof"):
        run = copy.deepcopy(model)
        if cli.lora:
            run = with_lora(run)
        summary = post_train(run, train, cli, use_pof=name == "pof")
        results[name] = evaluate(run, held_out, cli)
        if summary is not None:
            results["pof_summary"] = summary
    print(f"{'model':<28}{'eval loss':>10}{'perplexity':>12}")
    labels = {"before": "before post-training", "plain": f"plain AdamW, {cli.steps} steps",
              "pof": f"PoF (gamma {cli.gamma}), {cli.steps} steps"}
    for name, label in labels.items():
        print(f"{label:<28}{results[name]['loss']:>10.4f}{results[name]['perplexity']:>12.3f}")
    s = results["pof_summary"]
    print(f"PoF: {s['perturbations']} perturbations in {s['steps']} steps, mean t* {s['step']:.4g}, "
          f"mean ||gamma t* u|| {s['perturbation_norm']:.4g}, capped {s['capped_rate']:.0%}")
    return results


if __name__ == "__main__":
    main()
