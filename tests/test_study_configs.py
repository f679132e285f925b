"""The configurations of the CARSO question (issue 12): configs/carso_question.yaml and configs/carso_large.yaml
differ from params.yaml only where they say; configs/v1_fashion_mnist.yaml is CARSO v1's recipe for MNIST-like data
(METHOD.md, section 1), valid, built to the published sizes and one `--config params_file=...` away from a Snakemake
run (a dry run; nothing is trained)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from carso.attacks import AttackSpec
from carso.data import dataset_spec
from carso.models import build_classifier
from carso.params import load_params
from carso.training import attack_shares, training_attack
from carso.methods.carso.purifier import PurifierConfig, beta_schedule, build_purifier
from conftest import REPO, dry_run_config

CONFIG = "configs/v1_fashion_mnist.yaml"


def _differences(a: Any, b: Any, path: str = "") -> set[str]:
    """The dotted keys where two params trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {d for k in a.keys() | b.keys() for d in _differences(a.get(k), b.get(k), f"{path}.{k}".lstrip("."))}
    return set() if a == b else {path}


# The default run's positive controls (carso.methods.controls), unseen threats (evaluation.threats) and unseen source
# models (sources), which the question and L2 configs leave out.
POSITIVE_CONTROLS = {f"evaluation.defences.{d}" for d in ("plain", "ctl_scaled", "ctl_quant", "ctl_resize")} | {
    "evaluation.threats", "sources"}


@pytest.mark.parametrize("name, changed", [
    ("carso_question", {"evaluation.defences.atop", "evaluation.defences.atop_rt", "evaluation.defences.at_noise",
                        *POSITIVE_CONTROLS, "evaluation.defences.carso_logit",
                        "evaluation.defences.carso_prob", "evaluation.defences.carso_zero", "report.title",
                        "output_root"}),
    ("carso_large", {"purifier.decoder_channels", "purifier.epochs", "evaluation.defences.atop",
                     "evaluation.defences.atop_rt", "evaluation.defences.at_noise", *POSITIVE_CONTROLS, "report.title",
                     "output_root"}),
])
def test_a_question_config_is_the_default_run_changed_only_where_it_says(name: str, changed: set[str]) -> None:
    default, config = load_params(REPO / "params.yaml"), load_params(REPO / "configs" / f"{name}.yaml")
    assert _differences(default, config) == changed
    variants = {k: v for k, v in config["evaluation"]["defences"].items() if "variant_of" in v}
    assert all(v["variant_of"] == "carso" for v in variants.values())
    assert {k: v["set"] for k, v in variants.items()} == ({"carso_logit": {"carso.aggregation": "logit"},
                                                           "carso_prob": {"carso.aggregation": "prob"},
                                                           "carso_zero": {"carso.latent": "zero"}}
                                                          if name == "carso_question" else {})


def test_the_l2_config_is_the_default_run_in_the_l2_threat_model(tmp_path: Path) -> None:
    """Every radius 15 x the default's, the norm L2, PGD's step left to its L2 rule; nothing else differs; it
    dry-runs every stage (a schema bound of 1 on a radius once refused it)."""
    default, l2 = load_params(REPO / "params.yaml"), load_params(REPO / "configs" / "l2_fashion_mnist.yaml")
    sanity = {f"evaluation.defences.{d}.sanity.large_eps" for d in default["evaluation"]["defences"]
              if f"evaluation.defences.{d}" not in POSITIVE_CONTROLS}
    stored = {f"adversarial.attacks.{a}.{k}" for a in default["adversarial"]["attacks"] for k in ("eps", "step_size")}
    assert _differences(default, l2) == {"output_root", "evaluation.norm", "evaluation.eps", "classifier.attack.eps",
                                         "classifier.attack.step_size", "atop.finetune.adversary.eps",
                                         "evaluation.defences.at.pgd", "evaluation.defences.at_noise.pgd",
                                         *POSITIVE_CONTROLS} | sanity | stored - {
        "adversarial.attacks.fgsm_weak.step_size", "adversarial.attacks.fgsm_strong.step_size"}
    assert l2["evaluation"]["norm"] == "L2"
    radius = lambda p: [p["evaluation"]["eps"], p["classifier"]["attack"]["eps"], p["atop"]["finetune"]["adversary"]["eps"],
                        *(a["eps"] for a in p["adversarial"]["attacks"].values())]
    assert radius(l2) == pytest.approx([15 * e for e in radius(default)])
    assert all(run["step_size"] is None for run in l2["evaluation"]["defences"]["at"]["pgd"])
    table, commands, project = dry_run_config(tmp_path, "configs/l2_fashion_mnist.yaml")
    assert table["evaluate"] == 5 and table["train_classifier"] == 1 and not (project / "data").exists()


