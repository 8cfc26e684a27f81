"""A ``module:factory`` model for the worker's real CPU path (a few 4x4 linear blocks)."""

from __future__ import annotations


def factory():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x + torch.tanh(self.fc(x))

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), *[Block() for _ in range(4)], nn.Linear(4, 2)).double().eval()
