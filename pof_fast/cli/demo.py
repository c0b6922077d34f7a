"""``pof-fast demo``: pretrain -> posttrain -> eval on the digits data shipped with scikit-learn.

Trains an MLP (or the small CNN) with SAM, post-trains its feature extractor with PoF, and prints a
before/after table: test error, NLL, ECE, head-space sharpness (lambda_max of the training-loss Hessian
w.r.t. the head) and the landscape's t* ratio (median t* of test batches / training batches), with a control
column: plain SGD post-training of the feature extractor at the same lr and epochs. The run folders
(checkpoints, metrics.jsonl) go to --out, a temporary folder by default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Tuple

from .common import command, log, positive_int


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="pretrain (SAM) -> PoF posttrain -> eval on the digits data; "
                                           "a before/after table", description=__doc__.splitlines()[0].replace("``", ""))
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="mlp or cnn (with BatchNorm) (default mlp)")
    p.add_argument("--pretrain-optimizer", choices=("sam", "sgd"), default="sam", help="(default sam, rho 0.05)")
    p.add_argument("--pretrain-epochs", type=positive_int, default=60, help="pretraining epochs (default 60)")
    p.add_argument("--epochs", type=positive_int, default=10, help="PoF post-training epochs (default 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="PoF learning rate of the base SGD (default 1e-3)")
    p.add_argument("--gamma", type=float, default=2.0, help="perturbation factor (default 2)")
    p.add_argument("--gamma-sampling", choices=["uniform", "fixed"], default="uniform", help="(default uniform)")
    p.add_argument("--method", choices=["newton", "bracket_grid", "grid"], default="newton")
    p.add_argument("--direction", choices=["normalized", "raw"], default="normalized")
    p.add_argument("--backend", default="auto", help="auto, torch, cpp, triton or cuda (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--threads", type=positive_int, help="torch.set_num_threads (default torch's)")
    p.add_argument("--out", metavar="DIR", help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--no-control", action="store_true",
                   help="skip the control column (plain SGD post-training of the feature extractor, same lr and epochs)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write the PoF post-training curves here (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def _measure(model: Any, phi: Any, head: Any, data: Any, device: Any, seed: int) -> Dict[str, Any]:
    from ..training import landscape_of
    from .evaluate import measure

    row = measure(model, phi, head, data, device, hessian="head", seed=seed)
    row["t_ratio"] = landscape_of(phi, head, data, device, batch_size=128, batches=16, seed=seed).ratio
    return row


@command("demo")
def run(args: argparse.Namespace) -> int:
    from ..training import PostTrainConfig, PretrainConfig, posttrain, prepare_posttrain, pretrain, resolve_device

    device = resolve_device(args.device)
    started = time.perf_counter()
    quiet = (lambda message: None)
    show = not args.no_progress
    with tempfile.TemporaryDirectory(prefix="pof-fast-demo-") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        pre = PretrainConfig(model=args.model, optimizer=args.pretrain_optimizer, epochs=args.pretrain_epochs,
                             lr=0.05, batch_size=64, schedule="cosine", seed=args.seed)
        log(f"digits (scikit-learn): {args.model}, pretraining with {args.pretrain_optimizer.upper()} "
            f"for {args.pretrain_epochs} epochs (lr 0.05 cosine, batch 64) ...")
        pretrain(pre, str(root / "pretrain"), device=device, force=True, progress=show, log=quiet)
        post = PostTrainConfig(checkpoint=str(root / "pretrain" / "model.pt"), epochs=args.epochs, lr=args.lr,
                               gamma=args.gamma, gamma_sampling=args.gamma_sampling, method=args.method,
                               direction=args.direction, backend=args.backend, seed=args.seed)
        columns = {"before": _measure(*_loaded(prepare_posttrain, post.checkpoint, device), device, args.seed)}
        if not args.no_control:
            log(f"control: plain SGD on the feature extractor (PoF with gamma 0), lr {args.lr}, {args.epochs} epochs ...")
            control = dataclasses.replace(post, gamma=0.0, gamma_sampling="fixed")
            posttrain(control, str(root / "sgd"), device=device, force=True, progress=show, log=quiet)
            columns["plain SGD"] = _measure(*_loaded(prepare_posttrain, str(root / "sgd" / "model.pt"), device),
                                            device, args.seed)
        result = posttrain(post, str(root / "posttrain"), device=device, force=True, progress=show, log=log)
        columns["PoF"] = _measure(*_loaded(prepare_posttrain, str(root / "posttrain" / "model.pt"), device), device,
                                  args.seed)
        rows = [json.loads(line) for line in (root / "posttrain" / "metrics.jsonl").read_text().splitlines()]
    table = [("test error", "test_error", "{:.2%}"), ("test NLL", "test_nll", "{:.4f}"),
             ("test ECE", "test_ece", "{:.4f}"), ("head sharpness", "head_lambda_max", "{:.4f}"),
             ("t* ratio test/train", "t_ratio", "{:.3f}")]
    names = {"before": "before", "plain SGD": "plain SGD", "PoF": "after PoF"}
    log("")
    log(f"{'':<22}" + "".join(f"{names[c]:>12}" for c in columns))
    for label, key, fmt in table:
        log(f"{label:<22}" + "".join(f"{fmt.format(col[key]):>12}" for col in columns.values()))
    before, after = columns["before"], columns["PoF"]
    log(f"after PoF ({args.epochs} epochs): test error {before['test_error']:.2%} -> {after['test_error']:.2%}, "
        f"test NLL {before['test_nll']:.4f} -> {after['test_nll']:.4f}  ({time.perf_counter() - started:.1f} s)")
    log("head sharpness: lambda_max of the training-loss Hessian w.r.t. the head; t* ratio: median t* of test "
        "batches / training batches along their normalised head gradient (the paper: about 2)")
    if result.get("runaway"):
        log(f"runaway warnings at epochs {result['runaway']}")
    if args.plot:
        from . import plots
        from .common import plot_or_say

        plot_or_say(lambda: plots.curves(rows, Path(args.plot), f"demo: PoF post-training of the {args.model}"))
    if args.json:
        keep = ("calibration", "histories")
        with open(args.json, "w") as f:
            json.dump({**{("after" if name == "PoF" else name.replace(" ", "_")):
                          {k: v for k, v in col.items() if k not in keep} for name, col in columns.items()},
                       "epochs": [r for r in rows if r["epoch"] > 0],
                       "args": {k: v for k, v in vars(args).items() if k != "func"}}, f, indent=2)
    return 0


def _loaded(prepare: Any, checkpoint: str, device: Any) -> Tuple[Any, Any, Any, Any]:
    from ..training import PostTrainConfig

    model, phi, head, data, _ = prepare(PostTrainConfig(checkpoint=checkpoint), device)
    return model, phi, head, data
