"""CARSO defence throughput: N samples as one batch of B x N against a per-sample loop, and purifier training.

Prints images per second for inference (no gradient) and for attack passes (forward + backward to the
input, what every evaluation attack pays per step), batched vs looped, then purifier training throughput
in fp32 and bf16. Weights are random: throughput does not depend on them. On a CPU, keep B x N per pass
small enough for the cache: at --batch 100 (800 images per pass) the batched pass is slower than the loop.
Run: python bench/defence_throughput.py [--samples 8] [--batch 16]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from carso.defence import CarsoDefence
from carso.device import autocast, configure_threads
from carso.models import build_classifier
from carso.purifier import Purifier, PurifierConfig, purifier_loss
from carso.representation import RepresentationExtractor


def looped_logits(defence: CarsoDefence, x: torch.Tensor) -> torch.Tensor:
    """The same defence, one latent sample at a time (what batching replaces)."""
    c = defence.purifier.condition(defence.extractor(x))
    outs = []
    for _ in range(defence.n_samples):
        z = torch.randn(x.shape[0], defence.purifier.cfg.latent_dim)
        outs.append(defence.classifier(defence.purifier.decode(z, c)))
    return defence.aggregate(torch.stack(outs, dim=1))


def rate(fn: Callable[[], None], images: int, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return iters * images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="latent samples N per image")
    parser.add_argument("--batch", type=int, default=16, help="images per defence call (B x N per pass)")
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--width", type=int, default=16, help="cnn_small width (conv channels)")
    parser.add_argument("--decoder-channels", type=int, nargs="+", default=list(PurifierConfig().decoder_channels))
    args = parser.parse_args()
    configure_threads(args.threads)
    torch.manual_seed(0)
    clf = build_classifier("cnn_small", in_channels=1, num_classes=10, image_size=28, mean=[0.286], std=[0.353],
                           width=args.width)
    clf = clf.to(memory_format=torch.channels_last).eval()
    extractor = RepresentationExtractor(clf)
    x = torch.rand(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    purifier = Purifier(PurifierConfig(decoder_channels=tuple(args.decoder_channels)), extractor.shapes(x), (1, 28, 28), [0.286], [0.353])
    purifier = purifier.to(memory_format=torch.channels_last)
    defence = CarsoDefence(clf, purifier, extractor, n_samples=args.samples).eval()

    def attack_pass(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            xa = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(forward(xa), y), xa)
        return run

    def inference(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                forward(x)
        return run

    print(f"# CARSO defence, cnn_small width {args.width}, decoder channels {args.decoder_channels}, N={args.samples}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, fp32")
    print(f"{'pass':<22}{'batched img/s':>15}{'looped img/s':>14}{'speed-up':>10}")
    for name, make in (("inference", inference), ("attack (fwd+bwd)", attack_pass)):
        batched = rate(make(defence), args.batch, args.iters)
        looped = rate(make(lambda t: looped_logits(defence, t)), args.batch, args.iters)
        print(f"{name:<22}{batched:>15.0f}{looped:>14.0f}{batched / looped:>9.2f}x")

    print(f"\n# purifier training step, batch {args.train_batch}")
    xt = torch.rand(args.train_batch, 1, 28, 28)
    opt = torch.optim.RAdam(purifier.parameters(), lr=1e-3)
    purifier.train()
    for precision in ("fp32", "bf16"):
        def step() -> None:
            with torch.no_grad(), autocast(torch.device("cpu"), precision):
                acts = [a.float() for a in extractor(xt)]
            with autocast(torch.device("cpu"), precision):
                recon, mu, logvar = purifier(xt, acts)
            loss, _, _ = purifier_loss(recon.float(), xt, mu.float(), logvar.float(), 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{precision:<22}{rate(step, args.train_batch, args.iters):>15.0f} img/s")


if __name__ == "__main__":
    main()
