"""Tests on torch.distributed: ``spawn`` runs a worker on WORLD gloo ranks and returns each rank's result."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def spawn(worker, *args):
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_entry, args=(worker, os.path.join(tmp, "init"), results, args), nprocs=WORLD, join=True)
        return dict(results)


def _entry(rank, worker, init_file, results, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results[rank] = worker(rank, *args)
    finally:
        dist.destroy_process_group()


def gathered_equal(tensor):
    """Whether ``tensor`` is bitwise the same on every rank."""
    parts = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(parts, tensor.contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])
