"""The loops behind ``pof-fast pretrain`` and ``pof-fast posttrain``: SAM, schedules, checkpoints, resume.

A run lives in one folder: ``last.pt`` (a checkpoint after every epoch: model, optimizer and PoF state,
torch's RNG states, the epoch, the runaway guard, the configuration), ``metrics.jsonl`` (one JSON object per
epoch), ``model.pt`` (the final model, with the specification needed to rebuild it) and, for post-training,
``best.pt`` (the epoch with the lowest test NLL). Every random choice of an epoch (data order,
augmentation, search batches) comes from a generator seeded by ``(seed, epoch)``, and the global RNG state
(dropout) is saved, so ``resume`` from ``last.pt`` continues exactly as an uninterrupted run would.

:class:`SAM` is sharpness-aware minimisation (Foret et al., ICLR 2021): the base optimizer steps with the
gradient taken at ``w + rho g / ||g||``, ``g`` the gradient at ``w`` (the norm over all parameters).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from . import data as datasets
from .metrics import EigenResult, LandscapeResult, classification_metrics, head_hessian_hvp, hessian_lambda_max
from .metrics import landscape as line_landscape
from .metrics import model_hessian_hvp
from .models import build_model, check_split, split_model
from .norm import frozen_norm_stats

__all__ = ["SAM", "PretrainConfig", "PostTrainConfig", "RunawayGuard", "lr_factor", "pretrain", "posttrain",
           "load_classifier", "prepare_posttrain", "resolve_device", "evaluate", "predict", "features",
           "head_sharpness", "network_sharpness", "landscape_of", "checkpoint_data_spec", "save_checkpoint",
           "load_checkpoint", "RunError"]

SCHEDULES = ("constant", "cosine", "step")
BASE_OPTIMIZERS = ("sgd", "adam", "adamw")


class RunError(Exception):
    """A problem with the user's input (paths, arguments, files) that the command line reports in one line."""


