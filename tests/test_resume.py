"""A training killed mid-way resumes from its last epoch and ends exactly where an uninterrupted one does."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carso.device import describe_training
from carso.io import load_checkpoint, load_tensors, read_json, save_checkpoint
from conftest import HANG_GUARD_S, load_tiny, run_cli, write_params

EPOCHS = 5


def _project(root: Path) -> Path:
    params = load_tiny()
    params["classifier"]["epochs"] = EPOCHS
    root.mkdir(parents=True, exist_ok=True)
    write_params(root / "params.yaml", params)
    result = run_cli(["fetch", "--dataset", "fashion_mnist", "--out", "dataset"], cwd=root)
    assert result.returncode == 0, result.stderr
    return root


TRAIN = ["train-classifier", "--dataset", "fashion_mnist", "--data", "dataset", "--out", "clf", "--threads", "2"]


KILLER = Path(__file__).with_name("kill_after_first_epoch.py")


def killed_after_first_epoch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The stage `python -m carso ARGS`, SIGKILLed right after it checkpointed its first epoch."""
    return subprocess.run([sys.executable, str(KILLER), *args], cwd=cwd, capture_output=True, text=True, timeout=HANG_GUARD_S)


def test_killed_training_resumes_and_matches_uninterrupted(tmp_path: Path) -> None:
    whole = _project(tmp_path / "whole")
    assert run_cli(TRAIN, cwd=whole).returncode == 0
    broken = _project(tmp_path / "broken")
    assert killed_after_first_epoch(TRAIN, broken).returncode == -signal.SIGKILL
    assert load_checkpoint(broken / "clf" / "checkpoint.pt")["epoch"] == 1
    assert not (broken / "clf" / "model.safetensors").exists()
    resumed = run_cli(TRAIN, cwd=broken)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from clf/checkpoint.pt after epoch 1" in resumed.stderr
    a, _ = load_tensors(whole / "clf" / "model.safetensors")
    b, _ = load_tensors(broken / "clf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(broken / "clf" / "checkpoint.pt")["epoch"] == EPOCHS
    assert (broken / "clf" / "curve.csv").read_text().count("\n") == EPOCHS + 1


def test_resumed_training_names_every_device_it_ran_on(tmp_path: Path) -> None:
    """Epoch 1 made on a GPU (its checkpoint row says so) and resumed here: the metrics, and so the report's
    training line, name both devices with their epochs, not only the one that finished."""
    root = _project(tmp_path)
    assert killed_after_first_epoch(TRAIN, root).returncode == -signal.SIGKILL
    path = root / "clf" / "checkpoint.pt"
    state = load_checkpoint(path)
    assert [row["device"] for row in state["curve"]] == ["cpu"]
    state["curve"][0]["device"] = "cuda:0"
    save_checkpoint(path, state)
    resumed = run_cli(TRAIN, cwd=root)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from clf/checkpoint.pt after epoch 1" in resumed.stderr
    assert read_json(root / "clf" / "train_metrics.json")["device"] == f"cuda:0 (epoch 1), cpu (epochs 2-{EPOCHS})"


def test_describe_training_names_devices_only_when_they_changed() -> None:
    cpu = torch.device("cpu")
    rows = lambda *where: [{"epoch": i + 1, "device": d} for i, d in enumerate(where)]  # noqa: E731
    assert describe_training(cpu, rows("cpu", "cpu"))["device"] == "cpu"
    assert describe_training(cpu, [])["device"] == "cpu"
    assert describe_training(cpu, rows("cuda:0", "cuda:0", "cpu", "cuda:1"))["device"] == \
        "cuda:0 (epochs 1-2), cpu (epoch 3), cuda:1 (epoch 4)"


def test_checkpoint_from_other_settings_is_not_resumed(tmp_path: Path) -> None:
    root = _project(tmp_path)
    params = load_tiny()
    params["classifier"]["epochs"] = 1
    write_params(root / "params.yaml", params)
    assert run_cli(TRAIN, cwd=root).returncode == 0
    params["classifier"]["lr"] = 0.01
    write_params(root / "params.yaml", params)
    result = run_cli(TRAIN, cwd=root)
    assert result.returncode == 0 and "made with other settings" in result.stderr


ATOP = {"pretrain": ["pretrain-inpainter", "--out", "atop/pretrain"],
        "finetune": ["finetune-inpainter", "--pretrained", "atop/pretrain", "--out", "atop/finetune"]}


def _atop(stage: str) -> list[str]:
    command, *rest = ATOP[stage]
    return [command, "--dataset", "fashion_mnist", "--model", "clf/model.safetensors", "--data", "dataset",
            "--adversarial", "adv", "--threads", "2", *rest]


@pytest.fixture(scope="module")
def atop_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fetch, train-classifier and generate-adversarial on the tiny configuration: what the AToP stages read."""
    root = tmp_path_factory.mktemp("atop")
    write_params(root / "params.yaml", load_tiny())
    for args in (["fetch", "--dataset", "fashion_mnist", "--out", "dataset"],
                 TRAIN,
                 ["generate-adversarial", "--dataset", "fashion_mnist", "--model", "clf/model.safetensors",
                  "--data", "dataset", "--out", "adv", "--threads", "2"]):
        result = run_cli(args, cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_killed_atop_training_resumes_to_the_same_weights(atop_project: Path, tmp_path: Path, stage: str) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    for root in (whole, broken):
        shutil.copytree(atop_project, root)
        if stage == "finetune":
            assert run_cli(_atop("pretrain"), cwd=root).returncode == 0
    assert run_cli(_atop(stage), cwd=whole).returncode == 0
    assert killed_after_first_epoch(_atop(stage), broken).returncode == -signal.SIGKILL
    out = f"atop/{stage}"
    assert load_checkpoint(broken / out / "checkpoint.pt")["epoch"] == 1
    assert not (broken / out / "inpainter.safetensors").exists()
    resumed = run_cli(_atop(stage), cwd=broken)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out}/checkpoint.pt after epoch 1" in resumed.stderr
    names = ["inpainter.safetensors"] + (["discriminator.safetensors"] if stage == "pretrain" else [])
    for name in names:
        a, _ = load_tensors(whole / out / name)
        b, _ = load_tensors(broken / out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


PURIFY = ["train-purifier", "--dataset", "fashion_mnist", "--model", "clf/model.safetensors", "--adversarial", "adv",
          "--out", "purifier", "--threads", "2"]


def test_killed_purifier_training_resumes_to_the_same_weights(atop_project: Path, tmp_path: Path) -> None:
    """CARSO's purifier (RAdam inside Lookahead, whose slow weights are part of the state) killed after its first
    epoch and rerun ends bit-identical to an uninterrupted run."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    for root in (whole, broken):
        shutil.copytree(atop_project, root)
    assert run_cli(PURIFY, cwd=whole).returncode == 0
    assert killed_after_first_epoch(PURIFY, broken).returncode == -signal.SIGKILL
    assert load_checkpoint(broken / "purifier" / "checkpoint.pt")["epoch"] == 1
    assert not (broken / "purifier" / "model.safetensors").exists()
    resumed = run_cli(PURIFY, cwd=broken)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from purifier/checkpoint.pt after epoch 1" in resumed.stderr
    a, _ = load_tensors(whole / "purifier" / "model.safetensors")
    b, _ = load_tensors(broken / "purifier" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
