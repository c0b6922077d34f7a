"""The runs behind ``pof-fast pretrain`` and ``pof-fast posttrain``: SAM, schedules, checkpoints, resume.

A run lives in one folder: ``last.pt`` (a checkpoint after every epoch: model, optimizer and PoF state,
torch's RNG states, the epoch, the runaway guard, the configuration), ``metrics.jsonl`` (one JSON object per
epoch), ``model.pt`` (the final model, with the specification needed to rebuild it) and, for post-training,
``best.pt`` (the epoch with the lowest test NLL). Every random choice of an epoch (data order,
augmentation, search batches) comes from a generator seeded by ``(seed, epoch)``, and the global RNG state
(dropout) is saved, so ``resume`` from ``last.pt`` continues exactly as an uninterrupted run would.

Modules, one job each: :mod:`.sam` (SAM), :mod:`.config` (configurations), :mod:`.schedule` (learning
rates), :mod:`.sampling` (which rows each step and rank sees), :mod:`.world` (device, ranks, torchrun),
:mod:`.checkpoints` (files, RNG states), :mod:`.loading` (data and classifier of a run), :mod:`.evaluation`
(outputs, features, test metrics), :mod:`.geometry` (sharpness, landscape), :mod:`.runaway` (the guard),
:mod:`.run` (the run folder), :mod:`.pretraining` and :mod:`.posttraining` (the loops).
"""
from .checkpoints import checkpoint_data_spec, load_checkpoint, save_checkpoint
from .config import BASE_OPTIMIZERS, RESUMABLE, DataConfig, PostTrainConfig, PretrainConfig, check_config
from .errors import RunError
from .evaluation import evaluate, features, predict
from .geometry import head_sharpness, landscape_of, network_sharpness
from .loading import load_classifier, load_run_data, prepare_posttrain
from .posttraining import posttrain
from .pretraining import pretrain
from .run import Run
from .runaway import RunawayGuard
from .sam import SAM
from .schedule import SCHEDULES, lr_factor
from .world import World, launch, resolve_device

__all__ = ["SAM", "PretrainConfig", "PostTrainConfig", "RunawayGuard", "lr_factor", "pretrain", "posttrain",
           "load_classifier", "prepare_posttrain", "resolve_device", "evaluate", "predict", "features",
           "head_sharpness", "network_sharpness", "landscape_of", "checkpoint_data_spec", "save_checkpoint",
           "load_checkpoint", "RunError", "World", "launch", "BASE_OPTIMIZERS", "SCHEDULES", "RESUMABLE", "DataConfig",
           "check_config", "load_run_data", "Run"]
