"""Defence throughput: the attack pass of every defence before and after the attack engine, against this machine's peak.

Prints, with the sizes of a params file (default params.yaml; random weights: throughput does not depend on them):
1. The fp32 matrix-multiply peak of this machine with this many threads, measured here (large square sgemm).
2. The attack pass of every defence (the classifier alone, CARSO, AToP): one PGD-EoT step at the defence's evaluation
   batch size and EoT (the margin loss's input gradient averaged over the EoT draws), in defended images per second
   (points x draws per second), before and after this work, with FLOPs per defended image (torch.utils.flop_counter:
   matrix products and convolutions, forward + backward to the input), the achieved GFLOP/s and its share of the peak.
   Before: the plain modules, every one channels_last, one EoT draw per pass, and cnn_small's ReLU before its pooling
   (the code before carso/engine.py). After: carso.engine.prepare (BatchNorm folded, per-layer memory format) and the
   EoT draws batched into passes of the defence's tile (carso.engine.cpu_pass_images on a CPU).
3. The tile: the after pass of every defence at several pass_images (what each defence's cpu_pass_images is chosen from),
   then each lever alone: the after pass with one lever taken back at a time, and with every layer in one memory
   format (engine.layout channels_last / contiguous; the after pass is engine.layout auto).
4. AutoAttack rand's APGD step: pyautoattack's EoT loop (one draw per pass) against carso.attacks.BatchedEoT.
5. The judge (carso.verdicts): a randomised defence's fresh draws on its attacked points, forward passes only (2 x
   verdict_draws per point, batched into the defence's tile): the seconds one attack's final points cost to judge.
   --judge-only prints this alone.
6. With --compile MODE ...: the after pass compiled with torch.compile in each mode, and its compile time.
7. CARSO's N samples as one batch against a loop, and the training steps (CARSO's purifier; AToP's inpainter +
   discriminator, pre-training and fine-tuning) in fp32 / bf16 autocast, NCHW / channels_last.
Run: python bench/defence_throughput.py [--params params.yaml] [--compile default max-autotune-no-cudagraphs]
     [--defences at carso atop] [--no-training] [--judge-only]
"""
from __future__ import annotations

import argparse
import contextlib
import time
from unittest import mock
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from carso.attacks import BatchedEoT, _input_gradient, attack_loss, eot_chunks, eot_logits
from carso.device import autocast, configure_threads, has_amx, has_fast_bf16
from carso.engine import COMPILE_MODES, cpu_pass_images, lay_out, layout_plan, prepare
from carso.methods.atop.defence import AtopDefence, AtopPurifier
from carso.methods.atop.inpainter import Inpainter, InpainterConfig, PatchDiscriminator
from carso.methods.atop.training import Adversary, make_networks, train_step
from carso.methods.atop.transforms import TransformConfig
from carso.methods.carso.defence import CarsoDefence
from carso.methods.carso.purifier import Purifier, PurifierConfig, purifier_loss
from carso.methods.carso.representation import RepresentationExtractor
from carso.models import SmallCNN, build_classifier
from carso.params import load_params
from carso.verdicts import correct_draws

CPU = torch.device("cpu")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), to tell hosts apart: figures compare only within one run."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def describe_plan(plan: dict[str, str]) -> str:
    """A layout_plan in words: the model's format, then each submodule laid out otherwise."""
    return ", ".join(f"{name} {fmt}" if name else fmt for name, fmt in plan.items())


def looped_logits(defence: CarsoDefence, x: torch.Tensor) -> torch.Tensor:
    """The same defence, one latent sample at a time (what batching replaces)."""
    c = defence.purifier.condition(defence.extractor(x))
    outs = []
    for _ in range(defence.n_samples):
        z = torch.randn(x.shape[0], defence.purifier.cfg.latent_dim)
        outs.append(defence.classifier(defence.purifier.decode(z, c)))
    return defence.aggregate(torch.stack(outs, dim=1))


