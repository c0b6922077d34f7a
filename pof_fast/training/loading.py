"""What a run starts from: the dataset of a configuration, and a trained classifier from a file, split into
feature extractor and head."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import data as datasets
from ..models import build_model, check_split, split_model
from .checkpoints import load_checkpoint
from .config import DataConfig
from .errors import RunError

__all__ = ["load_classifier", "load_run_data", "prepare_posttrain"]


def load_classifier(path: str, model: Optional[str] = None, data: Optional[datasets.Data] = None,
                    unsafe_load: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(model, spec)`` from a file: a pof-fast checkpoint (``model.pt``, ``last.pt``, ``best.pt``), a
    ``state_dict`` of a built-in model (``model`` names it; ``data`` gives the input shape and classes), or,
    with ``unsafe_load``, a whole pickled ``nn.Module`` (``torch.save(model)``; only for files you trust)."""
    if not Path(path).is_file():
        raise RunError(f"checkpoint not found: {path}")
    if unsafe_load:
        obj = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(obj, nn.Module):
            return obj, {"file": str(Path(path).resolve())}
    else:
        obj = load_checkpoint(Path(path))
    if isinstance(obj, dict) and "model_spec" in obj and "model" in obj:
        spec = dict(obj["model_spec"])
        if "file" in spec:  # post-trained from a pickled module: rebuild it, then load the weights
            if not unsafe_load:
                raise RunError(f"{path} holds the weights of a model pickled in {spec['file']}: rebuilding it "
                               "unpickles that file, so pass --unsafe-load (only for files you trust)")
            net, _ = load_classifier(spec["file"], unsafe_load=True)
        else:
            net = build_model(spec["model"], spec["input_shape"], spec["num_classes"])
        net.load_state_dict(obj["model"])
        return net, spec
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        if model is None or data is None:
            raise RunError(f"{path} is a plain state_dict: name its architecture with --model "
                           "(and its data with --data) so it can be built")
        net = build_model(model, data.input_shape, data.num_classes)
        try:
            net.load_state_dict(obj)
        except RuntimeError as exc:
            raise RunError(f"{path} does not fit --model {model} for {data.name}: {str(exc).splitlines()[0]}") from exc
        return net, {"model": model, "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    raise RunError(f"{path} holds neither a pof-fast checkpoint nor a state_dict; a whole pickled model "
                   "(torch.save(model)) loads with --unsafe-load (only for files you trust)")


def load_run_data(cfg: DataConfig) -> datasets.Data:
    """The configuration's dataset; ``RunError`` with the reason when it cannot be read."""
    try:
        data = datasets.load_data(cfg.data, cfg.data_dir, cfg.image_size)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise RunError(str(exc)) from exc
    if cfg.augment != "auto":
        data.augment = cfg.augment
    return data


def prepare_posttrain(cfg: DataConfig, device: torch.device
                      ) -> Tuple[nn.Module, nn.Module, nn.Linear, datasets.Data, Dict[str, Any]]:
    """``(model, phi, head, data, spec)`` from ``cfg.checkpoint`` (with ``cfg.head``, ``cfg.model``,
    ``cfg.unsafe_load``): the model loaded, split into feature extractor and head, and checked on a batch."""
    if not Path(cfg.checkpoint).is_file():
        raise RunError(f"checkpoint not found: {cfg.checkpoint or '(none given: --checkpoint PATH)'}")
    data = load_run_data(cfg)
    model, spec = load_classifier(cfg.checkpoint, cfg.model, data, cfg.unsafe_load)
    model = model.to(device)
    try:
        phi, head = split_model(model, cfg.head or spec.get("head"))
        x, _ = next(datasets.batches(data.test, [torch.arange(min(8, len(data.test)))]))
        check_split(model, phi, head, datasets.prepare(data, x, torch.zeros(0), device)[0])
    except (ValueError, TypeError) as exc:
        raise RunError(str(exc)) from exc
    except RuntimeError as exc:
        raise RunError(f"the model does not run on {data.name} inputs of shape {list(data.input_shape)}: "
                       f"{str(exc).splitlines()[0]}") from exc
    if head.out_features != data.num_classes:
        raise RunError(f"the head has {head.out_features} outputs but {data.name} has {data.num_classes} classes")
    return model, phi, head, data, spec
