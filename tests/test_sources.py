"""Transfer from unseen source models (params `sources`, carso/sources.py): the momentum attack, the stages and the
keys that reach them, the crafted points' guards, and the refusals, each in one sentence."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from carso.attacks import AttackSpec, attack, distance, momentum_attack, predict
from carso.data import load_split
from carso.errors import UserError
from carso.io import save_tensors
from carso.models import build_classifier
from carso.params import validate
from carso.pipeline import root_text
from carso.sources import craft_one, load_crafted, source_cfg
from carso.stages import craft_stage, crafted_folder, evaluate_stage, graph, reached
from conftest import load_tiny, run_cli, write_params

CPU = torch.device("cpu")
BALLS = [("Linf", 0.1), ("L2", 1.5), ("L1", 7.5)]


@pytest.fixture(scope="module")
def model_and_batch(fm_subset: Path):
    """An untrained small CNN and 16 real test images labelled with its own predictions (every point starts
    correct, so an attack succeeds exactly where it changes the prediction)."""
    torch.manual_seed(0)
    model = build_classifier("cnn_small", in_channels=1, num_classes=10, image_size=28,
                             mean=[0.286], std=[0.353]).eval()
    x, _ = load_split(fm_subset, "test", limit=16)
    return model, x, predict(model, x, CPU, 16)


@pytest.mark.parametrize("norm, eps", BALLS)
def test_the_momentum_attack_breaks_an_undefended_model_inside_the_ball(model_and_batch, norm: str, eps: float
                                                                        ) -> None:
    model, x, y = model_and_batch
    x_adv = momentum_attack(model, x, y, eps, norm, steps=10)
    assert (distance(x_adv, x, norm) <= eps * (1 + 1e-4)).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (predict(model, x_adv, CPU, 16) != y).float().mean() >= 0.5
    assert torch.equal(momentum_attack(model, x, y, eps, norm, steps=10), x_adv)  # no randomness: reproducible


def test_the_momentum_attack_without_decay_is_iterative_fgsm(model_and_batch) -> None:
    """decay 0 forgets the accumulated gradient: each step is sign(grad) of size eps / steps, i.e. PGD without a
    random start at that step size, the same points."""
    model, x, y = model_and_batch
    spec = AttackSpec("pgd", eps=0.1, steps=5, step_size=0.02, random_start=False)
    assert torch.allclose(momentum_attack(model, x, y, 0.1, "Linf", steps=5, decay=0.0), attack(model, x, y, spec))


def test_a_source_is_trained_with_the_classifier_s_settings_and_its_own_model() -> None:
    params = load_tiny()
    for name in ("std", "adv"):
        cfg = source_cfg(params, name)
        assert cfg["arch"] == "cnn_v1" != params["classifier"]["arch"]  # another architecture than the classifier
        assert cfg["lr"] == params["classifier"]["lr"] and cfg["epochs"] == params["sources"]["models"][name]["epochs"]
    assert source_cfg(params, "std")["attack"] is None and source_cfg(params, "adv")["attack"]["method"] == "fgsm_rs"


def test_the_sources_are_stages_that_only_their_keys_reach() -> None:
    params = load_tiny()
    stages = graph(params)
    crafts = [craft_stage(t) for t in (None, "l2", "l1")]
    assert {"train_sources", *crafts} <= set(stages)
    for threat, name in ((None, "at"), ("l2", "atop"), ("l1", "at")):
        evaluation = stages[evaluate_stage(name, threat)]
        assert craft_stage(threat) in evaluation.after
        assert ("--sources", crafted_folder(threat)) in evaluation.args
        assert f"{crafted_folder(threat)}/points.safetensors" in evaluation.reads
    assert {s for s in stages if reached(stages, s, "evaluation.threats.l2.eps")} == {
        "craft_sources@l2", "evaluate:at@l2", "evaluate:atop@l2", "report"}  # no other threat's points
    moved = {s for s in stages if reached(stages, s, "sources.attacks")}
    assert moved == {*crafts, "report", *(s for s in stages if s.startswith("evaluate:"))}  # no training reruns
    assert {s for s in stages if reached(stages, s, "sources.models")} == {"train_sources", *moved}
    assert not reached(stages, "train_sources", "classifier.attack.steps")  # the classifier's attack is not theirs
    text = root_text(params)
    assert "craft_sources_under_l1:" in text and "craft-sources --params params.yaml --dataset ${item} --threat l1" in text
    del params["sources"]
    assert not [s for s in graph(params) if "sources" in s]  # without the section: no stage, no --sources


def test_a_crafting_pgd_stays_in_its_ball(model_and_batch) -> None:
    model, x, y = model_and_batch
    torch.manual_seed(0)
    for norm, eps in BALLS:
        x_adv = craft_one(model, x, y, {"method": "pgd", "steps": 5}, norm, eps, CPU, 8)
        assert (distance(x_adv, x, norm) <= eps * (1 + 1e-4)).all() and x_adv.min() >= 0 and x_adv.max() <= 1


def test_crafted_points_of_another_threat_or_other_points_are_refused(tmp_path: Path) -> None:
    y = torch.arange(10) % 10
    path = tmp_path / "points.safetensors"
    save_tensors(path, {"labels": y[:4], "std/pgd": torch.rand(4, 1, 28, 28)},
                 {"norm": "L2", "eps": 1.5, "sources": {"std": "cnn_v1, standard training"}})
    found = load_crafted(path, "L2", 1.5, y)
    assert list(found) == ["std/pgd"] and found["std/pgd"][1] == "std (cnn_v1, standard training)"
    with pytest.raises(UserError, match="crafted in L2 eps 1.5, but this evaluation attacks in Linf eps 0.1") as err:
        load_crafted(path, "Linf", 0.1, y)
    assert str(err.value).count(". ") == 0
    with pytest.raises(UserError, match="crafted on other test points"):
        load_crafted(path, "L2", 1.5, y.flip(0))


@pytest.mark.parametrize("change, words", [
    (lambda p: p["sources"]["attacks"].update(fgsm={"method": "fgsm", "steps": 1}), "'sources.attacks.fgsm.method'"),
    (lambda p: p["sources"]["models"]["std"].update(arch="vit"), "'sources.models.std.arch'"),
    (lambda p: p["evaluation"]["threats"].update(training=p["evaluation"]["threats"].pop("l1")),
     "'evaluation.threats.training': `training` names the training threat"),
])
def test_a_wrong_sources_setting_is_refused_in_one_sentence(change, words: str) -> None:
    params = copy.deepcopy(load_tiny())
    change(params)
    with pytest.raises(UserError, match=words.replace("(", "\\(")) as err:
        validate(params, "params.yaml")
    assert str(err.value).count(". ") <= 1


def test_evaluate_asks_for_the_crafted_points_when_params_declares_sources(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml", load_tiny())
    result = run_cli(["evaluate", "--dataset", "fashion_mnist", "--defence", "at", "--threat", "l2", "--model",
                      "missing.safetensors", "--data", "missing", "--out", "out"], cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "give --sources" in errors[0] and "sources/crafted/l2" in errors[0], errors[0]
    assert not (tmp_path / "out").exists()
