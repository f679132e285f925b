"""Atomic writes and safe loading of every artifact the pipeline produces."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from carso.errors import UserError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; run the stage that produces it first "
                        "(snakemake or dvc repro builds it).") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, Any] | None = None) -> None:
    """Save tensors as safetensors; `metadata` (JSON-serialisable) goes into the file header."""
    meta = {"carso": json.dumps(metadata or {})}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file written by `save_tensors`: (tensors, metadata)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; run the stage that produces it first "
                        "(snakemake or dvc repro builds it).")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("carso", "{}"))
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is corrupted or not a safetensors file ({err}); delete it and "
                        "rerun the stage that produces it.") from None


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save a resumable training state (tensors and plain Python values only) atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training state with `weights_only=True`: no arbitrary object is ever unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint {path} cannot be loaded safely ({type(err).__name__}); "
                        "delete it to start this stage from scratch.") from None


def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def fingerprint(obj: Any) -> str:
    """A stable hash of JSON-serialisable settings, to tell whether a checkpoint matches them."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (ties an artifact to the exact model it was made for)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
