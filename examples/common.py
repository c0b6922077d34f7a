"""What the examples share: a small CNN with BatchNorm split into phi and head, and synthetic data."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SmallCNN(nn.Module):
    """phi: two conv/BatchNorm/ReLU blocks and a pooling to 32 features; head: nn.Linear(32, classes)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.phi = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.phi(x))


def synthetic_loader(rows: int, batch_size: int, classes: int = 10, seed: int = 0) -> DataLoader:
    """Random 3x16x16 images whose class shifts the mean of one channel (learnable, no download)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (rows,), generator=gen)
    x = torch.randn(rows, 3, 16, 16, generator=gen) + (y.float() / classes)[:, None, None, None]
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=gen, drop_last=True)
