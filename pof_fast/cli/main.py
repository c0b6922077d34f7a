"""Entry point of the ``pof-fast`` console script: one sub-command per module."""
from __future__ import annotations

import argparse
import importlib
from typing import Optional, Sequence

# sub-command -> module exposing ``register(subparsers)``; imported only when needed.
COMMANDS = {
    "demo": "pof_fast.cli.demo",
    "pretrain": "pof_fast.cli.pretrain",
    "posttrain": "pof_fast.cli.posttrain",
    "eval": "pof_fast.cli.evaluate",
    "landscape": "pof_fast.cli.landscape",
    "bench": "pof_fast.cli.bench",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pof-fast", description="PoF post-training, fast.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
