"""The controls' defences, as nn.Modules from [0, 1] images to logits (carso.methods.controls says what each tests)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from carso.checkpoint import load_classifier


class Wrapped(nn.Module):
    """A frozen classifier behind something: the classifier always stays in eval mode, its weights never train."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Wrapped":
        super().train(mode)
        self.classifier.eval()
        return self


class NoisyLogits(Wrapped):
    """classifier(x) + sigma * noise: Gaussian noise on each logit, drawn afresh for every image at every pass.

    A randomisation that is no defence: it never moves the input (the attacks' gradients are the classifier's, up to
    the softmax weights of the noisy logits), and it changes a prediction only where the classifier's top two logits
    lie within a few sigma of each other. Elsewhere its expected predictions are the classifier's."""

    def __init__(self, classifier: nn.Module, sigma: float) -> None:
        super().__init__(classifier)
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x)
        return logits + self.sigma * torch.randn_like(logits)


class ScaledLogits(Wrapped):
    """classifier(x) * temperature. The argmax is the classifier's; cross-entropy saturates to exactly 0 (and its
    gradient with it) in fp32 wherever the scaled margin exceeds about 100, as after defensive distillation."""

    def __init__(self, classifier: nn.Module, temperature: float) -> None:
        super().__init__(classifier)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x) * self.temperature


def quantise(x: torch.Tensor, levels: int) -> torch.Tensor:
    """`x` in [0, 1] rounded to `levels` evenly spaced grey levels (0 and 1 among them)."""
    return torch.round(x * (levels - 1)) / (levels - 1)


class Quantised(Wrapped):
    """classifier(quantise(x)): bit-depth reduction. Rounding has a zero derivative almost everywhere, so every
    loss's input gradient is exactly zero. `straight_through`: the same forward values (up to fp32 rounding), with
    the identity's gradient through the rounding (BPDA, Athalye et al. 2018): the surrogate an attacker uses."""

    def __init__(self, classifier: nn.Module, levels: int, straight_through: bool = False) -> None:
        super().__init__(classifier)
        self.levels, self.straight_through = levels, straight_through

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = quantise(x, self.levels)
        return self.classifier(x + (q - x).detach() if self.straight_through else q)


def resize_pad(x: torch.Tensor, min_scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image shrunk by a factor drawn uniformly in [min_scale, 1] (bilinear) and placed at a uniformly drawn
    offset inside a black frame of the input's size (Xie et al. 2018, shrinking instead of growing so the classifier
    keeps its input size). Differentiable in `x`; the draws come from `generator` (CPU) or the global RNG."""
    n = len(x)
    draw = lambda: torch.rand(n, generator=generator)  # noqa: E731
    scale = min_scale + (1 - min_scale) * draw()
    centre = [(2 * draw() - 1) * (1 - scale) for _ in range(2)]  # the shrunk image's centre, in [-1, 1] coordinates
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, 0, 2], theta[:, 1, 2] = -centre[0] / scale, -centre[1] / scale
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class ResizePad(Wrapped):
    """classifier(resize_pad(x)), a fresh transform for every image at every pass."""

    def __init__(self, classifier: nn.Module, min_scale: float) -> None:
        super().__init__(classifier)
        self.min_scale = min_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(resize_pad(x, self.min_scale))


def load_noise(classifier_path: Path, artifacts: list[Path], dataset: str, params: dict[str, Any]) -> NoisyLogits:
    """`at_noise`: the classifier with Gaussian noise of std controls.at_noise.sigma on its logits."""
    return NoisyLogits(load_classifier(classifier_path, dataset), params["controls"]["at_noise"]["sigma"])


def load_plain(classifier_path: Path, artifacts: list[Path], dataset: str, params: dict[str, Any]) -> nn.Module:
    """`plain`: the classifier trained without adversarial training, alone."""
    return load_classifier(artifacts[0], dataset)


def load_scaled(classifier_path: Path, artifacts: list[Path], dataset: str, params: dict[str, Any]) -> ScaledLogits:
    """`ctl_scaled`: `plain` with its logits times controls.scaled.temperature."""
    return ScaledLogits(load_classifier(artifacts[0], dataset), params["controls"]["scaled"]["temperature"])


def load_quantised(classifier_path: Path, artifacts: list[Path], dataset: str, params: dict[str, Any]) -> Quantised:
    """`ctl_quant`: `plain` behind controls.quantise.levels grey levels (straight_through: its BPDA surrogate)."""
    cfg = params["controls"]["quantise"]
    return Quantised(load_classifier(artifacts[0], dataset), cfg["levels"], cfg["straight_through"])


def load_resized(classifier_path: Path, artifacts: list[Path], dataset: str, params: dict[str, Any]) -> ResizePad:
    """`ctl_resize`: finetune_resize's classifier behind random resize-and-pad (controls.resize.min_scale)."""
    return ResizePad(load_classifier(artifacts[0], dataset), params["controls"]["resize"]["min_scale"])
