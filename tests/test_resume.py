"""A training killed mid-way resumes from its last epoch and ends exactly where an uninterrupted one does."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

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
