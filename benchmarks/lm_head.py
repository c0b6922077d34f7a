"""A PoF search on a language-model head against one training step of that head, and the search's peak memory.

The head is Qwen2.5-0.5B-shaped by default (C = 151936 classes, D = 896, no bias, bf16) over n = 1024 tokens:
large enough for the 16-bit storage path (n (D + C) >= D C), where z0, R and d are stored in bf16.

    search:   pof_fast.line_search(h, W, None, y, method, backend, validate=False): z0 = h W^T, g_W = R^T h,
              d = h u^T and the scoring of every candidate
    fwd+bwd:  F.cross_entropy(F.linear(h, W), y).backward() with h and W requiring gradients: the three products
              of a head that trains (z = h W^T, dW = G^T h, dh = G W), in the same dtype

The calls are timed in alternation, round after round (the median of each, and the median of each round's ratio
to the fwd+bwd of the same round). Peak memory beyond the inputs (``pof_fast.bench.memory``: the CPU allocator's running sum under the profiler, or
CUDA's peak) is printed in units of one 16-bit [n, C] array; the search's returned direction (fp32 [C, D]) is
counted separately. Targets (issue 18): the search <= 1.2x the fwd+bwd; at most two 16-bit [n, C] arrays (and
16 MiB of chunks and workspace).

    python benchmarks/lm_head.py --threads 2 --json lm_head_cpu.json
    python benchmarks/lm_head.py --device cuda --tokens 4096
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# Appended: an installed pof_fast (with its compiled extension) wins over the checkout's sources, which have no
# pof_fast._C unless built in place (the search would run on the `torch` backend, 30x slower here).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pof_fast  # noqa: E402
from pof_fast.bench.environment import write_json  # noqa: E402
from pof_fast.bench.memory import peak_extra_bytes  # noqa: E402
from pof_fast.bench.timing import interleaved  # noqa: E402

TIME_TARGET = 1.2  # search / fwd+bwd
ARRAY_TARGET = 2  # 16-bit [n, C] arrays beyond the inputs and the returned direction
WORKSPACE_MIB = 16  # and at most this: the 8 MiB 16-bit chunk of g_W or u_W in flight, the products' workspace


def head_problem(tokens: int, dim: int, classes: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Features ~ N(0, 1), a head ~ N(0, 1/D) scaled so that the logits spread like a trained LM's, labels."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, dim, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(classes, dim, generator=g) * (4.0 / dim**0.5)).to(device=device, dtype=dtype)
    y = torch.randint(0, classes, (tokens,), generator=g).to(device)
    y[::7] = -100  # prompt/padding tokens
    return h, w, y


def summary(times: list) -> dict:
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"seconds": statistics.median(times), "p20": pick(0.2), "p80": pick(0.8), "repeats": len(times)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--classes", type=int, default=151936)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--methods", default="bracket_grid,newton")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds (each: every call once)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    h, w, y = head_problem(args.tokens, args.dim, args.classes, dtype, args.device)
    array = args.tokens * args.classes * 2  # bytes of one 16-bit [n, C] array
    direction = args.classes * args.dim * 4  # the returned fp32 u_W

    def train_step():
        hg, wg = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        F.cross_entropy(F.linear(hg, wg), y).backward()
        return hg.grad, wg.grad

    searches = {}
    for method in args.methods.split(","):
        kind = "raw" if method == "bracket_grid" else "normalized"
        searches[method] = functools.partial(pof_fast.line_search, h, w, None, y, method=method, direction=kind,
                                             backend=args.backend, validate=False)
    # Rounds of one call each, fwd+bwd first: every ratio compares calls made moments apart (this machine's speed
    # drifts by 10-20% over minutes, more than the differences measured).
    calls = [train_step, *searches.values()]
    seconds = interleaved(calls, args.device, args.budget)
    grads = (h.numel() + w.numel()) * h.element_size()  # dh and dW, outputs of the step
    peak = peak_extra_bytes(train_step, args.device)
    rows = [{"what": "fwd+bwd (F.linear + cross_entropy, dW and dh)", **summary(seconds[0]), "peak_bytes": peak,
             "arrays": (peak - grads) / array}]
    for (method, search), times in zip(searches.items(), seconds[1:]):
        peak = peak_extra_bytes(search, args.device)
        ratios = [t / t0 for t, t0 in zip(times, seconds[0])]
        rows.append({"what": f"search {method}", **summary(times), "peak_bytes": peak,
                     "arrays": (peak - direction) / array, "vs_fwd_bwd": statistics.median(ratios)})
    print(f"head: n={args.tokens} tokens, D={args.dim}, C={args.classes}, {args.dtype}, {args.device}, "
          f"backend {args.backend} (auto -> {pof_fast.backends()}), threads {torch.get_num_threads()}")
    print(f"one 16-bit [n, C] array = {array / 2**20:.0f} MiB; the fp32 direction [C, D] = {direction / 2**20:.0f} MiB")
    print(f"{'':<46}{'median s':>10}{'p20-p80':>16}{'x fwd+bwd':>10}{'peak MiB':>10}{'[n,C] arrays':>14}")
    for r in rows:
        ratio = f"{r['vs_fwd_bwd']:.2f}" if "vs_fwd_bwd" in r else "1"
        print(f"{r['what']:<46}{r['seconds']:>10.3f}{r['p20']:>8.3f}-{r['p80']:<7.3f}{ratio:>10}"
              f"{r['peak_bytes'] / 2**20:>10.0f}{r['arrays']:>14.2f}")
    for r in rows[1:]:
        extra = (r["peak_bytes"] - direction - ARRAY_TARGET * array) / 2**20
        print(f"target {r['what']}: <= {TIME_TARGET}x fwd+bwd: {'met' if r['vs_fwd_bwd'] <= TIME_TARGET else 'NOT met'}"
              f" ({r['vs_fwd_bwd']:.2f}x); <= {ARRAY_TARGET} arrays + {WORKSPACE_MIB} MiB: "
              f"{'met' if extra <= WORKSPACE_MIB else 'NOT met'} ({extra:+.1f} MiB)")
    return write_json(args.json, args.device, args=vars(args), rows=rows)


if __name__ == "__main__":
    main()
