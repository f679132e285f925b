"""The one place that decides the device, the precision and the thread count."""
from __future__ import annotations

import contextlib
import ctypes
import os
import random
from typing import Iterator

import numpy as np
import torch

from carso.errors import UserError


def select_device(requested: str = "auto") -> torch.device:
    """Return CUDA when present (or asked for), the CPU otherwise."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("runtime.device is 'cuda' in params.yaml but no CUDA GPU is visible; "
                        "set it to 'auto' or 'cpu'.")
    return torch.device(requested)


def configure_threads(threads: int | None) -> None:
    """Use exactly `threads` CPU threads (Snakemake passes its `threads:`), or all cores."""
    n = threads or os.cpu_count() or 1
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


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for training when asked for; a no-op (fp32) otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def describe(device: torch.device) -> dict[str, str | int]:
    """What ran where, for each stage's metrics."""
    info: dict[str, str | int] = {"device": str(device), "torch": torch.__version__,
                                  "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
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
