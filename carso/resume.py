"""Per-epoch checkpoints that a rerun resumes from, but only when they match the current run."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from carso.io import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class EpochCheckpoint:
    """`path` holds the state after the last finished epoch, tagged with `key` (a fingerprint of the
    settings, data and code). A state with another key is ignored, so a changed run starts afresh."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = Path(path), key

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state = load_checkpoint(self.path)
        if state.get("fingerprint") != self.key:
            log.info("ignoring %s: it was made with other settings, data or code; training from scratch",
                     self.path)
            return None
        log.info("resuming from %s after epoch %d", self.path, state["epoch"])
        return state

    def save(self, epoch: int, **state: Any) -> None:
        save_checkpoint(self.path, {"fingerprint": self.key, "epoch": epoch, **state})
