"""Classifier registry. Every model takes images in [0, 1] and normalises inside `forward`."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from carso.errors import UserError


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, stored as buffers so it travels with the weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Two conv blocks and two linear layers, for 1x28x28 (or small) inputs."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        side = image_size // 4
        self.fc1 = nn.Linear(2 * width * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0, 1] -> (B, K)
        # pooling before the ReLU is the same function (both are monotone) on a quarter of the activations
        x = F.relu(F.max_pool2d(self.conv1(self.normalize(x)), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class CnnV1(nn.Module):
    """CARSO v1's MNIST / Fashion-MNIST classifier (METHOD.md, section 1): conv(c-16, k4 s2)-Mish-BN-
    conv(16-32, k4 s2)-Mish-BN-FC100-Mish-BN-FC(classes)-LogSoftmax, for 28x28 inputs.

    It returns log-probabilities (still logits for every loss and aggregation: softmax of them is the same
    distribution); `log_softmax` is a module so the representation can hook the output."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], hidden: int = 100) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 4, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * (image_size // 4) ** 2, hidden)
        self.bn3 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.log_softmax = nn.LogSoftmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 28, 28) in [0, 1] -> (B, K) log-probabilities
        x = self.bn1(F.mish(self.conv1(self.normalize(x))))
        x = self.bn2(F.mish(self.conv2(x)))
        x = self.bn3(F.mish(self.fc1(x.flatten(1))))
        return self.log_softmax(self.fc2(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (BN-ReLU-conv twice, projection shortcut when the shape changes),
    shared by PreAct ResNet and WideResNet."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False)
                         if stride != 1 or c_in != c_out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 (He et al. 2016) for 32x32 inputs."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, c_in = [], 64
        for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [PreActBlock(c_in, c_out, stride), PreActBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1)
        return self.linear(out.flatten(1))


def wrn_layout(arch: str, depth: int, width: int) -> tuple[int, list[int]]:
    """Blocks per group and the channel widths (stem, then the three groups) of a WideResNet-depth-width."""
    if (depth - 4) % 6 != 0:
        raise UserError(f"classifier.arch_kwargs.depth must be 6n+4 for {arch} (got {depth}); use e.g. 16, 28, 34 or 70.")
    return (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]


class WideResNet(nn.Module):
    """WideResNet-depth-width (Zagoruyko & Komodakis 2016) for 32x32 inputs."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], depth: int = 28, width: int = 10) -> None:
        super().__init__()
        n, widths = wrn_layout("wide_resnet", depth, width)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, c_in = [], widths[0]
        for c_out, stride in zip(widths[1:], [1, 2, 2]):
            for i in range(n):
                blocks.append(PreActBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1)
        return self.fc(out.flatten(1))


class DMBlock(nn.Module):
    """Pre-activation WRN block in the layout of DeepMind's WideResNet (Gowal et al. 2020), as RobustBench
    ships it: the first 3x3 conv is unpadded and the input is padded by hand ("SAME": 1 on every side at
    stride 1, only right and bottom at stride 2); a 1x1 projection shortcut exactly when the channel count
    changes, applied to the activated input."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"DMBlock supports stride 1 or 2, not {stride}")
        self.stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(c_in)
        self.relu_0 = nn.SiLU()
        self.conv_0 = nn.Conv2d(c_in, c_out, 3, stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(c_out)
        self.relu_1 = nn.SiLU()
        self.conv_1 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu_0(self.batchnorm_0(x))
        out = self.conv_0(F.pad(act, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1)))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return (self.shortcut(act) if self.shortcut is not None else x) + out


class DMBlockGroup(nn.Module):
    """`n` DMBlocks; the first changes the width and the stride."""

    def __init__(self, n: int, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(*(DMBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                     for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """WideResNet-depth-width with SiLU (Swish) activations in DeepMind's layout, for 32x32 inputs.

    Its state dict has RobustBench's names and shapes (`init_conv`, `layer.G.block.B.{batchnorm_0, conv_0,
    batchnorm_1, conv_1, shortcut}`, `batchnorm`, `logits`), so RobustBench checkpoints of this family
    (Cui2023Decoupled_WRN-28-10 for CIFAR-10 and CIFAR-100) load with strict=True. The normalisation
    constants are buffers left out of the state dict, as in RobustBench; they come from the dataset.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], depth: int = 28, width: int = 10) -> None:
        super().__init__()
        n, widths = wrn_layout("dm_wide_resnet", depth, width)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.init_conv = nn.Conv2d(in_channels, widths[0], 3, 1, padding=1, bias=False)
        self.layer = nn.Sequential(*(DMBlockGroup(n, c_in, c_out, stride) for c_in, c_out, stride
                                     in zip(widths[:-1], widths[1:], (1, 2, 2))))
        self.batchnorm = nn.BatchNorm2d(widths[-1])
        self.relu = nn.SiLU()
        self.logits = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(self.init_conv((x - self.mean) / self.std))
        out = self.relu(self.batchnorm(out))
        out = F.avg_pool2d(out, tuple(out.shape[-2:]))  # global average (8x8 on 32x32 inputs)
        return self.logits(out.flatten(1))


# name -> (constructor, the input side it is built for; None = any side divisible by 4)
REGISTRY: dict[str, tuple[Callable[..., nn.Module], int | None]] = {
    "cnn_small": (SmallCNN, None),
    "cnn_v1": (CnnV1, 28),  # CARSO v1's MNIST-like classifier (ends in LogSoftmax)
    "preact_resnet18": (PreActResNet18, 32),
    "wide_resnet": (WideResNet, 32),
    "dm_wide_resnet": (DMWideResNet, 32),  # RobustBench's DMWideResNet layout, SiLU (Cui2023 WRN-28-10)
}


def build_classifier(arch: str, *, in_channels: int, num_classes: int, image_size: int,
                     mean: Sequence[float], std: Sequence[float], **kwargs: int) -> nn.Module:
    """Build a registered classifier, checking that it fits the dataset's image size."""
    if arch not in REGISTRY:
        raise UserError(f"classifier.arch '{arch}' is unknown; choose one of {sorted(REGISTRY)}.")
    constructor, side = REGISTRY[arch]
    if side is not None and image_size != side:
        raise UserError(f"classifier.arch '{arch}' is built for {side}x{side} images but the dataset "
                        f"has {image_size}x{image_size}; pick another classifier.arch in params.yaml.")
    if side is None and image_size % 4 != 0:
        raise UserError(f"classifier.arch '{arch}' needs an image side divisible by 4 (got {image_size}).")
    return constructor(in_channels, num_classes, image_size, mean, std, **kwargs)
