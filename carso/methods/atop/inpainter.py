"""AToP's generative purifier: a two-stage gated-convolution inpainter (DeepFill v2's structure, sized for 28 or
32 px images without upsampling the input) and an SN-PatchGAN discriminator.

stage input  [image in [-1, 1] with masked pixels at 0, a ones channel, the mask]  (B, C + 2, H, W)
coarse stage gated conv 5x5 -> gated conv 3x3 stride 2 -> dilated gated convs -> nearest x2 -> gated conv -> conv
refinement   the same structure on the coarse output pasted into the masked image; optional contextual
             attention on its half-resolution features
head         tanh; by default (`residual`) a correction added to the stage's input: clamp(input + 2 tanh(h))
             in [-1, 1] units. A plain tanh head trained from scratch can collapse to a black image (an L1
             optimum of a constant is the median pixel, 0 on Fashion-MNIST; tanh then saturates and its
             gradient dies: ../shared/docs/METHOD.md, section 2, measured trial).
Images enter and leave in [0, 1]; the [-1, 1] units are internal.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from carso.datasets import dataset_spec
from carso.device import has_amx
from carso.errors import UserError
from carso.io import load_tensors, save_tensors


@dataclass(frozen=True)
class InpainterConfig:
    """`atop.inpainter` of params.yaml (defaults: a small inpainter for 1 x 28 x 28 images; the paper's base
    width is 48)."""

    width: int = 16                       # channels of the coarse stage at full resolution (x2 at half resolution)
    refine_width: int = 16                # the same for the refinement stage
    dilations: tuple[int, ...] = (2, 4)   # dilation rates of the gated convs at half resolution (DeepFill: 2, 4, 8, 16)
    contextual_attention: bool = False    # add DeepFill's contextual-attention branch to the refinement stage
    residual: bool = True                 # heads predict a correction to their input (see the module docstring)

    @classmethod
    def from_params(cls, cfg: dict[str, Any]) -> "InpainterConfig":
        return cls(width=cfg["width"], refine_width=cfg["refine_width"], dilations=tuple(cfg["dilations"]),
                   contextual_attention=cfg["contextual_attention"], residual=cfg["residual"])

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class GatedConv2d(nn.Module):
    """A convolution with 2C outputs: ELU(features) * sigmoid(gates) (Yu et al. 2019)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 2 * c_out, kernel, stride, padding=dilation * (kernel - 1) // 2, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, gates = self.conv(x).chunk(2, dim=1)
        return F.elu(features) * torch.sigmoid(gates)


class ContextualAttention(nn.Module):
    """DeepFill's contextual attention on a feature map: every 3x3 patch is rebuilt as a softmax-weighted sum of
    the known (unmasked) patches, weighted by cosine similarity (scale 10), then merged back by a gated conv."""

    def __init__(self, channels: int, scale: float = 10.0) -> None:
        super().__init__()
        self.scale = scale
        self.merge = GatedConv2d(2 * channels, channels, 3)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feats.shape
        patches = F.unfold(feats, 3, padding=1).transpose(1, 2)  # (B, HW, C*9)
        keys = F.normalize(patches, dim=2)
        known = F.max_pool2d(F.interpolate(mask, size=(h, w)), 3, 1, 1).flatten(1) < 0.5  # (B, HW) patch fully known
        scores = self.scale * keys @ keys.transpose(1, 2)  # (B, HW query, HW key)
        scores = scores.masked_fill(~known.unsqueeze(1), -1e4)
        rebuilt = torch.softmax(scores, dim=2) @ patches  # (B, HW, C*9)
        folded = F.fold(rebuilt.transpose(1, 2), (h, w), 3, padding=1) / 9.0  # overlap-add of 3x3 patches
        return self.merge(torch.cat([feats, folded], dim=1))


