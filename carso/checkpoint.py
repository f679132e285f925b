"""Saving and loading trained models as safetensors, with the metadata needed to rebuild them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from carso.data import dataset_spec
from carso.errors import UserError
from carso.io import load_tensors, save_tensors
from carso.models import build_classifier


def save_classifier(path: Path, model: nn.Module, dataset: str, arch: str, arch_kwargs: dict[str, Any]) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_tensors(path, state, {"kind": "classifier", "dataset": dataset, "arch": arch, "arch_kwargs": arch_kwargs})


def load_classifier(path: Path, dataset: str) -> nn.Module:
    """Rebuild a classifier from its safetensors file; refuse one trained for another dataset or shape."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "classifier":
        raise UserError(f"{path} is not a classifier checkpoint written by this pipeline; rerun the "
                        "train_classifier stage.")
    if meta.get("dataset") != dataset:
        raise UserError(f"{path} was trained on {meta.get('dataset')}, not {dataset}; rerun the "
                        "train_classifier stage for this dataset.")
    spec = dataset_spec(dataset)
    model = build_classifier(meta["arch"], in_channels=spec.channels, num_classes=spec.num_classes,
                             image_size=spec.side, mean=spec.mean, std=spec.std, **meta["arch_kwargs"])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise UserError(f"{path} does not match classifier '{meta['arch']}' ({first}); rerun the "
                        "train_classifier stage.") from None
    return model.eval()


def load_classifier_defence(classifier_path: Path, artifacts: list[Path], dataset: str,
                            params: dict[str, Any]) -> nn.Module:
    """The `at` defence of the registry (carso.defences): the adversarially-trained classifier alone."""
    return load_classifier(classifier_path, dataset)
