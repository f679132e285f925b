"""params.yaml is validated by the library, by every stage's CLI and by the Snakefile, with one clear sentence."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from carso.errors import UserError
from carso.params import load_params, validate
from conftest import REPO, make_project, run_cli, run_tool, write_params

def _variant(params: dict[str, Any], name: str, overrides: dict[str, Any] | None, base: str = "carso") -> None:
    """Declare a variant of `base` (its section copied, with variant_of and, unless None, set)."""
    section = {**params["evaluation"]["defences"]["carso"], "variant_of": base}
    params["evaluation"]["defences"][name] = section if overrides is None else {**section, "set": overrides}


# (how to break the params, the words the error must contain)
BAD: dict[str, tuple[Callable[[dict[str, Any]], None], list[str]]] = {
    "wrong_type": (lambda p: p["classifier"].__setitem__("epochs", "ten"),
                   ["'classifier.epochs'", "an integer >= 1", "'ten'"]),
    "unknown_key": (lambda p: p["classifier"].__setitem__("epoch", 3),
                    ["unknown key 'classifier.epoch'", "epochs"]),
    "unknown_section": (lambda p: p.__setitem__("trainer", {}), ["unknown key 'trainer'", "classifier"]),
    "unknown_dataset": (lambda p: p.__setitem__("datasets", ["svhn"]),
                        ["'datasets[0]'", "'fashion_mnist'", "'svhn'"]),
    "missing_datasets": (lambda p: p.pop("datasets"), ["'datasets' is missing"]),
    "negative_eps": (lambda p: p["evaluation"].__setitem__("eps", -0.1),
                     ["'evaluation.eps'", "> 0", "-0.1"]),
    "zero_steps": (lambda p: p["evaluation"]["defences"]["carso"]["pgd"][0].__setitem__("steps", 0),
                   ["'evaluation.defences.carso.pgd[0].steps'", ">= 1", "(got 0)"]),
    "unknown_loss": (lambda p: p["evaluation"]["defences"]["at"]["pgd"][0].__setitem__("loss", "hinge"),
                     ["'evaluation.defences.at.pgd[0].loss'", "'ce', 'dlr', 'cw'", "'hinge'"]),
    "repeated_pgd_run": (lambda p: p["evaluation"]["defences"]["at"]["pgd"].append(
                         dict(p["evaluation"]["defences"]["at"]["pgd"][0])),
                         ["'evaluation.defences.at.pgd[2]' repeats the run pgd_ce", "different loss"]),
    "surrogate_unknown_key": (lambda p: p["evaluation"]["defences"]["carso"]["pgd"][2].__setitem__(
                              "surrogate", {"carso.aggregator": "logit"}),
                              ["'evaluation.defences.carso.pgd[2].surrogate'", "'carso.aggregator' is not a key"]),
    "surrogate_bad_value": (lambda p: p["evaluation"]["defences"]["carso"]["pgd"][2].__setitem__(
                            "surrogate", {"carso.aggregation": "median"}),
                            ["'evaluation.defences.carso.pgd[2].surrogate'", "'carso.aggregation'", "'median'"]),
    "linf_eps_above_one": (lambda p: p["evaluation"]["defences"]["at"]["sanity"].__setitem__("large_eps", 1.5),
                           ["'evaluation.defences.at.sanity.large_eps' is 1.5", "at most 1", "L2"]),
    "unknown_norm": (lambda p: p["evaluation"].__setitem__("norm", "L0"), ["'evaluation.norm'", "'Linf', 'L2', 'L1'"]),
    "purifier_unknown_attack": (lambda p: p["purifier"].__setitem__("attacks", ["pgd_strong", "cw"]),
                                ["'purifier.attacks'", "'cw'", "adversarial.attacks", "pgd_weak"]),
    "transfer_outside_threat_model": (lambda p: p["evaluation"].__setitem__("eps", 0.05),
                                      ["'evaluation.transfer_attack'", "pgd_strong", "eps 0.1", "0.05"]),
    "count_aggregation": (lambda p: p["carso"].__setitem__("aggregation", "count"),
                          ["'carso.aggregation'", "peel"]),
    "too_few_transfer_points": (lambda p: p["adversarial"].__setitem__("test_points", 5),
                                ["'adversarial.test_points' (5)", "evaluation.defences.", "n_points"]),
    "sanity_larger_than_attacked": (lambda p: p["evaluation"]["defences"]["carso"]["sanity"].__setitem__("n_points", 99),
                                    ["'evaluation.defences.carso.sanity.n_points' (99)", "n_points (8)"]),
    "strict_repeats_above_draws": (lambda p: p["evaluation"]["defences"]["carso"].__setitem__("verdict_repeats", 9),
                                   ["'evaluation.defences.carso.verdict_repeats' (9)", "verdict_draws (8)",
                                    "first of the selection draws"]),
    "noise_control_sigma": (lambda p: p["controls"]["at_noise"].__setitem__("sigma", 0),
                            ["'controls.at_noise.sigma'", "> 0", "(got 0)"]),
    "bad_enum": (lambda p: p["classifier"].__setitem__("precision", "fp16"),
                 ["'classifier.precision'", "'fp32', 'bf16'"]),
    "pgd_without_steps": (lambda p: p["adversarial"]["attacks"]["pgd_weak"].pop("steps"),
                          ["'adversarial.attacks.pgd_weak.steps'"]),
    "mirror_unset": (lambda p: p["data"]["mirror"].__setitem__("fashion_mnist", None),
                     ["'data.mirror.fashion_mnist'", "download"]),
    "unknown_defence": (lambda p: p["evaluation"]["defences"].__setitem__("bpda", p["evaluation"]["defences"]["at"]),
                        ["'evaluation.defences.bpda' is not a registered defence (at, carso, atop_rt, atop, at_noise, plain, "
                         "ctl_scaled, ctl_quant, ctl_resize)",
                         "variant_of: <defence>"]),
    "registered_as_variant": (lambda p: p["evaluation"]["defences"]["carso"].__setitem__("variant_of", "carso"),
                              ["'evaluation.defences.carso' is the registered defence", "a name of its own"]),
    "variant_without_set": (lambda p: _variant(p, "carso_logit", None),
                            ["'evaluation.defences.carso_logit' is not a registered defence", "set:"]),
    "variant_of_unknown": (lambda p: _variant(p, "bpda_logit", {"carso.aggregation": "logit"}, base="bpda"),
                           ["'evaluation.defences.bpda_logit' is not a registered defence", "variant_of:"]),
    "variant_training_key": (lambda p: _variant(p, "carso_long", {"purifier.epochs": 60}),
                             ["'evaluation.defences.carso_long.set' changes 'purifier.epochs'", "does not read at "
                              "inference (carso)", "a run of its own"]),
    "variant_bad_name": (lambda p: _variant(p, "Carso-Logit", {"carso.aggregation": "logit"}),
                         ["'evaluation.defences.Carso-Logit'", "lower case letters"]),
    "variant_bad_value": (lambda p: _variant(p, "carso_count", {"carso.aggregation": "count"}),
                          ["'evaluation.defences.carso_count.set'", "'carso.aggregation' is 'count'"]),
    "variant_unknown_key": (lambda p: _variant(p, "carso_x", {"carso.aggregator": "logit"}),
                            ["'evaluation.defences.carso_x.set'", "'carso.aggregator' is not a key"]),
    "atop_grid": (lambda p: p["atop"]["transform"].__setitem__("grid", 5),
                  ["'atop.transform.grid' (5)", "28-pixel side", "2, 4, 7, 14, 28"]),
    "atop_missing_share": (lambda p: p["atop"]["transform"].__setitem__("missing_share", 1.5),
                           ["'atop.transform.missing_share'", "> 0 and < 1", "1.5"]),
    "atop_no_block_missing": (lambda p: p["atop"]["transform"].__setitem__("missing_share", 0.01),
                              ["'atop.transform.missing_share' (0.01)", "0 of the 49 blocks"]),
    "atop_rt3_masks": (lambda p: p["atop"]["transform"].__setitem__("rt3_masks", 1),
                       ["'atop.transform.rt3_masks'", ">= 2", "(got 1)"]),
    "atop_adversary_eps": (lambda p: p["atop"]["finetune"]["adversary"].__setitem__("eps", 0.2),
                           ["'atop.finetune.adversary.eps' (0.2)", "evaluation.eps (0.1)", "threat model"]),
    "atop_adversary_target": (lambda p: p["atop"]["finetune"]["adversary"].__setitem__("target", "purifier"),
                              ["'atop.finetune.adversary.target'", "'classifier', 'pipeline'"]),
    "atop_monitor_attack": (lambda p: p["atop"]["pretrain"].__setitem__("monitor_attack", "cw"),
                            ["'atop.pretrain.monitor_attack'", "'cw'", "adversarial.attacks"]),
    "threat_unknown_defence": (lambda p: p["evaluation"]["threats"]["l2"]["defences"].append("bpda"),
                               ["'evaluation.threats.l2.defences' names bpda", "evaluation.defences does not evaluate"]),
    "threat_linf_above_one": (lambda p: p["evaluation"]["threats"]["l2"].update(norm="Linf"),
                              ["'evaluation.threats.l2' is an L-inf threat", "eps 1.5", "at most 1"]),
    "threat_large_eps_small": (lambda p: p["evaluation"]["threats"]["l1"].__setitem__("large_eps", 5),
                               ["'evaluation.threats.l1.large_eps' (5)", "its eps (7.5)", "much larger"]),
    "threat_is_training": (lambda p: p["evaluation"]["threats"]["l2"].update(norm="Linf", eps=0.1, large_eps=0.95),
                           ["'evaluation.threats.l2' is the training threat", "Linf eps 0.1", "already"]),
    "threat_bad_name": (lambda p: p["evaluation"]["threats"].__setitem__("L2-big", p["evaluation"]["threats"]["l2"]),
                        ["'evaluation.threats'", "invalid name", "'L2-big'"]),
    "threat_missing_key": (lambda p: p["evaluation"]["threats"]["l2"].pop("large_eps"),
                           ["'evaluation.threats.l2.large_eps' is missing"]),
    "purifier_unknown_layer": (lambda p: p["purifier"].__setitem__("layers", ["conv1", "features.0"]),
                               ["params.yaml: 'purifier.layers' names 'features.0'", "not a module of classifier.arch",
                                "conv1, conv2"]),
    "atop_grid_not_divisor": (lambda p: p["atop"]["transform"].__setitem__("grid", 5),  # its own key, not a surrogate's
                              ["params.yaml: 'atop.transform.grid' (5) does not divide"]),
}


def test_default_and_tiny_params_are_valid() -> None:
    load_params(REPO / "params.yaml")
    load_params(REPO / "tests" / "tiny" / "params.yaml")


def test_a_variant_is_its_base_defence_with_its_settings(tiny_params: dict[str, Any]) -> None:
    from carso.defences import defence, methods_of
    from carso.params import defence_params

    _variant(tiny_params, "carso_zero", {"carso.latent": "zero", "carso.n_samples": 2})
    validate(tiny_params)
    spec = defence("carso_zero", tiny_params)
    assert (spec.base, spec.load, spec.artifacts) == ("carso", defence("carso").load, defence("carso").artifacts)
    assert spec.compare_with == ("at", "carso") and "carso.latent=zero" in spec.label
    built = defence_params(tiny_params, "carso_zero", "params.yaml")
    assert (built["carso"]["latent"], built["carso"]["n_samples"]) == ("zero", 2)
    assert tiny_params["carso"]["latent"] == "sample"  # the run's own params are untouched
    assert [m.name for m in methods_of(["at", "carso_zero"], tiny_params)] == ["carso"]
    with pytest.raises(UserError, match="unknown defence 'carso_zero'"):
        defence("carso_zero")  # without the params that declare it


@pytest.mark.parametrize("case", sorted(BAD))
def test_library_rejects_bad_params_in_one_sentence(tiny_params: dict[str, Any], case: str) -> None:
    from carso.defences import check_models, methods_of

    breaker, words = BAD[case]
    breaker(tiny_params)
    with pytest.raises(UserError) as err:  # what the Snakefile's dry run runs: the params checks, then those that
        validate(tiny_params)              # build a model
        check_models(methods_of(list(tiny_params["evaluation"]["defences"])), tiny_params, "params.yaml")
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("case", ["wrong_type", "unknown_key", "negative_eps", "zero_steps"])
def test_cli_stops_with_the_message_and_writes_nothing(tmp_path: Path, tiny_params: dict[str, Any],
                                                       case: str) -> None:
    breaker, words = BAD[case]
    breaker(tiny_params)
    write_params(tmp_path / "params.yaml", tiny_params)
    result = run_cli(["fetch", "--dataset", "fashion_mnist", "--out", "out"], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and all(w in errors[0] for w in words), result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_rejects_unparsable_yaml(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("classifier: [unclosed\n")
    result = run_cli(["fetch", "--dataset", "fashion_mnist", "--out", "out"], cwd=tmp_path)
    assert result.returncode == 2 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr


def test_cli_rejects_a_dataset_not_listed(tmp_path: Path, tiny_params: dict[str, Any]) -> None:
    write_params(tmp_path / "params.yaml", tiny_params)
    result = run_cli(["fetch", "--dataset", "mnist", "--out", "out"], cwd=tmp_path)
    assert result.returncode == 2 and "not in `datasets`" in result.stderr


@pytest.mark.parametrize("case", ["unknown_key", "zero_steps", "purifier_unknown_layer"])
def test_snakefile_stops_with_the_message(tmp_path: Path, tiny_params: dict[str, Any], case: str) -> None:
    breaker, words = BAD[case]
    breaker(tiny_params)
    project = make_project(tmp_path / "project", tiny_params)
    result = run_tool(["snakemake", "-n", "--cores", "1"], cwd=project, timeout=120)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert all(w in output for w in words), output
    assert not (project / "data").exists()
