"""A run folder (checkpoint paths, the metrics file, resuming) and the progress bars of its loop."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .checkpoints import load_checkpoint
from .config import check_config, resumed_config
from .errors import RunError

__all__ = ["Run", "open_run", "progress_bar"]


class Run:
    """A run folder: checkpoints, the metrics file, and resuming."""

    def __init__(self, out: str, resume: bool, force: bool) -> None:
        self.dir = Path(out)
        self.last = self.dir / "last.pt"
        self.metrics = self.dir / "metrics.jsonl"
        if resume and not self.last.is_file():
            raise RunError(f"--resume: no checkpoint {self.last} to resume from")
        if not resume and self.last.exists() and not force:
            raise RunError(f"{self.dir} already holds a run ({self.last}): pass --resume to continue it, "
                           "--force to start it over, or another --out")
        if self.dir.exists() and not self.dir.is_dir():
            raise RunError(f"--out {self.dir} exists and is not a folder")
        self.resume = resume

    def start(self) -> None:
        """Create the folder (a fresh run: an empty metrics file); called once the inputs are known to be good."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            self.metrics.write_text("")

    def history(self, upto: int) -> List[Dict[str, Any]]:
        """The metrics lines of epochs ``<= upto`` (lines past the checkpoint, from an interrupted epoch, go)."""
        rows = [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()] \
            if self.metrics.is_file() else []
        rows = [r for r in rows if r["epoch"] <= upto]
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def log(self, row: Dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")


def open_run(kind: str, cls: type, cfg: Any, out: str, resume: bool, force: bool, overrides: Optional[Dict[str, Any]],
             log: Callable[[str], None]) -> Tuple[Run, Optional[Dict[str, Any]], Any]:
    """``(run, state, cfg)``: the run folder ``out``, its last checkpoint when resuming (else None) and the
    configuration, checked (when resuming: the saved one, with ``overrides`` as :func:`resumed_config` takes them)."""
    run = Run(out, resume, force)
    state = load_checkpoint(run.last) if resume else None
    if state is not None:
        if state.get("kind") != kind:
            raise RunError(f"{run.last} is a {state.get('kind')} checkpoint, not a {kind} one")
        cfg = resumed_config(cls, state["config"], overrides, log)
    if cfg is None:
        raise RunError(f"{kind} needs a configuration (or resume=True)")
    check_config(cfg)
    return run, state, cfg


def progress_bar(iterable: Any, total: int, desc: str, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not show, leave=False, dynamic_ncols=True)
