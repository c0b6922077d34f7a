"""Error of the large-16-bit-head search path against the float64 oracle of the same bf16 inputs.

Large 16-bit heads (docs/backends.md) store R and d in bf16 and return u rounded to bf16. This prints, per shape,
||u - u_64|| / ||u_64|| and the relative error of ||g||, where u_64 and ||g||_64 are the float64 gradient of the
mean cross-entropy at the op's own bf16 logits. Run:  python benchmarks/accuracy_16bit.py [--backend cpp|cuda]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import oracle  # noqa: E402
from problems import head_problem  # noqa: E402

import pof_fast  # noqa: E402

SHAPES = ((512, 256, 8192, 0.5), (1024, 512, 16384, 1.0), (1024, 1024, 32000, 2.0), (2048, 64, 4096, 1.0),
          (4096, 128, 8192, 2.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpp")
    args = parser.parse_args()
    device = "cuda" if args.backend == "cuda" else "cpu"
    for n, dim, classes, spread in SHAPES:
        h, w, b, y = head_problem(n, dim, classes, dtype=torch.bfloat16, spread=spread, seed=1, device=device)
        res = pof_fast.line_search(h, w, b, y, method="bracket_grid", backend=args.backend, validate=False)
        _, _, gw, gb, norm, scale = oracle.line(h, w, b, y, True, rounded_logits=True)
        u64 = torch.cat([gw.flatten(), gb]) * scale
        u = torch.cat([res.weight_direction.flatten(), res.bias_direction]).double().cpu()
        print(f"{args.backend} n={n} D={dim} C={classes}: ||u - u_64|| / ||u_64|| = "
              f"{((u - u64).norm() / u64.norm()).item():.2e}, ||g|| relative error "
              f"{abs(res.grad_norm.item() / norm - 1):.2e}", flush=True)


if __name__ == "__main__":
    main()
