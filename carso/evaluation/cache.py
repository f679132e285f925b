"""Resumable attacks: every finished batch of an attack is kept on disk, keyed by the attack's settings, the model's
weights and the seed, so a killed evaluation resumes where it stopped and equals an uninterrupted one."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from carso.attacks import AttackSpec, pgd_tracked
from carso.io import fingerprint, load_tensors, save_tensors, sha256_tensor

log = logging.getLogger(__name__)


def model_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer, so resumable state never outlives the model it belongs to."""
    return fingerprint([sha256_tensor(t.detach().float()) for t in model.state_dict().values()])


class AttackCache:
    """Runs attacks batch by batch and keeps every finished batch on disk, so a killed evaluation resumes
    where it stopped. Each batch draws from its own seed, so a resumed run equals an uninterrupted one."""

    def __init__(self, folder: Path, model_key: str, seed: int) -> None:
        self.folder, self.model_key, self.seed = folder, model_key, seed

    def batches(self, name: str, settings: dict[str, Any], n: int, batch_size: int, desc: str,
                compute: Callable[[int, slice, Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """`compute(i, points, folder)` for every batch `i` of `n` points, each batch's tensors saved once it is
        done and loaded instead of recomputed on a rerun; returns them concatenated over the batches.
        `settings` (with the model and the seed) name the run: other settings never reuse a stored batch."""
        key = fingerprint({**settings, "model": self.model_key, "seed": self.seed})
        folder = self.folder / f"{name}_{key[:16]}"
        parts = []
        starts = range(0, n, batch_size)
        for i, start in enumerate(tqdm(starts, desc=desc, unit="batch", mininterval=10)):
            path = folder / f"batch_{i:05d}.safetensors"
            if path.exists():
                parts.append(load_tensors(path)[0])
                continue
            torch.manual_seed(int(key[:12], 16) + i)
            part = {k: v.cpu() for k, v in compute(i, slice(start, start + batch_size), folder).items()}
            save_tensors(path, part, {"attack": name})
            parts.append(part)
            log.info("%s: batch %d/%d done", name, i + 1, len(starts))
        return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}

    def run(self, name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
            device: torch.device, batch_size: int, x_start: torch.Tensor | None = None,
            tag: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`pgd_tracked` (PGD, FGSM, with EoT; each point's best iterate) on `x`, batch by batch; returns the
        adversarial points and the run's trajectory (for the indicators). `tag`: more settings that name the run (a
        surrogate's, whose weights equal the defence's)."""
        settings = {"spec": asdict(spec), "x": sha256_tensor(x), "y": sha256_tensor(y),
                    "start": None if x_start is None else sha256_tensor(x_start), "tag": tag, "best_iterate": True}

        def one_batch(i: int, sl: slice, folder: Path) -> dict[str, torch.Tensor]:
            x_adv, trace = pgd_tracked(model, x[sl].to(device), y[sl].to(device), spec,
                                       x_start=None if x_start is None else x_start[sl].to(device))
            return {"x_adv": x_adv, **trace}

        desc = f"{name} ({spec.steps} steps x {spec.eot} EoT, eps {spec.eps:.4g})"
        found = self.batches(name, settings, len(x), batch_size, desc, one_batch)
        return found.pop("x_adv"), found
