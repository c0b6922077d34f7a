"""The PoF optimizer: post-trains a feature extractor around a fixed linear head.

Each step perturbs the head to theta0 - gamma * t* * u (t* from :func:`pof_fast.line_search` on a
search batch), lets the caller back-propagate a training loss through the perturbed head, then
steps the base optimizer on the feature extractor and restores the head to theta0 bit-exactly.
"""
from __future__ import annotations

import inspect
import math
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Type

import torch
from torch import Tensor, nn
from torch.optim import optimizer as torch_optimizer

from . import _validate as check
from . import dispatch, distributed
from .gamma import GammaSampler
from .graph import CapturedSearch
from .head import FixedHead, check_not_partitioned
from .norm import frozen_norm_stats
from .search import LineSearchResult, line_search, raise_named

__all__ = ["PoF", "PoFStats"]

GAMMA_SAMPLING = ("uniform", "fixed")
ON_CAPPED = ("skip", "clip")
SUMMARY_KEYS = ("step", "gamma", "perturbation_norm", "grad_norm", "loss0", "loss", "capped_rate", "skipped_rate")


@dataclass(frozen=True)
class PoFStats:
    """Telemetry of one perturbation; 0-d tensors on the head's device (read them when logging).

    step: t* of the search.  gamma: the factor used (drawn or fixed).  applied_step: the t used
    for the perturbation (0 when skipped, max_step when clipped).  perturbation_norm:
    ||gamma t u||.  grad_norm: ||g||.  loss0, loss: l(0), l(t*).  capped, skipped: bools.
    """

    step: Tensor
    gamma: Tensor
    applied_step: Tensor
    perturbation_norm: Tensor
    grad_norm: Tensor
    loss0: Tensor
    loss: Tensor
    capped: Tensor
    skipped: Tensor

    def values(self) -> Tensor:
        """``[8]`` float64, in the order of the summary keys."""
        return torch.stack([
            self.step.double(), self.gamma.double(), self.perturbation_norm.double(), self.grad_norm.double(),
            self.loss0.double(), self.loss.double(), self.capped.double(), self.skipped.double(),
        ])


@dataclass
class _Telemetry:
    """PoF's mutable record, one object: framework wrappers that copy an optimizer's ``__dict__``
    (Lightning's ``LightningOptimizer``) then still write into and read from the user's PoF.

    sums ``[8]`` float64 (the summary keys) and counts ``[2]`` int64 (perturbations, optimizer steps) live on
    the head's device and are updated in place: no host sync, and one compiled graph whatever the count.
    """

    sums: Tensor
    counts: Tensor
    last: Optional[PoFStats] = None
    captured: Dict[Any, CapturedSearch] = field(default_factory=dict)
    head_checked: bool = False  # validate=True: the head was compared with theta0 at the first perturb
    perturbed: bool = False  # perturb() was called at least once (a step before that is plain fine-tuning)
    warned_unperturbed: bool = False
    # validate=True on CUDA: (pinned host flag, event after it, features, target) of the last search, read later
    pending: Optional[tuple] = None
    # (features [n, D], target [n]) of the last training batch, from record(); perturb() with no batch takes them
    recorded: Optional[tuple[Tensor, Tensor]] = None


def _check_head(head: object) -> nn.Linear:
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be a torch.nn.Linear, got {type(head).__name__}")
    check_not_partitioned(head)
    # weight_norm / spectral_norm / torch.nn.utils.parametrize: head.weight is computed from other
    # parameters, so writing theta0 - gamma t u into it would not perturb the head that runs.
    if not isinstance(head._parameters.get("weight"), nn.Parameter) or any(
        type(hook).__name__ in ("WeightNorm", "SpectralNorm") for hook in head._forward_pre_hooks.values()
    ):
        raise ValueError(
            "head's weight is computed from other parameters (weight_norm, spectral_norm or a parametrization): "
            "PoF perturbs the weight itself. Remove the reparametrization first, e.g. "
            "torch.nn.utils.parametrize.remove_parametrizations(head, 'weight') or torch.nn.utils.remove_weight_norm(head)"
        )
    return head


