"""The controls' defences, as nn.Modules from [0, 1] images to the classifier's logits."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso.checkpoint import load_classifier


class NoisyLogits(nn.Module):
    """classifier(x) + sigma * noise: Gaussian noise on each logit, drawn afresh for every image at every pass.

    A randomisation that is no defence: it never moves the input (the attacks' gradients are the classifier's, up to
    the softmax weights of the noisy logits), and it changes a prediction only where the classifier's top two logits
    lie within a few sigma of each other. Elsewhere its expected predictions are the classifier's."""

    def __init__(self, classifier: nn.Module, sigma: float) -> None:
        super().__init__()
        self.classifier, self.sigma = classifier, sigma
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x)
        return logits + self.sigma * torch.randn_like(logits)

    def train(self, mode: bool = True) -> "NoisyLogits":
        """The classifier always stays in eval mode."""
        super().train(mode)
        self.classifier.eval()
        return self


def load(classifier_path: Path, artifacts: list[Path], dataset: str, params: dict[str, Any]) -> NoisyLogits:
    """`at_noise`: the classifier with Gaussian noise of std controls.at_noise.sigma on its logits."""
    return NoisyLogits(load_classifier(classifier_path, dataset), params["controls"]["at_noise"]["sigma"])
