"""Search benchmark from the source tree: ``pof-fast bench`` itself (the library is ``pof_fast/bench/``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pof_fast.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(prog="benchmarks/run.py"))
