"""Defence throughput: CARSO and AToP attack passes side by side, and their trainings in fp32 and bf16.

Prints, with the sizes of a params file (default params.yaml; random weights: throughput does not depend on them):
1. CARSO: images per second for inference (no gradient) and attack passes (forward + backward to the input, what
   every evaluation attack pays per step), its N samples as one batch of B x N against a per-sample loop. On a CPU
   keep B x N per pass small enough for the cache: at --batch 100 (800 images per pass) batching is slower.
2. Attack passes of every defence side by side (the classifier alone, CARSO, AToP's transform + inpainter +
   classifier), with FLOPs per defended image (torch.utils.flop_counter: matrix products and convolutions).
3. Training steps: CARSO's purifier, and AToP's inpainter + discriminator (pre-training, and fine-tuning with its
   FGSM + CE term) in fp32 / bf16 autocast, NCHW / channels_last.
Run: python bench/defence_throughput.py [--params params.yaml] [--batch 25] [--atop-batch 100]
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from carso.device import autocast, configure_threads, has_fast_bf16
from carso.methods.atop.defence import AtopDefence, AtopPurifier
from carso.methods.atop.inpainter import Inpainter, InpainterConfig, PatchDiscriminator
from carso.methods.atop.training import Adversary, make_networks, train_step
from carso.methods.atop.transforms import TransformConfig
from carso.methods.carso.defence import CarsoDefence
from carso.methods.carso.purifier import Purifier, PurifierConfig, purifier_loss
from carso.methods.carso.representation import RepresentationExtractor
from carso.models import build_classifier
from carso.params import load_params

CPU = torch.device("cpu")


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


def attack_pass(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        xa = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(forward(xa), y), xa)
    return run


def inference(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            forward(x)
    return run


def gflop_per_image(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """FLOPs of one attack pass per image (parameters frozen for the count, as the attacks' autograd.grad treats
    them: only the input's gradient is computed)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    xa = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(xa), y).backward()
    for p, flag in zip(model.parameters(), flags):
        p.requires_grad_(flag)
    return counter.get_total_flops() / len(x) / 1e9


def build(params: dict[str, Any], args: argparse.Namespace) -> tuple[nn.Module, CarsoDefence, AtopDefence]:
    torch.manual_seed(0)
    clf = build_classifier("cnn_small", in_channels=1, num_classes=10, image_size=28, mean=[0.286], std=[0.353],
                           width=args.width or params["classifier"]["arch_kwargs"]["width"])
    clf = clf.to(memory_format=torch.channels_last).eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    extractor = RepresentationExtractor(clf)
    channels = tuple(args.decoder_channels or params["purifier"]["decoder_channels"])
    purifier = Purifier(PurifierConfig(decoder_channels=channels), extractor.shapes(torch.zeros(1, 1, 28, 28)),
                        (1, 28, 28), [0.286], [0.353]).to(memory_format=torch.channels_last)
    carso = CarsoDefence(clf, purifier, extractor, n_samples=args.samples or params["carso"]["n_samples"]).eval()
    atop = params["atop"]
    inpainter = Inpainter(InpainterConfig.from_params(atop["inpainter"]), 1).to(memory_format=torch.channels_last)
    return clf, carso, AtopDefence(clf, AtopPurifier(TransformConfig.from_params(atop["transform"]), inpainter))


def bench_carso_batching(carso: CarsoDefence, batch: int, iters: int) -> None:
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    print(f"# CARSO defence, N={carso.n_samples}, batch {batch}: its N samples as one batch of B x N vs a loop")
    print(f"{'pass':<22}{'batched img/s':>15}{'looped img/s':>14}{'speed-up':>10}")
    for name, make in (("inference", lambda f: inference(f, x)), ("attack (fwd+bwd)", lambda f: attack_pass(f, x, y))):
        batched = rate(make(carso), batch, iters)
        looped = rate(make(lambda t: looped_logits(carso, t)), batch, iters)
        print(f"{name:<22}{batched:>15.0f}{looped:>14.0f}{batched / looped:>9.2f}x")


def bench_attack_passes(models: dict[str, tuple[nn.Module, int]], iters: int) -> None:
    print("\n# attack pass (forward + backward to the input), fp32, each defence at its evaluation batch size")
    print(f"{'defence':<40}{'batch':>6}{'img/s':>9}{'GFLOP/img':>11}{'GFLOP/s':>9}")
    for name, (model, batch) in models.items():
        x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        speed = rate(attack_pass(model, x, y), batch, iters)
        gflop = gflop_per_image(model, x, y)
        print(f"{name:<40}{batch:>6}{speed:>9.0f}{gflop:>11.3f}{speed * gflop:>9.1f}")


def bench_purifier_training(carso: CarsoDefence, batch: int, iters: int) -> None:
    print(f"\n# CARSO purifier training step, batch {batch}")
    xt = torch.rand(batch, 1, 28, 28)
    purifier = carso.purifier
    opt = torch.optim.RAdam(purifier.parameters(), lr=1e-3)
    purifier.train()
    for precision in ("fp32", "bf16"):
        def step() -> None:
            with torch.no_grad(), autocast(CPU, precision):
                acts = [a.float() for a in carso.extractor(xt)]
            with autocast(CPU, precision):
                recon, mu, logvar = purifier(xt, acts)
            loss, _, _ = purifier_loss(recon.float(), xt, mu.float(), logvar.float(), 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{precision:<22}{rate(step, batch, iters):>15.0f} img/s")
    purifier.eval()


def bench_inpainter_training(params: dict[str, Any], clf: nn.Module, batch: int, iters: int) -> None:
    atop = params["atop"]
    print(f"\n# AToP inpainter + discriminator training step, batch {batch} clean images "
          f"(fine-tuning adds their FGSM versions); bf16 is fast here: {has_fast_bf16(CPU)}")
    print(f"{'precision':<10}{'layout':<15}{'pretrain img/s':>16}{'finetune img/s':>16}")
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            cfg = {**atop["finetune"], "precision": precision, "channels_last": channels_last}
            torch.manual_seed(0)
            nets = make_networks(Inpainter(InpainterConfig.from_params(atop["inpainter"]), 1),
                                 PatchDiscriminator(1, atop["discriminator"]["channels"]),
                                 TransformConfig.from_params(atop["transform"]), cfg, CPU)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            xb = x.contiguous(memory_format=fmt)
            speeds = [rate(lambda: train_step(nets, clf, xb, y, cfg, adversary), batch, iters)
                      for adversary in (None, Adversary(clf, atop["finetune"]["adversary"]["eps"]))]
            layout = "channels_last" if channels_last else "NCHW"
            print(f"{precision:<10}{layout:<15}{speeds[0]:>16.0f}{speeds[1]:>16.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="the sizes of the models (default: params.yaml)")
    parser.add_argument("--samples", type=int, default=None, help="CARSO's N (default: carso.n_samples)")
    parser.add_argument("--batch", type=int, default=None,
                        help="CARSO images per pass (default: evaluation.defences.carso.batch_size)")
    parser.add_argument("--atop-batch", type=int, default=None,
                        help="AToP images per pass (default: evaluation.defences.atop.batch_size)")
    parser.add_argument("--train-batch", type=int, default=256, help="purifier training batch")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--width", type=int, default=None, help="cnn_small width (default: the params')")
    parser.add_argument("--decoder-channels", type=int, nargs="+", default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    params = load_params(args.params)
    clf, carso, atop = build(params, args)
    defences = params["evaluation"]["defences"]
    batch = args.batch or defences["carso"]["batch_size"]
    atop_batch = args.atop_batch or defences["atop"]["batch_size"]
    inp = params["atop"]["inpainter"]
    print(f"# {args.params}: cnn_small width {clf.conv1.out_channels}, CARSO decoder "
          f"{list(carso.purifier.cfg.decoder_channels)}, AToP {params['atop']['transform']['kind']} + inpainter width "
          f"{inp['width']}/{inp['refine_width']}, {torch.get_num_threads()} threads")
    bench_carso_batching(carso, batch, args.iters)
    bench_attack_passes({"at (classifier alone)": (clf, atop_batch), f"carso (N={carso.n_samples})": (carso, batch),
                         "atop (transform + inpainter + classifier)": (atop, atop_batch)}, args.iters)
    bench_purifier_training(carso, args.train_batch, args.iters)
    bench_inpainter_training(params, clf, params["atop"]["pretrain"]["batch_size"], args.iters)


if __name__ == "__main__":
    main()
