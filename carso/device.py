"""The one place that decides the device, the precision and the thread count."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from carso.errors import UserError

log = logging.getLogger(__name__)


def select_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """Return CUDA when present (or asked for), the CPU otherwise.

    Under torchrun, process `local_rank` of a node takes GPU `local_rank`. On a GPU, cuDNN picks the
    fastest convolution algorithms for the shapes it sees, and TF32 is switched off: fp32 stays fp32
    (every attack is measured in it), and training gets its speed from bf16 autocast instead.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("runtime.device is 'cuda' in params.yaml but no CUDA GPU is visible; "
                        "set it to 'auto' or 'cpu'.")
    if requested != "cuda":
        return torch.device(requested)
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"process {local_rank} of this node has no GPU of its own (only "
                        f"{torch.cuda.device_count()} visible); start at most that many processes per node.")
    torch.cuda.set_device(local_rank)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda", local_rank)


def configure_threads(threads: int | None, share: int = 1) -> None:
    """Use `threads` CPU threads (Snakemake passes its `threads:`; default all cores), split evenly
    between the `share` processes torchrun started on this node."""
    n = max(1, (threads or os.cpu_count() or 1) // share)
    torch.set_num_threads(n)
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Stop glibc from handing every freed activation buffer back to the kernel.

    By default glibc serves blocks above 128 KiB-32 MiB with mmap and unmaps them on free, so each
    forward/backward pass page-faults its activations in again (measured here: ~230k faults/s and a
    quarter of the CPU time in the kernel). Raising the mmap and trim thresholds keeps them in the heap.
    Returns whether the allocator was tuned (glibc only; a no-op elsewhere).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
        return bool(libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024) == 1 and ok)
    except (OSError, AttributeError):
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up here: a CUDA GPU with bf16, or a CPU for which oneDNN has
    bf16 kernels (AVX-512 and up). On an AVX2-only CPU bf16 is emulated: measured 10x slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon from Sapphire Rapids on): a CPU kind the engine's layout rules
    tell apart (carso.engine.layout_plan). torch's own check, else the kernel's CPU flags."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        try:
            with open("/proc/cpuinfo") as f:
                return any(line.startswith("flags") and " amx_tile" in line for line in f)
        except OSError:
            return False


def training_precision(requested: str, device: torch.device) -> str:
    """The precision a training stage runs in: `auto` is bf16 where it is fast (`has_fast_bf16`), else fp32."""
    if requested != "auto":
        return requested
    return "bf16" if has_fast_bf16(device) else "fp32"


def with_precision(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A training section with its `precision` resolved (`training_precision`), logged when it was `auto`."""
    resolved = training_precision(cfg["precision"], device)
    if cfg["precision"] == "auto":
        log.info("precision auto: %s on this %s", resolved, device.type)
    return {**cfg, "precision": resolved}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for training when asked for; a no-op (fp32) otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def describe(device: torch.device) -> dict[str, str | int | bool]:
    """What ran where, for each stage's metrics."""
    info: dict[str, str | int | bool] = {"device": str(device), "torch": torch.__version__,
                                         "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32"] = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    return info


def describe_training(device: torch.device, curve: Sequence[dict[str, Any]]) -> dict[str, str | int | bool]:
    """describe(device) for a training whose per-epoch `curve` rows name the device each epoch ran on. When a
    resumed training ran on more than one (its first epochs on a GPU, the rest on a CPU, say), "device" names
    each with its epochs, e.g. "cuda:0 (epochs 1-8), cpu (epochs 9-50)"; the other facts are this process's."""
    info = describe(device)
    spans: list[tuple[str, int, int]] = []
    for row in curve:
        where = row["device"]
        if spans and spans[-1][0] == where:
            spans[-1] = (where, spans[-1][1], row["epoch"])
        else:
            spans.append((where, row["epoch"], row["epoch"]))
    if len(spans) > 1:
        info["device"] = ", ".join(f"{d} (epoch {a})" if a == b else f"{d} (epochs {a}-{b})" for d, a, b in spans)
    return info


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Temporarily put a model in eval mode, restoring its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
