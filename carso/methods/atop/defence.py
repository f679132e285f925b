"""AToP's purifier (random transform + inpainter) and the defence (purifier + classifier) as nn.Modules from
[0, 1] images to the classifier's logits, differentiable end to end: no BPDA, no detach."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso.checkpoint import load_classifier
from carso.io import sha256_file
from carso.methods.atop.inpainter import Inpainter, load_inpainter
from carso.methods.atop.transforms import TransformConfig, TransformDraw, apply, draw


class AtopPurifier(nn.Module):
    """x -> random transform (a fresh draw per call unless one is given) -> inpainter -> purified x.

    RT1 / RT2: the purified image is the inpainter's whole output. RT3: the image is inpainted once per mask
    (as one batch of B x M) and each mask's missing pixels are taken from its own inpainting."""

    def __init__(self, transform: TransformConfig, inpainter: Inpainter) -> None:
        super().__init__()
        self.transform, self.inpainter = transform, inpainter

    def outputs(self, x: torch.Tensor, d: TransformDraw | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> transformed (B, M, C, H, W), coarse (B, C, H, W) and refined (B, C, H, W), all in [0, 1]."""
        d = draw(self.transform, x) if d is None else d
        masked, masks = apply(x, d)
        coarse, refined = self.inpainter(masked.flatten(0, 1), masks.flatten(0, 1))  # (B*M, C, H, W)
        return masked, self._compose(coarse, masks), self._compose(refined, masks)

    @staticmethod
    def _compose(out: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B*M, C, H, W) inpaintings -> (B, C, H, W): the single output, or each mask's region from its own."""
        b, m = masks.shape[:2]
        if m == 1:
            return out
        return (out.view(b, m, *out.shape[1:]) * masks).sum(dim=1)

    def forward(self, x: torch.Tensor, d: TransformDraw | None = None) -> torch.Tensor:
        return self.outputs(x, d)[2]


class AtopDefence(nn.Module):
    """classifier(purifier(x)): a randomised defence (a fresh transform at every forward pass)."""

    cpu_pass_images = 500  # its best tile of EoT draws per attack pass here (carso.engine; bench/defence_throughput.py)

    def __init__(self, classifier: nn.Module, purifier: AtopPurifier) -> None:
        super().__init__()
        self.classifier, self.purifier = classifier, purifier
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purifier(x))

    @property
    def images_per_input(self) -> int:
        """Inpaintings per image in one pass (RT3: one per mask)."""
        return self.purifier.transform.masks

    def draws(self, x: torch.Tensor, draws: int) -> torch.Tensor:
        """`draws` independent passes on `x` as one batch: (draws * B, K), draw d in rows d*B .. d*B + B-1, each
        with a transform of its own (also when `per: batch` shares one mask within a draw)."""
        parts = [draw(self.purifier.transform, x) for _ in range(draws)]
        noise = None if parts[0].noise is None else torch.cat([p.noise for p in parts])
        joint = TransformDraw(torch.cat([p.masks for p in parts]), noise)
        return self.classifier(self.purifier(x.repeat(draws, 1, 1, 1), joint))

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the defence makes of `x`, for the report's figure: the transformed inputs (B, M, C, H, W) and the
        purified image (B, 1, C, H, W), from one draw."""
        transformed, _, purified = self.purifier.outputs(x)
        return {"transformed": transformed, "purified": purified.unsqueeze(1)}

    def train(self, mode: bool = True) -> "AtopDefence":
        """The classifier always stays in eval mode."""
        super().train(mode)
        self.classifier.eval()
        return self


def load(classifier_path: Path, artifacts: list[Path], dataset: str, params: dict[str, Any]) -> AtopDefence:
    """`atop_rt` (artifacts[0] the pre-trained inpainter) or `atop` (the fine-tuned one), behind atop.transform."""
    classifier = load_classifier(classifier_path, dataset)
    inpainter = load_inpainter(artifacts[0], dataset, sha256_file(classifier_path))
    return AtopDefence(classifier, AtopPurifier(TransformConfig.from_params(params["atop"]["transform"]), inpainter))
