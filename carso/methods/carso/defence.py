"""The CARSO defence as one nn.Module from [0, 1] images to logits, attackable end to end."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso.checkpoint import load_classifier
from carso.io import sha256_file
from carso.methods.carso.aggregation import get_aggregation
from carso.methods.carso.purifier import Purifier, load_purifier
from carso.methods.carso.representation import RepresentationExtractor


class CarsoDefence(nn.Module):
    """representation -> condition -> N latent samples -> N reconstructions -> classifier -> aggregation.

    The N samples of every image go through the decoder and the classifier as one batch of B x N.
    The classifier is frozen; gradients still flow through it (to the representation and from the
    reconstructions), so an attack sees the whole defence's true gradient.
    """

    def __init__(self, classifier: nn.Module, purifier: Purifier, extractor: RepresentationExtractor,
                 n_samples: int = 8, aggregation: str = "peel", latent: str = "sample") -> None:
        super().__init__()
        self.classifier, self.purifier, self.extractor = classifier, purifier, extractor
        self.n_samples = n_samples
        self.aggregation_name = aggregation
        self.aggregate = get_aggregation(aggregation)
        self.latent = latent  # sample: z ~ N(0, I) for each reconstruction | zero: z = 0 (the v1 code; N equal ones)
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.eval()

    def reconstructions(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, C, H, W): N reconstructions per image, decoded as one batch of B x N."""
        b, n = x.shape[0], self.n_samples
        c = self.purifier.condition(self.extractor(x))  # (B, D)
        c = c.repeat_interleave(n, dim=0)  # (B*N, D): the N samples of image i are rows i*N .. i*N+N-1
        z = torch.randn(b * n, self.purifier.cfg.latent_dim, device=x.device, dtype=c.dtype)
        if self.latent == "zero":
            z = torch.zeros_like(z)
        return self.purifier.decode(z, c).view(b, n, *x.shape[1:])

    def sample_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> per-sample logits (B, N, K), classifying all B x N reconstructions at once."""
        recon = self.reconstructions(x)
        return self.classifier(recon.flatten(0, 1)).view(*recon.shape[:2], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregate(self.sample_logits(x))

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the defence makes of `x`, for the report's figure: its N reconstructions (B, N, C, H, W)."""
        return {"recon": self.reconstructions(x)}

    def train(self, mode: bool = True) -> "CarsoDefence":
        """The classifier always stays in eval mode; the purifier follows `mode`."""
        super().train(mode)
        self.classifier.eval()
        return self


def load(classifier_path: Path, artifacts: list[Path], dataset: str, params: dict[str, Any]) -> CarsoDefence:
    """The `carso` defence: the classifier, the train_purifier stage's purifier (artifacts[0]) and `carso`."""
    classifier = load_classifier(classifier_path, dataset)
    purifier, extractor = load_purifier(artifacts[0], classifier, dataset, sha256_file(classifier_path))
    cfg = params["carso"]
    return CarsoDefence(classifier, purifier, extractor, cfg["n_samples"], cfg["aggregation"], cfg["latent"])
