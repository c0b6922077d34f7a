"""Checkpoint files: atomic saves, safe loads, torch's RNG states, and the model and data specifications saved
beside the weights."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .. import data as datasets
from .config import DataConfig
from .errors import RunError

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state",
           "checkpoint_data_spec", "model_spec", "data_spec"]


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Write atomically (a temporary file, then a rename): an interrupted save leaves the previous one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """A pof-fast checkpoint (tensors and plain Python values only: loaded with ``weights_only=True``)."""
    if not Path(path).is_file():
        raise RunError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling error: say what the file is not
        raise RunError(f"{path} is not a pof-fast checkpoint or state_dict ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200]})") from exc


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_data_spec(path: str) -> Optional[Dict[str, Any]]:
    """The data a pof-fast checkpoint was trained on (``{"data", "data_dir", "image_size"}``), or None."""
    if not Path(path).is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a pof-fast checkpoint: no data spec
        return None
    return dict(obj["data_spec"]) if isinstance(obj, dict) and "data_spec" in obj else None


def model_spec(cfg_model: str, data: datasets.Data) -> Dict[str, Any]:
    return {"model": cfg_model, "input_shape": list(data.input_shape), "num_classes": data.num_classes}


def data_spec(cfg: DataConfig) -> Dict[str, Any]:
    data_dir = None if cfg.data_dir is None else str(Path(cfg.data_dir).resolve())
    return {"data": cfg.data, "data_dir": data_dir, "image_size": cfg.image_size}
