"""The denoiser: three convolutions that predict a correction added to the input, clamped to [0, 1]."""
from __future__ import annotations

import torch
from torch import nn


class Denoiser(nn.Module):
    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.net(x)).clamp(0, 1)


class Denoised(nn.Module):
    """The defence: the classifier on the denoised input, one module from [0, 1] images to logits."""

    def __init__(self, denoiser: Denoiser, classifier: nn.Module) -> None:
        super().__init__()
        self.denoiser, self.classifier = denoiser, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(x))
