"""The runaway guard: flags post-training whose perturbation feeds on itself."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

__all__ = ["RunawayGuard"]


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
