"""The evaluation protocol's own logic: resumable attacks, PGD continuation, per-point verdicts,
gradient-masking checks, the paired comparison of two defences and the report's verdict sentence."""
from __future__ import annotations

from pathlib import Path

import pyautoattack
import pytest
import torch
from torch import nn

from carso.attacks import AttackSpec, pgd_single, predict
from carso import evaluation
from carso.evaluation import AttackCache, Threat, masking_checks, pgd_spec
from carso.evaluation.families import Target, autoattack as autoattack_family
from carso.verdicts import Judge, Verdict
from carso.models import build_classifier
from carso.defences import DEFENCES, defence
from carso.errors import UserError
from carso.params import validate
from carso.report import comparison_sentence, comparisons
from carso.stats import paired_difference

CPU = torch.device("cpu")
REAL_AUTOATTACK = pyautoattack.AutoAttack


@pytest.fixture()
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_classifier("cnn_small", in_channels=1, num_classes=10, image_size=28, mean=[0.5], std=[0.3],
                            width=4, hidden=16).eval()


def test_attack_cache_resumes_bit_identically(model: nn.Module, tmp_path: Path) -> None:
    x, y = torch.rand(10, 1, 28, 28), torch.randint(0, 10, (10,))
    spec = AttackSpec("pgd", eps=0.1, steps=3, step_size=0.04)
    cache = AttackCache(tmp_path, "model-a", seed=0)
    first, _ = cache.run("pgd", model, x, y, spec, CPU, batch_size=4)
    files = sorted(tmp_path.glob("pgd_*/batch_*.safetensors"))
    assert len(files) == 3
    files[1].unlink()  # as if the run had been killed during the second batch
    torch.manual_seed(123)  # whatever the global RNG holds, each batch draws from its own seed
    resumed, _ = cache.run("pgd", model, x, y, spec, CPU, batch_size=4)
    assert torch.equal(first, resumed)
    assert (first - x).abs().max() <= 0.1 + 1e-6
    other, _ = AttackCache(tmp_path, "model-b", seed=0).run("pgd", model, x, y, spec, CPU, batch_size=4)
    assert len(list(tmp_path.glob("pgd_*"))) == 2 and other.shape == first.shape  # another model: fresh state


def test_autoattack_resumes_batch_by_batch(model: nn.Module, tmp_path: Path) -> None:
    x = torch.rand(10, 1, 28, 28)
    y = predict(model, x, CPU, 10)  # every point starts correct, so AutoAttack attacks them all
    target = lambda: Target(model, x, y, Threat("Linf", 0.05), CPU, 4, 0,  # noqa: E731
                            AttackCache(tmp_path, "model-a", seed=0), Judge(model, False, 1, 1, CPU, 4))
    run = lambda: autoattack_family.run(target(), torch.arange(len(y)), "standard")  # noqa: E731
    first, x_first = run()
    files = sorted(tmp_path.glob("autoattack_*/batch_*"))
    assert [f.name for f in files] == [f"batch_{i:05d}.safetensors" for i in range(3)]  # AutoAttack's state is gone
    assert 0 < (x_first - x).abs().max() <= 0.05 + 1e-6 and not first.ok[predict(model, x_first, CPU, 10) != y].any()
    kept = files[0].stat().st_mtime_ns
    files[1].unlink()  # as if a cluster's time limit had killed the run during the second batch
    torch.manual_seed(123)
    resumed, x_resumed = run()
    assert torch.equal(first.ok, resumed.ok) and torch.equal(x_first, x_resumed)
    assert files[1].exists() and files[0].stat().st_mtime_ns == kept  # only the lost batch ran again


def test_a_batch_killed_inside_autoattack_runs_again(model: nn.Module, tmp_path: Path) -> None:
    """A run killed inside an AutoAttack batch leaves pyautoattack's state file (its own format, which it cannot
    read back); the rerun discards it and gives the uninterrupted batch's result."""
    from pyautoattack.state import EvaluationState

    x = torch.rand(4, 1, 28, 28)
    y = predict(model, x, CPU, 4)
    run = lambda folder: evaluation.run_autoattack(model, x, y, 0.05, "standard", CPU, 4, 0,  # noqa: E731
                                                   folder / "batch_00000_autoattack_state.json")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    flags, x_adv = run(tmp_path / "a")
    stale = EvaluationState({"apgd-ce", "apgd-t", "fab-t", "square"},
                            path=tmp_path / "b" / "batch_00000_autoattack_state.json")
    stale.run_attacks.add("apgd-ce")
    stale.to_disk(force=True)  # what a kill during the batch leaves behind
    torch.manual_seed(123)
    again, x_again = run(tmp_path / "b")
    assert torch.equal(flags, again) and torch.equal(x_adv, x_again)
    assert not list((tmp_path / "b").iterdir())  # the state file is gone once the batch is complete