def rate(fn: Callable[[], None], images: int, iters: int, warmup: int = 2, rounds: int = 3) -> float:
    """Images per second of `fn` (which handles `images` images), the best of `rounds` rounds of `iters` calls
    after `warmup` calls: the least disturbed round (another process or the allocator only ever slows one down)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, time.perf_counter() - start)
    return iters * images / best


def matmul_peak(iters: int = 5) -> tuple[float, int]:
    """The best fp32 sgemm rate (GFLOP/s) over a few large square sizes, and the size that reached it."""
    best = (0.0, 0)
    for n in (1024, 2048, 3072):
        a, b = torch.rand(n, n), torch.rand(n, n)
        speed = rate(lambda: torch.mm(a, b), 2 * n ** 3, iters, warmup=1) / 1e9  # noqa: B023
        best = max(best, (speed, n))
    return best


def attack_pass(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        xa = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(forward(xa), y), xa)
    return run


def eot_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int, pass_images: int | None
             ) -> Callable[[], None]:
    """One PGD-EoT step's gradient (the margin loss averaged over `eot` draws), as the evaluation computes it."""
    def run() -> None:
        _input_gradient(model, x, y, None, eot, "dlr", pass_images)
    return run


def inference(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            forward(x)
    return run


def relu_then_pool(self: SmallCNN, x: torch.Tensor) -> torch.Tensor:
    """cnn_small's forward before this work: ReLU on the full maps, then pooling (the same function)."""
    x = F.max_pool2d(F.relu(self.conv1(self.normalize(x))), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    return self.fc2(F.relu(self.fc1(x.flatten(1))))


def gflop_per_image(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int, pass_images: int | None) -> float:
    """FLOPs (matrix products and convolutions) of one PGD-EoT step per defended image, counted on the step's own
    passes (`backward` to the input: the counter cannot follow autograd.grad; the weights are frozen, as the attacks
    never need their gradients)."""
    for p in model.parameters():
        p.requires_grad_(False)
    xa = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        for draws in eot_chunks(model, len(x), eot, pass_images):
            attack_loss(eot_logits(model, xa, draws), y.repeat(draws), "dlr").sum().backward()
    return counter.get_total_flops() / (len(x) * eot) / 1e9


def build(params: dict[str, Any], args: argparse.Namespace) -> dict[str, nn.Module]:
    """Fresh defences with random weights (seed 0) at the sizes of `params`: `at`, `carso`, `atop`."""
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
    atop_defence = AtopDefence(clf, AtopPurifier(TransformConfig.from_params(atop["transform"]), inpainter)).eval()
    return {"at": clf, "carso": carso, "atop": atop_defence}


def suite(params: dict[str, Any], name: str, args: argparse.Namespace) -> tuple[int, int]:
    """The batch size and the largest EoT of a defence's evaluation section (--batch / --atop-batch override)."""
    section = params["evaluation"]["defences"][name]
    batch = {"carso": args.batch, "atop": args.atop_batch}.get(name) or section["batch_size"]
    return min(batch, section["n_points"]), max(run["eot"] for run in section["pgd"])


def old_classifier() -> contextlib.AbstractContextManager:
    """While open, cnn_small runs its forward from before the engine (`relu_then_pool`)."""
    return mock.patch.object(SmallCNN, "forward", relu_then_pool)


def step_inputs(params: dict[str, Any], name: str, args: argparse.Namespace
                ) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """A defence's evaluation batch size and EoT, and a batch of random images and labels of that size."""
    batch, eot = suite(params, name, args)
    return batch, eot, torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))


def bench_carso_batching(carso: CarsoDefence, batch: int, iters: int) -> None:
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    print(f"\n# CARSO defence, N={carso.n_samples}, batch {batch}: its N samples as one batch of B x N vs a loop")
    print(f"{'pass':<22}{'batched img/s':>15}{'looped img/s':>14}{'speed-up':>10}")
    for name, make in (("inference", lambda f: inference(f, x)), ("attack (fwd+bwd)", lambda f: attack_pass(f, x, y))):
        batched = rate(make(carso), batch, iters)
        looped = rate(make(lambda t: looped_logits(carso, t)), batch, iters)
        print(f"{name:<22}{batched:>15.0f}{looped:>14.0f}{batched / looped:>9.2f}x")


