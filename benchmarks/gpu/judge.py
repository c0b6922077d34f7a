"""Every target of a GPU check, judged on the JSON files its parts wrote (``pof_fast/bench/targets.py``).

    python benchmarks/gpu/judge.py PART2_OUT PART3_OUT [--json targets.json]

Folders are read for ``*.json``. One line per target: met, MISSED, or reported (no threshold), and the file it was
judged on. Search benchmarks are judged with the ``auto`` backend of the machine that ran them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from pof_fast.bench.report import format_target  # noqa: E402
from pof_fast.bench.targets import judge_results, load_results  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="JSON files, or folders of them")
    parser.add_argument("--json", metavar="FILE", help="write the judged targets here")
    args = parser.parse_args(argv)
    targets = judge_results(load_results(args.paths))
    for target in targets:
        print(f"{format_target(target)}  [{os.path.basename(target['source'])}]")
    verdicts = [t["met"] for t in targets]
    print(f"{verdicts.count(True)} met, {verdicts.count(False)} missed, {verdicts.count(None)} reported")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(targets, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