class InpaintStage(nn.Module):
    """One stage: full-resolution gated conv, a stride-2 gated conv, dilated gated convs at half resolution,
    nearest-neighbour upsampling, a gated conv and a conv to the image channels, tanh head."""

    def __init__(self, channels: int, width: int, dilations: Sequence[int], attention: bool, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.encode = nn.Sequential(GatedConv2d(channels + 2, width, 5), GatedConv2d(width, 2 * width, 3, stride=2))
        self.dilated = nn.Sequential(*(GatedConv2d(2 * width, 2 * width, 3, dilation=r) for r in dilations))
        self.attention = ContextualAttention(2 * width) if attention else None
        self.decode = GatedConv2d(2 * width, width, 3)
        self.head = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) image in [-1, 1] (masked pixels 0) and (N, 1, H, W) mask -> (N, C, H, W) in [-1, 1]."""
        h = self.dilated(self.encode(torch.cat([image, torch.ones_like(mask), mask], dim=1)))
        if self.attention is not None:
            h = self.attention(h, mask)
        h = F.interpolate(h, size=image.shape[-2:], mode="nearest")
        out = torch.tanh(self.head(self.decode(h)))
        return (image + 2 * out).clamp(-1.0, 1.0) if self.residual else out


class Inpainter(nn.Module):
    """Coarse stage, then a refinement stage on the coarse output pasted into the masked image."""

    @staticmethod
    def preferred_memory_format(device: torch.device) -> torch.memory_format:
        """Its layout in attack passes under engine.layout auto (carso.engine.layout_plan), measured per CPU kind with
        bench/defence_throughput.py (docs/performance.md): its few-channel gated convs run faster in NCHW on a Xeon
        with AMX (1.15x channels_last) but slower on an AMD EPYC with AVX-512 and no AMX (channels_last 1.1-1.25x
        faster, three runs). Unmeasured elsewhere (other CPUs, GPUs): channels_last, as every other layer."""
        return torch.contiguous_format if device.type == "cpu" and has_amx() else torch.channels_last

    def __init__(self, cfg: InpainterConfig, channels: int) -> None:
        super().__init__()
        self.cfg, self.channels = cfg, channels
        self.coarse = InpaintStage(channels, cfg.width, cfg.dilations, False, cfg.residual)
        self.refine = InpaintStage(channels, cfg.refine_width, cfg.dilations, cfg.contextual_attention, cfg.residual)

    def forward(self, masked: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) masked images in [0, 1] and (N, 1, H, W) masks -> coarse and refined outputs in [0, 1]."""
        image = 2 * masked - 1
        coarse = self.coarse(image, mask)
        pasted = image * (1 - mask) + coarse * mask
        refined = self.refine(pasted, mask)
        return (coarse + 1) / 2, (refined + 1) / 2


class PatchDiscriminator(nn.Module):
    """SN-PatchGAN: spectrally normalised 5x5 stride-2 convs with LeakyReLU(0.2) on [image in [-1, 1], mask];
    every element of the last feature map is one patch's score."""

    def __init__(self, channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.widths = list(widths)
        layers: list[nn.Module] = []
        c_in = channels + 1
        for c_out in widths:
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 5, stride=2, padding=2)), nn.LeakyReLU(0.2)]
            c_in = c_out
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) image in [0, 1] and (N, 1, H, W) mask -> (N, patches) scores."""
        return self.net(torch.cat([2 * image - 1, mask], dim=1)).flatten(1)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean D(fake)."""
    return -fake.mean()


def save_network(path: Path, net: nn.Module, meta: dict[str, Any]) -> None:
    """An inpainter or discriminator as safetensors, with what it takes to rebuild and check it."""
    save_tensors(path, {k: v.detach().cpu() for k, v in net.state_dict().items()}, meta)


def _read(path: Path, kind: str, dataset: str, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = load_tensors(path)
    if meta.get("kind") != kind or meta.get("dataset") != dataset:
        raise UserError(f"{path} is not a {dataset} {kind} written by this pipeline; rerun the {stage} stage.")
    return tensors, meta


def _load_state(net: nn.Module, tensors: dict[str, torch.Tensor], path: Path, stage: str) -> None:
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise UserError(f"{path} does not match its recorded sizes ({str(err).splitlines()[0]}); rerun the "
                        f"{stage} stage.") from None


def load_inpainter(path: Path, dataset: str, classifier_sha256: str | None = None) -> Inpainter:
    """Rebuild an inpainter; refuse one made for another dataset, or fine-tuned against another classifier."""
    stage = "pretrain_inpainter or finetune_inpainter"
    tensors, meta = _read(path, "inpainter", dataset, stage)
    tuned_for = meta.get("classifier_sha256")
    if classifier_sha256 is not None and tuned_for is not None and tuned_for != classifier_sha256:
        raise UserError(f"{path} was fine-tuned against another classifier; rerun the finetune_inpainter stage.")
    net = Inpainter(InpainterConfig.from_params(meta["config"]), dataset_spec(dataset).channels)
    _load_state(net, tensors, path, stage)
    return net.eval()


def load_discriminator(path: Path, dataset: str) -> PatchDiscriminator:
    tensors, meta = _read(path, "discriminator", dataset, "pretrain_inpainter")
    net = PatchDiscriminator(dataset_spec(dataset).channels, meta["channels"])
    _load_state(net, tensors, path, "pretrain_inpainter")
    return net
