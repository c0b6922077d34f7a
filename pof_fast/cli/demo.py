"""``pof-fast demo``: pretrain an MLP on scikit-learn's digits, then PoF post-train its features.

Real data that ships with scikit-learn (1,797 8x8 images, 10 classes; 80/20 split). Reports test
error and test NLL before and after, and PoF telemetry per epoch. About a minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Dict, Tuple

import torch
from torch import Tensor, nn


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="pretrain an MLP on the digits data, then PoF post-train it")
    p.add_argument("--pretrain-epochs", type=int, default=60, help="plain SGD epochs before PoF (default 60)")
    p.add_argument("--epochs", type=int, default=10, help="PoF post-training epochs (default 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="PoF learning rate of the base SGD (default 1e-3)")
    p.add_argument("--gamma", type=float, default=2.0, help="perturbation factor (default 2)")
    p.add_argument("--gamma-sampling", choices=["uniform", "fixed"], default="uniform")
    p.add_argument("--method", choices=["newton", "bracket_grid", "grid"], default="newton")
    p.add_argument("--direction", choices=["normalized", "raw"], default="normalized")
    p.add_argument("--backend", default="auto", help="auto, torch, cpp, triton or cuda (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


class MLP(nn.Module):
    """phi: 64 -> 256 -> 128 (ReLU), head: 128 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.phi(x))


def load_digits(seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train [1437, 64], y_train, x_test [360, 64], y_test), pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:
        raise SystemExit("pof-fast demo needs scikit-learn: pip install scikit-learn") from exc
    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


@torch.no_grad()
def evaluate(model: MLP, x: Tensor, y: Tensor) -> Dict[str, float]:
    logits = model(x)
    return {
        "error": (logits.argmax(1) != y).float().mean().item(),
        "nll": nn.functional.cross_entropy(logits, y).item(),
    }


def batches(n: int, size: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    return order.split(size)


def progress(iterable, desc: str, hide: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=hide, leave=False, dynamic_ncols=True)


def run(args: argparse.Namespace) -> int:
    from pof_fast import PoF

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_digits(args.seed)
    model = MLP()
    start = time.perf_counter()

    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for _ in progress(range(args.pretrain_epochs), "pretrain (SGD)", args.no_progress, args.pretrain_epochs):
        for idx in batches(len(y_tr), 64, gen):
            sgd.zero_grad()
            nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            sgd.step()
    before = evaluate(model, x_tr, y_tr), evaluate(model, x_te, y_te)
    print(f"digits: {len(y_tr)} train / {len(y_te)} test rows; MLP 64-256-128-10")
    print(f"after SGD pretraining ({args.pretrain_epochs} epochs): test error {before[1]['error']:.2%}, "
          f"test NLL {before[1]['nll']:.4f} (train NLL {before[0]['nll']:.4f})")

    opt = PoF(model.phi.parameters(), torch.optim.SGD, head=model.head, gamma=args.gamma,
              gamma_sampling=args.gamma_sampling, method=args.method, direction=args.direction,
              backend=args.backend, seed=args.seed, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    print(f"PoF: gamma={args.gamma} ({args.gamma_sampling}), method={args.method}, direction={args.direction}, "
          f"lr={args.lr}, search batch 256, train batch 64")
    print(f"{'epoch':>5} {'t*':>9} {'gamma':>6} {'||pert||':>9} {'||g||':>8} {'l(0)':>7} {'l(t*)':>7} "
          f"{'capped':>6} {'test err':>8} {'test NLL':>8}")
    history = []
    for epoch in range(1, args.epochs + 1):
        opt.reset_summary()
        train_batches = batches(len(y_tr), 64, gen)
        for idx in progress(train_batches, f"PoF epoch {epoch}", args.no_progress, len(train_batches)):
            search = torch.randint(len(y_tr), (256,), generator=gen)
            with torch.no_grad():
                search_features = model.phi(x_tr[search])
            opt.perturb(search_features, y_tr[search])
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
        row = {"epoch": epoch, **opt.summary(), **{f"test_{k}": v for k, v in evaluate(model, x_te, y_te).items()}}
        history.append(row)
        print(f"{epoch:>5} {row['step']:>9.4f} {row['gamma']:>6.3f} {row['perturbation_norm']:>9.4f} "
              f"{row['grad_norm']:>8.4f} {row['loss0']:>7.4f} {row['loss']:>7.4f} {row['capped_rate']:>6.1%} "
              f"{row['test_error']:>8.2%} {row['test_nll']:>8.4f}")
    after = evaluate(model, x_te, y_te)
    print(f"after PoF ({args.epochs} epochs): test error {before[1]['error']:.2%} -> {after['error']:.2%}, "
          f"test NLL {before[1]['nll']:.4f} -> {after['nll']:.4f}  ({time.perf_counter() - start:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"before": before[1], "after": after, "epochs": history, "args": vars(args) | {"func": None}}, f, indent=2)
    return 0
