"""The sizes of SPEC section 5, the synthetic search batch, and the searches every backend row runs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._types import SearchPlan

__all__ = ["CASES", "CPU_CASE_D", "IGNORE_INDEX", "SCRIPT", "SEARCHES", "Case", "Problem", "case_for", "plan"]


@dataclass(frozen=True)
class Case:
    """One size of SPEC section 5."""

    name: str
    what: str
    n: int
    dim: int
    classes: int
    dtype: str
    note: str = ""


CASES = {
    "A": Case("A", "WRN-28-10 on CIFAR-10", 256, 640, 10, "float32"),
    "B": Case("B", "WRN-28-10 on CIFAR-100", 256, 640, 100, "float32"),
    "C": Case("C", "EfficientNet-B7 on ImageNet", 256, 2560, 1000, "float32"),
    "D": Case("D", "a language-model head", 4096, 4096, 128256, "bfloat16"),
}
# Full-size case D is 2 GiB per [n, C] float32 pass and minutes per search on 2 cores: scaled down there.
CPU_CASE_D = Case("D", "a language-model head (scaled for the CPU)", 512, 1024, 32000, "bfloat16",
                  "scaled down on the CPU from n=4096, D=4096, C=128256")

# The reference script's settings (SPEC section 3) and the two searches timed per backend: (method, direction).
SCRIPT = dict(init_step=1.0, max_step=100.0, partitions=16)
SEARCHES = (("bracket_grid", "raw"), ("newton", "normalized"))
IGNORE_INDEX = -100


def case_for(name: str, device: str) -> Case:
    """The case called ``name`` as it runs on ``device`` (case D is scaled down on the CPU)."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; choose from {','.join(CASES)}")
    return CPU_CASE_D if (name == "D" and device == "cpu") else CASES[name]


def plan(method: str = "bracket_grid", direction: str = "raw") -> SearchPlan:
    """The plan ``pof_fast.line_search`` forms for ``method`` and ``direction`` with the script's settings;
    the default is the script's own search, the one every baseline runs."""
    return SearchPlan(method, direction == "normalized", ignore_index=IGNORE_INDEX, **SCRIPT)


@dataclass
class Problem:
    """A synthetic search batch for a head that is partly fitted (loss at theta0 about 1 to 6).

    Features cluster around their class centre (scaled by 0.1, so that the raw-gradient line
    search of the script stops inside its bracket on cases A to C); 20% of the labels are redrawn
    at random, as a search batch is never fitted exactly.
    """

    features: Tensor
    weight: Tensor
    bias: Tensor
    target: Tensor

    @classmethod
    def make(cls, case: Case, device: str, seed: int = 0) -> "Problem":
        gen = torch.Generator().manual_seed(seed)
        centres = torch.randn(case.classes, case.dim, generator=gen)
        label = torch.randint(0, case.classes, (case.n,), generator=gen)
        redrawn = torch.rand(case.n, generator=gen) < 0.2
        target = torch.where(redrawn, torch.randint(0, case.classes, (case.n,), generator=gen), label)
        features = 0.1 * (centres[label] + 2.0 * torch.randn(case.n, case.dim, generator=gen))
        weight = centres * (60.0 / case.dim)
        bias = 0.1 * torch.randn(case.classes, generator=gen)
        dtype = getattr(torch, case.dtype)
        return cls(*(t.to(device=device, dtype=dtype) for t in (features, weight, bias)), target.to(device))

    def args(self) -> tuple:
        return self.features, self.weight, self.bias, self.target
