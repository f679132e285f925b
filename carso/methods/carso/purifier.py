"""CARSO's purifier: a conditional VAE from the classifier's representation to clean reconstructions.

representation (one tensor per hooked layer) -> per-layer conv compressors (a linear layer's output: as it is)
-> condition head (optional hidden linear layers, then one to the condition) -> c
training:  [pre-encoded input, c] -> joint encoder -> (mu, logvar) -> z ~ q(z | x, c)
inference: z ~ N(0, I)
[z, c] -> decoder (linear, transposed-conv stack, conv, sigmoid) -> image in [0, 1]
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from carso.data import dataset_spec
from carso.errors import UserError
from carso.io import load_tensors, save_tensors
from carso.models import Normalize
from carso.methods.carso.representation import RepresentationExtractor


@dataclass(frozen=True)
class PurifierConfig:
    """Every size of the purifier (defaults: a small one sized for 1x28x28 inputs)."""

    compressor_depth: int = 3           # 3x3 unpadded convs per hooked conv layer, halving channels each time (0: none)
    condition_dim: int = 130            # size of the condition vector c
    condition_hidden: tuple[int, ...] = ()  # linear layers between the flattened representation and c (v1: 260)
    latent_dim: int = 64                # size of z
    pre_encoder_channels: tuple[int, ...] = (6, 12)  # strided convs of the input pre-encoder
    decoder_start_side: int = 7         # side of the decoder's first feature map
    decoder_channels: tuple[int, ...] = (32, 16, 8)  # first map's channels, then one 2x upsampling each

    @classmethod
    def from_params(cls, cfg: dict[str, Any]) -> "PurifierConfig":
        """The size keys of params.yaml's `purifier` section (the training keys are ignored)."""
        return cls(compressor_depth=cfg["compressor_depth"], condition_dim=cfg["condition_dim"],
                   condition_hidden=tuple(cfg.get("condition_hidden", ())), latent_dim=cfg["latent_dim"],
                   pre_encoder_channels=tuple(cfg["pre_encoder_channels"]),
                   decoder_start_side=cfg["decoder_start_side"], decoder_channels=tuple(cfg["decoder_channels"]))

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]


