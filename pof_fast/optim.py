"""The PoF optimizer: post-trains a feature extractor around a fixed linear head.

Each step perturbs the head to theta0 - gamma * t* * u (t* from :func:`pof_fast.line_search` on a
search batch), lets the caller back-propagate a training loss through the perturbed head, then
steps the base optimizer on the feature extractor and restores the head to theta0 bit-exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Type

import torch
from torch import Tensor, nn

from . import _validate as check
from ._types import DIRECTIONS, METHODS
from .search import LineSearchResult, line_search

__all__ = ["PoF", "PoFStats"]

GAMMA_SAMPLING = ("uniform", "fixed")
ON_CAPPED = ("skip", "clip")


@dataclass(frozen=True)
class PoFStats:
    """Telemetry of one perturbation; 0-d tensors on the head's device (read them when logging).

    step: t* of the search.  gamma: the factor used (drawn or fixed).  applied_step: the t used
    for the perturbation (0 when skipped, max_step when clipped).  perturbation_norm:
    ||gamma t u||.  grad_norm: ||g||.  loss0, loss: l(0), l(t*).  capped, skipped: bools.
    """

    step: Tensor
    gamma: float
    applied_step: Tensor
    perturbation_norm: Tensor
    grad_norm: Tensor
    loss0: Tensor
    loss: Tensor
    capped: Tensor
    skipped: Tensor


class PoF(torch.optim.Optimizer):
    """Wraps a base optimizer for PoF post-training (Sato et al., ICML 2022).

    Args:
        params: the feature extractor's parameters (or param groups). Must not include the head's.
        base_optimizer: a ``torch.optim.Optimizer`` class, built on our ``param_groups`` with
            ``**base_kwargs`` so schedulers and grad scalers see one optimizer.
        head: the trained ``nn.Linear`` head; theta0 = its weight and bias at construction. Its
            parameters are frozen (``requires_grad=False``): PoF never trains the head.
        gamma: perturbation factor (the paper: 2).
        gamma_sampling: ``"uniform"`` (default) draws the factor from U(0, gamma) at every step as
            the reference script does; ``"fixed"`` uses ``gamma`` itself as the poster's formula
            reads. Uniform is the default because it is the stable one: on a SAM-trained MLP on the
            digits data, fixed gamma = 2 made t* grow step after step (the features drift away
            from what theta0 fits) until test error rose from ~3% to 25-30%, at post-training
            learning rates from 1e-4 (over 100 epochs) to 5e-3; uniform sampling stayed stable.
        method, direction, init_step, max_step, partitions, ignore_index, backend: passed to
            :func:`pof_fast.line_search`.
        on_capped: ``"skip"`` applies no perturbation when the search was capped (as the reference
            multi-GPU script rejects such steps); ``"clip"`` perturbs with t* = max_step.
        seed: seed of the generator that draws gamma (a random one when None).
        validate: check the search batch for NaN/inf and bad labels (one host sync per step).
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Type[torch.optim.Optimizer],
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
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(base_optimizer, type) or not issubclass(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer class (e.g. torch.optim.SGD), got {base_optimizer!r}")
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be a torch.nn.Linear, got {type(head).__name__}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0 <= gamma < math.inf):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        check.choice("gamma_sampling", gamma_sampling, GAMMA_SAMPLING)
        check.choice("on_capped", on_capped, ON_CAPPED)
        check.choice("method", method, METHODS)
        check.choice("direction", direction, DIRECTIONS)
        check.positive("init_step", init_step)
        check.positive("max_step", max_step)
        check.positive("partitions", partitions, integer=True)
        super().__init__(params, dict(base_kwargs))
        head_ids = {id(p) for p in head.parameters()}
        if any(id(p) in head_ids for group in self.param_groups for p in group["params"]):
            raise ValueError("params must not include the head's parameters: PoF keeps the head fixed at theta0")
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._share_base_state()
        self.defaults.update(self.base_optimizer.defaults)

        self.head = head.requires_grad_(False)
        self.theta0_weight = head.weight.detach().clone()
        self.theta0_bias = head.bias.detach().clone() if head.bias is not None else None
        self.gamma = float(gamma)
        self.gamma_sampling = gamma_sampling
        self.on_capped = on_capped
        self.search_kwargs = dict(
            method=method, direction=direction, init_step=init_step, max_step=max_step,
            partitions=partitions, ignore_index=ignore_index, backend=backend, validate=validate,
        )
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        self.last: Optional[PoFStats] = None
        self.reset_summary()

    def _share_base_state(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _gamma_factor(self) -> float:
        if self.gamma_sampling == "fixed":
            return self.gamma
        return self.gamma * float(torch.rand((), generator=self.generator))

    @torch.no_grad()
    def perturb(self, search_features: Tensor, search_target: Tensor) -> LineSearchResult:
        """Search along the normalised head gradient of the search batch and perturb the head.

        search_features: ``[n, D]`` phi(x_s), computed by the caller (gradients are not needed).
        search_target: ``[n]`` labels. Sets the head to theta0 - gamma * t* * u; returns the search.
        """
        check.tensor("search_features", search_features, 2)
        if search_features.shape[1] != self.theta0_weight.shape[1]:
            raise ValueError(
                f"search_features must have shape [n, {self.theta0_weight.shape[1]}] (the head's in_features), "
                f"got {list(search_features.shape)}"
            )
        result = line_search(
            search_features.detach(), self.theta0_weight, self.theta0_bias, search_target, **self.search_kwargs
        )
        factor = self._gamma_factor()
        max_step = torch.full_like(result.step, self.search_kwargs["max_step"])
        capped_step = max_step if self.on_capped == "clip" else torch.zeros_like(result.step)
        applied = torch.where(result.capped, capped_step, result.step)
        coef = factor * applied
        self.head.weight.copy_(self.theta0_weight - coef * result.weight_direction)
        if self.theta0_bias is not None:
            self.head.bias.copy_(self.theta0_bias - coef * result.bias_direction)
        stats = PoFStats(
            step=result.step, gamma=factor, applied_step=applied,
            perturbation_norm=coef * result.direction_norm, grad_norm=result.grad_norm,
            loss0=result.loss0, loss=result.loss, capped=result.capped,
            skipped=result.capped & (self.on_capped == "skip"),
        )
        self._record(stats)
        return result

    @torch.no_grad()
    def restore(self) -> None:
        """Set the head back to theta0, bit-exactly."""
        self.head.weight.copy_(self.theta0_weight)
        if self.theta0_bias is not None:
            self.head.bias.copy_(self.theta0_bias)

    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """One base-optimizer step on the feature extractor, then the head back to theta0.

        ``closure``, if given, recomputes the training loss through the perturbed head and calls
        ``backward()``; it runs with gradients enabled before the base step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.base_optimizer.step()
        self.restore()
        return loss

    def _record(self, stats: PoFStats) -> None:
        self.last = stats
        values = torch.stack([
            stats.step.double(), torch.tensor(stats.gamma, dtype=torch.float64, device=stats.step.device),
            stats.perturbation_norm.double(), stats.grad_norm.double(), stats.loss0.double(),
            stats.loss.double(), stats.capped.double(), stats.skipped.double(),
        ])
        self._sums = values if self._sums is None else self._sums + values
        self._count += 1

    def reset_summary(self) -> None:
        """Start a new running summary (e.g. at every epoch)."""
        self._sums: Optional[Tensor] = None
        self._count = 0

    def summary(self) -> Dict[str, float]:
        """Means since the last :meth:`reset_summary` (one host sync): t*, gamma, perturbation
        norm, grad norm, loss0, loss, and the capped and skipped rates; plus ``steps``."""
        keys = ("step", "gamma", "perturbation_norm", "grad_norm", "loss0", "loss", "capped_rate", "skipped_rate")
        if self._sums is None:
            return {"steps": 0, **{k: float("nan") for k in keys}}
        means = (self._sums / self._count).tolist()
        return {"steps": self._count, **dict(zip(keys, means))}

    def state_dict(self) -> Dict[str, Any]:
        """The base optimizer's state, theta0, and the state of the generator that draws gamma."""
        return {
            "base": self.base_optimizer.state_dict(),
            "theta0_weight": self.theta0_weight.clone(),
            "theta0_bias": None if self.theta0_bias is None else self.theta0_bias.clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the head is set to the loaded theta0."""
        missing = {"base", "theta0_weight", "theta0_bias", "generator"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}: was it saved by pof_fast.PoF?")
        if (state_dict["theta0_bias"] is None) != (self.theta0_bias is None):
            raise ValueError("state_dict: the saved head and this head differ in having a bias")
        check.shape("state_dict['theta0_weight']", state_dict["theta0_weight"], tuple(self.theta0_weight.shape), "the head's weight")
        self.base_optimizer.load_state_dict(state_dict["base"])
        self._share_base_state()
        self.theta0_weight.copy_(state_dict["theta0_weight"])
        if self.theta0_bias is not None:
            self.theta0_bias.copy_(state_dict["theta0_bias"])
        self.generator.set_state(state_dict["generator"])
        self.restore()