def bench_attack_passes(params: dict[str, Any], args: argparse.Namespace, peak: float) -> None:
    print("\n# attack pass: one PGD-EoT step (margin-loss input gradient averaged over the EoT draws), fp32, each "
          "defence at its evaluation batch and EoT;\n# img/s = defended images (points x draws) per second; "
          "after: carso.engine.prepare + EoT draws batched into each defence's tile (carso.engine.cpu_pass_images)")
    print(f"{'defence':<8}{'batch':>6}{'EoT':>5}{'before img/s':>14}{'after img/s':>13}{'speed-up':>10}"
          f"{'GFLOP/img':>11}{'GFLOP/s':>9}{'of peak':>9}")
    for name in args.defences:
        batch, eot, x, y = step_inputs(params, name, args)
        with old_classifier():
            before = rate(eot_step(build(params, args)[name], x, y, eot, None), batch * eot, args.iters, warmup=1)
        after_model = prepare(build(params, args)[name], CPU)
        tile = cpu_pass_images(after_model)
        after = rate(eot_step(after_model, x, y, eot, tile), batch * eot, args.iters, warmup=1)
        gflop = gflop_per_image(after_model, x, y, eot, tile)
        print(f"{name:<8}{batch:>6}{eot:>5}{before:>14.0f}{after:>13.0f}{after / before:>9.2f}x{gflop:>11.4f}"
              f"{after * gflop:>9.1f}{100 * after * gflop / peak:>8.1f}%")


def batched_apgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int, tile: int) -> Callable[[], None]:
    """The same step answered by carso.attacks.BatchedEoT (what the evaluation gives APGD): the draws in batched passes."""
    adapter = BatchedEoT(model, eot, tile)

    def run() -> None:
        xa = x.clone().requires_grad_(True)
        for _ in range(eot):
            adapter.get_logits_loss_grad_dlr(xa, y)
    return run


def bench_autoattack_eot(params: dict[str, Any], args: argparse.Namespace) -> None:
    names = [d for d in args.defences if d != "at"]  # the classifier alone has no EoT
    if not names:
        return
    print("\n# AutoAttack rand: one APGD step (20 EoT draws, DLR) on the prepared defence, pyautoattack's loop "
          "(one draw per pass) vs carso.attacks.BatchedEoT (img/s)")
    print(f"{'defence':<8}{'batch':>6}{'tile':>6}{'looped img/s':>14}{'batched img/s':>15}{'speed-up':>10}")
    for name in names:
        batch, _, x, y = step_inputs(params, name, args)
        model = prepare(build(params, args)[name], CPU)
        tile = cpu_pass_images(model)
        looped = rate(eot_step(model, x, y, 20, None), batch * 20, args.iters, warmup=1)  # APGD's loop: a draw a pass
        batched = rate(batched_apgd_step(model, x, y, 20, tile), batch * 20, args.iters, warmup=1)
        print(f"{name:<8}{batch:>6}{tile:>6}{looped:>14.0f}{batched:>15.0f}{batched / looped:>9.2f}x")


