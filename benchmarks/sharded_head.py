"""The search on a class-sharded LM head (PoF on FSDP2 / tensor parallel) against the same search with the head
gathered first, on gloo processes (CPU), and the bytes each moves; plus the same bytes on paper for any sizes.

Each of ``--world`` processes holds ``C / world`` rows of a bf16 head (Qwen2.5-0.5B-shaped by default: C = 151936,
D = 896) as a DTensor ``Shard(0)`` and brings ``--tokens`` search tokens of its own:

    sharded:   what ``PoF.perturb`` does on that head: the tokens' rows gathered (counts, then features and labels
               in one buffer), then the class-sharded search on the local rows (``sharded_classes=(c0, C)``)
    gathered:  ``W = weight.full_tensor()`` (the head gathered), then the union search of the ranks' own tokens
               on the whole head (``process_group=``: the replicated-head recipe; it all-reduces g_W [C, D] fp32)

Timed in alternation (sharded, gathered, ...), the median of each on rank 0 and every round's times written;
peak memory beyond the inputs (``pof_fast.bench.memory``) of one call each. Bytes: what one rank receives, with
ring collectives (an all-gather brings (W-1)/W of the result, an all-reduce 2 (W-1)/W of its buffer).

    flock /tmp/pof-bench.lock python benchmarks/sharded_head.py --repeats 3
    python benchmarks/sharded_head.py --paper --world 8 --classes 128256 --dim 4096 --tokens 4096
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pof_fast  # noqa: E402
from pof_fast import distributed  # noqa: E402
from pof_fast._types import SearchPlan  # noqa: E402
from pof_fast.bench.memory import peak_extra_bytes  # noqa: E402
from pof_fast.drivers import evaluations  # noqa: E402

MiB = 2.0**20


def bytes_received(world: int, classes: int, dim: int, tokens: int, element: int, plan: SearchPlan) -> dict:
    """Bytes one rank receives per search: the rows gathered (sharded) against the head gathered (gathered)."""
    gather, reduce = (world - 1) / world, 2 * (world - 1) / world
    rows = world * tokens  # every rank's tokens
    candidates = evaluations(plan)
    # sharded: counts; rows (features + int64 labels); lse max and sum, ||g||, target terms [2, n]; per candidate
    # the max [n] and three moments [3, n] (fp32)
    sharded_rows = gather * (8 * world + rows * (dim * element + 8))
    sharded_search = reduce * 4 * (2 * rows + 1 + 2 * rows + 4 * candidates * rows)
    # gathered: the head; then the union search: g_W [C, D] (+ count) once, [3] sums per candidate (fp32)
    head = gather * classes * dim * element
    union = reduce * 4 * (classes * dim + 1 + 3 * candidates)
    return {"sharded_rows": sharded_rows, "sharded_search": sharded_search,
            "sharded": sharded_rows + sharded_search, "gathered_head": head, "gathered_search": union,
            "gathered": head + union}


def worker(rank: int, world: int, init: str, cli: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(cli.threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(0)
        full = (torch.randn(cli.classes, cli.dim, generator=g) * cli.dim**-0.5).to(torch.bfloat16)
        weight = distribute_tensor(full, mesh, [Shard(0)])
        del full
        layout = distributed.head_layout(weight, None, tensor_parallel=False)
        local = weight.to_local()
        g = torch.Generator().manual_seed(1 + rank)
        h = torch.randn(cli.tokens, cli.dim, generator=g).to(torch.bfloat16)
        y = torch.randint(0, cli.classes, (cli.tokens,), generator=g)
        group = dist.group.WORLD
        kwargs = dict(method=cli.method, validate=False)

        def sharded():
            rows, labels = distributed.gather_rows(h, y, group, -100)
            return pof_fast.line_search(rows, local, None, labels, process_group=layout.class_group,
                                        sharded_classes=(layout.first, layout.classes), **kwargs).step

        def gathered():
            return pof_fast.line_search(h, weight.full_tensor(), None, y, process_group=group, **kwargs).step

        variants = {"sharded": sharded, "gathered": gathered}
        steps = {name: float(fn()) for name, fn in variants.items()}  # warm-up, and t* of each
        times = {name: [] for name in variants}
        for _ in range(cli.repeats):
            for name, fn in variants.items():
                dist.barrier()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        memory = {name: peak_extra_bytes(fn, "cpu") for name, fn in variants.items()}
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"times": times, "memory": memory, "steps": steps}, f)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--classes", type=int, default=151936)
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--tokens", type=int, default=1024, help="search tokens per rank")
    parser.add_argument("--method", default="newton", choices=("newton", "bracket_grid", "grid"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--paper", action="store_true", help="print the bytes only (no processes)")
    parser.add_argument("--json", help="write the results here")
    cli = parser.parse_args(argv)
    plan = SearchPlan(method=cli.method)
    moved = bytes_received(cli.world, cli.classes, cli.dim, cli.tokens, 2, plan)
    result = {"args": vars(cli), "bytes_received_per_rank": moved}
    print(f"C={cli.classes} D={cli.dim} bf16, {cli.world} ranks x {cli.tokens} tokens, {cli.method}: bytes one rank "
          f"receives per search: sharded {moved['sharded'] / MiB:.1f} MiB (rows {moved['sharded_rows'] / MiB:.1f}, "
          f"search {moved['sharded_search'] / MiB:.1f}); head gathered {moved['gathered'] / MiB:.1f} MiB (head "
          f"{moved['gathered_head'] / MiB:.1f}, union search {moved['gathered_search'] / MiB:.1f})")
    if not cli.paper:
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "rank0.json")
            mp.spawn(worker, args=(cli.world, os.path.join(folder, "init"), cli, out), nprocs=cli.world, join=True)
            with open(out) as f:
                measured = json.load(f)
        result.update(measured)
        for name, times in measured["times"].items():
            print(f"{name:9s} median {statistics.median(times):.3f} s  (runs {', '.join(f'{t:.3f}' for t in times)})"
                  f"  peak extra memory {measured['memory'][name] / MiB:.0f} MiB  t* {measured['steps'][name]:.6f}")
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
