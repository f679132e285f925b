"""The L2 threat model end to end: the tiny configuration with every radius in L2 runs through Snakemake (every
stage), every stored and evaluated adversarial point stays in its L2 ball and in [0, 1], and every figure names the
norm. Unit tests cover the L2 projection and steps (test_attacks.py); this one caught a schema bound that refused an
L2 radius above 1 before any stage ran."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from carso.io import load_tensors
from conftest import LOCAL_CORES, load_tiny, make_project, run_tool

EPS, FACTOR = 1.5, 15  # the tiny run's L-inf 0.1 radii, x15 (as configs/l2_fashion_mnist.yaml does to params.yaml)


def _in_l2(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with every radius of the threat model x FACTOR in L2, PGD steps of 2.5 eps / steps."""
    params["evaluation"].update(norm="L2", eps=EPS)
    params["evaluation"].pop("threats")  # (its L2 threat is now the training one; configs/l2_fashion_mnist.yaml has none)
    attack = params["classifier"]["attack"]
    attack.update(eps=attack["eps"] * FACTOR, step_size=2.5 * attack["eps"] * FACTOR / attack["steps"])
    for stored in params["adversarial"]["attacks"].values():
        stored["eps"] *= FACTOR
        if stored["method"] == "pgd":
            stored["step_size"] = 2.5 * stored["eps"] / stored["steps"]
    params["atop"]["finetune"]["adversary"]["eps"] *= FACTOR
    for section in params["evaluation"]["defences"].values():
        section["sanity"]["large_eps"] = 10.0
        for run in section["pgd"]:
            run["step_size"] = None  # L2's rule: 2.5 eps / steps
    return params


@pytest.fixture(scope="module")
def l2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = make_project(tmp_path_factory.mktemp("l2"), _in_l2(load_tiny()))
    result = run_tool(["snakemake", "--cores", str(LOCAL_CORES)], cwd=project, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return project / "data" / "fashion_mnist"


def _within_l2_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    distance = (x_adv - x).flatten(1).norm(dim=1)
    assert distance.max() <= eps * (1 + 1e-5), distance.max()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_the_stored_attacks_are_l2_attacks(l2_run: Path) -> None:
    stored, _ = load_tensors(l2_run / "adversarial" / "test.safetensors")
    summary = json.loads((l2_run / "adversarial" / "summary.json").read_text())
    assert summary["norm"] == "L2"
    for name in ("fgsm_strong", "pgd_strong"):
        _within_l2_ball(stored[name], stored["clean"], EPS)
        assert (stored[name] - stored["clean"]).abs().max() > 0.1 + 1e-3  # past the L-inf box: not an L-inf attack


@pytest.mark.parametrize("defence", ["at", "carso", "atop_rt", "atop", "at_noise"])
def test_every_defence_is_evaluated_in_l2_and_its_points_stay_in_the_ball(l2_run: Path, defence: str) -> None:
    metrics = json.loads((l2_run / "eval" / defence / "metrics.json").read_text())
    assert (metrics["norm"], metrics["eps"]) == ("L2", EPS)
    examples, _ = load_tensors(l2_run / "eval" / defence / "examples.safetensors")
    _within_l2_ball(examples["adversarial"], examples["clean"], EPS)
    report = (l2_run / "report" / "report.md").read_text()
    assert f"| `{defence}` (" in report and "L-inf" not in report.split("## Robust accuracy")[1].split("##")[0]
    assert "Adversarial training: PGD-2 at L2 eps 1.5 (classifier.attack" in report
