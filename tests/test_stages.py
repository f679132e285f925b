"""Each stage runs from its CLI on a small real subset, in the order the DAG runs them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from carso.io import load_tensors
from conftest import load_tiny, run_cli, write_params


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fetch -> train-classifier -> generate-adversarial -> evaluate -> report, by hand."""
    root = tmp_path_factory.mktemp("chain")
    write_params(root / "params.yaml", load_tiny())
    d = "data/fashion_mnist"
    steps = [["fetch", "--out", f"{d}/dataset"],
             ["train-classifier", "--data", f"{d}/dataset", "--out", f"{d}/classifier"],
             ["generate-adversarial", "--model", f"{d}/classifier/model.safetensors", "--data", f"{d}/dataset",
              "--out", f"{d}/adversarial"],
             ["evaluate", "--defence", "at", "--model", f"{d}/classifier/model.safetensors",
              "--data", f"{d}/dataset", "--out", f"{d}/eval/at"],
             ["report", "--root", d, "--out", f"{d}/report"]]
    for args in steps:
        result = run_cli([args[0], "--dataset", "fashion_mnist", "--threads", "2", *args[1:]], cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
    return root / d


def test_fetch_writes_tensors_and_manifest(chain: Path) -> None:
    manifest = json.loads((chain / "dataset" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 400 and manifest["splits"]["test"]["count"] == 100


def test_training_writes_model_curve_and_metrics(chain: Path) -> None:
    tiny: dict[str, Any] = load_tiny()
    curve = (chain / "classifier" / "curve.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,") and len(curve) == 1 + tiny["classifier"]["epochs"]
    metrics = json.loads((chain / "classifier" / "train_metrics.json").read_text())
    assert metrics["epochs"] == tiny["classifier"]["epochs"] and metrics["device"] == "cpu"
    assert metrics["precision"] == "bf16"


def test_adversarial_examples_respect_eps_and_keep_labels(chain: Path) -> None:
    tiny = load_tiny()["adversarial"]
    tensors, meta = load_tensors(chain / "adversarial" / "test.safetensors")
    assert len(tensors["labels"]) == tiny["test_points"]
    for name, spec in tiny["attacks"].items():
        delta = (tensors[name] - tensors["clean"]).abs().max().item()
        assert delta <= spec["eps"] + 1e-6
        assert 0.0 <= tensors[name].min().item() and tensors[name].max().item() <= 1.0
    assert set(meta["attacks"]) == set(tiny["attacks"])
    summary = json.loads((chain / "adversarial" / "summary.json").read_text())
    assert 0.0 <= summary["train"]["pgd_strong"]["success_rate"] <= 1.0
    train, _ = load_tensors(chain / "adversarial" / "train.safetensors")
    assert len(train["labels"]) == load_tiny()["adversarial"]["train_points"]


def test_evaluation_reports_every_attack_with_intervals(chain: Path) -> None:
    m = json.loads((chain / "eval" / "at" / "metrics.json").read_text())
    n = load_tiny()["evaluation"]["n_points"]
    for key in ("pgd", "autoattack", "robust_worst_case", "clean_subset"):
        assert m[key]["n"] == n and m[key]["ci_low"] <= m[key]["accuracy"] <= m[key]["ci_high"]
    assert m["clean"]["n"] == 100 and m["precision"] == "fp32" and m["randomised"] is False
    assert m["robust_worst_case"]["accuracy"] <= min(m["pgd"]["accuracy"], m["autoattack"]["accuracy"])
    assert not list((chain / "eval" / "at").glob("autoattack_state_*"))


def test_report_is_self_contained_and_shows_measured_numbers(chain: Path) -> None:
    html = (chain / "report" / "report.html").read_text()
    m = json.loads((chain / "eval" / "at" / "metrics.json").read_text())
    assert "data:image/png;base64," in html and "<table>" in html
    assert f"{100 * m['clean']['accuracy']:.2f}%" in html
    assert f"(n={m['autoattack']['n']})" in html
    md = (chain / "report" / "report.md").read_text()
    assert "| defence |" in md and (chain / "report" / "training_curves.png").stat().st_size > 1000


def test_report_fails_clearly_without_inputs(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml", load_tiny())
    result = run_cli(["report", "--dataset", "fashion_mnist", "--root", "data/none", "--out", "r"], cwd=tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_evaluation_uses_fp32_even_if_training_used_bf16(chain: Path) -> None:
    tensors, _ = load_tensors(chain / "classifier" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
