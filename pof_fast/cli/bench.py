"""``pof-fast bench``: time one PoF line search per backend against the reference loop, eager and torch.compile.

Argument parsing and printing only: what is measured and how is the benchmark library
:mod:`pof_fast.bench` (see its docstring and ``BENCHMARKS.md``).
"""
from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

import torch

from .. import dispatch
from ..bench.cases import CASES

__all__ = ["add_arguments", "main", "register"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="short timing budget (smoke runs)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before timing (CPU)")
    parser.add_argument("--json", metavar="FILE", help="write every number and the environment here")
    parser.add_argument("--plot", metavar="FILE.png", help="write a speed-up chart (needs matplotlib)")


def _command(args: argparse.Namespace) -> int:
    from ..bench import suite

    cases = [c.strip().upper() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"pof-fast bench: unknown case(s) {','.join(unknown)}; choose from {','.join(CASES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pof-fast bench: --device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(dispatch.backends().extension)
    suite.run(args.device, cases, args.quick, args.json, args.plot, log=print)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``bench`` sub-command to ``pof-fast``."""
    parser = subparsers.add_parser("bench", help="time the line search against the reference loop, eager "
                                                 "and torch.compile (SPEC section 5)")
    add_arguments(parser)
    parser.set_defaults(func=_command)


def main(argv: Optional[Sequence[str]] = None, prog: str = "pof-fast bench") -> int:
    """The command on its own (``benchmarks/run.py``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(parser)
    return _command(parser.parse_args(argv))
