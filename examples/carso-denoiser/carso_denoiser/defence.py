"""The two defences' loaders, called by carso's evaluate stage as f(classifier_path, artifacts, dataset, params)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from carso.plugin import UserError, load_classifier, load_weights
from carso_denoiser.model import Denoised, Denoiser


def _denoised(classifier_path: Path, dataset: str, weights: Path, width: int, key: str) -> nn.Module:
    state = load_weights(weights)
    channels = state["net.0.weight"].shape[1] if "net.0.weight" in state else None
    denoiser = Denoiser(channels or 1, width)
    try:
        denoiser.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{weights} does not hold a denoiser of width {width} ({str(err).splitlines()[0]}); "
                        f"check {key}") from None
    return Denoised(denoiser.eval(), load_classifier(classifier_path, dataset)).eval()


def load(classifier_path: Path, artifacts: list[Path], dataset: str, params: dict[str, Any]) -> nn.Module:
    """Defence `denoiser`: the classifier behind what train_denoiser wrote."""
    return _denoised(classifier_path, dataset, artifacts[0], params["denoiser"]["width"], "denoiser.width")


def load_file(classifier_path: Path, artifacts: list[Path], dataset: str, params: dict[str, Any]) -> nn.Module:
    """Defence `denoiser_file`: the classifier behind your own weights file (denoiser_file.weights)."""
    cfg = params["denoiser_file"]
    return _denoised(classifier_path, dataset, Path(cfg["weights"]), cfg["width"], "denoiser_file.width")
