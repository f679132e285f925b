"""Where an attack pass spends its time: torch.profiler on one PGD-EoT step of every defence, grouped by kind of work.

For each defence (the classifier alone, CARSO, AToP; random weights at the sizes of a params file, the evaluation's
batch and EoT) and each engine (before: the plain modules, one EoT draw per pass, cnn_small's ReLU before its
pooling; after: carso.engine.prepare and EoT draws batched into the defence's tile, cpu_pass_images), prints the
step's time split into convolutions and matrix products, elementwise / pooling / normalisation kernels, memory
(fills, copies, allocation, concatenation), autograd and dispatch, and what no operator accounts for; then the
operators that took the most time, and every convolution alone at its shape in the pass, in GFLOP/s against the
fp32 matmul peak measured here. docs/performance.md records and reads its output.
Run: python bench/profile_attack_pass.py [--params params.yaml] [--steps 3] [--top 8]
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from defence_throughput import build, eot_step, matmul_peak, old_classifier, step_inputs
from carso.attacks import eot_chunks, eot_logits
from carso.device import configure_threads
from carso.engine import cpu_pass_images, prepare
from carso.params import load_params

CPU = torch.device("cpu")
KINDS = ("convolutions and matrix products", "elementwise, pooling, normalisation", "memory: fills, copies, allocation",
         "autograd and dispatch", "outside operators")
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul"}
MEMORY = {"aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like", "aten::copy_", "aten::clone",
          "aten::contiguous", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::to",
          "aten::_to_copy", "aten::cat", "aten::repeat", "aten::repeat_interleave", "aten::new_zeros",
          "aten::new_empty_strided", "aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::ones_like"}


def kind(op: str) -> str:
    if "conv" in op or op in MATMUL:
        return KINDS[0]
    if op in MEMORY:
        return KINDS[2]
    if op.startswith("aten::"):
        return KINDS[1]
    return KINDS[3]


def profile_step(step, steps: int) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """Wall seconds per step, seconds per step of each kind of work, and the operators by their self time."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    by_kind: dict[str, float] = defaultdict(float)
    ops = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / steps
        by_kind[kind(event.key)] += seconds
        ops.append((event.key, seconds))
    by_kind[KINDS[4]] = max(0.0, wall - sum(by_kind.values()))
    return wall, by_kind, sorted(ops, key=lambda o: -o[1])


def report(name: str, engine: str, batch: int, eot: int, wall: float, by_kind: dict[str, float],
           ops: list[tuple[str, float]], top: int) -> None:
    print(f"\n## {name}, {engine}: batch {batch} x EoT {eot}, {1e3 * wall:.0f} ms per step "
          f"({batch * eot / wall:.0f} defended images/s, under the profiler)")
    for k in KINDS:
        print(f"  {k:<40}{1e3 * by_kind[k]:>9.1f} ms {100 * by_kind[k] / wall:>6.1f}%")
    print("  top operators (self time):")
    for op, seconds in ops[:top]:
        print(f"    {op:<46}{1e3 * seconds:>9.1f} ms {100 * seconds / wall:>6.1f}%")


def conv_shapes(model: nn.Module, x: torch.Tensor, draws: int) -> list[tuple[str, nn.Module, torch.Size]]:
    """Every convolution that one pass of `draws` EoT draws runs, with the input shape it sees."""
    seen: list[tuple[str, nn.Module, torch.Size]] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, mod, args[0].shape)))
               for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        eot_logits(model, x, draws)
    for handle in handles:
        handle.remove()
    return list({name: (name, mod, shape) for name, mod, shape in seen}.values())


def conv_efficiency(model: nn.Module, x: torch.Tensor, draws: int, peak: float) -> None:
    """Each convolution alone at its shape in the pass: forward + backward to its input, in GFLOP/s."""
    print(f"  each convolution alone (forward + backward to its input) at its shape in one pass of {draws} draws:")
    for name, conv, shape in conv_shapes(model, x, draws):
        inp = torch.rand(shape).contiguous(memory_format=torch.channels_last if conv.weight.is_contiguous(
            memory_format=torch.channels_last) and not conv.weight.is_contiguous() else torch.contiguous_format)

        def step() -> None:
            xa = inp.clone().requires_grad_(True)  # noqa: B023
            torch.autograd.grad(conv(xa).sum(), xa)  # noqa: B023

        with FlopCounterMode(display=False) as counter:
            xa = inp.clone().requires_grad_(True)
            conv(xa).sum().backward()
        flops = counter.get_total_flops()
        step()
        start = time.perf_counter()
        for _ in range(5):
            step()
        speed = 5 * flops / (time.perf_counter() - start) / 1e9
        kind = "convT" if isinstance(conv, nn.ConvTranspose2d) else "conv"
        print(f"    {name:<34}{kind:<6}{conv.in_channels:>4}->{conv.out_channels:<4}k{conv.kernel_size[0]} "
              f"{shape[-2]}x{shape[-1]} x{shape[0]:<6}{speed:>7.1f} GFLOP/s {100 * speed / peak:>5.1f}% of peak")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per defence and engine")
    parser.add_argument("--top", type=int, default=8, help="operators listed per profile")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    params = load_params(args.params)
    sizes = argparse.Namespace(width=None, decoder_channels=None, samples=None, batch=None, atop_batch=None)
    peak, n = matmul_peak()
    print(f"# {args.params}, {torch.get_num_threads()} threads, torch {torch.__version__}; fp32 matmul peak "
          f"{peak:.0f} GFLOP/s ({n} x {n})")
    for name in ("at", "carso", "atop"):
        batch, eot, x, y = step_inputs(params, name, sizes)
        with old_classifier():
            before = eot_step(build(params, sizes)[name], x, y, eot, None)
            report(name, "before", batch, eot, *profile_step(before, args.steps), args.top)
        after = prepare(build(params, sizes)[name], CPU)
        tile = cpu_pass_images(after)
        report(name, "after", batch, eot, *profile_step(eot_step(after, x, y, eot, tile), args.steps), args.top)
        conv_efficiency(after, x, eot_chunks(after, batch, eot, tile)[0], peak)


if __name__ == "__main__":
    main()
