"""Both training stages run data-parallel under torchrun (gloo, 2 CPU processes), and as one process."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carso.attacks import accuracy
from carso.checkpoint import load_classifier
from carso.distributed import Team, require_single
from carso.errors import UserError
from carso.data import load_split
from carso.io import load_checkpoint, sha256_file
from carso.methods.carso.purifier import load_purifier
from conftest import HANG_GUARD_S, load_tiny, run_cli, write_params

D = "data/fashion_mnist"
EPOCHS = 4


def torchrun(args: list[str], cwd: Path, nproc: int = 2, script: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m carso ARGS`, as the Snakemake rules launch it (or `script`
    in place of `-m carso`)."""
    target = [str(script)] if script else ["-m", "carso"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *target, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=HANG_GUARD_S)


def rows(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fetch -> train-classifier (2 processes) -> generate-adversarial -> train-purifier (2 processes)."""
    root = tmp_path_factory.mktemp("ddp")
    params = load_tiny()
    params["classifier"]["epochs"] = params["purifier"]["epochs"] = EPOCHS
    # 400 = 3 x 133 + 1 training images, 60 = 59 + 1 purifier points: each epoch ends with a batch of one point,
    # which two processes cannot share (Team.covers): skipped, it must neither crash BatchNorm nor give NaN
    params["classifier"]["batch_size"], params["purifier"]["batch_size"] = 133, 59
    write_params(root / "params.yaml", params)
    common = ["--dataset", "fashion_mnist", "--threads", "2"]
    for args, parallel in [
        (["fetch", "--out", f"{D}/dataset"], False),
        (["train-classifier", "--data", f"{D}/dataset", "--out", f"{D}/classifier"], True),
        (["generate-adversarial", "--model", f"{D}/classifier/model.safetensors", "--data", f"{D}/dataset",
          "--out", f"{D}/adversarial"], False),
        (["train-purifier", "--model", f"{D}/classifier/model.safetensors", "--adversarial", f"{D}/adversarial",
          "--out", f"{D}/purifier"], True),
    ]:
        argv = [args[0], *common, "--log-file", f"logs/{args[0]}.log", *args[1:]]  # as the rules pass it
        result = torchrun(argv, root) if parallel else run_cli(argv, root)
        assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage,loss", [("classifier", "train_loss"), ("purifier", "bce")])
def test_two_processes_train_and_the_loss_falls(trained: Path, stage: str, loss: str) -> None:
    metrics = json.loads((trained / D / stage / "train_metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["backend"] == "gloo" and metrics["device"] == "cpu"
    assert metrics["threads"] == 1  # the rule's 2 threads are split between the 2 processes
    assert metrics["epochs"] == EPOCHS and "precision" in metrics
    curve = rows(trained / D / stage / "curve.csv")
    assert [r["epoch"] for r in curve] == list(range(1, EPOCHS + 1))
    assert curve[-1][loss] < curve[0][loss]
    log = (trained / "logs" / f"train-{stage}.log").read_text()
    assert [int(n) for n in re.findall(r"epoch (\d+): loss", log)] == list(range(1, EPOCHS + 1))  # rank 0 alone


@pytest.mark.slow
def test_the_checkpoints_load_and_resume_in_one_process(trained: Path) -> None:
    classifier_path = trained / D / "classifier" / "model.safetensors"
    model = load_classifier(classifier_path, "fashion_mnist").eval()
    x, y = load_split(trained / D / "dataset", "test")
    assert accuracy(model, x, y, torch.device("cpu"), 100) > 0.3  # chance is 0.1
    purifier, extractor = load_purifier(trained / D / "purifier" / "model.safetensors", model, "fashion_mnist",
                                        sha256_file(classifier_path))
    with torch.no_grad():
        z = torch.randn(len(x), purifier.cfg.latent_dim)
        recon = purifier.decode(z, purifier.condition(extractor(x)))
    assert recon.shape == x.shape and recon.isfinite().all()
    # A single-process rerun finds the 2-process run's epoch checkpoint complete and resumes from it.
    before = sha256_file(trained / D / "classifier" / "model.safetensors")
    result = run_cli(["train-classifier", "--dataset", "fashion_mnist", "--threads", "2", "--data", f"{D}/dataset",
                      "--out", f"{D}/classifier"], trained)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"after epoch {EPOCHS}" in result.stderr
    assert sha256_file(trained / D / "classifier" / "model.safetensors") == before
    metrics = json.loads((trained / D / "classifier" / "train_metrics.json").read_text())
    assert metrics["processes"] == 1 and metrics["backend"] == "none"


def test_shards_split_every_global_batch_exactly() -> None:
    batch = torch.arange(11)
    shards = [Team(rank=r, size=3).shard(batch) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == batch.tolist()
    assert [len(s) for s in shards] == [4, 4, 3]
    assert torch.equal(Team().shard(batch), batch)  # one process: the whole batch
    assert Team(rank=0, size=3).covers(6) and not Team(rank=0, size=3).covers(5)  # two points or more per process
    assert Team().covers(2) and not Team().covers(1)


def test_other_stages_refuse_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="single process"):
        require_single()
    monkeypatch.setenv("WORLD_SIZE", "1")
    require_single()


@pytest.mark.slow
def test_a_killed_two_process_training_resumes_to_the_same_weights(trained: Path, tmp_path: Path) -> None:
    """The 2-process classifier training SIGKILLed after its first epoch's checkpoint (rank 0 writes it and dies;
    torchrun stops rank 1), rerun under torchrun: bit-identical to the uninterrupted 2-process run."""
    root = tmp_path / "killed"
    shutil.copytree(trained / D / "dataset", root / D / "dataset")
    shutil.copy(trained / "params.yaml", root / "params.yaml")
    args = ["train-classifier", "--dataset", "fashion_mnist", "--threads", "2", "--data", f"{D}/dataset",
            "--out", f"{D}/classifier"]
    killed = torchrun(args, root, script=Path(__file__).with_name("kill_after_first_epoch.py"))
    assert killed.returncode != 0 and load_checkpoint(root / D / "classifier" / "checkpoint.pt")["epoch"] == 1
    assert not (root / D / "classifier" / "model.safetensors").exists()
    resumed = torchrun(args, root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 1" in resumed.stderr
    assert sha256_file(root / D / "classifier" / "model.safetensors") == sha256_file(
        trained / D / "classifier" / "model.safetensors")
