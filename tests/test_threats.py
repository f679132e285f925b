"""Unseen threats (evaluation.threats): the suite derived for each, and the jobs and keys of the threat matrix."""
from __future__ import annotations

import copy
from typing import Any

import pytest

from carso.evaluation import unseen_section
from carso.pipeline import dvc_name, root_text
from carso.stages import evaluate_stage, graph, reached
from conftest import load_tiny, run_cli, write_params

THREAT = {"norm": "L2", "eps": 1.5, "large_eps": 14, "n_points": 8, "sanity_points": 3, "pgd_runs": 1, "pgd_steps": 4,
          "pgd_first": True, "square": False, "defences": ["at"]}


def _section(**changes: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(load_tiny()["evaluation"]["defences"]["at"])
    cfg.update(changes)
    return cfg


def test_the_unseen_suite_keeps_the_defence_s_attacks_scaled_to_the_threat() -> None:
    surrogate = {"loss": "ce", "steps": 5, "step_size": 0.01, "eot": 1, "restarts": 1, "zero_grad_patience": 10,
                 "surrogate": {"carso.aggregation": "logit"}}
    cfg = _section(n_points=20, pgd=[*_section()["pgd"], surrogate])
    own = [r for r in cfg["pgd"] if not r.get("surrogate")]
    out = unseen_section(cfg, THREAT)
    assert [r["loss"] for r in out["pgd"]] == [own[0]["loss"], "ce"] and out["pgd"][1]["surrogate"]
    assert all(r["step_size"] is None for r in out["pgd"])  # scaled to the threat's radius (pgd_spec)
    assert [r["eot"] for r in out["pgd"]] == [own[0]["eot"], 1] and out["autoattack"] == cfg["autoattack"]
    assert out["n_points"] == 8 and out["sanity"]["n_points"] == 3 and out["pgd_first"]
    assert [r["steps"] for r in out["pgd"]] == [min(own[0]["steps"], 4), 4]
    assert out["sanity"]["large_eps"] == 14 and not out["square"]["enabled"]
    assert "spsa" not in out and "hopskipjump" not in out  # query attacks run under the training threat only
    assert cfg["pgd"][0]["step_size"] is not None and cfg["n_points"] == 20  # the defence's own section untouched
    assert unseen_section(_section(n_points=5), {**THREAT, "pgd_runs": 2, "square": True})["n_points"] == 5
    assert len(unseen_section(cfg, {**THREAT, "pgd_runs": 2})["pgd"]) == 3


def test_each_defence_and_threat_is_one_stage_that_only_its_threat_reaches() -> None:
    params = load_tiny()
    stages = graph(params)
    pairs = [(n, t) for t, spec in params["evaluation"]["threats"].items() for n in spec["defences"]]
    assert pairs == [("at", "l2"), ("atop", "l2"), ("at", "l1")]
    for name, threat in pairs:
        stage = stages[evaluate_stage(name, threat)]
        assert stage.out == f"threats/{threat}/{name}" and "adversarial/test.safetensors" not in stage.reads
        assert stage.extra == ("--defence", name, "--threat", threat)
        assert set(stages["report"].after) >= {stage.name}
    changed = {s for s in stages if reached(stages, s, "evaluation.threats.l2.eps")}
    assert changed == {"craft_sources@l2", "evaluate:at@l2", "evaluate:atop@l2", "report"}  # no training, no other
    # threat (its points crafted on the unseen sources are redone in the new ball)
    assert not reached(stages, "evaluate:at@l2", "evaluation.eps")  # the training radius is not this threat's
    assert reached(stages, "evaluate:at@l2", "classifier.epochs")  # but a retrained classifier is re-attacked
    assert dvc_name("evaluate:atop@l2") == "evaluate_atop_under_l2"
    text = root_text(params)
    assert "evaluate_atop_under_l2:" in text and "--defence atop --threat l2" in text


def test_without_threats_the_graph_is_today_s() -> None:
    params = load_tiny()
    del params["evaluation"]["threats"]
    assert not [s for s in graph(params) if "@" in s]


@pytest.mark.parametrize("args, words", [
    (["--threat", "l3"], ["--threat l3", "has no such threat (l2, l1)"]),
    (["--threat", "l1", "--defence", "atop"], ["--threat l1: defence 'atop' is not in evaluation.threats.l1.defences"]),
    ([], ["needs --adversarial", "or give --threat NAME"]),
])
def test_evaluate_refuses_a_wrong_threat_in_one_sentence(tmp_path, args: list[str], words: list[str]) -> None:
    write_params(tmp_path / "params.yaml", load_tiny())
    defence = ["--defence", "at"] if "--defence" not in args else []
    result = run_cli(["evaluate", "--dataset", "fashion_mnist", *defence, *args, "--model", "missing.safetensors",
                      "--data", "missing", "--out", "out"], cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(w in errors[0] for w in words), errors[0]
    assert not (tmp_path / "out").exists()
