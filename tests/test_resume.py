"""A training killed mid-way resumes from its last epoch and ends exactly where an uninterrupted one does."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from carso.io import load_checkpoint, load_tensors
from conftest import load_tiny, run_cli, write_params

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


def _kill_after_first_checkpoint(root: Path) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "carso", *TRAIN], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = root / "clf" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return load_checkpoint(ckpt)["epoch"]


def test_killed_training_resumes_and_matches_uninterrupted(tmp_path: Path) -> None:
    whole = _project(tmp_path / "whole")
    assert run_cli(TRAIN, cwd=whole).returncode == 0
    broken = _project(tmp_path / "broken")
    killed_at = _kill_after_first_checkpoint(broken)
    assert 1 <= killed_at < EPOCHS
    assert not (broken / "clf" / "model.safetensors").exists()
    resumed = run_cli(TRAIN, cwd=broken)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from clf/checkpoint.pt after epoch {killed_at}" in resumed.stderr
    a, _ = load_tensors(whole / "clf" / "model.safetensors")
    b, _ = load_tensors(broken / "clf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(broken / "clf" / "checkpoint.pt")["epoch"] == EPOCHS
    assert (broken / "clf" / "curve.csv").read_text().count("\n") == EPOCHS + 1


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


# A deterministic kill point: SIGKILL the stage right after it checkpointed its first epoch.
KILL_AFTER_FIRST_EPOCH = """
import os, signal, sys
import carso.resume as resume
save = resume.EpochCheckpoint.save
def save_then_die(self, parts, curve):
    save(self, parts, curve)
    if len(curve) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
resume.EpochCheckpoint.save = save_then_die
from carso.cli import main
sys.exit(main(sys.argv[1:]))
"""
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
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_EPOCH, *_atop(stage)], cwd=broken,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
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
