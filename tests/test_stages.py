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
    """fetch -> train-classifier -> generate-adversarial -> train-purifier -> evaluate (at, carso) -> report."""
    root = tmp_path_factory.mktemp("chain")
    write_params(root / "params.yaml", load_tiny())
    d = "data/fashion_mnist"
    steps = [["fetch", "--out", f"{d}/dataset"],
             ["train-classifier", "--data", f"{d}/dataset", "--out", f"{d}/classifier"],
             ["generate-adversarial", "--model", f"{d}/classifier/model.safetensors", "--data", f"{d}/dataset",
              "--out", f"{d}/adversarial"],
             ["train-purifier", "--model", f"{d}/classifier/model.safetensors", "--adversarial", f"{d}/adversarial",
              "--out", f"{d}/purifier"],
             ["evaluate", "--defence", "at", "--model", f"{d}/classifier/model.safetensors",
              "--data", f"{d}/dataset", "--adversarial", f"{d}/adversarial", "--out", f"{d}/eval/at"],
             ["evaluate", "--defence", "carso", "--model", f"{d}/classifier/model.safetensors",
              "--purifier", f"{d}/purifier/model.safetensors", "--data", f"{d}/dataset",
              "--adversarial", f"{d}/adversarial", "--out", f"{d}/eval/carso"],
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


@pytest.mark.parametrize("defence", ["at", "carso"])
def test_evaluation_reports_every_attack_with_intervals(chain: Path, defence: str) -> None:
    m = json.loads((chain / "eval" / defence / "metrics.json").read_text())
    cfg = load_tiny()["evaluation"]["defences"][defence]
    for key in ("pgd", "autoattack", "transfer", "robust_worst_case", "clean_subset"):
        assert m[key]["n"] == cfg["n_points"] and m[key]["ci_low"] <= m[key]["accuracy"] <= m[key]["ci_high"]
        assert m[key]["accuracy"] <= m[key]["mean_accuracy"] + 1e-9  # all repeats correct <= the mean verdict
    assert m["clean"]["n"] == 100 and m["precision"] == "fp32"
    assert m["robust_worst_case"]["accuracy"] <= min(m[k]["accuracy"] for k in ("pgd", "autoattack", "transfer"))
    for check in ("base_steps", "more_steps", "large_eps"):
        assert m["sanity"][check]["n"] == cfg["sanity"]["n_points"]
    assert m["sanity"]["more_steps"]["steps"] == cfg["sanity"]["more_steps_factor"] * cfg["pgd"]["steps"]
    assert isinstance(m["gradient_masking"], list)
    assert not (chain / "eval" / defence / "work").exists()  # resumable state is cleared once complete


def test_carso_is_randomised_and_attacked_with_eot(chain: Path) -> None:
    at = json.loads((chain / "eval" / "at" / "metrics.json").read_text())
    carso = json.loads((chain / "eval" / "carso" / "metrics.json").read_text())
    cfg = load_tiny()["evaluation"]["defences"]["carso"]
    assert at["randomised"] is False and at["verdict_repeats"] == 1 and at["autoattack"]["version"] == "standard"
    assert carso["randomised"] is True and carso["verdict_repeats"] == cfg["verdict_repeats"]
    assert carso["autoattack"]["version"] == "rand" and carso["pgd"]["eot"] == cfg["pgd"]["eot"]
    assert carso["pgd"]["step_size"] == pytest.approx(0.007 * 0.1 / (8 / 255))


def test_examples_hold_reconstructions_and_per_point_verdicts(chain: Path) -> None:
    tensors, _ = load_tensors(chain / "eval" / "carso" / "examples.safetensors")
    n_samples = load_tiny()["carso"]["n_samples"]
    assert tensors["recon_clean"].shape[1:] == (n_samples, 1, 28, 28)
    assert tensors["recon_adversarial_pred"].shape == (len(tensors["labels"]), n_samples)
    assert len(tensors["robust_worst_case"]) == load_tiny()["evaluation"]["defences"]["carso"]["n_points"]
    at, _ = load_tensors(chain / "eval" / "at" / "examples.safetensors")
    assert "recon_clean" not in at and len(at["robust_worst_case"]) == 20


def test_purifier_stage_writes_model_curve_and_metrics(chain: Path) -> None:
    tiny = load_tiny()["purifier"]
    curve = (chain / "purifier" / "curve.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,") and len(curve) == 1 + tiny["epochs"]
    metrics = json.loads((chain / "purifier" / "train_metrics.json").read_text())
    assert metrics["layers"] == ["conv1", "conv2"] and metrics["monitor_points"] == tiny["monitor_points"]
    assert 0.0 <= metrics["final_recon_adv_acc"] <= 1.0


def test_report_is_self_contained_and_shows_measured_numbers(chain: Path) -> None:
    html = (chain / "report" / "report.html").read_text()
    m = json.loads((chain / "eval" / "at" / "metrics.json").read_text())
    assert "data:image/png;base64," in html and "<table>" in html
    assert f"{100 * m['clean']['accuracy']:.2f}%" in html
    assert f"(n={m['autoattack']['n']})" in html
    md = (chain / "report" / "report.md").read_text()
    assert "| defence |" in md and (chain / "report" / "training_curves.png").stat().st_size > 1000
    for figure in ("purifier_curves.png", "reconstructions.png"):
        assert (chain / "report" / figure).stat().st_size > 1000 and figure in md
    assert "`carso` (classifier + CARSO purifier)" in md and "classifier alone on this run" in md


def test_report_fails_clearly_without_inputs(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml", load_tiny())
    result = run_cli(["report", "--dataset", "fashion_mnist", "--root", "data/none", "--out", "r"], cwd=tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_evaluation_uses_fp32_even_if_training_used_bf16(chain: Path) -> None:
    tensors, _ = load_tensors(chain / "classifier" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_carso_evaluation_without_a_purifier_says_what_to_pass(chain: Path) -> None:
    root = chain.parent.parent
    result = run_cli(["evaluate", "--dataset", "fashion_mnist", "--defence", "carso", "--model",
                      "data/fashion_mnist/classifier/model.safetensors", "--data", "data/fashion_mnist/dataset",
                      "--adversarial", "data/fashion_mnist/adversarial", "--out", "elsewhere"], cwd=root)
    assert result.returncode == 2 and "--purifier" in result.stderr and "Traceback" not in result.stderr
    assert not (root / "elsewhere" / "metrics.json").exists()
