"""AToP's random transforms, drawn afresh at every call: a block mask (RT1), Gaussian noise then a block mask
(RT2), or noise then N complementary block masks that partition the image (RT3).

The image side is cut into `grid` x `grid` blocks (7 x 7 blocks of 4 x 4 pixels at 28 px, 8 x 8 at 32 px).
RT1 and RT2 mask exactly round(missing_share * grid^2) blocks; RT3 draws a random permutation of the blocks
and splits it into `rt3_masks` groups, so every block is missing in exactly one of the masks. Masked pixels
take the mid-grey value (0.5 in [0, 1], 0 in the inpainter's [-1, 1] units). All of it is batched tensor
work on the images' device; a draw (`TransformDraw`) can be applied to several images, so the clean and the
adversarial halves of a fine-tuning batch see the same masks and noise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

KINDS = ("rt1", "rt2", "rt3")


@dataclass(frozen=True)
class TransformConfig:
    """`atop.transform` of params.yaml (defaults: the paper's RT2 on a 7 x 7 grid, for 28 x 28 images)."""

    kind: str = "rt2"             # rt1: mask | rt2: noise, then mask | rt3: noise, then rt3_masks complementary masks
    grid: int = 7                 # blocks per image side (it must divide the side)
    missing_share: float = 0.25   # share of the blocks masked by rt1 / rt2 (rt3: 1 / rt3_masks each)
    noise_sigma: float = 0.25     # std of the Gaussian noise of rt2 / rt3, in [0, 1] pixel units
    rt3_masks: int = 4            # complementary masks of rt3
    per: str = "image"            # image: a mask per image | batch: one mask for the whole batch

    @classmethod
    def from_params(cls, cfg: dict[str, Any]) -> "TransformConfig":
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def masks(self) -> int:
        """Inpaintings per image: rt3_masks for rt3, else 1."""
        return self.rt3_masks if self.kind == "rt3" else 1

    def missing_blocks(self) -> int:
        """Blocks masked by rt1 / rt2: the configured share of the grid, rounded to a whole block."""
        return round(self.missing_share * self.grid ** 2)


@dataclass
class TransformDraw:
    """The randomness of one transform: `masks` (B, M, 1, H, W), 1 where a pixel is missing, and the noise
    (B, C, H, W) in [0, 1] units (None for rt1)."""

    masks: torch.Tensor
    noise: torch.Tensor | None

    def repeat(self, times: int) -> "TransformDraw":
        """The same draw for `times` stacked copies of the batch (e.g. clean and adversarial halves)."""
        noise = None if self.noise is None else self.noise.repeat(times, 1, 1, 1)
        return TransformDraw(self.masks.repeat(times, 1, 1, 1, 1), noise)


def _block_ranks(b: int, blocks: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """(b, blocks): for every image a uniformly random ordering of its blocks (rank of each block)."""
    scores = torch.rand(b, blocks, device=device, generator=generator)
    return scores.argsort(dim=1).argsort(dim=1)


def _to_pixels(block_masks: torch.Tensor, grid: int, side: int) -> torch.Tensor:
    """(B, M, grid * grid) block flags -> (B, M, 1, side, side) pixel masks."""
    cell = side // grid
    b, m, _ = block_masks.shape
    grid_masks = block_masks.view(b, m, 1, grid, grid)
    return grid_masks.repeat_interleave(cell, dim=3).repeat_interleave(cell, dim=4)


def draw_masks(cfg: TransformConfig, b: int, side: int, device: torch.device,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, M, 1, side, side) float masks, 1 = missing: rt1/rt2 mask `missing_blocks()` blocks (M = 1); rt3's M
    masks partition the blocks (block of rank r belongs to mask r * M // blocks)."""
    blocks = cfg.grid ** 2
    ranks = _block_ranks(1 if cfg.per == "batch" else b, blocks, device, generator)
    if cfg.kind == "rt3":
        group = ranks * cfg.rt3_masks // blocks  # (b', blocks): which mask each block belongs to
        flags = group.unsqueeze(1) == torch.arange(cfg.rt3_masks, device=device).view(1, -1, 1)
    else:
        flags = (ranks < cfg.missing_blocks()).unsqueeze(1)
    masks = _to_pixels(flags.float(), cfg.grid, side)
    return masks.expand(b, -1, -1, -1, -1) if cfg.per == "batch" else masks


def draw(cfg: TransformConfig, x: torch.Tensor, generator: torch.Generator | None = None) -> TransformDraw:
    """A fresh draw of masks and noise for the images `x` (B, C, H, W), on their device."""
    masks = draw_masks(cfg, x.shape[0], x.shape[-1], x.device, generator)
    if cfg.kind == "rt1":
        return TransformDraw(masks, None)
    noise = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype) * cfg.noise_sigma
    return TransformDraw(masks, noise)


def apply(x: torch.Tensor, d: TransformDraw) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformed images and their masks, one copy per mask: ((B, M, C, H, W) in [0, 1], (B, M, 1, H, W)).

    Noise is added first and the result clipped to [0, 1]; then masked pixels are set to mid-grey (0.5)."""
    if d.noise is not None:
        x = (x + d.noise).clamp(0.0, 1.0)
    x = x.unsqueeze(1)  # (B, 1, C, H, W)
    return x * (1 - d.masks) + 0.5 * d.masks, d.masks