class LayerCompressor(nn.Module):
    """depth x [3x3 conv without padding, BatchNorm, LeakyReLU(0.2)], channels c -> c/2 -> c/4 ..., flattened.
    A linear layer's (B, F) output, or any output with depth 0, is only flattened."""

    def __init__(self, shape: tuple[int, ...], depth: int) -> None:
        super().__init__()
        if len(shape) != 3 or depth == 0:
            self.net, self.out_features = nn.Identity(), math.prod(shape)
            return
        c, h, w = shape
        if min(h, w) - 2 * depth < 1:
            raise UserError(f"a hooked layer's {h}x{w} activations are too small for purifier.compressor_depth "
                            f"{depth}; lower it or hook earlier layers.")
        blocks, c_in = [], c
        for _ in range(depth):
            c_out = max(1, c_in // 2)
            blocks += _conv_block(c_in, c_out)
            c_in = c_out
        self.net = nn.Sequential(*blocks)
        self.out_features = c_in * (h - 2 * depth) * (w - 2 * depth)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net(a).flatten(1)


class Purifier(nn.Module):
    """The conditional VAE; `shapes` are the hooked activations' shapes (without batch)."""

    def __init__(self, cfg: PurifierConfig, shapes: Sequence[tuple[int, ...]], image_shape: tuple[int, int, int],
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.cfg, self.image_shape = cfg, image_shape
        c_img, side, _ = image_shape
        self.compressors = nn.ModuleList(LayerCompressor(s, cfg.compressor_depth) for s in shapes)
        widths = [sum(m.out_features for m in self.compressors), *cfg.condition_hidden, cfg.condition_dim]
        self.condition_head = nn.Sequential(*(layer for w_in, w_out in zip(widths[:-1], widths[1:]) for layer in
                                              (nn.Linear(w_in, w_out), nn.BatchNorm1d(w_out), nn.LeakyReLU(0.2))))
        self.pre_encoder = self._pre_encoder(c_img, mean, std)
        with torch.no_grad():
            pre_flat = self.pre_encoder(torch.zeros(1, *image_shape)).shape[1]
        self.encoder = nn.Linear(pre_flat + cfg.condition_dim, 2 * cfg.latent_dim)
        self.decoder_input, self.decoder = self._decoder(side, c_img)

    def _pre_encoder(self, c_img: int, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
        layers: list[nn.Module] = [Normalize(mean, std)]
        c_in = c_img
        for c_out in self.cfg.pre_encoder_channels:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in = c_out
        return nn.Sequential(*layers, nn.Flatten())

    def _decoder(self, side: int, c_img: int) -> tuple[nn.Module, nn.Module]:
        cfg, chans = self.cfg, self.cfg.decoder_channels
        if cfg.decoder_start_side * 2 ** (len(chans) - 1) != side:
            raise UserError(f"purifier.decoder_start_side ({cfg.decoder_start_side}) doubled once per "
                            f"purifier.decoder_channels entry after the first ({len(chans) - 1}) must give the "
                            f"image side {side}; adjust one of them.")
        first = nn.Linear(cfg.latent_dim + cfg.condition_dim, chans[0] * cfg.decoder_start_side ** 2)
        layers: list[nn.Module] = [nn.LeakyReLU(0.2), nn.Unflatten(1, (chans[0], cfg.decoder_start_side,
                                                                        cfg.decoder_start_side))]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(chans[-1], c_img, 3, padding=1), nn.Sigmoid()]
        return first, nn.Sequential(*layers)

    def condition(self, acts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Representation (one tensor per hooked layer) -> condition c, (B, condition_dim)."""
        return self.condition_head(torch.cat([m(a) for m, a in zip(self.compressors, acts)], dim=1))

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(possibly perturbed) input and condition -> mean and log-variance of q(z | x, c)."""
        mu, logvar = self.encoder(torch.cat([self.pre_encoder(x), c], dim=1)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(M, latent) and (M, condition) -> (M, C, H, W) reconstructions in [0, 1]."""
        return self.decoder(self.decoder_input(torch.cat([z, c], dim=1)))

    def forward(self, x: torch.Tensor, acts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: reconstruction from z ~ q(z | x, c) (reparameterised), and q's parameters."""
        c = self.condition(acts)
        mu, logvar = self.encode(x, c)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z, c), mu, logvar


def purifier_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                  beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image summed pixel-wise BCE + beta * KL(q || N(0, I)), averaged over the batch: (loss, bce, kl)."""
    n = target.shape[0]
    bce = F.binary_cross_entropy(recon.float(), target, reduction="sum") / n
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / n
    return bce + beta * kl, bce, kl


def beta_schedule(epoch: int, epochs: int, delay: float = 0.125, ramp: float = 0.042) -> float:
    """KL weight of 0-based `epoch` (purifier.beta_warmup): 0 for the first `delay` share of the epochs, then a
    linear ramp over the next `ramp` share, then 1 (published: 12.5% and ~4.2%; v1: 0 and 0, beta = 1 throughout)."""
    off, ramp = delay * epochs, ramp * epochs
    if ramp == 0:
        return 1.0 if epoch >= off else 0.0
    return float(min(1.0, max(0.0, (epoch - off) / ramp)))


def build_purifier(classifier: nn.Module, dataset: str, cfg: PurifierConfig,
                   layers: list[str] | None) -> tuple[Purifier, RepresentationExtractor]:
    """A fresh purifier for `classifier`'s representation at `layers` (None: every conv layer)."""
    spec = dataset_spec(dataset)
    extractor = RepresentationExtractor(classifier, layers)
    image_shape = (spec.channels, spec.side, spec.side)
    shapes = extractor.shapes(torch.zeros(1, *image_shape))
    return Purifier(cfg, shapes, image_shape, spec.mean, spec.std), extractor


def save_purifier(path: Path, purifier: Purifier, dataset: str, layers: list[str], classifier_sha256: str) -> None:
    state = {k: v.detach().cpu() for k, v in purifier.state_dict().items()}
    save_tensors(path, state, {"kind": "purifier", "dataset": dataset, "config": purifier.cfg.as_dict(),
                               "layers": layers, "classifier_sha256": classifier_sha256})


def load_purifier(path: Path, classifier: nn.Module, dataset: str,
                  classifier_sha256: str) -> tuple[Purifier, RepresentationExtractor]:
    """Rebuild a purifier for `classifier`; refuse one trained on another classifier or dataset."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "purifier":
        raise UserError(f"{path} is not a purifier written by this pipeline; rerun the train_purifier stage.")
    if meta.get("dataset") != dataset or meta.get("classifier_sha256") != classifier_sha256:
        raise UserError(f"{path} was trained for another classifier or dataset; rerun the train_purifier stage.")
    purifier, extractor = build_purifier(classifier, dataset, PurifierConfig.from_params(meta["config"]),
                                         meta["layers"])
    try:
        purifier.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise UserError(f"{path} does not match its recorded purifier sizes ({str(err).splitlines()[0]}); "
                        "rerun the train_purifier stage.") from None
    return purifier.eval(), extractor
