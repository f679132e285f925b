"""Adversarial-training throughput: fp32 NCHW against channels_last + bf16 autocast, same model.

Prints, for each configuration, examples x attack steps per second of a full PGD adversarial-training
step (attack + weight update), measured after a warm-up. Run: python bench/adv_training_throughput.py
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from carso.attacks import AttackSpec, attack
from carso.device import autocast, configure_threads, memory_format, select_device
from carso.models import build_classifier

CONFIGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def _throughput(arch: str, precision: str, channels_last: bool, batch: int, steps: int,
                iters: int, warmup: int, side: int, channels: int) -> float:
    device = select_device("auto")
    torch.manual_seed(0)
    fmt = memory_format(channels_last)
    model = build_classifier(arch, in_channels=channels, num_classes=10, image_size=side,
                             mean=[0.5] * channels, std=[0.25] * channels).to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, channels, side, side, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    spec = AttackSpec("pgd", eps=0.1, steps=steps)

    def step() -> None:
        x_adv = attack(model, x, y, spec, autocast(device, precision))
        with autocast(device, precision):
            loss = F.cross_entropy(model(x_adv).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iters * batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cnn_small")
    parser.add_argument("--side", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=7, help="PGD steps per training step")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    print(f"# {args.arch} {args.channels}x{args.side}x{args.side}, batch {args.batch}, PGD-{args.steps}, "
          f"{torch.get_num_threads()} threads, device {select_device('auto')}")
    print(f"{'precision':<10}{'layout':<16}{'ex x steps / s':>16}{'speed-up':>10}")
    base = None
    for precision, channels_last in CONFIGS:
        rate = _throughput(args.arch, precision, channels_last, args.batch, args.steps,
                           args.iters, args.warmup, args.side, args.channels)
        base = base or rate
        layout = "channels_last" if channels_last else "NCHW"
        print(f"{precision:<10}{layout:<16}{rate:>16.0f}{rate / base:>9.2f}x")


if __name__ == "__main__":
    main()
