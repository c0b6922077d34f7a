"""Where a run executes: its device and, under ``torchrun``, its rank in the process group.

:func:`launch` reads the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, plus the
rendezvous address): with them it initialises ``torch.distributed`` (gloo on the CPU, NCCL on CUDA with the
device ``cuda:LOCAL_RANK``) and destroys the group on exit; without them it is a single process. The loops
take a :class:`World` and write files and print on rank 0 only.

Test hook: when ``POF_FAST_RANK_DUMP`` names a folder, :meth:`World.dump` writes ``rank<r>.pt`` there (what a
test compares across ranks). Nothing else reads that variable.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
from torch import Tensor, nn

from .errors import RunError

__all__ = ["World", "launch", "resolve_device", "DUMP_VARIABLE"]

DUMP_VARIABLE = "POF_FAST_RANK_DUMP"
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; ``RunError`` when CUDA is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RunError(f"--device {name!r} is not a device (cpu, cuda, cuda:N or auto)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} but torch.cuda.is_available() is False (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise RunError(f"--device {name}: only cpu and cuda are supported")
    return device


@dataclass(frozen=True)
class World:
    """This process's device and rank; ``group`` is None for a single process."""

    device: torch.device
    rank: int = 0
    size: int = 1
    group: Optional[Any] = None

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints, evaluates and writes the run folder."""
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel (gradients averaged across ranks), or as it is."""
        if self.group is None:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, process_group=self.group)

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks (in place)."""
        if self.group is not None:
            torch.distributed.all_reduce(tensor, group=self.group)
        return tensor

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` (a picklable object) on every rank."""
        if self.group is None:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def dump(self, payload: Dict[str, Any]) -> None:
        """The test hook (see the module docstring)."""
        folder = os.environ.get(DUMP_VARIABLE)
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            torch.save(payload, Path(folder) / f"rank{self.rank}.pt")


@contextlib.contextmanager
def launch(device: str) -> Iterator[World]:
    """The :class:`World` of this process (see the module docstring); ``device`` is the ``--device`` option
    (under ``torchrun`` a CUDA device means this rank's, ``cuda:LOCAL_RANK``)."""
    resolved = resolve_device(device)
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        yield World(resolved)
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise RunError("launched by torchrun, but this torch has no torch.distributed")
    if resolved.type == "cuda":
        resolved = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(resolved)
    dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    try:
        yield World(resolved, dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    finally:
        dist.destroy_process_group()
