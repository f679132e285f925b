"""The threat model an evaluation attacks in: a norm and a radius, as one small value passed to every attack."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from carso.attacks import NORMS, distance, project


@dataclass(frozen=True)
class Threat:
    """Perturbations of at most `eps` in `norm` (Linf, L2 or L1) around a point of [0, 1]^d; `name` labels it in the
    metrics and the report (e.g. the key of `evaluation.threats`)."""

    norm: str
    eps: float
    name: str = ""

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; use one of {', '.join(NORMS)}")
        if not self.eps > 0:
            raise ValueError(f"a threat's radius must be positive, not {self.eps!r}")

    @property
    def label(self) -> str:
        return f"{self.norm} eps {self.eps:.4g}"

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`x_adv` moved into this ball around `x` and into [0, 1]."""
        return project(x_adv, x, self.eps, self.norm)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-point distance in this threat's norm."""
        return distance(x_adv, x, self.norm)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, slack: float = 1e-4) -> torch.Tensor:
        """Per point: does `x_adv` lie in the ball (up to float32 rounding, `slack` relative to eps: an L1 distance
        sums the rounding of every pixel moved) and in [0, 1]?"""
        inside = self.distance(x_adv, x) <= self.eps * (1 + slack)
        in_box = (x_adv.flatten(1).amin(dim=1) >= 0) & (x_adv.flatten(1).amax(dim=1) <= 1)
        return inside & in_box