def bench_judge(params: dict[str, Any], args: argparse.Namespace) -> None:
    """What judging one attack's final points costs a randomised defence: 2 x verdict_draws forward passes per
    point over its n_points attacked points, at its evaluation batch, draws batched into its tile."""
    names = [d for d in args.defences if d != "at"]  # the classifier alone is judged once
    if not names:
        return
    print("\n# the judge: one attack's final points of a randomised defence classified with fresh draws "
          "(2 x verdict_draws per point, forward only, fp32, draws batched into the defence's tile)")
    print(f"{'defence':<8}{'points':>7}{'draws':>7}{'batch':>7}{'tile':>6}{'img/s':>9}{'seconds':>9}")
    for name in names:
        section = params["evaluation"]["defences"][name]
        points, draws, batch = section["n_points"], 2 * section["verdict_draws"], section["batch_size"]
        model = prepare(build(params, args)[name], CPU)
        tile = cpu_pass_images(model)
        x, y = torch.rand(points, 1, 28, 28), torch.randint(0, 10, (points,))
        images = rate(lambda: correct_draws(model, x, y, draws, CPU, batch, tile), points * draws, 1, warmup=1)
        print(f"{name:<8}{points:>7}{draws:>7}{batch:>7}{tile:>6}{images:>9.0f}{points * draws / images:>9.1f}")


def bench_tiles(params: dict[str, Any], args: argparse.Namespace) -> None:
    tiles = (None, 250, 500, 1000, 2000, 4000)
    print("\n# the tile: after-pass img/s with the EoT draws batched into passes of up to pass_images images "
          "(-: one draw per pass)")
    print(f"{'defence':<8}" + "".join(f"{'-' if t is None else t:>8}" for t in tiles))
    for name in args.defences:
        batch, eot, x, y = step_inputs(params, name, args)
        model = prepare(build(params, args)[name], CPU)
        speeds = [rate(eot_step(model, x, y, eot, t), batch * eot, args.iters, warmup=1) for t in tiles]
        print(f"{name:<8}" + "".join(f"{v:>8.0f}" for v in speeds))


def bench_levers(params: dict[str, Any], args: argparse.Namespace) -> None:
    """The after pass with one lever of the engine taken back at a time: what each one is worth here."""
    print("\n# each lever alone: the after pass, and the after pass with one lever taken back (img/s)")
    levers = ("after", "BatchNorm not folded", "one EoT draw per pass", "layout channels_last",
              "layout contiguous", "ReLU before pooling")
    print(f"{'defence':<8}" + "".join(f"{lever:>27}" for lever in levers))
    for name in args.defences:
        batch, eot, x, y = step_inputs(params, name, args)
        speeds = []
        for lever in levers:
            with old_classifier() if lever == "ReLU before pooling" else contextlib.nullcontext():
                model = build(params, args)[name]
                tile = cpu_pass_images(model)
                if lever == "BatchNorm not folded":
                    model = lay_out(model.eval(), CPU)
                else:  # the layout levers: every layer in one format (after: engine.layout auto, carso.engine.layout_plan)
                    model = prepare(model, CPU, layout=lever.split()[1] if lever.startswith("layout") else "auto")
                step = eot_step(model, x, y, eot, None if lever == "one EoT draw per pass" else tile)
                speeds.append(rate(step, batch * eot, args.iters, warmup=1))
        print(f"{name:<8}" + "".join(f"{v:>27.0f}" for v in speeds))


def bench_compile(params: dict[str, Any], args: argparse.Namespace) -> None:
    print("\n# torch.compile of the after pass (evaluation.defences.<name>.engine.compile); compile: seconds of the "
          "first step")
    print(f"{'defence':<8}{'mode':<28}{'eager img/s':>12}{'compiled img/s':>16}{'speed-up':>10}{'compile s':>11}")
    for name in args.defences:
        batch, eot, x, y = step_inputs(params, name, args)
        model = prepare(build(params, args)[name], CPU)
        tile = cpu_pass_images(model)
        eager = rate(eot_step(model, x, y, eot, tile), batch * eot, args.iters, warmup=1)
        for mode in args.compile:
            torch._dynamo.reset()
            step = eot_step(prepare(build(params, args)[name], CPU, mode), x, y, eot, tile)
            start = time.perf_counter()
            step()
            first = time.perf_counter() - start
            speed = rate(step, batch * eot, args.iters, warmup=1)
            print(f"{name:<8}{mode:<28}{eager:>12.0f}{speed:>16.0f}{speed / eager:>9.2f}x{first:>11.1f}")


