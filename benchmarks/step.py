"""What PoF costs per training step: one PoF step vs one plain SGD step and one SAM step.

Model: a CIFAR-sized WideResNet built here (random weights, random 3x32x32 inputs: no download).
Every step uses the base optimizer of the paper's runs (SGD, momentum 0.9, Nesterov, weight decay
5e-4) on a training batch of 64; the PoF step also runs the search batch of 256 through the
feature extractor (no gradient, train mode as the reference script does) and ``opt.perturb``:

    sgd:     forward + backward (64) + step
    sam:     two forward + backward (64) + step (rho 0.05)
    pof:     features of the search batch (256) + opt.perturb + forward + backward (64) + opt.step
    search:  opt.perturb alone on precomputed search features (the part pof_fast accelerates)
    search_unchecked: the same with ``validate=False`` (no NaN/label checks, no host sync)

Times use ``pof_fast.bench.timing.time_call`` (``do_bench`` on CUDA, median of repeats on the CPU).

    python benchmarks/step.py --device cpu --model wrn-10-2 --json step_cpu.json
    python benchmarks/step.py --device cuda --model wrn-28-10 --json step_cuda.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pof_fast  # noqa: E402
from pof_fast.bench.environment import environment  # noqa: E402
from pof_fast.bench.targets import STEP_SHARE_TARGETS  # noqa: E402
from pof_fast.bench.timing import time_call  # noqa: E402

MODELS = {"wrn-28-10": (28, 10), "wrn-16-4": (16, 4), "wrn-10-2": (10, 2)}
SEARCH_BATCH, TRAIN_BATCH = 256, 64
SGD = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


class Block(nn.Module):
    """Pre-activation wide basic block (Zagoruyko & Komodakis, 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-widen for 32x32 inputs; ``features`` is phi, ``fc`` the linear head."""

    def __init__(self, depth: int, widen: int, classes: int = 10) -> None:
        super().__init__()
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)]
        for stage in range(3):
            for i in range(blocks):
                cin = widths[stage] if i == 0 else widths[stage + 1]
                layers.append(Block(cin, widths[stage + 1], (1 if stage == 0 else 2) if i == 0 else 1))
        layers += [nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[3], classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def sam_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, rho: float = 0.05) -> None:
    """One SAM step (Foret et al., 2021): ascend to the worst point within rho, take the gradient there."""
    params = [p for p in model.parameters() if p.requires_grad]
    F.cross_entropy(model(x), y).backward()
    norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
    scale = rho / (norm + 1e-12)
    with torch.no_grad():
        shifts = [p.grad * scale for p in params]
        torch._foreach_add_(params, shifts)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        torch._foreach_sub_(params, shifts)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(model_name: str, device: str, budget_s: float) -> Dict[str, Any]:
    """Seconds per step for sgd, sam, pof and the search alone, and the ratios between them."""
    torch.manual_seed(0)
    depth, widen = MODELS[model_name]
    model = WideResNet(depth, widen).to(device).train()
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    xs = torch.randn(SEARCH_BATCH, 3, 32, 32, device=device)
    ys = torch.randint(0, 10, (SEARCH_BATCH,), device=device)
    xt = torch.randn(TRAIN_BATCH, 3, 32, 32, device=device)
    yt = torch.randint(0, 10, (TRAIN_BATCH,), device=device)
    phi, head = model.features, model.fc

    sgd = torch.optim.SGD(model.parameters(), **SGD)

    def sgd_step() -> None:
        F.cross_entropy(model(xt), yt).backward()
        sgd.step()
        sgd.zero_grad(set_to_none=True)

    def sam() -> None:
        sam_step(model, sgd, xt, yt)

    pof = pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, seed=0, **SGD)

    def pof_step() -> None:
        with torch.no_grad():
            hs = phi(xs)
        pof.perturb(hs, ys)
        F.cross_entropy(head(phi(xt)), yt).backward()
        pof.step()
        pof.zero_grad(set_to_none=True)

    with torch.no_grad():
        hs = phi(xs)

    def search() -> None:
        pof.perturb(hs, ys)
        pof.restore()

    unchecked = pof_fast.PoF(phi.parameters(), torch.optim.SGD, head=head, seed=0, validate=False, **SGD)

    def search_unchecked() -> None:
        unchecked.perturb(hs, ys)
        unchecked.restore()

    steps: Dict[str, Callable[[], None]] = {"sgd": sgd_step, "sam": sam, "pof": pof_step, "search": search,
                                            "search_unchecked": search_unchecked}
    times = {}
    for name, fn in steps.items():
        fn()  # warm-up (the SGD step and PoF's head copy both need their state created first)
        timing = time_call(fn, device, budget_s)
        times[name] = dict(median_s=timing.median, p20_s=timing.p20, p80_s=timing.p80, repeats=timing.repeats)
    sgd_s, pof_s, search_s = (times[k]["median_s"] for k in ("sgd", "pof", "search"))
    return dict(model=model_name, params=sum(p.numel() for p in model.parameters()), feature_dim=head.in_features,
                search_batch=SEARCH_BATCH, train_batch=TRAIN_BATCH, times=times,
                backend=pof_fast.dispatch.resolve("auto", torch.device(device)).name,
                pof_over_sgd=pof_s / sgd_s, sam_over_sgd=times["sam"]["median_s"] / sgd_s,
                search_share_of_sgd=search_s / sgd_s, search_share_of_pof=search_s / pof_s,
                unchecked_share_of_sgd=times["search_unchecked"]["median_s"] / sgd_s,
                target_share=STEP_SHARE_TARGETS[device], target_met=search_s / sgd_s <= STEP_SHARE_TARGETS[device])


def format_result(result: Dict[str, Any]) -> str:
    t = result["times"]
    lines = [f"{result['model']} ({result['params'] / 1e6:.1f} M parameters, head D={result['feature_dim']}), "
             f"search batch {result['search_batch']}, train batch {result['train_batch']}, "
             f"backend {result['backend']}",
             f"{'step':<16} {'time':>10} {'spread':>7} {'vs sgd':>7}"]
    for name in t:
        spread = (t[name]["p80_s"] - t[name]["p20_s"]) / t[name]["median_s"] * 100
        lines.append(f"{name:<16} {t[name]['median_s'] * 1e3:>7.2f} ms {spread:>6.0f}% "
                     f"{t[name]['median_s'] / t['sgd']['median_s']:>6.3f}x")
    lines.append(f"the search adds {result['search_share_of_sgd'] * 100:.1f}% to an SGD step "
                 f"(target <= {result['target_share']:.0%}: {'met' if result['target_met'] else 'MISSED'}); "
                 f"it is {result['search_share_of_pof'] * 100:.1f}% of a PoF step; without the input checks "
                 f"(validate=False, no host sync) it adds {result['unchecked_share_of_sgd'] * 100:.1f}%")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=tuple(MODELS), help="default: wrn-28-10 on cuda, wrn-10-2 on cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or ("wrn-28-10" if args.device == "cuda" else "wrn-10-2")
    budget = (0.1 if args.quick else 1.0) if args.device == "cuda" else (0.5 if args.quick else 5.0)
    result = measure(model, args.device, budget)
    result["env"] = environment(args.device)
    print(format_result(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
