"""The report's text and figures follow the run's configuration: what a paper reports is said against this run's
dataset and threat model, and figures name classes, not label indices."""
from __future__ import annotations

import pytest
import torch

from carso.datasets import DATASETS
from carso.defences import DEFENCES
from carso.report import examples_png, headline_png, published_sentence, training_threat_line


def _metrics(dataset: str, norm: str, eps: float) -> dict:
    return {"dataset": dataset, "norm": norm, "eps": eps}


@pytest.mark.parametrize("name", ["carso", "atop"])
def test_the_published_figures_are_said_against_this_run_s_setting(name: str) -> None:
    spec = DEFENCES[name]
    assert published_sentence(spec, _metrics("fashion_mnist", "Linf", 0.1)).endswith(
        "It gives no figure for Fashion-MNIST at L-inf eps 0.1, this run's setting.")
    assert published_sentence(spec, _metrics("mnist", "Linf", 0.3)).endswith(
        "It gives no figure for MNIST at L-inf eps 0.3, this run's setting.")
    assert published_sentence(spec, _metrics("cifar10", "Linf", 8 / 255)).endswith(
        "This run's setting (CIFAR-10, L-inf eps 0.03137) is one of them.")
    assert published_sentence(spec, _metrics("cifar10", "L2", 0.5)).endswith(
        "It gives no figure for CIFAR-10 at L2 eps 0.5, this run's setting.")
    assert spec.published in published_sentence(spec, _metrics("cifar100", "Linf", 8 / 255))


def test_every_dataset_names_each_of_its_classes() -> None:
    for spec in DATASETS.values():
        assert spec.title and len(spec.classes) == spec.num_classes == len(set(spec.classes))
    assert DATASETS["fashion_mnist"].class_name(9) == "Ankle boot" and DATASETS["cifar100"].class_name(0) == "apple"


def test_the_examples_figure_names_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The titles of the examples figure, captured from matplotlib: class names where there were indices."""
    import matplotlib.axes

    titles: list[str] = []
    original = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, label, *a, **k: (titles.append(label), original(self, label, *a, **k))[1])
    ex = {"clean": torch.rand(2, 1, 8, 8), "adversarial": torch.rand(2, 1, 8, 8), "labels": torch.tensor([9, 0]),
          "pred_clean": torch.tensor([9, 7]), "pred_adversarial": torch.tensor([7, 0])}
    assert examples_png(ex, "at", DATASETS["fashion_mnist"].class_name).startswith(b"\x89PNG")
    assert titles == ["clean: Ankle boot\n-> Ankle boot", "adver: Ankle boot\n-> Sneaker",
                      "clean: T-shirt/top\n-> Sneaker", "adver: T-shirt/top\n-> T-shirt/top"]


def test_the_headline_chart_draws_every_defence_with_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.axes

    bars: list[tuple] = []
    original = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, height, width, **k: (
        bars.append((list(x), list(height), k["yerr"], k["label"])), original(self, x, height, width, **k))[1])
    e = lambda acc, lo, hi: {"accuracy": acc, "ci_low": lo, "ci_high": hi, "n": 100, "confidence": 0.95}  # noqa: E731
    evals = {"at": {"clean_subset": e(0.8, 0.7, 0.9), "robust_worst_case": e(0.72, 0.6, 0.8)},
             "carso": {"clean_subset": e(0.84, 0.75, 0.9), "robust_worst_case": e(0.34, 0.25, 0.44)}}
    assert headline_png(evals).startswith(b"\x89PNG")
    (clean, worst) = bars
    assert clean[1] == pytest.approx([80, 84]) and worst[1] == pytest.approx([72, 34])
    assert worst[2][0] == pytest.approx([12, 9]) and worst[2][1] == pytest.approx([8, 10])  # down to ci_low, up to ci_high
    assert (clean[3], worst[3]) == ("clean", "worst case over all attacks")


def test_the_classifier_s_training_attack_is_named_in_the_run_s_norm() -> None:
    l2 = {"classifier": {"attack": {"method": "pgd", "eps": 1.5, "steps": 7, "step_size": 0.536}},
          "evaluation": {"norm": "L2"}}
    assert training_threat_line(l2).startswith("Adversarial training: PGD-7 at L2 eps 1.5 (classifier.attack")
    v1 = {"classifier": {"attack": {"method": "fgsm_rs", "eps": [0.15, 0.3], "steps": 1, "step_size": 0.375}},
          "evaluation": {"norm": "Linf"}}
    assert training_threat_line(v1) == ("Adversarial training: FGSM from a random start at L-inf eps 0.15, 0.3 "
                                         "(classifier.attack, evaluation.norm); the PGD-10 monitor at eps 0.3.")
