"""PoF on a causal LM whose head is sharded: FSDP2 (``fully_shard``) or tensor parallel (``ColwiseParallel``).

    torchrun --nproc_per_node 2 examples/fsdp2_pof.py          # FSDP2: every rank holds half the head's rows
    torchrun --nproc_per_node 2 examples/fsdp2_pof.py --tp     # the head ColwiseParallel, the decoder replicated
    torchrun --nproc_per_node 4 examples/fsdp2_pof.py --tp     # 2 x 2: FSDP2 over "dp", the head TP over "tp"

A tiny random Llama (nothing downloaded; its random head stands in for a trained theta0) is sharded, and PoF
post-trains its decoder for a few steps on random tokens. PoF reads the head's layout from its DTensor weight:
each rank keeps theta0 as its own rows, the search batches' hidden states are gathered over the ranks that bring
their own tokens (never the head), the class-sharded search runs on the local rows, and the perturbation is
written into them, so FSDP2's next all-gather hands the training forward the perturbed head. Rank 0 prints t* per
step. Runs on the CPU with gloo (``--device cpu``, the default) or on GPUs with NCCL (``--device cuda``).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from transformers import AutoModelForCausalLM, LlamaConfig

import pof_fast
from pof_fast.integrations.transformers import check_lm_head, search_rows


def tiny_llama(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)  # PoF needs the head's own weights (untie_lm_head otherwise)
    return AutoModelForCausalLM.from_config(config)


def shard(model: torch.nn.Module, tp: bool, device: str) -> int:
    """Shards ``model`` in place; returns the index of the token set this rank draws (shared by TP ranks)."""
    world = dist.get_world_size()
    if tp:
        if world % 2:
            raise SystemExit("--tp needs an even number of processes (a tensor-parallel dim of 2)")
        mesh = init_device_mesh(device, (world // 2, 2), mesh_dim_names=("dp", "tp"))
        # The head vocab-parallel (each TP rank its rows); full logits for the model's own loss.
        parallelize_module(model.lm_head, mesh["tp"], ColwiseParallel(output_layouts=Replicate()))
        if world == 2:  # no data-parallel dim: the decoder stays replicated, both ranks the same tokens
            return 0
        dp_mesh, token_set = mesh["dp"], mesh.get_coordinate()[0]
    else:
        dp_mesh, token_set = init_device_mesh(device, (world,)), dist.get_rank()
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)  # the root: embeddings, final norm and (without --tp) the head's rows
    return token_set


def batch(vocab: int, rows: int, length: int, seed: int, device: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt the loss skips
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()}


def main(argv: Optional[list] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", action="store_true", help="the head ColwiseParallel (and FSDP2 over dp with 4 ranks)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank, search and training each")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    cli = parser.parse_args(argv)
    if cli.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cli.device == "cuda" else "gloo")
    try:
        model = tiny_llama(cli.vocab).to(cli.device)
        token_set = shard(model, cli.tp, cli.device)
        head = check_lm_head(model)  # the FSDP2 / TP head passes: a Linear, not tied
        extractor = [p for name, p in model.named_parameters() if not name.startswith("lm_head.")]
        pof = pof_fast.PoF(extractor, torch.optim.AdamW, head=head, lr=cli.lr, seed=0)
        steps = []
        for step in range(cli.steps):
            search = batch(cli.vocab, cli.batch_size, cli.length, 2 * (1000 * step + token_set) + 1, cli.device)
            features, target = search_rows(model, search)  # the decoder under FSDP2's hooks, no head logits
            result = pof.perturb(features, target)  # every rank: the same t*, its own rows perturbed
            loss = model(**batch(cli.vocab, cli.batch_size, cli.length, 2 * (1000 * step + token_set),
                                 cli.device)).loss
            loss.backward()
            pof.step()  # the decoder's step; the head's rows back to theta0 exactly
            pof.zero_grad()
            steps.append(float(result.step))
            if dist.get_rank() == 0:
                print(f"step {step}: t* = {steps[-1]:.4f}  gamma = {float(pof.last.gamma):.3f}  "
                      f"l(0) = {float(result.loss0):.4f}  l(t*) = {float(result.loss):.4f}  "
                      f"training loss = {float(loss.detach()):.4f}", flush=True)
        return {"steps": steps, **pof.summary()}
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