# -- SAM -------------------------------------------------------------------------------------------------


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around a base optimizer (Foret et al., 2021).

    ``step(closure)``: the closure zeroes the gradients, computes the loss, calls ``backward()`` and returns the
    loss. SAM calls it at ``w`` (gradient ``g``), moves to ``w + e`` with ``e = rho g / ||g||`` (``||g||`` over
    every parameter), calls it again, moves back to ``w`` and steps the base optimizer with the gradient taken
    at ``w + e``. Returns the loss at ``w``. The closure is told which pass it is in by ``SAM.second_pass``
    (True during the second call), e.g. to keep BatchNorm statistics from moving twice.
    """

    def __init__(self, params: Any, base_optimizer: Type[torch.optim.Optimizer], rho: float = 0.05,
                 **base_kwargs: Any) -> None:
        if not (isinstance(rho, (int, float)) and 0.0 <= rho < math.inf):
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
        super().__init__(params, dict(rho=rho, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.second_pass = False

    @torch.no_grad()
    def _ascend(self) -> List[Tuple[Tensor, Tensor]]:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return []
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
        moved = []
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is not None:
                    e = (p.grad.double() * scale).to(p.dtype)
                    p.add_(e)
                    moved.append((p, e))
        return moved

    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise TypeError("SAM needs a closure: opt.step(closure), where the closure zeroes the gradients, "
                            "computes the loss, calls backward() and returns the loss")
        with torch.enable_grad():
            loss = closure()
        moved = self._ascend()
        self.second_pass = True
        try:
            with torch.enable_grad():
                closure()
        finally:
            self.second_pass = False
            with torch.no_grad():
                for p, e in moved:
                    p.sub_(e)
        self.base_optimizer.step()
        return loss

    def state_dict(self) -> Dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


# -- configurations --------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    data: str = "digits"
    data_dir: Optional[str] = None
    image_size: int = 32
    augment: str = "auto"  # auto (the dataset's), standard, none
    workers: int = 0


@dataclass
class PretrainConfig(DataConfig):
    """Training from scratch. The defaults suit the digits MLP (a few seconds on a CPU); CIFAR recipes use
    lr 0.1, batch 128, 200 epochs."""

    model: str = "mlp"
    optimizer: str = "sgd"  # sgd or sam
    rho: float = 0.05
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: Tuple[int, ...] = ()
    lr_decay: float = 0.1
    epochs: int = 60
    batch_size: int = 64
    seed: int = 0


@dataclass
class PostTrainConfig(DataConfig):
    """PoF from a checkpoint (see :class:`pof_fast.PoF` for the PoF options)."""

    checkpoint: str = ""
    head: Optional[str] = None
    model: Optional[str] = None  # the architecture of a plain state_dict checkpoint
    unsafe_load: bool = False
    base_optimizer: str = "sgd"  # sgd, adam, adamw
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "constant"
    milestones: Tuple[int, ...] = ()
    lr_decay: float = 0.1
    epochs: int = 30
    batch_size: int = 64
    search_batch_size: int = 256
    gamma: float = 2.0
    gamma_sampling: str = "uniform"
    method: str = "newton"
    direction: str = "normalized"
    max_step: float = 100.0
    on_capped: str = "skip"
    norm_stats: str = "frozen"  # BatchNorm in the search forward: frozen or update
    backend: str = "auto"
    runaway_window: int = 2
    stop_on_runaway: bool = False
    seed: int = 0


# settings a resumed run may change (they do not change what is computed)
RESUMABLE = ("epochs", "workers", "stop_on_runaway")


def check_config(cfg: DataConfig) -> None:
    """``RunError`` for values out of range (argparse checks the choices)."""
    positive = ["epochs", "batch_size", "image_size"] + (["search_batch_size", "runaway_window"]
                                                         if isinstance(cfg, PostTrainConfig) else [])
    for name in positive:
        if getattr(cfg, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "weight_decay", "momentum"):
        value = getattr(cfg, name)
        if not (0.0 <= value < math.inf) or (name == "lr" and value == 0.0):
            raise RunError(f"--{name.replace('_', '-')} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, "
                           f"got {value}")
    if getattr(cfg, "schedule", "constant") not in SCHEDULES:
        raise RunError(f"--schedule must be one of {', '.join(SCHEDULES)}")
    if isinstance(cfg, PretrainConfig) and not (0.0 <= cfg.rho < math.inf):
        raise RunError(f"--rho must be a finite number >= 0, got {cfg.rho}")
    if not (0.0 < cfg.lr_decay < math.inf):
        raise RunError(f"--lr-decay must be a finite number > 0, got {cfg.lr_decay}")
    if isinstance(cfg, PostTrainConfig):
        if not (0.0 <= cfg.gamma < math.inf):
            raise RunError(f"--gamma must be a finite number >= 0, got {cfg.gamma}")
        if not (0.0 < cfg.max_step < math.inf):
            raise RunError(f"--max-step must be a finite number > 0, got {cfg.max_step}")
    if cfg.workers < 0:
        raise RunError(f"--workers must be >= 0, got {cfg.workers}")


def lr_factor(schedule: str, epoch_progress: float, epochs: int, milestones: Sequence[int] = (),
              decay: float = 0.1) -> float:
    """The learning-rate multiplier at ``epoch_progress`` (epochs done, fractional) of ``epochs``.

    constant: 1. cosine: ``(1 + cos(pi * progress / epochs)) / 2``, per step. step: ``decay ** k``, ``k`` the
    number of ``milestones`` (epochs) passed; no milestones means half and three quarters of the run.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch_progress / epochs, 1.0)))
    if schedule == "step":
        marks = list(milestones) or [epochs // 2, (3 * epochs) // 4]
        return decay ** sum(epoch_progress >= m for m in marks)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


# -- devices, models, checkpoints ------------------------------------------------------------------------


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


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


# -- evaluation ------------------------------------------------------------------------------------------


def _index_batches(n: int, size: int, gen: Optional[torch.Generator] = None, drop_last: bool = False) -> List[Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    parts = list(order.split(size))
    if drop_last and len(parts) > 1 and len(parts[-1]) < size:
        parts.pop()
    return parts


@torch.no_grad()
def predict(model: nn.Module, data: datasets.Data, split: str, device: torch.device, batch_size: int = 512,
            workers: int = 0, limit: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """``(logits, labels)`` of ``split`` ("train" or "test", no augmentation) in eval mode, on the CPU."""
    part = getattr(data, split)
    n = len(part) if limit is None else min(limit, len(part))
    was = model.training
    model.eval()
    outs, labels = [], []
    try:
        for x, y in datasets.batches(part, _index_batches(n, batch_size), workers):
            x, y = datasets.prepare(data, x, y, device)
            outs.append(model(x).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was)
    return torch.cat(outs), torch.cat(labels)


def evaluate(model: nn.Module, data: datasets.Data, device: torch.device, workers: int = 0) -> Dict[str, float]:
    """Test error, NLL and ECE."""
    return classification_metrics(*predict(model, data, "test", device, workers=workers))


@torch.no_grad()
def features(phi: nn.Module, data: datasets.Data, split: str, device: torch.device, index: Optional[Tensor] = None,
             batch_size: int = 512, workers: int = 0) -> Tuple[Tensor, Tensor]:
    """``(phi(x), y)`` for rows ``index`` (all by default) of ``split``, eval mode, no augmentation."""
    part = getattr(data, split)
    index = torch.arange(len(part)) if index is None else index
    was = phi.training
    phi.eval()
    outs, labels = [], []
    try:
        for x, y in datasets.batches(part, list(index.split(batch_size)), workers):
            x, y = datasets.prepare(data, x, y, device)
            outs.append(phi(x))
            labels.append(y)
    finally:
        phi.train(was)
    return torch.cat(outs), torch.cat(labels)


def checkpoint_data_spec(path: str) -> Optional[Dict[str, Any]]:
    """The data a pof-fast checkpoint was trained on (``{"data", "data_dir", "image_size"}``), or None."""
    if not Path(path).is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a pof-fast checkpoint: no data spec
        return None
    return dict(obj["data_spec"]) if isinstance(obj, dict) and "data_spec" in obj else None


def head_sharpness(phi: nn.Module, head: nn.Linear, data: datasets.Data, device: torch.device, *,
                   samples: int = 2048, method: str = "lanczos", iters: int = 50, tol: float = 1e-3, seed: int = 0,
                   workers: int = 0, on_iteration: Optional[Callable[[int, float, float], None]] = None
                   ) -> EigenResult:
    """lambda_max of the Hessian of the training loss with respect to the head's parameters, at the head as
    it is, on ``samples`` training rows (a seeded choice; all when there are fewer), features in eval mode,
    in float64."""
    n = len(data.train)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(samples, n)].sort().values
    h, y = features(phi, data, "train", device, index, workers=workers)
    bias = None if head.bias is None else head.bias.detach().double()
    hvp, dim = head_hessian_hvp(h.double(), y, head.weight.detach().double(), bias)
    return hessian_lambda_max(hvp, dim, method=method, iters=iters, tol=tol, seed=seed, device=h.device,
                              dtype=torch.float64, on_iteration=on_iteration)


def network_sharpness(model: nn.Module, data: datasets.Data, device: torch.device, *, samples: int = 2048,
                      batch_size: int = 256, method: str = "lanczos", iters: int = 50, tol: float = 1e-3,
                      seed: int = 0, workers: int = 0,
                      on_iteration: Optional[Callable[[int, float, float], None]] = None) -> EigenResult:
    """lambda_max of the Hessian of the training loss with respect to every trainable parameter (eval mode, so
    BatchNorm uses its running statistics), on ``samples`` training rows, by double back-propagation."""
    n = len(data.train)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(samples, n)].sort().values
    batches = [datasets.prepare(data, *b, device) for b in datasets.batches(data.train, list(index.split(batch_size)),
                                                                            workers)]
    params = [p for p in model.parameters() if p.requires_grad]
    was = model.training
    model.eval()
    try:
        hvp, dim = model_hessian_hvp(model, params, batches)
        return hessian_lambda_max(hvp, dim, method=method, iters=iters, tol=tol, seed=seed, device=device,
                                  dtype=torch.float32, on_iteration=on_iteration)
    finally:
        model.train(was)


def landscape_of(phi: nn.Module, head: nn.Linear, data: datasets.Data, device: torch.device, *,
                 batch_size: int = 128, batches: int = 32, max_step: float = 100.0, seed: int = 0,
                 workers: int = 0) -> LandscapeResult:
    """:func:`pof_fast.metrics.landscape` on ``batches`` random batches of ``batch_size`` rows of the training
    and of the test split (rows distinct within a batch; features in eval mode, no augmentation)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for split in ("train", "test"):
        n = len(getattr(data, split))
        size = min(batch_size, n)
        index = torch.cat([torch.randperm(n, generator=gen)[:size] for _ in range(batches)])
        h, y = features(phi, data, split, device, index, workers=workers)
        pairs.append(list(zip(h.split(size), y.split(size))))
    weight = head.weight.detach()
    bias = None if head.bias is None else head.bias.detach()
    return line_landscape(pairs[0], pairs[1], weight, bias, max_step=max_step)


# -- the runaway guard -----------------------------------------------------------------------------------


@dataclass
class RunawayGuard:
    """Flags post-training whose perturbation feeds on itself.

    Fires at an epoch when, over the last ``window`` epoch-to-epoch changes, the mean t* or the mean
    perturbation norm grew at every epoch and by at least ``growth`` (relative) in all, **and** the test NLL
    rose at every epoch and by at least ``rise`` in all. Under the stable defaults t* may drift up slowly while
    the test NLL falls or moves by noise: that does not fire.
    """

    window: int = 2
    growth: float = 0.10
    rise: float = 0.10
    history: List[Tuple[float, float, float]] = field(default_factory=list)  # (t*, ||pert||, test NLL)
    fired_at: List[int] = field(default_factory=list)

    def update(self, epoch: int, t_star: float, perturbation_norm: float, test_nll: float) -> bool:
        self.history.append((t_star, perturbation_norm, test_nll))
        recent = self.history[-(self.window + 1):]
        if len(recent) < self.window + 1:
            return False

        def grows(k: int, by: float) -> bool:
            steady = all(b[k] > a[k] for a, b in zip(recent, recent[1:]))
            return steady and recent[-1][k] >= (1.0 + by) * recent[0][k]

        fired = (grows(0, self.growth) or grows(1, self.growth)) and grows(2, self.rise)
        if fired:
            self.fired_at.append(epoch)
        return fired


# -- the loops -------------------------------------------------------------------------------------------


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


def _resumed_config(cls: type, saved: Dict[str, Any], overrides: Optional[Dict[str, Any]],
                    warn: Callable[[str], None]) -> Any:
    """The saved configuration; from ``overrides`` (the settings given for the resumed run) those of
    :data:`RESUMABLE` are taken, and any other that differs from the saved value gets a warning and is ignored."""
    defaults = cls()
    values = {f.name: saved.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)}
    for name, value in (overrides or {}).items():
        if name not in values:
            continue
        if name in RESUMABLE:
            values[name] = value
        elif _norm(value) != _norm(values[name]):
            warn(f"--resume: --{name.replace('_', '-')} {value} ignored, the run continues with {values[name]}")
    return cls(**values)


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


def _progress(iterable: Any, total: int, desc: str, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not show, leave=False, dynamic_ncols=True)


def _set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor
    return base_lr * factor


def _model_spec(cfg_model: str, data: datasets.Data) -> Dict[str, Any]:
    return {"model": cfg_model, "input_shape": list(data.input_shape), "num_classes": data.num_classes}


def _data_spec(cfg: DataConfig) -> Dict[str, Any]:
    data_dir = None if cfg.data_dir is None else str(Path(cfg.data_dir).resolve())
    return {"data": cfg.data, "data_dir": data_dir, "image_size": cfg.image_size}


def load_run_data(cfg: DataConfig) -> datasets.Data:
    """The configuration's dataset; ``RunError`` with the reason when it cannot be read."""
    try:
        data = datasets.load_data(cfg.data, cfg.data_dir, cfg.image_size)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise RunError(str(exc)) from exc
    if cfg.augment != "auto":
        data.augment = cfg.augment
    return data


def pretrain(cfg: Optional[PretrainConfig], out: str, *, device: torch.device, resume: bool = False,
             overrides: Optional[Dict[str, Any]] = None, force: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train a built-in model from scratch with SGD or SAM into the run folder ``out``; returns the last epoch's
    metrics. ``resume``: continue the run in ``out`` with its saved configuration (``cfg`` is not needed);
    ``overrides`` may change the settings of :data:`RESUMABLE` (others are ignored with a warning)."""
    run = Run(out, resume, force)
    state = load_checkpoint(run.last) if resume else None
    if state is not None:
        if state.get("kind") != "pretrain":
            raise RunError(f"{run.last} is a {state.get('kind')} checkpoint, not a pretrain one")
        cfg = _resumed_config(PretrainConfig, state["config"], overrides, log)
    if cfg is None:
        raise RunError("pretrain needs a configuration (or resume=True)")
    check_config(cfg)
    data = load_run_data(cfg)
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    except ValueError as exc:
        raise RunError(str(exc)) from exc
    run.start()
    base_kwargs = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                       weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sam":
        opt: torch.optim.Optimizer = SAM(model.parameters(), torch.optim.SGD, rho=cfg.rho, **base_kwargs)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), **base_kwargs)
    else:
        raise RunError(f"--optimizer must be sgd or sam, got {cfg.optimizer!r}")
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        start = state["epoch"]
        run.history(start)
    else:
        run.log({"epoch": 0, **{f"test_{k}": v for k, v in evaluate(model, data, device, cfg.workers).items()}})
    spec = _model_spec(cfg.model, data)
    log(f"pretrain: {cfg.model} on {data.name} ({len(data.train)} train / {len(data.test)} test rows), "
        f"{cfg.optimizer}{f' rho={cfg.rho}' if cfg.optimizer == 'sam' else ''}, lr {cfg.lr} {cfg.schedule}, "
        f"batch {cfg.batch_size}, {cfg.epochs} epochs" + (f", resumed after epoch {start}" if start else ""))
    row: Dict[str, Any] = {}
    for epoch in range(start + 1, cfg.epochs + 1):
        began = time.perf_counter()
        gen = _epoch_generator(cfg.seed, epoch)
        index = _index_batches(len(data.train), cfg.batch_size, gen, drop_last=True)
        model.train()
        total = torch.zeros((), dtype=torch.float64, device=device)
        rows = 0
        for i, (x, y) in enumerate(_progress(datasets.batches(data.train, index, cfg.workers), len(index),
                                             f"pretrain {epoch}/{cfg.epochs}", progress)):
            x, y = datasets.prepare(data, x, y, device, gen)
            lr = _set_lr(opt, cfg.lr, lr_factor(cfg.schedule, epoch - 1 + i / len(index), cfg.epochs,
                                                cfg.milestones, cfg.lr_decay))

            def closure() -> Tensor:
                opt.zero_grad()
                if getattr(opt, "second_pass", False):  # SAM's second pass: BatchNorm statistics move once
                    with frozen_norm_stats(model):
                        loss = nn.functional.cross_entropy(model(x), y)
                        loss.backward()
                else:
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                return loss

            loss = opt.step(closure)
            total += loss.detach().double() * len(y)
            rows += len(y)
        test = evaluate(model, data, device, cfg.workers)
        row = {"epoch": epoch, "lr": lr, "train_loss": float(total) / max(rows, 1),
               **{f"test_{k}": v for k, v in test.items()}, "seconds": time.perf_counter() - began}
        run.log(row)
        save_checkpoint(run.last, {"kind": "pretrain", "config": asdict(cfg), "model_spec": spec,
                                   "data_spec": _data_spec(cfg), "model": model.state_dict(),
                                   "optimizer": opt.state_dict(), "rng": _rng_state(), "epoch": epoch})
        log(f"epoch {epoch:>4}  lr {lr:.4g}  train loss {row['train_loss']:.4f}  test error {test['error']:.2%}  "
            f"NLL {test['nll']:.4f}  ECE {test['ece']:.4f}")
    save_checkpoint(run.dir / "model.pt", {"kind": "model", "model_spec": spec, "data_spec": _data_spec(cfg),
                                           "model": model.state_dict(), "config": asdict(cfg)})
    return row


def _base_class(name: str) -> Tuple[Type[torch.optim.Optimizer], Callable[[PostTrainConfig], Dict[str, Any]]]:
    if name == "sgd":
        return torch.optim.SGD, lambda c: dict(lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0,
                                               weight_decay=c.weight_decay)
    if name == "adam":
        return torch.optim.Adam, lambda c: dict(lr=c.lr, weight_decay=c.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW, lambda c: dict(lr=c.lr, weight_decay=c.weight_decay)
    raise RunError(f"--base-optimizer must be one of {', '.join(BASE_OPTIMIZERS)}, got {name!r}")


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


def posttrain(cfg: Optional[PostTrainConfig], out: str, *, device: torch.device, resume: bool = False,
              overrides: Optional[Dict[str, Any]] = None, force: bool = False, progress: bool = True,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """PoF post-training of the feature extractor of ``cfg.checkpoint`` into the run folder ``out``; returns the
    final epoch's metrics (with ``"runaway"``: the epochs where the guard fired, ``"stopped"``, ``"best_epoch"``
    and ``"before"``: the starting model's test metrics). ``resume``/``overrides`` as in :func:`pretrain`."""
    from .optim import PoF

    run = Run(out, resume, force)
    state = load_checkpoint(run.last) if resume else None
    if state is not None:
        if state.get("kind") != "posttrain":
            raise RunError(f"{run.last} is a {state.get('kind')} checkpoint, not a posttrain one")
        cfg = _resumed_config(PostTrainConfig, state["config"], overrides, log)
    if cfg is None:
        raise RunError("posttrain needs a configuration (or resume=True)")
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    model, phi, head, data, spec = prepare_posttrain(cfg, device)
    if "file" in spec:
        spec = dict(spec, head=cfg.head)
    base, kwargs = _base_class(cfg.base_optimizer)
    head_ids = {id(p) for p in head.parameters()}
    params = [p for p in model.parameters() if id(p) not in head_ids]
    opt = PoF(params, base, head=head, gamma=cfg.gamma, gamma_sampling=cfg.gamma_sampling, method=cfg.method,
              direction=cfg.direction, max_step=cfg.max_step, on_capped=cfg.on_capped, backend=cfg.backend,
              seed=cfg.seed, **kwargs(cfg))
    guard = RunawayGuard(cfg.runaway_window)
    best = {"epoch": 0, "test_nll": math.inf}
    start = 0
    run.start()
    before = evaluate(model, data, device, cfg.workers)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        guard = RunawayGuard(cfg.runaway_window, history=[tuple(h) for h in state["guard"]["history"]],
                             fired_at=list(state["guard"]["fired_at"]))
        best, start = dict(state["best"]), state["epoch"]
        run.history(start)
    else:
        run.log({"epoch": 0, **{f"test_{k}": v for k, v in before.items()}})
        best = {"epoch": 0, "test_nll": before["nll"]}
        save_checkpoint(run.dir / "best.pt", _final(spec, cfg, model, 0))
    log(f"posttrain: PoF on {data.name}, gamma {cfg.gamma} ({cfg.gamma_sampling}), {cfg.method}/{cfg.direction}, "
        f"{cfg.base_optimizer} lr {cfg.lr} {cfg.schedule}, search batch {cfg.search_batch_size}, train batch "
        f"{cfg.batch_size}, {cfg.epochs} epochs" + (f", resumed after epoch {start}" if start else ""))
    log(f"{'epoch':>5} {'t*':>8} {'||pert||':>8} {'||g||':>7} {'capped':>6} {'skipped':>7} {'train':>7} "
        f"{'test err':>8} {'NLL':>7} {'ECE':>6}")
    row: Dict[str, Any] = {}
    stopped = False
    loss_fn = nn.functional.cross_entropy
    for epoch in range(start + 1, cfg.epochs + 1):
        began = time.perf_counter()
        gen = _epoch_generator(cfg.seed, epoch)
        index = _index_batches(len(data.train), cfg.batch_size, gen, drop_last=True)
        n = len(data.train)
        search_index = [torch.randint(n, (cfg.search_batch_size,), generator=gen) if cfg.search_batch_size < n
                        else torch.randperm(n, generator=gen) for _ in index]  # a search batch: random training rows
        model.train()
        phi.train()  # a split copy of the model's root keeps its own training flag
        opt.reset_summary()
        total = torch.zeros((), dtype=torch.float64, device=device)
        rows = 0
        pairs = zip(datasets.batches(data.train, index, cfg.workers),
                    datasets.batches(data.train, search_index, cfg.workers))
        for i, ((x, y), (xs, ys)) in enumerate(_progress(pairs, len(index), f"PoF {epoch}/{cfg.epochs}", progress)):
            x, y = datasets.prepare(data, x, y, device, gen)
            xs, ys = datasets.prepare(data, xs, ys, device, gen)
            lr = _set_lr(opt, cfg.lr, lr_factor(cfg.schedule, epoch - 1 + i / len(index), cfg.epochs,
                                                cfg.milestones, cfg.lr_decay))
            opt.perturb(opt.search_features(phi, xs, norm_stats=cfg.norm_stats), ys)
            opt.zero_grad()
            loss = loss_fn(head(phi(x)), y)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(y)
            rows += len(y)
        pof = opt.summary()
        test = evaluate(model, data, device, cfg.workers)
        runaway = guard.update(epoch, pof["step"], pof["perturbation_norm"], test["nll"])
        row = {"epoch": epoch, "lr": lr, **pof, "train_loss": float(total) / max(rows, 1),
               **{f"test_{k}": v for k, v in test.items()}, "runaway": runaway,
               "seconds": time.perf_counter() - began}
        run.log(row)
        if test["nll"] < best["test_nll"]:
            best = {"epoch": epoch, "test_nll": test["nll"]}
            save_checkpoint(run.dir / "best.pt", _final(spec, cfg, model, epoch))
        save_checkpoint(run.last, {"kind": "posttrain", "config": asdict(cfg), "model_spec": spec,
                                   "data_spec": _data_spec(cfg), "model": model.state_dict(),
                                   "optimizer": opt.state_dict(), "rng": _rng_state(), "epoch": epoch,
                                   "guard": {"history": [list(h) for h in guard.history],
                                             "fired_at": guard.fired_at}, "best": best})
        log(f"{epoch:>5} {pof['step']:>8.4f} {pof['perturbation_norm']:>8.4f} {pof['grad_norm']:>7.4f} "
            f"{pof['capped_rate']:>6.1%} {pof['skipped_rate']:>7.1%} {row['train_loss']:>7.4f} "
            f"{test['error']:>8.2%} {test['nll']:>7.4f} {test['ece']:>6.4f}")
        if runaway:
            log(f"warning: runaway at epoch {epoch}: mean t* / perturbation norm grew for {cfg.runaway_window} epochs "
                f"in a row while the test NLL rose (lower --lr or --gamma, or use --gamma-sampling uniform)" +
                ("; stopping (--stop-on-runaway)" if cfg.stop_on_runaway else
                 "; --stop-on-runaway stops here and keeps the best epoch"))
            if cfg.stop_on_runaway:
                stopped = True
                break
    final = load_checkpoint(run.dir / "best.pt") if stopped else _final(spec, cfg, model, row.get("epoch", start))
    if stopped:
        log(f"kept the best epoch ({best['epoch']}, test NLL {best['test_nll']:.4f}) as {run.dir / 'model.pt'}")
    save_checkpoint(run.dir / "model.pt", final)
    return dict(row, runaway=list(guard.fired_at), stopped=stopped, best_epoch=best["epoch"],
                before={f"test_{k}": v for k, v in before.items()})


def _final(spec: Dict[str, Any], cfg: PostTrainConfig, model: nn.Module, epoch: int) -> Dict[str, Any]:
    return {"kind": "model", "model_spec": spec, "data_spec": _data_spec(cfg), "model": model.state_dict(),
            "config": asdict(cfg), "epoch": epoch}