class Noisy(nn.Module):
    """A randomised defence: the classifier's logits plus fresh noise on every pass."""

    def __init__(self, model: nn.Module, scale: float = 3.0) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits + self.scale * logits.std() * torch.randn_like(logits)


def _short_autoattack(*args, **kwargs):
    """AutoAttack as built, with 5 APGD iterations of 2 EoT samples instead of 100 of 20: what resumes is the same."""
    adversary = REAL_AUTOATTACK(*args, **kwargs)
    adversary.apgd.n_iter, adversary.apgd.eot_iter = 5, 2
    return adversary


def test_autoattack_rand_runs_its_eot_draws_in_batched_passes(model: nn.Module, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def short(*args, **kwargs):
        adversary = REAL_AUTOATTACK(*args, **kwargs)
        adversary.apgd.n_iter = 3
        return adversary

    class Recorded(Noisy):
        passes: list[int] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.passes.append(len(x))
            return super().forward(x)

    monkeypatch.setattr(pyautoattack, "AutoAttack", short)
    noisy = Recorded(model, scale=0.02)
    x = torch.rand(4, 1, 28, 28)
    y = predict(model, x, CPU, 4)
    flags, x_adv = evaluation.run_autoattack(noisy, x, y, 0.3, "rand", CPU, 4, 0, tmp_path / "state.json",
                                             pass_images=10_000)
    assert flags.shape == (4,) and (x_adv - x).abs().max() <= 0.3 + 1e-6
    steps = [n for n in noisy.passes if n > 4]  # APGD's steps (on the points still correct), the rest plain passes
    assert steps and all(n % 20 == 0 for n in steps)  # each step's 20 EoT draws in one pass


def test_a_resumed_evaluation_equals_an_uninterrupted_one(model: nn.Module, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyautoattack, "AutoAttack", _short_autoattack)
    noisy = Noisy(model, scale=0.02)  # small: an untrained model's margins are small
    x, x_transfer = torch.rand(12, 1, 28, 28), torch.rand(12, 1, 28, 28)
    y = predict(model, x, CPU, 12)
    cfg = {"n_points": 12, "batch_size": 4, "verdict_draws": 8, "verdict_repeats": 3,
           "pgd": [{"loss": "dlr", "steps": 3, "step_size": 0.02, "eot": 2, "restarts": 1, "zero_grad_patience": 2}],
           "autoattack": {"enabled": True, "version": "rand"},
           "square": {"enabled": True, "n_queries": 5, "p_init": 0.8},
           "sanity": {"n_points": 4, "large_eps": 0.95, "large_eps_steps": 2, "more_steps_factor": 2}}
    common = {"eps": 0.1, "confidence": 0.95}
    run = lambda folder: evaluation.evaluate_defence(noisy, x, y, x_transfer, common, cfg, CPU, 0, folder)  # noqa: E731
    uninterrupted, _, worst = run(tmp_path / "a")
    real = evaluation.run_autoattack

    def killed(*args, **kwargs):  # a cluster's time limit, after one AutoAttack batch
        if list((tmp_path / "b").glob("work/autoattack_*/batch_*.safetensors")):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(autoattack_family, "run_autoattack", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(autoattack_family, "run_autoattack", real)
    torch.manual_seed(99)  # whatever the global RNG holds when the rerun starts
    resumed, _, worst_resumed = run(tmp_path / "b")
    def without_time(r: dict) -> dict:
        cascade = [{k: v for k, v in step.items() if k != "seconds"} for step in r["cascade"]]
        return {**{k: v for k, v in r.items() if k != "seconds"}, "cascade": cascade}

    assert without_time(resumed) == without_time(uninterrupted)
    assert all(torch.equal(getattr(worst, k), getattr(worst_resumed, k)) for k in ("ok", "select", "estimate"))
    clean = resumed["clean_subset"]  # a point with mixed repeats: the verdicts really are random
    assert resumed["randomised"] and clean["strict"]["accuracy"] < clean["accuracy"]
    assert resumed["cascade"][1]["attack"] == "autoattack" and resumed["cascade"][1]["attacked_points"] > 4


class SpyAutoAttack:
    """pyautoattack's AutoAttack, recording what each instance was built with and which APGD losses it ran (with
    few iterations: the test is about which attacks run, not how long)."""

    built: list[dict] = []

    def __new__(cls, *args, **kwargs):
        adversary = REAL_AUTOATTACK(*args, **kwargs)
        record = {"version": adversary.version, "attacks": list(adversary.attacks_to_run),
                  "eot_iter": adversary.apgd.eot_iter, "ran": []}
        cls.built.append(record)
        adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = adversary.fab.n_iter = 5  # fast; what ran is the same
        adversary.square.n_queries = 20
        perturb = adversary.apgd.perturb

        def spy(x, y, *a, **k):
            record["ran"].append(adversary.apgd.loss)
            return perturb(x, y, *a, **k)

        adversary.apgd.perturb = spy
        return adversary


PROTOCOL = {"n_points": 4, "batch_size": 4, "verdict_draws": 4, "verdict_repeats": 3,
            "pgd": [{"loss": "dlr", "steps": 2, "step_size": 0.02, "eot": 2, "restarts": 1, "zero_grad_patience": 2}],
            "autoattack": {"enabled": True, "version": "rand"},
            "square": {"enabled": False, "n_queries": 5, "p_init": 0.8},
            "sanity": {"n_points": 4, "large_eps": 0.95, "large_eps_steps": 1, "more_steps_factor": 1}}


def test_a_randomised_defence_gets_autoattack_rand_with_eot_and_a_deterministic_one_standard(
        model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyautoattack, "AutoAttack", SpyAutoAttack)
    monkeypatch.setattr(SpyAutoAttack, "built", [])
    x = torch.rand(4, 1, 28, 28)
    y = predict(model, x, CPU, 4)
    common = {"eps": 0.3, "confidence": 0.95}
    m, _, _ = evaluation.evaluate_defence(Noisy(model, scale=0.02), x, y, x, common, PROTOCOL, CPU, 0, tmp_path / "r")
    (rand,) = SpyAutoAttack.built
    assert m["randomised"] and (rand["version"], rand["eot_iter"]) == ("rand", 20)
    assert rand["ran"][0] == "dlr" and set(rand["ran"]) <= {"dlr", "ce"}  # the margin loss first (our order)
    deterministic = {**PROTOCOL, "verdict_draws": 1, "verdict_repeats": 1,
                     "autoattack": {"enabled": True, "version": "standard"}}
    m, _, _ = evaluation.evaluate_defence(model, x, y, x, common, deterministic, CPU, 0, tmp_path / "d")
    standard = SpyAutoAttack.built[1]
    assert not m["randomised"] and standard["version"] == "standard" and standard["eot_iter"] == 1
    assert standard["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and standard["ran"][0] == "ce"


@pytest.mark.parametrize("change, words", [
    ({"autoattack": {"enabled": True, "version": "standard"}}, "autoattack.version is standard"),
    ({"pgd": [{**PROTOCOL["pgd"][0], "eot": 1}]}, "every pgd run has eot: 1"),
    ({"verdict_repeats": 1}, "verdict_repeats is 1"),
    ({"verdict_draws": 1, "verdict_repeats": 1}, "verdict_draws is 1"),
])
def test_a_randomised_defence_with_a_deterministic_protocol_is_refused_in_one_sentence(
        model: nn.Module, tmp_path: Path, change: dict, words: str) -> None:
    x = torch.rand(4, 1, 28, 28)
    y = predict(model, x, CPU, 4)
    with pytest.raises(UserError, match=f"randomised .* but evaluation.defences.carso attacks it as a deterministic "
                                        f"one: (.*; )?{words}") as caught:
        evaluation.evaluate_defence(Noisy(model, scale=0.02), x, y, x, {"eps": 0.1, "confidence": 0.95},
                                    {**PROTOCOL, **change}, CPU, 0, tmp_path, section="evaluation.defences.carso")
    assert str(caught.value).count(". ") == 0 and not (tmp_path / "work").exists()  # one sentence, nothing attacked


def _rows(x: torch.Tensor, part: torch.Tensor) -> list[int]:
    """Which rows of `x` the batch `part` holds."""
    return sorted(i for i in range(len(x)) if any(torch.equal(x[i], p) for p in part))


def test_the_cascade_gives_later_attacks_only_the_survivors_past_the_subset(
        model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    x = torch.rand(12, 1, 28, 28)
    pred = predict(model, x, CPU, 12)
    y = pred.clone()
    y[[2, 7]] = (pred[[2, 7]] + 1) % 10  # misclassified clean: attacked by nothing
    x_transfer = x.clone()
    other = [next(j for j in range(12) if pred[j] != pred[i]) for i in (8, 9)]
    x_transfer[[8, 9]] = x[other]  # the transfer attack breaks points 8 and 9
    calls: dict[str, list[int]] = {}
    real_run, real_aa = AttackCache.run, evaluation.run_autoattack

    def spy_run(self, name, model_, xs, *args, **kwargs):
        calls.setdefault(name, []).extend(_rows(x, xs))
        return real_run(self, name, model_, xs, *args, **kwargs)

    def spy_aa(model_, xs, *args, **kwargs):
        calls.setdefault("autoattack", []).extend(_rows(x, xs))
        return real_aa(model_, xs, *args, **kwargs)

    monkeypatch.setattr(AttackCache, "run", spy_run)
    monkeypatch.setattr(autoattack_family, "run_autoattack", spy_aa)
    pgd = {"steps": 5, "step_size": 0.01, "eot": 1, "restarts": 1, "zero_grad_patience": 2}
    cfg = {"n_points": 12, "batch_size": 4, "verdict_draws": 1, "verdict_repeats": 1,
           "pgd": [{"loss": "ce", **pgd}, {"loss": "dlr", **pgd}],
           "autoattack": {"enabled": True, "version": "standard"},
           "square": {"enabled": False, "n_queries": 5, "p_init": 0.8},
           "sanity": {"n_points": 4, "large_eps": 0.95, "large_eps_steps": 2, "more_steps_factor": 2}}
    m, adversarial, worst = evaluation.evaluate_defence(model, x, y, x_transfer, {"eps": 0.01, "confidence": 0.95},
                                                        cfg, CPU, 0, tmp_path)
    subset, correct = [0, 1, 3], [i for i in range(12) if i not in (2, 7)]
    assert calls["autoattack"] == [i for i in correct if i < 4 or i not in (8, 9)]
    aa_left = [i for i in calls["autoattack"] if predict(model, adversarial["autoattack"][i:i + 1], CPU, 1) == y[i]]
    assert 0 < len(aa_left) < len(calls["autoattack"])  # eps 0.01 breaks some points, not all
    assert calls["pgd_ce"] == sorted(set(subset) | {i for i in aa_left if i >= 4})
    ce_left = {i for i in aa_left if predict(model, adversarial["pgd_ce"][i:i + 1], CPU, 1) == y[i]}
    assert calls["pgd_dlr"] == sorted(set(subset) | {i for i in ce_left if i >= 4})  # the next run: CE's survivors
    for loss in ("ce", "dlr"):  # the checks run on the subset alone, each of its points, once per loss
        assert calls[f"pgd_large_eps_{loss}"] == [0, 1, 2, 3] and m["sanity"]["large_eps"][loss]["n"] == 4
    assert not set(calls["pgd_more_steps"]) - set(subset)
    assert {a["n"] for a in m["attacks"].values()} == {4} and list(m["attacks"]) == ["transfer", "autoattack",
                                                                                      "pgd_ce", "pgd_dlr"]
    assert [s["attack"] for s in m["cascade"]] == ["transfer", "autoattack", "pgd_ce", "pgd_dlr", "more_steps", "fgsm"]
    assert calls["fgsm"] == [i for i in subset]  # the single-step check: the subset's points correct clean
    assert m["sanity"]["base_steps"]["run"] == m["strongest_pgd"] in ("pgd_ce", "pgd_dlr")
    worst = worst.ok
    assert m["robust_worst_case"]["n"] == 12 and m["robust_worst_case"]["strict"]["correct"] == int(worst.sum())
    assert m["robust_worst_case"]["accuracy"] == m["robust_worst_case"]["strict"]["accuracy"]  # deterministic: one rule
    assert m["cascade"][-1]["strict"]["correct"] == int(worst.sum())  # eps 0.95: another threat model, not in the worst
    assert not worst[[2, 7, 8, 9]].any() and worst.sum() <= len(aa_left)


def test_pgd_continued_from_where_it_stopped_equals_a_longer_run(model: nn.Module) -> None:
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    torch.manual_seed(1)
    long = pgd_single(model, x, y, AttackSpec("pgd", eps=0.1, steps=6, step_size=0.02))
    torch.manual_seed(1)
    half = pgd_single(model, x, y, AttackSpec("pgd", eps=0.1, steps=3, step_size=0.02))
    rest = pgd_single(model, x, y, AttackSpec("pgd", eps=0.1, steps=3, step_size=0.02, random_start=False),
                      x_start=half)
    assert torch.equal(long, rest)


def test_pgd_spec_scales_lee_and_kim_step_only_when_asked() -> None:
    cfg = {"loss": "dlr", "steps": 200, "step_size": None, "eot": 20, "restarts": 1, "zero_grad_patience": 10}
    assert pgd_spec(0.1, cfg).alpha == pytest.approx(0.007 * 0.1 / (8 / 255))
    assert pgd_spec(0.1, {**cfg, "step_size": 0.01}).alpha == 0.01 and pgd_spec(0.1, cfg).zero_grad_patience == 10
    assert pgd_spec(0.1, cfg).loss == "dlr" and pgd_spec(1.5, cfg, "L2").alpha == pytest.approx(2.5 * 1.5 / 200)


def test_verdicts_combine_per_point() -> None:
    """The strict rule needs both outcomes; the other figures are the stronger attack's per point, the stronger one
    picked by the selection shares (the earlier one on a tie) and its value read from the estimate shares."""
    from carso.verdicts import scatter

    a = Verdict(torch.tensor([True, True, False, True]), torch.tensor([1.0, 0.5, 0.5, 1.0]),
                torch.tensor([0.9, 0.7, 0.4, 1.0]), draws=4, repeats=2)
    b = scatter(Verdict(torch.tensor([True, False]), torch.tensor([0.75, 0.5]), torch.tensor([1.0, 0.2]), 4, 2),
                torch.tensor([0, 1]), 4)
    c = a & b  # b ran on the first two points only: neutral on the others
    assert c.ok.tolist() == [True, False, False, True]
    assert c.select.tolist() == pytest.approx([0.75, 0.5, 0.5, 1.0])
    assert c.estimate.tolist() == pytest.approx([1.0, 0.7, 0.4, 1.0])  # point 1: a tie keeps a's estimate
    entry = c.entry(0.95)
    assert entry["n"] == 4 and entry["accuracy"] == pytest.approx(0.775) and entry["draws"] == 4
    assert entry["strict"]["accuracy"] == 0.5 and entry["strict"]["repeats"] == 2
    assert entry["ci_low"] < 0.775 < entry["ci_high"] and c.head(2).entry(0.95)["n"] == 2


def _verdict(correct: int, n: int = 100) -> Verdict:
    return Verdict.certain(torch.arange(n) < correct)


TITLES = {"pgd_ce": ("pgd", "PGD-200 (ce)"), "autoattack": ("autoattack", "AutoAttack (rand)"),
          "transfer": ("transfer", "transfer"), "square": ("square", "Square")}


def _results(verdicts: dict[str, Verdict], large_eps: dict[str, float] | None = None) -> dict:
    entry = {k: v.entry(0.95) for k, v in verdicts.items()}
    attacks = {k: {**entry[k], "kind": TITLES[k][0], "title": TITLES[k][1]} for k in verdicts if k in TITLES}
    large = {loss: {"accuracy": acc, "eps": 0.95} for loss, acc in (large_eps or {"ce": 0.0}).items()}
    return {"attacks": attacks, "sanity": {"base_steps": {**entry["base_steps"], "steps": 200},
                                           "more_steps": {**entry["more_steps"], "steps": 400}, "large_eps": large}}


def test_masking_checks_flag_clear_signatures_and_not_noise() -> None:
    healthy = {"pgd_ce": _verdict(70), "autoattack": _verdict(68), "transfer": _verdict(80), "square": _verdict(75),
               "base_steps": _verdict(35, 50), "more_steps": _verdict(34, 50)}
    assert masking_checks(_results(healthy), healthy, 0.95) == []
    noise = {**healthy, "transfer": _verdict(69), "square": _verdict(67)}  # a point or so apart: not a signature
    assert masking_checks(_results(noise), noise, 0.95) == []
    transfer = {**healthy, "transfer": _verdict(55)}  # clearly fewer than both white-box attacks
    found = masking_checks(_results(transfer), transfer, 0.95)
    assert len(found) == 2 and "white-box PGD-200 (ce) (70.00%)" in found[0] and "AutoAttack" in found[1]
    square = {**healthy, "square": _verdict(40)}  # black-box beats white-box
    found = masking_checks(_results(square), square, 0.95)
    assert len(found) == 2 and all(line.startswith("the black-box Square attack (no gradients) left 40.00%")
                                   for line in found)
    one_loss_enough = _results(healthy, {"ce": 0.3, "dlr": 0.02})  # the margin loss reaches ~0: no flag
    assert masking_checks(one_loss_enough, healthy, 0.95) == []
    none_reach = masking_checks(_results(healthy, {"ce": 0.3, "dlr": 0.2}), healthy, 0.95)
    assert len(none_reach) == 1 and "eps 0.95, starting from the clean points, no attack loss" in none_reach[0] and "dlr 20.00%" in none_reach[0]
    more = {**healthy, "base_steps": _verdict(20, 50), "more_steps": _verdict(35, 50)}
    assert "400 PGD steps" in masking_checks(_results(more), more, 0.95)[0]


def test_paired_difference_interval() -> None:
    same = [True, False] * 20
    d = paired_difference(same, same)
    assert d["difference"] == 0 and d["ci_low"] <= 0 <= d["ci_high"]
    better = [True] * 40
    d = paired_difference(better, [False] * 10 + [True] * 30)
    assert d["difference"] == pytest.approx(0.25) and 0 < d["ci_low"] < 0.25 < d["ci_high"] <= 1
    swapped = paired_difference([False] * 10 + [True] * 30, better)
    assert swapped["ci_low"] == pytest.approx(-d["ci_high"]) and swapped["ci_high"] == pytest.approx(-d["ci_low"])


def _evals(*names: str, confidence: float = 0.95) -> dict:
    return {name: {"robust_worst_case": {"confidence": confidence}, "verdict_repeats": 5} for name in names}


def _outcomes(verdicts: dict[str, list[bool]]) -> dict[str, tuple[list[float], list[bool]]]:
    """Deterministic outcomes: each point's probability is its verdict."""
    return {name: ([float(v) for v in ok], ok) for name, ok in verdicts.items()}


@pytest.mark.parametrize("carso_robust, words", [
    ([True] * 60 + [False] * 40, "CARSO beat the classifier alone on this run, by +30.0 points"),
    ([True] * 10 + [False] * 90, "CARSO did worse than the classifier alone"),
    ([True] * 31 + [False] * 69, "did not measurably beat"),
])
def test_report_states_plainly_whether_carso_beat_the_classifier(carso_robust: list[bool], words: str) -> None:
    at = [True] * 30 + [False] * 70
    outcomes = _outcomes({"at": at + [True] * 400, "carso": carso_robust})
    sentence = comparison_sentence("carso", "at", _evals("at", "carso"), outcomes, DEFENCES)
    assert words in sentence and "same first 100 test points" in sentence and "strict rule" not in sentence
    assert comparison_sentence("carso", "atop", _evals("at", "carso"), outcomes, DEFENCES) is None


def test_the_comparison_is_on_the_headline_and_names_where_the_strict_rule_disagrees() -> None:
    """Two randomised defences, equal per draw (every point 0.8 likely correct), one with noisier verdicts: the
    headline finds no difference, the strict rule a large one, and the sentence says both."""
    at = ([0.8] * 100, [True] * 80 + [False] * 20)
    noisy = ([0.8] * 100, [True] * 30 + [False] * 70)
    sentence = comparison_sentence("carso", "at", _evals("at", "carso"), {"at": at, "carso": noisy}, DEFENCES)
    assert sentence.startswith("CARSO did not measurably beat the classifier alone on this run: difference +0.0 points")
    assert "Expected robust accuracy under the strongest attack found for each point" in sentence
    assert "The strict rule disagrees on the significance: with all repeats correct the difference is -50.0" in sentence
    assert 'would say "did worse than"' in sentence


def _with_variants(tiny_params: dict, robust: dict[str, list[bool]]) -> list[str]:
    for name, value in (("carso_logit", "logit"), ("carso_prob", "prob")):
        tiny_params["evaluation"]["defences"][name] = {**tiny_params["evaluation"]["defences"]["carso"],
                                                       "variant_of": "carso", "set": {"carso.aggregation": value}}
    return comparisons(_evals(*robust), _outcomes(robust), {name: defence(name, tiny_params) for name in robust})


def test_report_says_whether_any_configuration_of_a_defence_beat_the_classifier(tiny_params: dict) -> None:
    at = [True] * 50 + [False] * 50
    lines = _with_variants(tiny_params, {"at": at, "carso": [False] * 100, "carso_logit": [True] * 95 + [False] * 5,
                                         "carso_prob": at})
    assert any(line.startswith("CARSO (carso.aggregation=logit) beat the classifier alone on this run, by +45.0")
               for line in lines)
    assert any(line.startswith("CARSO (carso.aggregation=logit) beat CARSO on this run") for line in lines)
    finding = next(line for line in lines if line.startswith("Finding:"))
    assert finding.startswith("Finding: `carso_logit` +45.0 points (95% interval [+") and "beat `at`" in finding
    assert "`carso_prob` (carso.aggregation=prob)" in finding and "`carso` (as configured)" in finding
    lines = _with_variants(tiny_params, {"at": at, "carso": [False] * 100, "carso_logit": [False] * 100,
                                         "carso_prob": [True] * 48 + [False] * 52})
    finding = next(line for line in lines if line.startswith("Finding:"))
    assert finding.startswith("Finding: no configuration of CARSO beat `at` on the worst case; the closest was "
                              "`carso_prob` -2.0 points")


def test_report_pairs_defences_only_under_the_same_threat_model(tiny_params: dict) -> None:
    for name, base in (("at_eps2", "at"), ("carso_eps2", "carso")):
        tiny_params["evaluation"]["defences"][name] = {**tiny_params["evaluation"]["defences"][base], "variant_of": base,
                                                      "set": {"evaluation.eps": 0.2, "evaluation.transfer_attack": "pgd_weak"}}
    validate(tiny_params)
    eps = {"at": 0.1, "carso": 0.1, "at_eps2": 0.2, "carso_eps2": 0.2}
    evals = {n: {"robust_worst_case": {"confidence": 0.95}, "eps": e, "norm": "Linf"} for n, e in eps.items()}
    robust = {"at": [True] * 50 + [False] * 50, "carso": [False] * 100, "at_eps2": [True] * 70 + [False] * 30,
              "carso_eps2": [True] * 80 + [False] * 20}
    lines = comparisons(evals, _outcomes(robust), {n: defence(n, tiny_params) for n in eps})
    pairs = [line.split(" on this run")[0] for line in lines if "on this run" in line]
    assert pairs == ["CARSO did worse than the classifier alone",
                     "CARSO (evaluation.eps=0.2, evaluation.transfer_attack=pgd_weak) beat the classifier alone "
                     "(evaluation.eps=0.2, evaluation.transfer_attack=pgd_weak)"]
    finding = next(line for line in lines if line.startswith("Finding:"))
    assert finding.startswith("Finding: `carso_eps2` +10.0 points") and "beat `at`" in finding and "`carso` (as configured)" in finding


def test_report_compares_each_defence_with_those_its_registry_entry_names() -> None:
    evals = _evals("at", "carso", "atop_rt", "atop", confidence=0.9)
    robust = {"at": [True] * 50 + [False] * 50, "carso": [False] * 100, "atop_rt": [True] * 50 + [False] * 50,
              "atop": [True] * 90 + [False] * 10}
    lines = comparisons(evals, _outcomes(robust), DEFENCES)
    assert any(line.startswith("AToP beat the classifier alone on this run, by +40.0 points (90% paired interval")
               for line in lines)
    assert any(line.startswith("AToP beat AToP without fine-tuning") for line in lines)
    assert any(line.startswith("AToP beat CARSO") for line in lines)
    assert any(line.startswith("CARSO did worse than the classifier alone") for line in lines)
    assert any(line.startswith("AToP without fine-tuning did not measurably beat the classifier alone") for line in lines)
    assert sum("AToP paper reports" in line for line in lines) == 1 and sum("CARSO paper" in line for line in lines) == 1


def test_the_report_names_a_defence_whose_cross_entropy_saturates() -> None:
    from carso.report import saturation_sentences

    def grads(ce: float, dlr: float = 0.0) -> dict:
        return {"gradients": {loss: {"clean": {"points": 40, "zero_gradient_share": zero}}
                              for loss, zero in (("ce", ce), ("dlr", dlr))}}

    found = saturation_sentences({"at": grads(0.0), "carso": grads(0.8), "atop": grads(0.1)})
    assert len(found) == 1 and found[0].startswith("`carso`: the cross-entropy loss saturates")
    assert "80%" in found[0] and "`at`: 0%" in found[0]
    assert saturation_sentences({"carso": grads(0.2)}) == []  # no reference: only a share above the margin counts
    assert "the DLR loss saturates" in saturation_sentences({"at": grads(0.0), "toy": grads(0.0, dlr=0.9)})[0]


class Rolled(nn.Module):
    """A surrogate that never predicts the classifier's label: its logits moved one class along."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).roll(1, dims=1)


def test_a_surrogate_attack_takes_gradients_from_the_surrogate_and_verdicts_from_the_defence(
        model: nn.Module, tmp_path: Path) -> None:
    from test_attacks import Steep

    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    y = predict(model, x, CPU, 16)
    steep = Steep(model)  # cross-entropy saturates on every point: PGD on it is blind
    pgd = {"steps": 10, "step_size": 0.025, "eot": 1, "restarts": 1, "zero_grad_patience": 3}
    cfg = {"n_points": 16, "batch_size": 8, "verdict_draws": 1, "verdict_repeats": 1,
           "pgd": [{"loss": "ce", **pgd}, {"loss": "ce", **pgd, "surrogate": {"toy.scale": 1}},
                   {"loss": "dlr", **pgd, "surrogate": {"toy.labels": "rolled"}}],
           "autoattack": {"enabled": False, "version": "rand"}, "square": {"enabled": False, "n_queries": 5, "p_init": 0.8},
           "sanity": {"n_points": 16, "large_eps": 0.95, "large_eps_steps": 2, "more_steps_factor": 1}}
    surrogates = {"pgd_ce_surrogate": model, "pgd_dlr_surrogate": Rolled(model)}
    m, adversarial, _ = evaluation.evaluate_defence(steep, x, y, x, {"eps": 0.1, "confidence": 0.95}, cfg, CPU, 0,
                                                    tmp_path, surrogates)
    a = m["attacks"]
    assert a["pgd_ce"]["accuracy"] > 0.8 > 0.5 > a["pgd_ce_surrogate"]["accuracy"]  # the unscaled copy's gradient works
    assert a["pgd_ce_surrogate"]["surrogate"] == {"toy.scale": 1} and "gradients through toy.scale=1" in \
        a["pgd_ce_surrogate"]["title"]
    for name in surrogates:  # every verdict is the defence's own classification of the final points
        assert a[name]["strict"]["correct"] == int((predict(steep, adversarial[name], CPU, 16) == y).sum())
    assert a["pgd_dlr_surrogate"]["accuracy"] > 0  # judged on the surrogate, which never predicts y, it would be 0
    assert m["strongest_pgd"] == "pgd_ce" and m["sanity"]["base_steps"]["run"] == "pgd_ce"  # own runs only


def test_the_whole_suite_follows_an_l2_threat_model(model: nn.Module, tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    y = predict(model, x, CPU, 8)
    pgd = {"steps": 3, "step_size": None, "eot": 1, "restarts": 1, "zero_grad_patience": 2}
    cfg = {"n_points": 8, "batch_size": 8, "verdict_draws": 1, "verdict_repeats": 1,
           "pgd": [{"loss": "ce", **pgd}, {"loss": "dlr", **pgd}],
           "autoattack": {"enabled": True, "version": "standard"}, "square": {"enabled": True, "n_queries": 10, "p_init": 0.8},
           "sanity": {"n_points": 8, "large_eps": 20.0, "large_eps_steps": 2, "more_steps_factor": 1}}
    eps = 1.0  # an L2 radius: far larger than any one pixel may move under L-inf 0.1
    m, adversarial, _ = evaluation.evaluate_defence(model, x, y, x, {"norm": "L2", "eps": eps, "confidence": 0.95}, cfg,
                                                    CPU, 0, tmp_path)
    assert m["norm"] == "L2" and list(m["attacks"]) == ["transfer", "autoattack", "square", "pgd_ce", "pgd_dlr"]
    for name in ("autoattack", "square", "pgd_ce", "pgd_dlr"):
        delta = (adversarial[name] - x).flatten(1)
        assert delta.norm(dim=1).max() <= eps + 1e-4 and adversarial[name].min() >= 0 and adversarial[name].max() <= 1
    assert m["attacks"]["pgd_ce"]["step_size"] == pytest.approx(2.5 * eps / 3)  # L2's default step, not Lee & Kim's
    assert max((adversarial[n] - x).abs().max() for n in ("pgd_ce", "autoattack")) > 0.1  # no L-inf box at 0.1
