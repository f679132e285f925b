"""Dataset fetch: torchvision download or a local mirror -> uint8 tensors + manifest."""
from __future__ import annotations

import gzip
import importlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carso.datasets import DATASETS, DatasetSpec, dataset_spec  # noqa: F401 (re-exported)
from carso.errors import UserError
from carso.io import load_tensors, save_tensors, sha256_tensor, write_json

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _to_uint8_nchw(data: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(data), dtype=torch.uint8)
    return t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)  # (N, H, W) or (N, H, W, C)


def _from_torchvision(spec: DatasetSpec, root: Path, download: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    dataset_class = getattr(importlib.import_module("torchvision.datasets"), spec.torchvision_class)
    splits = {}
    for split, train in (("train", True), ("test", False)):
        ds = dataset_class(str(root), train=train, download=download)
        images = _to_uint8_nchw(ds.data)
        splits[split] = (images.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))
    return splits


def _stage_idx_files(spec: DatasetSpec, mirror: Path, workdir: Path) -> Path:
    """Lay a folder of IDX files (.gz or not) out the way torchvision's MNIST classes read them."""
    raw = workdir / spec.torchvision_class / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        plain, packed = mirror / name, mirror / f"{name}.gz"
        if plain.exists():
            shutil.copyfile(plain, raw / name)
        elif packed.exists():
            with gzip.open(packed, "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            raise FileNotFoundError(name)
    return workdir


def read_mirror(spec: DatasetSpec, mirror: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read a dataset from a local folder, or say exactly what is missing and how to get it."""
    missing = (f"{spec.name} was not found in {mirror} (data.mirror.{spec.name} in params.yaml): "
               f"{spec.install_hint}, point data.mirror.{spec.name} at the folder that holds it, "
               "or set data.source to 'download' on a machine with internet.")
    if not mirror.is_dir():
        raise UserError(missing)
    try:
        if spec.channels == 1:
            with tempfile.TemporaryDirectory() as tmp:
                return _from_torchvision(spec, _stage_idx_files(spec, mirror, Path(tmp)), download=False)
        return _from_torchvision(spec, mirror, download=False)
    except (FileNotFoundError, RuntimeError):
        raise UserError(missing) from None


def select_subset(labels: torch.Tensor, per_class: int | None, mode: str, seed: int) -> torch.Tensor:
    """Indices of the first (or a seeded random) `per_class` examples of every class, in dataset order."""
    if per_class is None:
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for k in labels.unique().tolist():
        idx = (labels == k).nonzero().squeeze(1)
        if mode == "random":
            idx = idx[torch.randperm(len(idx), generator=gen)]
        chosen.append(idx[:per_class])
    return torch.cat(chosen).sort().values


def fetch_dataset(name: str, data_params: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Fetch `name`, apply the subset option, write train/test tensors and the manifest."""
    spec = dataset_spec(name)
    if data_params["source"] == "download":
        try:
            splits = _from_torchvision(spec, Path(data_params["download_root"]), download=True)
        except (OSError, RuntimeError) as err:
            raise UserError(f"downloading {name} failed ({err}); on a machine without internet set "
                            f"data.source to 'mirror' and data.mirror.{name} to a local folder.") from None
    else:
        folder = data_params["mirror"].get(name)
        if not folder:
            raise UserError(f"data.mirror.{name} is not set in params.yaml: {spec.install_hint} and set "
                            f"data.mirror.{name} to that folder, or set data.source to 'download'.")
        splits = read_mirror(spec, Path(folder))
    sub = data_params["subset"]
    manifest: dict[str, Any] = {"dataset": name, "source": data_params["source"], "splits": {}}
    for split, (images, labels) in splits.items():
        keep = select_subset(labels, sub[f"{split}_per_class"], sub["mode"], sub["seed"])
        images, labels = images[keep].contiguous(), labels[keep].contiguous()
        save_tensors(out_dir / f"{split}.safetensors", {"images": images, "labels": labels},
                     {"dataset": name, "split": split})
        manifest["splits"][split] = {
            "count": len(labels), "shape": list(images.shape[1:]), "dtype": "uint8",
            "class_counts": torch.bincount(labels, minlength=spec.num_classes).tolist(),
            "sha256_images": sha256_tensor(images), "sha256_labels": sha256_tensor(labels)}
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def load_split(data_dir: Path, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 in [0, 1] (N, C, H, W) and int64 labels, optionally the first `limit`."""
    tensors, _ = load_tensors(Path(data_dir) / f"{split}.safetensors")
    images, labels = tensors["images"], tensors["labels"]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.float().div_(255.0), labels


def load_adversarial(path: Path, names: list[str], limit: int | None = None) -> dict[str, torch.Tensor]:
    """Clean images, labels and the named attacks from a generate_adversarial file (first `limit` rows)."""
    tensors, _ = load_tensors(path)
    missing = [n for n in names if n not in tensors]
    if missing:
        stored = ", ".join(k for k in tensors if k not in ("clean", "labels"))
        raise UserError(f"{path} holds no '{missing[0]}' examples (it has: {stored}); rerun the "
                        "generate_adversarial stage with that attack in adversarial.attacks.")
    return {k: tensors[k][:limit].float() if k != "labels" else tensors[k][:limit]
            for k in ["clean", "labels", *names]}
