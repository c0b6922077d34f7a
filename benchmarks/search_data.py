"""Which search batch: a fresh one (the paper) or the previous training batch? Fidelity on the digits MLP.

For each seed: pretrain the MLP with SAM (rho 0.05, lr 0.05 cosine, batch 64, as the stability table), then
post-train its feature extractor from that checkpoint with PoF (SGD momentum 0.9 Nesterov, weight decay 5e-4,
gamma U(0, 2), newton) in each search mode, on the same training batches (``--batch`` rows):

    fresh N       a fresh search batch of N random training rows every step (the paper; PoF.perturb(h_s, y_s))
    previous      the previous step's training batch (PoF.record in the training forward, PoF.perturb()): --batch rows

and reports, per mode, the mean and the spread (min-max) over seeds of the final test error, the head sharpness
(lambda_max of the training-loss Hessian w.r.t. the head) and the landscape's t* ratio (median t* of test batches
/ training batches, the paper: about 2). ``fresh --batch`` against ``previous`` compares at equal search rows; the
other fresh sizes show the effect of the row count on its own.

t* agreement, step by step on one shared run per seed (driven by the fresh search of --batch rows): at every step
the t* of the previous training batch and the t* of a second, independent fresh batch of the same size are taken
too (searches only, nothing applied); reported as the median |log(t* other / t* fresh)| of each, so the previous
batch's disagreement is read against the disagreement between two fresh batches.

    PYTHONPATH=. nice -n 19 python benchmarks/search_data.py --seeds 4 --workers 2 --json /tmp/search_data.json
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


def _pretrain(seed: int, epochs: int, root: str) -> str:
    import torch

    from pof_fast import training

    out = Path(root) / f"pre-{seed}"
    cfg = training.PretrainConfig(model="mlp", optimizer="sam", rho=0.05, lr=0.05, schedule="cosine", epochs=epochs,
                                  batch_size=64, seed=seed)
    training.pretrain(cfg, str(out), device=torch.device("cpu"), force=True, progress=False, log=lambda m: None)
    return str(out / "model.pt")


def _posttrain(checkpoint: str, seed: int, mode: str, rows: int, args: Any, shared: bool = False) -> Dict[str, Any]:
    """One post-training run; ``mode`` "fresh" (``rows`` random rows) or "previous". ``shared``: also the t* of
    the previous batch and of a second fresh batch at every step, searched but not applied."""
    import torch

    import pof_fast
    from pof_fast import data as datasets
    from pof_fast import training

    device = torch.device("cpu")
    torch.manual_seed(seed)
    model, phi, head, data, _ = training.prepare_posttrain(training.PostTrainConfig(checkpoint=checkpoint), device)
    params = [p for p in model.parameters() if all(p is not q for q in head.parameters())]
    opt = pof_fast.PoF(params, torch.optim.SGD, head=head, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
                       gamma=2.0, seed=seed)
    n = len(data.train)
    x_all, y_all = datasets.prepare(data, *data.train.batch(torch.arange(n)), device)
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    steps, other = [], {"previous": [], "fresh": []}
    model.train()
    for _ in range(args.epochs):
        for index in torch.randperm(n, generator=gen)[: n - n % args.batch].split(args.batch):
            if mode == "previous" and opt.recorded is not None:
                previous = opt.recorded
                opt.perturb()
            else:
                previous = opt.recorded
                search = torch.randint(n, (rows,), generator=gen)
                opt.perturb(opt.search_features(phi, x_all[search]), y_all[search])
            if shared and previous is not None:
                second = torch.randint(n, (rows,), generator=gen)
                kwargs = dict(method="newton")
                other["previous"].append(float(pof_fast.line_search(*previous[:1], opt.theta0_weight, opt.theta0_bias,
                                                                    previous[1], **kwargs).step))
                with torch.no_grad():
                    h2 = phi(x_all[second])
                other["fresh"].append(float(pof_fast.line_search(h2, opt.theta0_weight, opt.theta0_bias,
                                                                 y_all[second], **kwargs).step))
            steps.append(float(opt.last.step))
            opt.zero_grad()
            features = phi(x_all[index])
            opt.record(features, y_all[index])
            torch.nn.functional.cross_entropy(head(features), y_all[index]).backward()
            opt.step()
    result = {"seed": seed, "mode": mode, "rows": rows, "t_star_mean": statistics.mean(steps)}
    if shared:
        driven = steps[1:]
        result["agreement"] = {k: statistics.median(abs(math.log(max(o, 1e-12) / max(f, 1e-12)))
                                                    for o, f in zip(v, driven)) for k, v in other.items()}
        return result
    metrics = training.evaluate(model, data, device)
    result.update(test_error=metrics["error"],
                  head_lambda_max=training.head_sharpness(phi, head, data, device, seed=0).value,
                  t_ratio=training.landscape_of(phi, head, data, device, batch_size=128, batches=16, seed=0).ratio)
    return result


def _seed(task: Dict[str, Any]) -> List[Dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    args, seed = task["args"], task["seed"]
    started = time.perf_counter()
    checkpoint = _pretrain(seed, args.pretrain_epochs, task["root"])
    results = [_posttrain(checkpoint, seed, "fresh", rows, args) for rows in args.fresh_rows]
    results.append(_posttrain(checkpoint, seed, "previous", args.batch, args))
    results.append(_posttrain(checkpoint, seed, "fresh", args.batch, args, shared=True))
    print(f"seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return results


def _spread(values: List[float], fmt: str) -> str:
    return f"{fmt.format(statistics.mean(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(results: List[Dict[str, Any]], batch: int) -> str:
    lines = ["| search batch | rows | test error % | head lambda_max | t* ratio test/train | mean t* |",
             "|---|---|---|---|---|---|"]
    runs = [r for r in results if "agreement" not in r]
    for mode, rows in sorted({(r["mode"], r["rows"]) for r in runs}, key=lambda k: (k[1], k[0] == "previous")):
        cell = [r for r in runs if (r["mode"], r["rows"]) == (mode, rows)]
        label = "previous training batch" if mode == "previous" else "fresh"
        lines.append(f"| {label} | {rows} | {_spread([100 * r['test_error'] for r in cell], '{:.2f}')} | "
                     f"{_spread([r['head_lambda_max'] for r in cell], '{:.3f}')} | "
                     f"{_spread([r['t_ratio'] for r in cell], '{:.2f}')} | "
                     f"{_spread([r['t_star_mean'] for r in cell], '{:.3g}')} |")
    shared = [r["agreement"] for r in results if "agreement" in r]
    if shared:
        lines.append("")
        lines.append(f"t* agreement on a shared run (driven by fresh {batch}-row batches), median |log(t* / t* fresh)| "
                     f"per seed, mean (min-max): previous training batch "
                     f"{_spread([a['previous'] for a in shared], '{:.3f}')}; a second fresh batch "
                     f"{_spread([a['fresh'] for a in shared], '{:.3f}')}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="training batch rows (= the previous batch's search rows)")
    p.add_argument("--fresh-rows", default="32,128", help="fresh search batch sizes, comma-separated")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--pretrain-epochs", type=int, default=60)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    args.fresh_rows = [int(v) for v in args.fresh_rows.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pof-search-data-") as root, \
            multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = sum(pool.map(_seed, [dict(args=args, seed=s, root=root) for s in range(args.seeds)]), [])
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(table(results, args.batch))
    print(f"\n{args.seeds} seeds in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
