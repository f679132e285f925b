"""Per-epoch checkpoints that a rerun resumes from, but only when they match the current run."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from carso.io import fingerprint, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def code_digest(modules: Sequence[str]) -> str:
    """A hash of the library modules that shape a training run: a checkpoint from other code is never resumed."""
    here = Path(__file__).resolve().parent
    return fingerprint([(here / f"{m}.py").read_text() for m in modules])


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Seed the global RNG for `epoch` and return a generator for its shuffling and augmentation.

    Every epoch draws from its own seed, so a run resumed after epoch k continues exactly as an
    uninterrupted one would. The returned generator is the same in every process of a data-parallel
    team (one shuffled order for all); the global RNG (attack starts, latent samples) differs per rank,
    and rank 0 draws what a single process draws.
    """
    epoch_seed = seed * 100_003 + epoch
    torch.manual_seed(epoch_seed + 7_919 * rank)
    return torch.Generator().manual_seed(epoch_seed)


class EpochCheckpoint:
    """`path` holds the state after the last finished epoch, tagged with `key` (a fingerprint of the
    settings, data and code). A state with another key is ignored, so a changed run starts afresh.

    The state is that of named parts (models, optimizers, schedulers: anything with `state_dict` and
    `load_state_dict`), e.g. {"model": ..., "optimizer": ..., "scheduler": ...}."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = Path(path), key

    def restore(self, parts: dict[str, Any]) -> list[dict[str, Any]]:
        """Load a matching state into `parts`; return its per-epoch curve (empty when there is nothing to
        resume, so training starts at epoch len(curve) + 1)."""
        if not self.path.exists():
            return []
        state = load_checkpoint(self.path)
        if state.get("fingerprint") != self.key:
            log.info("ignoring %s: it was made with other settings, data or code; training from scratch",
                     self.path)
            return []
        log.info("resuming from %s after epoch %d", self.path, state["epoch"])
        for name, part in parts.items():
            part.load_state_dict(state[name])
        return state["curve"]

    def save(self, parts: dict[str, Any], curve: list[dict[str, Any]]) -> None:
        """Record the state of `parts` after epoch len(curve)."""
        save_checkpoint(self.path, {"fingerprint": self.key, "epoch": len(curve), "curve": curve,
                                    **{name: part.state_dict() for name, part in parts.items()}})