def bench_purifier_training(carso: CarsoDefence, batch: int, iters: int) -> None:
    print(f"\n# CARSO purifier training step (classifier's representation + VAE step), batch {batch}; bf16 is fast "
          f"here: {has_fast_bf16(CPU)}")
    print(f"{'precision':<10}{'layout':<15}{'img/s':>8}")
    purifier = carso.purifier
    opt = torch.optim.RAdam(purifier.parameters(), lr=1e-3)
    purifier.train()
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            carso.to(memory_format=fmt)
            xt = torch.rand(batch, 1, 28, 28).contiguous(memory_format=fmt)

            def step() -> None:
                with torch.no_grad(), autocast(CPU, precision):
                    acts = [a.float() for a in carso.extractor(xt)]  # noqa: B023
                with autocast(CPU, precision):
                    recon, mu, logvar = purifier(xt, acts)  # noqa: B023
                loss, _, _ = purifier_loss(recon.float(), xt, mu.float(), logvar.float(), 1.0)  # noqa: B023
                opt.zero_grad()
                loss.backward()
                opt.step()
            layout = "channels_last" if channels_last else "NCHW"
            print(f"{precision:<10}{layout:<15}{rate(step, batch, iters):>8.0f}")
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
                        help="CARSO points per step (default: evaluation.defences.carso.batch_size)")
    parser.add_argument("--atop-batch", type=int, default=None,
                        help="AToP points per step (default: evaluation.defences.atop.batch_size)")
    parser.add_argument("--train-batch", type=int, default=256, help="purifier training batch")
    parser.add_argument("--iters", type=int, default=2, help="calls per timed round (the best of 3 rounds)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--width", type=int, default=None, help="cnn_small width (default: the params')")
    parser.add_argument("--decoder-channels", type=int, nargs="+", default=None)
    parser.add_argument("--compile", nargs="*", default=[], choices=[m for m in COMPILE_MODES if m != "eager"],
                        help="also time the after pass compiled in these torch.compile modes (minutes on 2 cores)")
    parser.add_argument("--no-training", action="store_true", help="skip the training steps")
    parser.add_argument("--defences", nargs="+", default=["at", "carso", "atop"], choices=["at", "carso", "atop"],
                        help="the defences whose attack passes are timed (default: all three)")
    parser.add_argument("--judge-only", action="store_true", help="print the judge's cost alone")
    args = parser.parse_args()
    configure_threads(args.threads)
    params = load_params(args.params)
    if args.judge_only:
        print(f"# {args.params}: CPU {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        bench_judge(params, args)
        return
    models = build(params, args)
    carso = models["carso"]
    inp = params["atop"]["inpainter"]
    print(f"# {args.params}: cnn_small width {models['at'].conv1.out_channels}, CARSO N={carso.n_samples} decoder "
          f"{list(carso.purifier.cfg.decoder_channels)}, AToP {params['atop']['transform']['kind']} + inpainter width "
          f"{inp['width']}/{inp['refine_width']}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    peak, n = matmul_peak()
    print(f"# fp32 matmul peak here: {peak:.0f} GFLOP/s ({n} x {n} sgemm, {torch.get_num_threads()} threads); CPU "
          f"{cpu_name()}, AMX {'yes' if has_amx() else 'no'}; engine.layout auto: "
          + "; ".join(f"{name} {describe_plan(layout_plan(model, CPU))}" for name, model in models.items()))
    bench_attack_passes(params, args, peak)
    bench_tiles(params, args)
    bench_levers(params, args)
    bench_autoattack_eot(params, args)
    bench_judge(params, args)
    if args.compile:
        bench_compile(params, args)
    bench_carso_batching(carso, suite(params, "carso", args)[0], args.iters)
    if not args.no_training:
        bench_purifier_training(carso, args.train_batch, args.iters)
        bench_inpainter_training(params, models["at"], params["atop"]["pretrain"]["batch_size"], args.iters)


if __name__ == "__main__":
    main()