def _check_finite(head: FixedHead) -> None:
    name = head.nonfinite()
    if name is not None:
        raise ValueError(f"head.{name} contains NaN or inf: theta0 must be a trained, finite head")


class PoF(torch.optim.Optimizer):
    """Wraps a base optimizer for PoF post-training (Sato et al., ICML 2022).

    Args:
        params: the feature extractor's parameters (or param groups). Must not include the head's.
        base_optimizer: a ``torch.optim.Optimizer`` class, built on our ``param_groups`` with
            ``**base_kwargs`` so schedulers and grad scalers see one optimizer. Closure-driven bases
            (``LBFGS``) get ``step(closure)``'s closure; SAM-style bases that take a ``base_optimizer``
            of their own get it from ``base_kwargs`` (pass PoF's base positionally).
        head: the trained ``nn.Linear`` head. theta0 is its weight and bias **at construction** (load the
            trained weights first, or call :meth:`retake_theta0` after loading). Its parameters are frozen
            (see ``freeze_head``) and their stale ``.grad`` cleared: PoF never trains the head.
        gamma: perturbation factor (the paper: 2).
        gamma_sampling: ``"uniform"`` (default) draws the factor from U(0, gamma) at every step as
            the reference script does; ``"fixed"`` uses ``gamma`` itself as the poster's formula
            reads. Uniform is the default because it is the stable one: on a SAM-trained MLP on the
            digits data, fixed gamma = 2 made t* grow step after step (the features drift away
            from what theta0 fits) until test error rose from ~3% to 25-30%, at post-training
            learning rates from 1e-4 (over 100 epochs) to 5e-3; uniform sampling stayed stable.
        method: passed to :func:`pof_fast.line_search`, as are ``direction``, ``init_step``, ``max_step``, ``partitions``,
            ``ignore_index``, ``backend`` (checked here) and ``validate``. On CUDA, ``validate=True`` reads the
            search's finiteness flag at the next ``perturb`` (no stall); a search on bad data does not perturb
            the head, and that next call raises the ``ValueError`` naming the bad argument.
        on_capped: ``"skip"`` applies no perturbation when the search was capped (as the reference
            multi-GPU script rejects such steps); ``"clip"`` perturbs with t* = max_step.
        seed: seed of PoF's own gamma stream (a fresh random one when None; torch's global RNG is never used).
        cuda_graph: run each search as a CUDA graph replay (captured once per search-batch shape; the head
            must be on a CUDA device; implies no data checks inside the graph, see :class:`CapturedSearch`).
        process_group: search the union of every rank's search batch (see :func:`pof_fast.line_search`), so all
            ranks perturb the head identically; the gamma stream's seed is rank 0's. A head whose weight is a
            DTensor sharded by classes (FSDP2, ``ColwiseParallel``, 2-D meshes) needs nothing more: its mesh says
            which ranks hold the other rows and which bring their own tokens (gathered, never the head); theta0 is
            this rank's rows and the perturbation is written into them (:mod:`pof_fast.head`). An explicit
            ``process_group`` there is the data-parallel union: the tokens are gathered over it instead.
        freeze_head: set the head's ``requires_grad`` to False. None (default): True unless
            ``torch.distributed`` is initialized, where a ``DistributedDataParallel`` built before PoF
            would wait for the head's gradients; then the head keeps ``requires_grad`` and PoF drops its
            gradients at every step. Build PoF before DDP and pass True to save that work.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Optional[Type[torch.optim.Optimizer]] = None,
        /,
        *,
        head: nn.Linear,
        gamma: float = 2.0,
        gamma_sampling: str = "uniform",
        method: str = "newton",
        direction: str = "normalized",
        init_step: float = 1.0,
        max_step: float = 100.0,
        partitions: int = 16,
        ignore_index: int = -100,
        on_capped: str = "skip",
        backend: str = "auto",
        seed: Optional[int] = None,
        validate: bool = True,
        cuda_graph: bool = False,
        freeze_head: Optional[bool] = None,
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
        **base_kwargs: Any,
    ) -> None:
        if base_optimizer is None:  # PoF(params, base_optimizer=SGD, ...)
            base_optimizer = base_kwargs.pop("base_optimizer", None)
        if not isinstance(base_optimizer, type) or not issubclass(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer class (e.g. torch.optim.SGD), got {base_optimizer!r}")
        head = _check_head(head)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0 <= gamma < math.inf):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        check.choice("gamma_sampling", gamma_sampling, GAMMA_SAMPLING)
        check.choice("on_capped", on_capped, ON_CAPPED)
        check.search_options(method, direction, init_step, max_step, partitions, ignore_index)
        dispatch.check_backend(backend)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if cuda_graph and head.weight.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the head on a CUDA device, it is on {head.weight.device}")
        fixed = FixedHead(head)
        _check_finite(fixed)
        if cuda_graph and fixed.layout is not None:
            raise ValueError("cuda_graph=True with a sharded (DTensor) head is not supported: the search's "
                             "collectives run between launches")
        super().__init__(params, dict(base_kwargs))
        head_ids = {id(p) for p in head.parameters()}
        if any(id(p) in head_ids for group in self.param_groups for p in group["params"]):
            raise ValueError(
                "params must not include the head's parameters: PoF keeps the head fixed at theta0. Pass only the "
                "feature extractor's parameters (a Transformers Trainer building PoF from optimizer_cls_and_kwargs "
                "passes every parameter that requires a gradient: freeze the head first, head.requires_grad_(False)). "
                "A head whose weight is tied to an embedding of the feature extractor cannot be kept fixed: untie it "
                "(a Hugging Face model: pof_fast.integrations.transformers.untie_lm_head(model))"
            )
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        # GradScaler hands grad_scale/found_inf to step() (no host read to skip a step) when this is True.
        self._step_supports_amp_scaling = True
        self._base_fused_scaling = bool(getattr(self.base_optimizer, "_step_supports_amp_scaling", False))
        closure = inspect.signature(self.base_optimizer.step).parameters.get("closure")
        self._base_needs_closure = closure is not None and closure.default is inspect.Parameter.empty

        if freeze_head is None:
            freeze_head = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.freeze_head = bool(freeze_head)
        self.head = head
        for p in head.parameters():
            p.grad = None
            if self.freeze_head:
                p.requires_grad_(False)
        self._head = fixed
        self.gamma = float(gamma)
        self.gamma_sampling = gamma_sampling
        self.on_capped = on_capped
        self.cuda_graph = bool(cuda_graph)
        self.search_kwargs = dict(
            method=method, direction=direction, init_step=init_step, max_step=max_step,
            partitions=partitions, ignore_index=ignore_index, backend=backend, validate=validate,
            process_group=None,
        )
        self.gamma_sampler = GammaSampler(seed if seed is not None else secrets.randbits(63), head.weight.device)
        if fixed.layout is not None and fixed.layout.mesh_group is not None:  # every rank of the mesh: one gamma
            self.gamma_sampler.agree(fixed.layout.mesh_group)
        if process_group is not None:
            self.set_process_group(process_group)
        device = head.weight.device
        self._telemetry = _Telemetry(torch.zeros(8, dtype=torch.float64, device=device),
                                     torch.zeros(2, dtype=torch.int64, device=device))

    def set_process_group(self, process_group: "torch.distributed.ProcessGroup") -> None:
        """Search the union of the ranks' search batches from now on, as ``PoF(..., process_group=...)`` does.

        Every rank of the group then perturbs the head identically, and the gamma stream becomes rank 0's
        (offset and position, one broadcast). Call it on every rank of the group, between steps.
        """
        if self.cuda_graph:
            raise ValueError("cuda_graph=True with a process_group is not supported: the union search's "
                             "all-reduces run between launches")
        self.gamma_sampler.agree(process_group)
        self.search_kwargs["process_group"] = process_group

    @property
    def process_group(self) -> Optional["torch.distributed.ProcessGroup"]:
        """The group whose ranks' search batches are searched together (None: this process's batch alone)."""
        return self.search_kwargs["process_group"]

    # -- theta0 ---------------------------------------------------------------------------------------

    @property
    def theta0_weight(self) -> Tensor:
        """theta0's weight ``[C, D]`` (a sharded head: this rank's rows ``[C_r, D]``)."""
        return self._head.theta0_weight

    @property
    def theta0_bias(self) -> Optional[Tensor]:
        """theta0's bias ``[C]`` (this rank's rows of a sharded head), or None."""
        return self._head.theta0_bias

    def retake_theta0(self) -> None:
        """Take theta0 anew from the head as it is now (e.g. after ``model.load_state_dict(trained)``)."""
        _check_head(self.head)
        _check_finite(self._head)
        self._head.retake()

    def restore(self) -> None:
        """Set the head back to theta0, bit-exactly."""
        self._head.restore()

    # -- one PoF step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def search_features(self, extractor: nn.Module, *inputs: Any, norm_stats: str = "frozen") -> Tensor:
        """``extractor(*inputs)`` for the search batch, without gradients.

        norm_stats: ``"frozen"`` (default): BatchNorm-style layers normalise with the batch's statistics
        as in training but their running statistics do not move (see :func:`pof_fast.frozen_norm_stats`);
        ``"update"``: they move, as the reference script's train-mode search forward does.
        """
        check.choice("norm_stats", norm_stats, ("frozen", "update"))
        if norm_stats == "update":
            return extractor(*inputs)
        with frozen_norm_stats(extractor):
            return extractor(*inputs)

    @torch.no_grad()
    def perturb(self, search_features: Optional[Tensor] = None, search_target: Optional[Tensor] = None
                ) -> LineSearchResult:
        """Search along the normalised head gradient of the search batch and perturb the head.

        search_features: ``[n, D]`` phi(x_s), or ``[..., D]`` token batches (e.g. a causal LM's ``[B, T, D]``
        hidden states, see :func:`pof_fast.causal_lm_rows`), any float dtype (promoted to the head's; no gradient
        needed). search_target: ``[n]`` (or ``[...]``) labels, ``ignore_index`` for rows that do not count.
        Both omitted: the search runs on the last training batch given to :meth:`record` (and drops it).
        Sets the head to theta0 - gamma * t* * u; returns the search. A sharded head: this rank's rows (plain
        tensors, or DTensors whose placements say which ranks share them); the result's directions are this
        rank's rows.
        Call it once per optimizer step (with gradient accumulation: once, before the micro-batches).
        """
        if search_features is None and search_target is None:
            search_features, search_target = self._take_recorded()
        layout = self._head.layout
        if layout is not None:  # a sharded head: this rank's rows, then every rank's that brings its own tokens
            search_features, search_target, dims = distributed.local_rows(layout, search_features, search_target)
            search_features, search_target = self._search_rows(search_features, search_target, "search_")
            group = self.process_group or distributed.group_of(layout.mesh, dims)
            search_features, search_target = distributed.gather_rows(
                search_features.detach(), search_target, group, self.search_kwargs["ignore_index"])
        search_features, search_target = self._search_rows(search_features, search_target, "search_")
        if self.search_kwargs["validate"] and not self._telemetry.head_checked:
            self._telemetry.head_checked = True
            self._warn_if_head_moved()
        result, finite = self._checked_search(search_features.detach(), search_target)
        factor = self.gamma_sampler.draw(self.gamma, self.gamma_sampling == "uniform")
        capped_step = torch.full_like(result.step, self.search_kwargs["max_step"] if self.on_capped == "clip" else 0.0)
        applied = torch.where(result.capped, capped_step, result.step)
        if finite is not None:  # a search on bad data (reported at the next call) never perturbs the head
            applied = torch.where(finite, applied, torch.zeros_like(applied))
        coef = factor.to(applied.dtype) * applied
        self._head.write(coef, result.weight_direction, result.bias_direction)
        stats = PoFStats(
            step=result.step, gamma=factor, applied_step=applied,
            perturbation_norm=coef * result.direction_norm, grad_norm=result.grad_norm,
            loss0=result.loss0, loss=result.loss, capped=result.capped,
            skipped=result.capped & (self.on_capped == "skip"),
        )
        record = self._telemetry
        record.last = stats
        record.perturbed = True
        record.sums.add_(stats.values())
        record.counts[0] += 1
        return result

    def record(self, features: Tensor, target: Tensor) -> None:
        """Keep the head's input and targets of this training forward: the next :meth:`perturb` with no
        arguments searches on them (the previous-batch search, see ``docs/search-data.md``).

        features: ``[n, D]`` or ``[..., D]`` (a causal LM: ``pof.record(*pof_fast.causal_lm_rows(hidden, labels))``),
        target: ``[n]`` or ``[...]`` labels (``ignore_index`` for rows that do not count). Kept detached, without a
        copy (views), until that ``perturb`` or the next ``record``, which replaces them: only the last batch is kept.
        Call it after the last micro-batch's forward (or on every micro-batch: the last one wins). No host sync;
        traceable by ``torch.compile(fullgraph=True)`` inside the training forward.
        """
        features, target = self._search_rows(features, target, "")
        self._telemetry.recorded = (features.detach(), target)

    @property
    def recorded(self) -> Optional[tuple[Tensor, Tensor]]:
        """``(features [n, D], target [n])`` kept by :meth:`record` for the next :meth:`perturb` (None: none)."""
        return self._telemetry.recorded

    def _take_recorded(self) -> tuple[Tensor, Tensor]:
        """The batch :meth:`record` kept, dropped from PoF (a ValueError when there is none)."""
        recorded, self._telemetry.recorded = self._telemetry.recorded, None
        if recorded is None:
            raise ValueError("perturb() without search_features and search_target searches the batch given to "
                             "record() since the last perturb(), and none was recorded: record the training batch "
                             "(pof.record(features, target)) after its forward, or pass a search batch (the first "
                             "step has no previous batch: give it a fresh one)")
        return recorded

    def _search_rows(self, features: Tensor, target: Tensor, prefix: str) -> tuple[Tensor, Tensor]:
        """``(features [n, D], target [n] int64)`` after the checks, views where the layouts allow."""
        check.row_features(f"{prefix}features", features)
        if features.shape[-1] != self.theta0_weight.shape[1]:
            raise ValueError(
                f"{prefix}features must have shape [..., {self.theta0_weight.shape[1]}] (the head's in_features), "
                f"got {list(features.shape)}"
            )
        target = check.target_tensor(target, features.shape[:-1])
        return features.reshape(-1, features.shape[-1]), target

    def _warn_if_head_moved(self) -> None:
        """One host read, at the first perturb with validate=True: weights loaded after PoF was built."""
        if self._head.moved():
            warnings.warn(
                "pof_fast.PoF: the head changed since PoF was built, and theta0 is the head at construction: "
                "the first step sets the head back to that theta0. If you loaded trained weights after building "
                "PoF, call opt.retake_theta0() first.", RuntimeWarning, stacklevel=3)

    def _checked_search(self, features: Tensor, target: Tensor) -> tuple[LineSearchResult, Optional[Tensor]]:
        """The search, and on CUDA with validate=True its finiteness flag, checked later without a stall.

        On the CPU (and with validate=False) the search checks itself (one cheap read). On CUDA a read right
        after the search would wait for every kernel queued before it; instead the flag l(0) + ||g|| is finite
        goes to pinned host memory behind an event, and is read at the next ``perturb`` or ``summary``, when it
        is long done. The bad argument is then named in a ``ValueError``; the bad search did not perturb.
        """
        if not (self.search_kwargs["validate"] and features.device.type == "cuda"):
            return self._search(features, target, self.search_kwargs["validate"]), None
        self.raise_pending()
        result = self._search(features, target, False)
        finite = torch.isfinite(result.loss0 + result.grad_norm)
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._telemetry.pending = (flag, event, features, target)
        return result, finite

    def raise_pending(self) -> None:
        """Raise the ``ValueError`` of a search on bad data not yet reported (CUDA with validate=True)."""
        pending, self._telemetry.pending = self._telemetry.pending, None
        if pending is None:
            return
        flag, event, features, target = pending
        if not event.query():  # recorded a step ago: normally done, so this reads without waiting
            event.synchronize()
        if not bool(flag):
            raise_named({"search_features": features, "head.weight": self.theta0_weight, "head.bias": self.theta0_bias},
                        target, self._head.classes, self.search_kwargs["ignore_index"], True)

    def _search(self, features: Tensor, target: Tensor, validate: bool) -> LineSearchResult:
        kwargs = dict(self.search_kwargs, validate=validate)
        layout = self._head.layout
        if layout is not None:  # the rows are every rank's already: the class-sharded search on the local rows
            kwargs.update(process_group=layout.class_group, sharded_classes=(layout.first, layout.classes))
            if layout.class_group is None:  # one rank holds every row
                kwargs.update(process_group=None, sharded_classes=False)
        if not self.cuda_graph:
            return line_search(features, self.theta0_weight, self.theta0_bias, target, **kwargs)
        key = (tuple(features.shape), features.dtype, features.device, target.dtype)
        captured = self._telemetry.captured.get(key)
        if captured is None:
            kwargs = {k: v for k, v in self.search_kwargs.items() if k not in ("validate", "process_group")}
            captured = CapturedSearch(features, self.theta0_weight, self.theta0_bias, target, **kwargs)
            self._telemetry.captured[key] = captured
        return captured(features, target)

    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """One base-optimizer step on the feature extractor, then the head back to theta0.

        ``closure``, if given, recomputes the training loss through the perturbed head and calls
        ``backward()``; it is handed to the base optimizer's ``step`` (which may call it several times,
        as LBFGS does). Under a ``GradScaler`` (``scaler.step(opt)``), gradients are unscaled once and a
        step with inf/NaN gradients is skipped; the head is back at theta0 after every step, taken or
        skipped.
        """
        if not self._telemetry.perturbed:
            self._warn_unperturbed()
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        try:
            if closure is None and self._base_needs_closure:
                raise TypeError(
                    f"{type(self.base_optimizer).__name__} needs a closure: call opt.step(closure) with a closure "
                    "that recomputes the training loss through the perturbed head and calls backward()"
                )
            if found_inf is None:
                loss = self.base_optimizer.step(closure) if closure is not None else self._base_step()
            elif self._base_fused_scaling:  # the base unscales and skips on the device: no host read
                self.base_optimizer.grad_scale, self.base_optimizer.found_inf = grad_scale, found_inf
                try:
                    loss = self.base_optimizer.step()
                finally:
                    del self.base_optimizer.grad_scale, self.base_optimizer.found_inf
            else:  # GradScaler's own rule for plain optimizers: one host read of found_inf
                loss = None
                if grad_scale is not None:
                    grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
                    if grads:
                        torch._foreach_mul_(grads, grad_scale.double().reciprocal().float().to(grads[0].device))
                if not bool(found_inf):
                    loss = self.base_optimizer.step()
        finally:
            self.restore()
            if not self.freeze_head:  # the head's gradients (kept for DDP) are never used
                for p in self.head.parameters():
                    p.grad = None
        self._telemetry.counts[1] += 1
        return loss

    def _warn_unperturbed(self) -> None:
        """Once per PoF: a step was taken and perturb() was never called, so nothing was post-trained with PoF."""
        record = self._telemetry
        if record.warned_unperturbed:
            return
        record.warned_unperturbed = True
        warnings.warn(
            "pof_fast.PoF.step() ran but perturb() was never called: this step trained the feature extractor at "
            "theta0, i.e. plain fine-tuning with the base optimizer, not PoF. Call opt.perturb(search_features, "
            "search_target) before each optimizer step (in a Transformers Trainer: add "
            "pof_fast.integrations.transformers.PoFCallback(); in Lightning: "
            "pof_fast.integrations.lightning.PoFCallback).",
            RuntimeWarning, stacklevel=3)

    def _base_step(self) -> Optional[Tensor]:
        """The base optimizer's step; under ``torch.compile`` traced as part of the caller's graph.

        torch.optim wraps every ``step`` in ``_use_grad_for_differentiable``, which breaks the graph on
        purpose on both sides of the step. While compiling, and when no step hook is registered (hooks run
        in the wrapper), PoF calls the step's own body under ``torch.no_grad()`` instead: the same update
        with no graph break.
        """
        base = self.base_optimizer
        hooks = (base._optimizer_step_pre_hooks, base._optimizer_step_post_hooks,
                 torch_optimizer._global_optimizer_pre_hooks, torch_optimizer._global_optimizer_post_hooks)
        if not torch.compiler.is_compiling() or base.defaults.get("differentiable", False) or any(hooks):
            return base.step()
        body = type(base).step
        while hasattr(body, "__wrapped__"):
            body = body.__wrapped__
        with torch.no_grad():
            return body(base)

    # -- telemetry ------------------------------------------------------------------------------------

    @property
    def last(self) -> Optional[PoFStats]:
        """The last perturbation's :class:`PoFStats` (None before the first)."""
        return self._telemetry.last

    def reset_summary(self) -> None:
        """Start a new running summary (e.g. at every epoch)."""
        self._telemetry.sums.zero_()
        self._telemetry.counts.zero_()

    def summary(self) -> Dict[str, float]:
        """Means over the perturbations since the last :meth:`reset_summary` (one host sync): t*, gamma,
        perturbation norm, grad norm, loss0, loss, and the capped and skipped rates; ``steps`` counts
        optimizer steps and ``perturbations`` searches."""
        self.raise_pending()
        record = self._telemetry
        perturbations, steps = record.counts.tolist()
        means = (record.sums / perturbations).tolist() if perturbations else [float("nan")] * len(SUMMARY_KEYS)
        return {"steps": steps, "perturbations": perturbations, **dict(zip(SUMMARY_KEYS, means))}

    # -- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The base optimizer's state, theta0, the state of the gamma stream, and the batch :meth:`record` kept
        for the next search (so a resumed previous-batch search continues exactly; None if there is none)."""
        return {"base": self.base_optimizer.state_dict(), **self._head.state(), "gamma_stream": self.gamma_sampler.state(),
                "recorded": self._telemetry.recorded}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the head is set to the loaded theta0 (checked once, here)."""
        missing = {"base", "theta0_weight", "theta0_bias", "gamma_stream"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}: was it saved by pof_fast.PoF?")
        if (state_dict["theta0_bias"] is None) != (self.theta0_bias is None):
            raise ValueError("state_dict: the saved head and this head differ in having a bias")
        theta0 = {name: None if state_dict[name] is None else self._head.loadable(name, state_dict[name])
                  for name in ("theta0_weight", "theta0_bias")}
        check.shape("state_dict['theta0_weight']", theta0["theta0_weight"], tuple(self.theta0_weight.shape), "the head's weight")
        for name, value in theta0.items():
            if value is not None and not torch.isfinite(value).all():
                raise ValueError(f"state_dict['{name}'] contains NaN or inf")
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.theta0_weight.copy_(theta0["theta0_weight"])
        if self.theta0_bias is not None:
            self.theta0_bias.copy_(theta0["theta0_bias"])
        self.gamma_sampler.load_state(state_dict["gamma_stream"])
        recorded = state_dict.get("recorded")  # absent from checkpoints older than the previous-batch search
        self._telemetry.recorded = None if recorded is None else self._search_rows(
            *(t.to(self.theta0_weight.device) for t in recorded), "state_dict['recorded'] ")
        self.restore()
