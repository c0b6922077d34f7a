"""Where is PoF post-training stable? A learning-rate x gamma x sampling grid on the digits data.

For each model (the MLP; the small CNN with BatchNorm) and seed: pretrain with SAM (rho 0.05, lr 0.05 cosine,
batch 64), then post-train the feature extractor from that checkpoint with every (lr, gamma, sampling) of the
grid, and with plain SGD at the same lr and epochs (PoF with gamma = 0: the same loop without perturbation) as
the control. Reports, per cell, the mean over seeds of the change of test error (points) and test NLL against
the control, the head sharpness (lambda_max of the training-loss Hessian w.r.t. the head) as a ratio to the
control's, the largest mean t* of an epoch, and how many runs the runaway guard flagged. Everything runs through
the library behind ``pof-fast pretrain/posttrain/eval`` (pof_fast.training), on CPU, one thread per worker.

    PYTHONPATH=. python benchmarks/stability.py --workers 2 --json /tmp/stability.json > /tmp/stability.md
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

# (sampling, gamma); ("fixed", 0.0) is the plain-SGD control
CONFIGS = [("fixed", 0.0), ("uniform", 1.0), ("uniform", 2.0), ("uniform", 4.0), ("fixed", 1.0), ("fixed", 2.0)]


def _pretrain(task: Tuple[str, int, int, str]) -> str:
    import torch

    from pof_fast import training

    torch.set_num_threads(1)
    model, seed, epochs, root = task
    out = Path(root) / f"pre-{model}-{seed}"
    cfg = training.PretrainConfig(model=model, optimizer="sam", rho=0.05, lr=0.05, schedule="cosine", epochs=epochs,
                                  batch_size=64, seed=seed)
    training.pretrain(cfg, str(out), device=torch.device("cpu"), force=True, progress=False, log=lambda m: None)
    return str(out / "model.pt")


def _posttrain(task: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from pof_fast import training

    torch.set_num_threads(1)
    started = time.perf_counter()
    out = Path(task["root"]) / f"post-{task['model']}-{task['seed']}-{task['lr']}-{task['sampling']}-{task['gamma']}"
    cfg = training.PostTrainConfig(checkpoint=task["checkpoint"], lr=task["lr"], epochs=task["epochs"],
                                   gamma=task["gamma"], gamma_sampling=task["sampling"], seed=task["seed"])
    device = torch.device("cpu")
    result = training.posttrain(cfg, str(out), device=device, force=True, progress=False, log=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    model, phi, head, data, _ = training.prepare_posttrain(training.PostTrainConfig(checkpoint=str(out / "model.pt")),
                                                           device)
    sharp = training.head_sharpness(phi, head, data, device, seed=0)
    return dict(task, test_error=result["test_error"], test_nll=result["test_nll"], test_ece=result["test_ece"],
                before_error=result["before"]["test_error"], before_nll=result["before"]["test_nll"],
                head_lambda_max=sharp.value, head_converged=sharp.converged,
                max_t_star=max(r["step"] for r in rows[1:]), last_t_star=rows[-1]["step"],
                runaway=bool(result["runaway"]), seconds=time.perf_counter() - started)


def _fmt_range(values: List[float], fmt: str) -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}" if len(values) > 1 else fmt.format(values[0])


def table(results: List[Dict[str, Any]]) -> str:
    control = {(r["model"], r["seed"], r["lr"]): r for r in results if r["gamma"] == 0.0}
    lines = ["| model | lr | gamma sampling | d test error (points) | d test NLL | head sharpness / SGD | "
             "max mean t* | runaway runs | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["lr"], r["sampling"], r["gamma"]) for r in results},
                  key=lambda k: (k[0] != "mlp", k[1], k[3] != 0.0, k[2] == "fixed", k[3]))
    for model, lr, sampling, gamma in keys:
        cell = [r for r in results if (r["model"], r["lr"], r["sampling"], r["gamma"]) == (model, lr, sampling, gamma)]
        if gamma == 0.0:
            errs = [100 * r["test_error"] for r in cell]
            lines.append(f"| {model} | {lr:g} | plain SGD (control) | {statistics.mean(errs):.2f} % error "
                         f"(before: {100 * statistics.mean(r['before_error'] for r in cell):.2f} %) | "
                         f"NLL {statistics.mean(r['test_nll'] for r in cell):.4f} | "
                         f"lambda_max {statistics.mean(r['head_lambda_max'] for r in cell):.3f} | - | "
                         f"{sum(r['runaway'] for r in cell)}/{len(cell)} | |")
            continue
        d_err = [100 * (r["test_error"] - control[(model, r["seed"], lr)]["test_error"]) for r in cell]
        d_nll = [r["test_nll"] - control[(model, r["seed"], lr)]["test_nll"] for r in cell]
        sharp = [r["head_lambda_max"] / control[(model, r["seed"], lr)]["head_lambda_max"] for r in cell]
        runaway = sum(r["runaway"] for r in cell)
        mean_err = statistics.mean(d_err)
        if mean_err > 1.0 or runaway:
            verdict = "unstable"
        elif mean_err > 0.3:
            verdict = "costs error"
        else:
            verdict = "helps" if mean_err < -0.3 else "neutral"
        label = f"uniform [0, {gamma:g}]" if sampling == "uniform" else f"fixed {gamma:g}"
        lines.append(f"| {model} | {lr:g} | {label} | {mean_err:+.2f} ({_fmt_range(d_err, '{:+.2f}')}) | "
                     f"{statistics.mean(d_nll):+.4f} | {statistics.mean(sharp):.2f}x ({_fmt_range(sharp, '{:.2f}')}) | "
                     f"{statistics.mean(r['max_t_star'] for r in cell):.3g} | {runaway}/{len(cell)} | {verdict} |")
    return "\n".join(lines)


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--lrs", default="0.0003,0.001,0.003,0.01")
    p.add_argument("--seeds", type=int, default=4, help="MLP seeds (the CNN gets --cnn-seeds)")
    p.add_argument("--cnn-seeds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=30, help="MLP post-training epochs")
    p.add_argument("--cnn-epochs", type=int, default=20)
    p.add_argument("--pretrain-epochs", type=int, default=60, help="MLP SAM pretraining epochs")
    p.add_argument("--cnn-pretrain-epochs", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", metavar="FILE", help="write every run's numbers here")
    p.add_argument("--from-json", metavar="FILE", help="print the table of a --json file again, running nothing")
    args = p.parse_args(argv)
    if args.from_json:
        print(table(json.loads(Path(args.from_json).read_text())["results"]))
        return 0
    models = [m for m in args.models.split(",") if m]
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = {"mlp": args.seeds, "cnn": args.cnn_seeds}
    epochs = {"mlp": args.epochs, "cnn": args.cnn_epochs}
    pre_epochs = {"mlp": args.pretrain_epochs, "cnn": args.cnn_pretrain_epochs}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pof-stability-") as root, \
            multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        pre_tasks = [(m, s, pre_epochs[m], root) for m in models for s in range(seeds[m])]
        checkpoints = dict(zip([(m, s) for m, s, _, _ in pre_tasks], pool.map(_pretrain, pre_tasks)))
        print(f"pretrained {len(checkpoints)} models in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        tasks = [dict(model=m, seed=s, lr=lr, sampling=sampling, gamma=gamma, epochs=epochs[m],
                      checkpoint=checkpoints[(m, s)], root=root)
                 for m in models for s in range(seeds[m]) for lr in lrs for sampling, gamma in CONFIGS]
        results = []
        for i, r in enumerate(pool.imap_unordered(_posttrain, tasks), 1):
            results.append(r)
            print(f"[{i}/{len(tasks)}] {r['model']} seed {r['seed']} lr {r['lr']} {r['sampling']} {r['gamma']}: "
                  f"error {r['test_error']:.4f} lambda {r['head_lambda_max']:.3f} ({r['seconds']:.0f} s)",
                  file=sys.stderr)
    for r in results:
        r.pop("root")
        r.pop("checkpoint")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(table(results))
    print(f"\n{len(results)} post-training runs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
