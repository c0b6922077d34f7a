"""PoF's own stream of gamma draws: device tensors, no host sync, no ``torch.Generator``.

Draw k is ``hash((k + offset) mod 2**32) / 2**32`` with PCG's output permutation as the hash
(O'Neill 2014; the "pcg_hash" of Jarzynski & Olano, JCGT 2020) on int64 tensors. A counter on the
device counts the draws, so ``torch.compile`` traces a draw without a graph break, a CUDA graph
replays it, and torch's global RNG (the user's data order) is never touched. The seed picks the
offset: the streams of two seeds are shifted copies of one sequence of period 2**32.
"""
from __future__ import annotations

from typing import Any, Dict, Union

import torch
from torch import Tensor

__all__ = ["GammaSampler", "pcg_hash"]

MASK = 0xFFFFFFFF
IntLike = Union[int, Tensor]


def pcg_hash(x: IntLike) -> IntLike:
    """PCG's RXS-M-XS output permutation of a 32-bit value (Python int or int64 tensor in [0, 2**32))."""
    state = (x * 747796405 + 2891336453) & MASK
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & MASK
    return (word >> 22) ^ word


class GammaSampler:
    """Seeded U(0, 1) draws scaled by gamma, as 0-d float64 tensors on ``device``."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.offset = int(pcg_hash((pcg_hash(seed & MASK) + (seed >> 32)) & MASK))
        self.counter = torch.zeros((), dtype=torch.int64, device=device)

    def draw(self, gamma: float, uniform: bool) -> Tensor:
        """gamma * U(0, 1) (the next draw) when ``uniform``, else gamma itself."""
        if not uniform:
            return torch.full_like(self.counter, gamma, dtype=torch.float64)
        bits = pcg_hash((self.counter + self.offset) & MASK)
        self.counter.add_(1)
        return bits.double() * (gamma / 2.0**32)

    def agree(self, group: "torch.distributed.ProcessGroup") -> None:
        """Take rank 0's stream (offset and position) on every rank of ``group``: one broadcast."""
        import torch.distributed as dist

        state = torch.stack([torch.full_like(self.counter, self.offset), self.counter])
        dist.broadcast(state, src=dist.get_global_rank(group, 0), group=group)
        self.offset = int(state[0].item())
        self.counter.copy_(state[1])

    def state(self) -> Dict[str, Any]:
        return {"offset": self.offset, "counter": self.counter.clone()}

    def load_state(self, state: Dict[str, Any]) -> None:
        self.offset = int(state["offset"])
        self.counter.copy_(state["counter"])