def test_the_short_v1_config_cuts_only_the_schedules() -> None:
    v1, short = load_params(REPO / CONFIG), load_params(REPO / "configs" / "v1_fashion_mnist_short.yaml")
    assert _differences(v1, short) == {"classifier.epochs", "adversarial.train_points", "purifier.epochs",
                                       "purifier.batch_size", "report.title", "output_root"}
    assert (short["classifier"]["epochs"], short["adversarial"]["train_points"], short["purifier"]["epochs"]) == (
        4, 20000, 30)


def test_the_full_classifier_v1_config_cuts_only_the_purifiers_schedule() -> None:
    """Its classifier section is v1's, so that a checkpoint of one resumes in the other."""
    v1 = load_params(REPO / CONFIG)
    full = load_params(REPO / "configs" / "v1_fashion_mnist_full_classifier.yaml")
    short = load_params(REPO / "configs" / "v1_fashion_mnist_short.yaml")
    assert _differences(v1, full) == {"adversarial.train_points", "purifier.epochs", "purifier.batch_size",
                                      "report.title", "output_root"}
    assert full["classifier"] == v1["classifier"] and full["purifier"] == short["purifier"]


def test_every_shipped_params_file_writes_under_a_root_of_its_own() -> None:
    files = [REPO / "params.yaml", REPO / "tests" / "tiny" / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))]
    roots = [load_params(f)["output_root"] for f in files]
    assert roots[0] == "." and roots[1] == "runs/tiny" and len(set(roots)) == len(files) >= 8


@pytest.fixture(scope="module")
def v1() -> dict[str, Any]:
    return load_params(REPO / CONFIG)  # schema + cross-checks


def _classifier(params: dict[str, Any]) -> nn.Module:
    spec = dataset_spec("fashion_mnist")
    cfg = params["classifier"]
    return build_classifier(cfg["arch"], in_channels=spec.channels, num_classes=spec.num_classes,
                            image_size=spec.side, mean=spec.mean, std=spec.std, **cfg["arch_kwargs"]).eval()


def test_the_v1_classifier_ends_in_log_softmax_and_trains_at_two_radii(v1: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = _classifier(v1)
    out = model(torch.rand(4, 1, 28, 28))
    assert out.shape == (4, 10) and torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-5)
    assert [type(m).__name__ for m in model.children()] == ["Normalize", "Conv2d", "BatchNorm2d", "Conv2d",
                                                            "BatchNorm2d", "Linear", "BatchNorm1d", "Linear", "LogSoftmax"]
    specs = training_attack(v1["classifier"])
    assert [(s.method, s.eps, s.steps, s.step_size) for s in specs] == [("pgd", 0.15, 40, 0.01), ("pgd", 0.3, 40, 0.01)]


