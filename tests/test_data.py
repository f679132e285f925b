"""Dataset fetch from the local mirror: tensors, manifest, subsets and the missing-data error."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from carso.data import fetch_dataset, load_split, select_subset
from carso.errors import UserError
from carso.io import load_tensors, sha256_tensor


def test_fetched_subset_is_uint8_balanced_and_described(fm_subset: Path) -> None:
    tensors, _ = load_tensors(fm_subset / "train.safetensors")
    images, labels = tensors["images"], tensors["labels"]
    assert images.dtype == torch.uint8 and images.shape == (400, 1, 28, 28)
    assert torch.bincount(labels).tolist() == [40] * 10
    manifest = json.loads((fm_subset / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 400
    assert manifest["splits"]["test"]["shape"] == [1, 28, 28]
    assert manifest["splits"]["train"]["sha256_images"] == sha256_tensor(images)


def test_load_split_gives_floats_in_unit_range(fm_subset: Path) -> None:
    x, y = load_split(fm_subset, "test", limit=7)
    assert x.dtype == torch.float32 and x.shape == (7, 1, 28, 28)
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0 and y.dtype == torch.int64


def test_subset_first_and_random() -> None:
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    assert select_subset(labels, 2, "first", 0).tolist() == [0, 1, 2, 3]
    random_a = select_subset(labels, 2, "random", 1)
    assert random_a.tolist() == select_subset(labels, 2, "random", 1).tolist()
    assert torch.bincount(labels[random_a]).tolist() == [2, 2]
    assert select_subset(labels, None, "first", 0).tolist() == list(range(8))


def test_missing_mirror_says_what_to_install(tmp_path: Path, tiny_params: dict[str, Any]) -> None:
    tiny_params["data"]["mirror"]["fashion_mnist"] = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        fetch_dataset("fashion_mnist", tiny_params["data"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_incomplete_mirror_is_reported(tmp_path: Path, tiny_params: dict[str, Any]) -> None:
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    tiny_params["data"]["mirror"]["fashion_mnist"] = str(tmp_path / "mirror")
    with pytest.raises(UserError, match="was not found in"):
        fetch_dataset("fashion_mnist", tiny_params["data"], tmp_path / "out")
