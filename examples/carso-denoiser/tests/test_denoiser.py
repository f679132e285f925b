"""The example plugin's own tests: its declaration passes carso's registry checks, its defences are one module from
[0, 1] images to logits with gradients end to end, its loader refuses a wrong file in one sentence, and its stage
trains and resumes. Run with the plugin installed: `python -m pytest examples/carso-denoiser/tests`."""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from carso.defences import use_plugins
from carso.plugin import UserError, save_tensors
from carso_denoiser import FILE_METHOD, METHOD
from carso_denoiser.defence import load_file
from carso_denoiser.model import Denoised, Denoiser
from carso_denoiser.training import stage


@pytest.fixture(autouse=True)
def registered():
    use_plugins(["denoiser", "denoiser_file"])  # as a params file naming them does
    yield
    use_plugins([])


def test_declarations() -> None:
    assert METHOD.api == FILE_METHOD.api == 1
    assert FILE_METHOD.stages == ()  # loader-only
    assert METHOD.stages[0].writes[0] == METHOD.defences[0].artifacts[0]


def test_the_defence_is_differentiable_end_to_end() -> None:
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    model = Denoised(Denoiser(1, 4), classifier)
    x = torch.rand(3, 1, 28, 28, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_wrong_weights_file_is_one_sentence(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    params = {"denoiser_file": {"weights": str(tmp_path / "bad.safetensors"), "width": 4}}
    with pytest.raises(UserError, match="does not hold a denoiser of width 4"):
        load_file(tmp_path / "classifier.safetensors", [], "fashion_mnist", params)
    params["denoiser_file"]["weights"] = str(tmp_path / "weights.pt")
    with pytest.raises(UserError, match="never unpickled"):
        load_file(tmp_path / "classifier.safetensors", [], "fashion_mnist", params)


def _adversarial(folder: Path) -> None:
    torch.manual_seed(0)
    clean = torch.rand(32, 1, 28, 28)
    save_tensors(folder / "train.safetensors", {"clean": clean, "labels": torch.zeros(32, dtype=torch.long),
                                                "pgd": (clean + 0.1 * torch.randn_like(clean)).clamp(0, 1)})


def test_the_stage_trains_and_resumes(tmp_path: Path) -> None:
    _adversarial(tmp_path)
    params = {"denoiser": {"width": 4, "epochs": 2, "batch_size": 16, "lr": 1e-2, "train_points": None},
              "adversarial": {"attacks": {"pgd": {}}}, "runtime": {"seed": 0}}
    args = Namespace(adversarial=str(tmp_path), out=str(tmp_path / "out"))
    stage(args, params, torch.device("cpu"), None)
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    curve = (tmp_path / "out" / "curve.csv").read_text().splitlines()
    assert curve[0] == "epoch,mse" and len(curve) == 3
    stage(args, params, torch.device("cpu"), None)  # every epoch done: resumes, trains nothing, writes the same
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