def test_the_v1_purifier_has_the_published_sizes(v1: dict[str, Any]) -> None:
    pur = v1["purifier"]
    purifier, extractor = build_purifier(_classifier(v1), "fashion_mnist", PurifierConfig.from_params(pur),
                                         pur["layers"])
    shapes = extractor.shapes(torch.zeros(1, 1, 28, 28))
    assert shapes == [(16, 14, 14), (32, 7, 7), (100,), (10,)] and sum(torch.Size(s).numel() for s in shapes) == 4814
    linears = [m for m in purifier.condition_head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4814, 260), (260, 130)]
    assert purifier.cfg.latent_dim == 64 and purifier.decoder_input.in_features == 64 + 130
    convs = [m for m in purifier.decoder if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d))]
    assert [purifier.decoder_input.out_features // 49] + [m.out_channels for m in convs] == [97, 48, 24, 1]
    assert purifier.decode(torch.zeros(2, 64), torch.zeros(2, 130)).shape == (2, 1, 28, 28)
    assert (pur["epochs"], pur["batch_size"], pur["adversarial_fraction"]) == (150, 1536, 0.4)
    assert beta_schedule(0, pur["epochs"], pur["beta_warmup"]["delay"], pur["beta_warmup"]["ramp"]) == 1.0
    eps = sorted((a["method"], a["eps"]) for name, a in v1["adversarial"]["attacks"].items() if name in pur["attacks"])
    assert eps == [("fgsm", 0.15), ("fgsm", 0.3), ("pgd", 0.15), ("pgd", 0.3)]
    assert (v1["carso"]["n_samples"], v1["carso"]["latent"]) == (4, "zero")


def test_the_published_beta_schedule_is_unchanged() -> None:
    assert [beta_schedule(e, 48) for e in (0, 6, 7, 8, 9)] == pytest.approx([0.0, 0.0, 1 / 2.016, 2 / 2.016, 1.0])


def test_each_share_of_a_batch_is_attacked_at_its_own_radius() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(6, 1, 4, 4) * 0.4 + 0.3, torch.tensor([0, 1, 2, 0, 1, 2])
    specs = [AttackSpec("pgd", eps=e, steps=10, step_size=e / 4, random_start=True) for e in (0.05, 0.2)]
    delta = (attack_shares(model, x, y, specs) - x).abs().flatten(1).amax(1)
    assert torch.all(delta[:3] <= 0.05 + 1e-6) and torch.all(delta[:3] > 0.04)
    assert torch.all(delta[3:] <= 0.2 + 1e-6) and torch.all(delta[3:] > 0.15)


def test_the_v1_configuration_dry_runs(tmp_path: Path) -> None:
    table, commands, project = dry_run_config(tmp_path, CONFIG)
    assert table == {"fetch": 1, "train_classifier": 1, "generate_adversarial": 1, "train_purifier": 1, "evaluate": 4,
                     "report": 1, "all": 1, "total": 10}
    evaluated = sorted(re.search(r"--defence (\w+)", c).group(1) for c in commands if " evaluate " in c)
    assert evaluated == ["at", "at_eps01", "carso", "carso_eps01"]
    assert all(f"--params {CONFIG} " in c for c in commands) and not (project / "data").exists()


def test_the_unseen_full_config_is_the_default_run_at_the_papers_budgets(tmp_path: Path) -> None:
    """configs/unseen_full.yaml: the default run with the unseen threats' full derived suites and the query attacks at
    the papers' budgets (SPSA 100 x 128 queries, HopSkipJump about 25k) on the four real defences; nothing else."""
    default, full = load_params(REPO / "params.yaml"), load_params(REPO / "configs" / "unseen_full.yaml")
    real = ("at", "carso", "atop_rt", "atop")
    threats = {f"evaluation.threats.{t}.{k}" for t in ("l2", "l1") for k in ("sanity_points", "pgd_runs", "pgd_steps",
                                                                             "pgd_first")}
    queries = {f"evaluation.defences.{d}.{f}" for d in real for f in ("spsa", "hopskipjump")}
    assert _differences(default, full) == {"output_root", "report.title", *threats, *queries}
    for name in real:
        spsa, hsj = (full["evaluation"]["defences"][name][f] for f in ("spsa", "hopskipjump"))
        assert spsa["iterations"] * 2 * spsa["samples"] == 12_800 and spsa["n_points"] == hsj["n_points"] == 50
        assert hsj["max_iter"] == 50 and hsj["max_eval"] == 500
    table, _, project = dry_run_config(tmp_path, "configs/unseen_full.yaml")
    assert table["evaluate"] == 9 and table["evaluate_threat"] == 8 and not (project / "data").exists()
