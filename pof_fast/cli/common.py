"""What every command shares: device, seed, threads, progress, plots, data and model options, errors."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Type

from tqdm.auto import tqdm

__all__ = ["add_run_options", "add_data_options", "add_model_options", "config", "command", "log", "write_json_line"]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def int_list(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs, e.g. 60,120,160, got {text!r}") from exc


def add_run_options(p: argparse.ArgumentParser, out: Optional[str], plot_name: Optional[str],
                    resumable: bool = True) -> None:
    """--out, --device, --seed, --threads, --no-progress, --plot (and --resume/--force for training commands)."""
    g = p.add_argument_group("run")
    if out is None:
        g.add_argument("--out", metavar="DIR", help="folder for the results (default: the checkpoint's folder)")
    else:
        g.add_argument("--out", metavar="DIR", default=out, help=f"run folder (default {out})")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    g.add_argument("--seed", type=int, default=0, help="seed of everything random in the run (default 0)")
    g.add_argument("--threads", type=positive_int, help="torch.set_num_threads (CPU threads; default torch's)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    if plot_name is not None:
        g.add_argument("--plot", action="store_true", help=f"write {plot_name} into the output folder (needs matplotlib)")
    if resumable:
        g.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoint (exactly as if never interrupted)")
        g.add_argument("--force", action="store_true", help="start over in an --out that already holds a run")


def add_data_options(p: argparse.ArgumentParser, default_data: Optional[str]) -> None:
    from ..data import DATASETS

    g = p.add_argument_group("data (never downloaded)")
    where = "(default: the checkpoint's, else digits)" if default_data is None else f"(default {default_data})"
    g.add_argument("--data", choices=DATASETS, default=default_data,
                   help=f"digits (shipped with scikit-learn), cifar10/cifar100 (python batches in --data-dir) or "
                        f"folder (--data-dir/train/<class>/*, --data-dir/val/<class>/*) {where}")
    g.add_argument("--data-dir", metavar="DIR", help="where cifar10/cifar100/folder data lies")
    g.add_argument("--image-size", type=positive_int, default=32, help="image folders: resize to this side (default 32)")
    g.add_argument("--augment", choices=("auto", "standard", "none"), default="auto",
                   help="training augmentation: standard = random crop (padding 1/8) + horizontal flip; "
                        "auto = standard except for digits (default auto)")
    g.add_argument("--workers", type=int, default=0, help="image folders: decoding processes (default 0)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --head, --model, --unsafe-load: the trained classifier to load."""
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="FILE",
                   help="a pof-fast checkpoint (model.pt, best.pt, last.pt), a state_dict of a built-in --model, or "
                        "(with --unsafe-load) a whole pickled nn.Module")
    g.add_argument("--head", metavar="NAME", help="the linear head's submodule name (default: found by split_model)")
    g.add_argument("--model", help="the built-in architecture of a plain state_dict checkpoint")
    g.add_argument("--unsafe-load", action="store_true",
                   help="allow a checkpoint that is a pickled object (runs code from the file: trusted files only)")


def config(cls: Type[Any], args: argparse.Namespace) -> Any:
    """A configuration dataclass from the parsed arguments (options not given keep the dataclass's default)."""
    return cls(**given(cls, args))


def given(cls: Type[Any], args: argparse.Namespace) -> Dict[str, Any]:
    """The configuration settings given on the command line (options of config fields default to None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def defaults_from(parser: argparse.ArgumentParser, cls: Type[Any]) -> None:
    """Make the options of ``cls``'s fields default to None, so that :func:`given` sees what was given (the help
    texts say the dataclass's defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    for action in parser._actions:
        if action.dest in names:
            action.default = None


def log(message: str) -> None:
    """Print a line without breaking the progress bars."""
    tqdm.write(message, file=sys.stdout)


def write_json_line(path: Path, row: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Run a command body: set the thread count; report user errors in one line (``SystemExit``)."""

    def wrap(body: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(body)
        def run(args: argparse.Namespace) -> int:
            import torch

            from ..training import RunError

            if getattr(args, "threads", None):
                torch.set_num_threads(args.threads)
            try:
                return body(args)
            except RunError as exc:
                raise SystemExit(f"pof-fast {name}: {exc}") from None

        return run

    return wrap


def plot_or_say(write: Callable[[], Path]) -> None:
    """Write a plot; without matplotlib, say so and go on."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        log("--plot: matplotlib is not installed (pip install matplotlib); no plot written")
        return
    log(f"plot: {write()}")
