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

    cpu_pass_images = 1000  # its best tile of EoT draws per attack pass here (carso.engine; bench/defence_throughput.py)

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

    def reconstructions(self, x: torch.Tensor, draws: int = 1) -> torch.Tensor:
        """(B, C, H, W) -> (draws * B, N, C, H, W): N reconstructions per image, decoded as one batch of
        draws x B x N. The condition depends on the input only, so it is computed once for all the draws."""
        b, n = x.shape[0], self.n_samples
        c = self.purifier.condition(self.extractor(x))  # (B, D)
        # (draws*B*N, D): draw d's N samples of image i are rows (d*B + i)*N .. (d*B + i)*N + N-1
        c = c.repeat(draws, 1).repeat_interleave(n, dim=0)
        z = torch.randn(draws * b * n, self.purifier.cfg.latent_dim, device=x.device, dtype=c.dtype)
        if self.latent == "zero":
            z = torch.zeros_like(z)
        return self.purifier.decode(z, c).view(draws * b, n, *x.shape[1:])

    def sample_logits(self, x: torch.Tensor, draws: int = 1) -> torch.Tensor:
        """(B, C, H, W) -> per-sample logits (draws * B, N, K), classifying all reconstructions at once."""
        recon = self.reconstructions(x, draws)
        return self.classifier(recon.flatten(0, 1)).view(*recon.shape[:2], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregate(self.sample_logits(x))

    @property
    def images_per_input(self) -> int:
        """Reconstructions per image in one pass."""
        return self.n_samples

    def draws(self, x: torch.Tensor, draws: int) -> torch.Tensor:
        """`draws` independent passes of the defence on `x` as one batch: (draws * B, K), draw d in rows d*B ..
        d*B + B-1 (what EoT averages over; see carso.attacks.eot_logits)."""
        return self.aggregate(self.sample_logits(x, draws))

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
