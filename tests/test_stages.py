"""Each stage runs from its CLI on a small real subset, in the order the DAG runs them."""
from __future__ import annotations

import json
from html import escape as html_escape
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from carso.codedeps import stage_modules
from carso.io import load_tensors
from browser import Rendered, render
from conftest import ARTIFACTS, HANG_GUARD_S, load_tiny, run_cli, write_params
from report_reader import COMPARISON, figures, html_sections, md_sections

D = "data/fashion_mnist"
CLF = f"{D}/classifier/model.safetensors"
DEFENCES = {"at": [], "carso": [f"{D}/purifier/model.safetensors"],
            "atop_rt": [f"{D}/atop/pretrain/inpainter.safetensors"], "atop": [f"{D}/atop/finetune/inpainter.safetensors"],
            "at_noise": [], "plain": [f"{D}/controls/plain/model.safetensors"],
            "ctl_scaled": [f"{D}/controls/plain/model.safetensors"], "ctl_quant": [f"{D}/controls/plain/model.safetensors"],
            "ctl_resize": [f"{D}/controls/resize/model.safetensors"]}
UNSEEN = [("at", "l2"), ("atop", "l2"), ("at", "l1")]  # the tiny config's evaluation.threats: (defence, threat)
SOURCE_ATTACKS = [f"src_{s}_{a}" for s in ("std", "adv") for a in ("pgd", "mifgsm")]  # the tiny config's sources
STEPS = [["fetch", "--out", f"{D}/dataset"],
         ["train-classifier", "--data", f"{D}/dataset", "--out", f"{D}/classifier"],
         ["generate-adversarial", "--model", CLF, "--data", f"{D}/dataset", "--out", f"{D}/adversarial"],
         ["train-purifier", "--model", CLF, "--adversarial", f"{D}/adversarial", "--out", f"{D}/purifier"],
         ["pretrain-inpainter", "--model", CLF, "--data", f"{D}/dataset", "--adversarial", f"{D}/adversarial",
          "--out", f"{D}/atop/pretrain"],
         ["finetune-inpainter", "--model", CLF, "--data", f"{D}/dataset", "--adversarial", f"{D}/adversarial",
          "--pretrained", f"{D}/atop/pretrain", "--out", f"{D}/atop/finetune"],
         ["train-plain", "--data", f"{D}/dataset", "--out", f"{D}/controls/plain"],
         ["finetune-resize", "--data", f"{D}/dataset", "--plain", f"{D}/controls/plain", "--out", f"{D}/controls/resize"],
         ["train-sources", "--data", f"{D}/dataset", "--out", f"{D}/sources/models"],
         *(["craft-sources", "--models", f"{D}/sources/models", "--data", f"{D}/dataset", *threat,
            "--out", f"{D}/sources/crafted/{threat[-1] if threat else 'training'}"] for threat in ([], ["--threat", "l2"],
                                                                                                  ["--threat", "l1"])),
         *(["evaluate", "--defence", name, "--model", CLF, *(["--artifacts", *files] if files else []),
            "--data", f"{D}/dataset", "--adversarial", f"{D}/adversarial", "--sources", f"{D}/sources/crafted/training",
            "--out", f"{D}/eval/{name}"] for name, files in DEFENCES.items()),
         *(["evaluate", "--defence", name, "--threat", threat, "--model", CLF,
            *(["--artifacts", *DEFENCES[name]] if DEFENCES[name] else []), "--data", f"{D}/dataset",
            "--sources", f"{D}/sources/crafted/{threat}", "--out", f"{D}/threats/{threat}/{name}"]
           for name, threat in UNSEEN),
         ["report", "--root", D, "--out", f"{D}/report"]]


TRACER = Path(__file__).with_name("stage_tracer.py")


def run_traced(args: list[str], cwd: Path, trace: Path) -> subprocess.CompletedProcess:
    """`python -m carso ARGS`, recording in `trace` the modules, files and params keys it used (stage_tracer.py)."""
    return subprocess.run([sys.executable, str(TRACER), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=HANG_GUARD_S, env={**os.environ, "CARSO_TRACE": str(trace)})


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fetch -> train-classifier -> generate-adversarial -> train-purifier -> pretrain-inpainter ->
    finetune-inpainter -> evaluate (at, carso, atop_rt, atop, at_noise) -> report, each through `python -m carso`;
    traces/<i>.json records the carso modules, files and params keys step i really used."""
    root = tmp_path_factory.mktemp("chain")
    write_params(root / "params.yaml", load_tiny())
    (root / "traces").mkdir()
    for i, args in enumerate(STEPS):
        result = run_traced([args[0], "--dataset", "fashion_mnist", "--threads", "2", *args[1:]], root,
                            root / "traces" / f"{i}.json")
        assert result.returncode == 0, result.stderr[-3000:]
    return root / D


def test_every_module_a_stage_imports_is_declared_as_its_code(chain: Path) -> None:
    """What each stage really imported (sys.modules at its exit) must all be in the stage's declared
    code (carso.codedeps, hence the Snakemake inputs and DVC deps), the registry's by-name imports included."""
    folder = chain.parent.parent / "traces"
    for i, args in enumerate(STEPS):
        modules = json.loads((folder / f"{i}.json").read_text())["imports"]
        stage = args[0].replace("-", "_")
        defences = [args[args.index("--defence") + 1]] if stage == "evaluate" else list(DEFENCES)
        assert "carso.cli" in modules and "carso.params" in modules, stage
        assert set(modules) <= stage_modules(stage, defences), (stage, set(modules) - stage_modules(stage, defences))


# Read by stages without being a dependency: `datasets` (is --dataset one of them?) and `runtime.device` (where a
# stage runs, like --threads; each stage's metrics record the device, as they record the host).
NOT_DEPENDENCIES = {"datasets", "runtime.device"}


def _covered(item: str, declared: list[str], sep: str = ".") -> bool:
    """Is `item` (a dotted params key, or a path with sep "/") one of `declared` or inside one of them?"""
    return any(item == d or item.startswith(f"{d}{sep}") for d in declared)


def test_each_stage_declares_every_file_and_params_key_it_reads(chain: Path) -> None:
    """What each stage really read (files under data/ and params keys, traced while it ran on the tiny config) must
    be declared by its DVC stage in dvc.yaml (deps, params; its own output folders for resuming), which
    test_workflow.py holds equal to the Snakemake rule's inputs and settings."""
    from test_workflow import dvc_stages
    from conftest import REPO

    stages = dvc_stages(REPO)
    folder = chain.parent.parent / "traces"
    missing = {}
    for i, args in enumerate(STEPS):
        trace = json.loads((folder / f"{i}.json").read_text())
        stage = args[0].replace("-", "_")
        name = f"evaluate_{args[args.index('--defence') + 1]}" if stage == "evaluate" else stage
        if "--threat" in args:
            name += f"_under_{args[args.index('--threat') + 1]}"
        declared = stages[f"{name}@fashion_mnist"]
        files = [f for f in trace["reads"] if f.startswith("data/")]
        own = [str(Path(out).parent) for out in declared["outs"]]  # its resumable state (checkpoint, attack batches)
        undeclared_files = [f for f in files if not _covered(f, declared["deps"] + own, "/")]
        undeclared_keys = [k for k in trace["keys"] if k not in NOT_DEPENDENCIES and not _covered(k, declared["params"])]
        if undeclared_files or undeclared_keys:
            missing[name] = {"files": undeclared_files, "keys": undeclared_keys}
    assert not missing, missing


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


@pytest.mark.parametrize("defence", list(DEFENCES))
def test_evaluation_reports_every_attack_with_intervals(chain: Path, defence: str) -> None:
    m = json.loads((chain / "eval" / defence / "metrics.json").read_text())
    cfg = load_tiny()["evaluation"]["defences"][defence]
    runs = [f"pgd_{r['loss']}" + ("_surrogate" if r.get("surrogate") else "") for r in cfg["pgd"]]
    query = {"square": _query_runs("square", cfg["square"], m["randomised"]),
             **{f: _query_runs(f, cfg.get(f), m["randomised"]) for f in ("spsa", "hopskipjump")}}
    attacks = ["transfer", *SOURCE_ATTACKS, *(["autoattack"] if cfg["autoattack"]["enabled"] else []),
               *query["square"], *runs, *query["spsa"], *query["hopskipjump"]]
    assert list(m["attacks"]) == attacks  # every attack of the suite, in the order it ran
    alone = cfg["sanity"]["n_points"]  # each attack's own figure: on the subset that gets every attack
    capped = {name: min(alone, cfg[f]["n_points"]) for f in ("spsa", "hopskipjump") for name in query[f]}
    points = {name: capped.get(name, alone) for name in attacks}  # a query attack: on its own first n_points
    entries = {**m["attacks"], "robust_worst_case": m["robust_worst_case"], "clean_subset": m["clean_subset"]}
    draws, repeats = (cfg["verdict_draws"], cfg["verdict_repeats"]) if m["randomised"] else (1, 1)
    for key, e in entries.items():
        assert e["n"] == e["strict"]["n"] == points.get(key, cfg["n_points"])
        assert e["ci_low"] <= e["accuracy"] <= e["ci_high"] and e["draws"] == draws and e["strict"]["repeats"] == repeats
        if not m["randomised"]:  # one verdict per point: the headline and the strict rule coincide
            assert e["accuracy"] == e["strict"]["accuracy"] and (e["ci_low"], e["ci_high"]) == (
                e["strict"]["ci_low"], e["strict"]["ci_high"])
    head = json.loads((chain / "eval" / defence / "headline.json").read_text())  # DVC's metrics: the same figures
    both = lambda e, n: {"acc": round(e["accuracy"], 4), "strict": round(e["strict"]["accuracy"], 4), "n": n}  # noqa: E731
    assert head == {"clean": {"acc": round(m["clean"]["accuracy"], 4), "n": m["clean"]["n"]},
                    "clean_attacked": both(m["clean_subset"], cfg["n_points"]),
                    "worst_case": both(m["robust_worst_case"], cfg["n_points"]),
                    "alone": {k: both(m["attacks"][k], points[k]) for k in attacks if k not in SOURCE_ATTACKS},
                    "sources": both(m["sources"], alone), "verdict_draws": draws, "verdict_repeats": repeats}
    family = [m["attacks"][k] for k in SOURCE_ATTACKS]  # each names its source; the family: per point the strongest
    assert all(a["kind"] == "source" and a["title"].startswith(f"transfer from {a['source']} (cnn_v1, ") for a in family)
    assert m["sources"]["attacks"] == SOURCE_ATTACKS and m["sources"]["sources"] == ["adv", "std"]
    if not m["randomised"]:  # (a randomised defence's pick and estimate use different draws)
        assert m["sources"]["accuracy"] <= min(a["accuracy"] for a in family) + 1e-9
    assert m["clean"]["n"] == 100 and m["precision"] == "fp32" and m["norm"] == "Linf"
    robust, _ = load_tensors(chain / "eval" / defence / "examples.safetensors")
    worst, expected = robust["robust_worst_case"].bool(), robust["robust_expected"].double()
    strict = m["robust_worst_case"]["strict"]
    assert worst.sum().item() == strict["correct"] == m["cascade"][-1]["strict"]["correct"]
    assert abs(expected.mean().item() - m["robust_worst_case"]["accuracy"]) < 1e-9
    uncapped = [a for name, a in m["attacks"].items() if name not in capped]
    assert worst[:alone].double().mean().item() <= min(a["strict"]["accuracy"] for a in uncapped) + 1e-9
    for name, n in capped.items():  # on its own points, the worst case is at most what the query attack left
        assert worst[:n].double().mean().item() <= m["attacks"][name]["strict"]["accuracy"] + 1e-9
    assert sum(m["strongest_per_point"].values()) == cfg["n_points"]
    assert [s["picked_points"] for s in m["cascade"]] == [m["strongest_per_point"][s["attack"]] for s in m["cascade"]]
    eot_single = ["eot_single"] if m["randomised"] and max(r["eot"] for r in cfg["pgd"]) > 1 else []
    assert [s["attack"] for s in m["cascade"]] == attacks + ["more_steps", "fgsm", *eot_single]
    assert m["sanity"]["fgsm"]["n"] == alone and ("eot_single" in m["sanity"]) == bool(eot_single)
    kinds = {(i["indicator"], i["attack"]) for i in m["indicators"]}  # every indicator, for every run it concerns
    assert {("zero_gradient", loss) for loss in ("ce", "dlr", "cw")} | {("fgsm_beats_pgd", "fgsm")} <= kinds
    assert {("silent_success", name) for name in runs} <= kinds
    assert all(isinstance(i["fired"], bool) and i["text"] for i in m["indicators"])
    for check in ("base_steps", "more_steps"):
        assert m["sanity"][check]["n"] == cfg["sanity"]["n_points"] and m["sanity"][check]["run"] == m["strongest_pgd"]
    own_losses = {r["loss"] for r in cfg["pgd"] if not r.get("surrogate")}
    assert set(m["sanity"]["large_eps"]) == own_losses and {e["n"] for e in m["sanity"]["large_eps"].values()} == {alone}
    steps = next(r["steps"] for r, name in zip(cfg["pgd"], runs) if name == m["strongest_pgd"])
    assert m["sanity"]["more_steps"]["steps"] == cfg["sanity"]["more_steps_factor"] * steps
    no_loss_reaches_zero = min(e["accuracy"] for e in m["sanity"]["large_eps"].values()) > 0.10
    assert no_loss_reaches_zero == any("no attack loss brought accuracy near 0" in line for line in m["gradient_masking"])
    assert set(m["gradients"]) == {"ce", "dlr", "cw"}  # each loss, on the subset's clean-correct points
    for grads in m["gradients"].values():
        assert 0 < grads["clean"]["points"] == grads["pgd_final"]["points"] <= alone
        for key in ("zero_gradient_share", "zero_loss_share", "nonfinite_share"):
            assert 0 <= grads["clean"][key] <= 1 and 0 <= grads["pgd_final"][key] <= 1
    assert not (chain / "eval" / defence / "work").exists()  # resumable state is cleared once complete


@pytest.mark.parametrize("pair", UNSEEN, ids=lambda p: f"{p[0]}-{p[1]}")
def test_unseen_threats_attack_in_their_own_ball_with_the_derived_suite(chain: Path, pair: tuple[str, str]) -> None:
    """A defence under an unseen threat: its own norm and radius, the suite unseen_section derives from the defence's
    section (no transfer, no query attack), every adversarial point inside that ball and in [0, 1], the masking
    checks at the threat's large radius, and the same per-point outcomes as under the training threat's files."""
    from carso.evaluation import Threat, unseen_section

    name, threat = pair
    params = load_tiny()
    t = params["evaluation"]["threats"][threat]
    cfg = unseen_section(params["evaluation"]["defences"][name], t)
    folder = chain / "threats" / threat / name
    m = json.loads((folder / "metrics.json").read_text())
    assert (m["threat"], m["norm"], m["eps"], m["precision"]) == (threat, t["norm"], t["eps"], "fp32")
    runs = [f"pgd_{r['loss']}" for r in cfg["pgd"]]
    square = [k for k in m["attacks"] if k.startswith("square")]  # (one run per k of the k-draw view)
    assert bool(square) == cfg["square"]["enabled"]
    first = [*(["autoattack"] if cfg["autoattack"]["enabled"] else []), *square]
    assert list(m["attacks"]) == [*SOURCE_ATTACKS, *([*runs, *first] if t["pgd_first"] else [*first, *runs])]  # the order
    # they ran in (the unseen sources' transfers first, crafted in this threat's ball)
    assert all(a["steps"] <= t["pgd_steps"] for a in m["attacks"].values() if a["kind"] == "pgd")
    assert m["sanity"]["fgsm"]["n"] == min(t["sanity_points"], cfg["n_points"]) == cfg["sanity"]["n_points"]
    assert m["robust_worst_case"]["n"] == cfg["n_points"] == min(t["n_points"], params["evaluation"]["defences"][name]["n_points"])
    assert all(e["eps"] == t["large_eps"] for e in m["sanity"]["large_eps"].values())
    assert all(a["step_size"] == pytest.approx(2.5 * t["eps"] / a["steps"]) for a in m["attacks"].values()
               if a["kind"] == "pgd")
    tensors, _ = load_tensors(folder / "examples.safetensors")
    ball = Threat(t["norm"], t["eps"])
    assert ball.contains(tensors["adversarial"], tensors["clean"]).all()
    assert len(tensors["robust_expected"]) == cfg["n_points"]
    head = json.loads((folder / "headline.json").read_text())
    assert head["worst_case"]["n"] == cfg["n_points"] and set(head["alone"]) == set(m["attacks"]) - {*SOURCE_ATTACKS}
    assert head["sources"]["n"] == m["sources"]["n"] == cfg["sanity"]["n_points"]  # the sources as one family
    assert not (folder / "work").exists()


def test_the_report_has_the_generalisation_table_with_the_metrics_figures(chain: Path) -> None:
    """Rows the defences, columns the training threat and each unseen threat (each figure the metrics file's, the
    paired difference against `at` recomputed), and a sentence per defence and threat on whether it generalises."""
    from carso.report import point_outcomes
    from carso.stats import paired_outcomes
    from report_reader import md_sections

    sections = md_sections((chain / "report" / "report.md").read_text())
    (table,) = sections["Generalisation: threats and attack families the defences were not trained for"]["tables"]
    header, rows = table[0], {row[0].strip("`"): row for row in table[1:]}
    assert header[1].startswith("training threat (L-inf eps 0.1)")
    assert header[2].startswith("unseen: L2 eps 1.5 (l2)") and header[3].startswith("unseen: L1 eps 7.5 (l1)")
    assert list(rows) == list(DEFENCES)
    for col, threat in ((2, "l2"), (3, "l1")):
        for name in DEFENCES:
            cell = rows[name][col]
            if (name, threat) not in UNSEEN:
                assert cell == "not evaluated"
                continue
            m = json.loads((chain / "threats" / threat / name / "metrics.json").read_text())
            assert _agrees(figures(cell)[0], m["robust_worst_case"])
            if name != "at":
                folders = [chain / "threats" / threat / n for n in (name, "at")]
                d = paired_outcomes(*(point_outcomes(f / "examples.safetensors") for f in folders),
                                    m["robust_worst_case"]["confidence"])
                assert f"vs at {100 * d['difference']:+.1f}" in cell.replace("`", "")
    assert header[-1] == "transfer from unseen models, strongest per point (training threat)"
    evals = {n: json.loads((chain / "eval" / n / "metrics.json").read_text()) for n in DEFENCES}
    for name, m in evals.items():  # the sources as one family, paired against at on the shared first points
        assert _agrees(figures(rows[name][-1])[0], m["sources"])
        if name != "at":
            d = paired_outcomes(*((evals[n]["sources"]["per_point"]["expected"], evals[n]["sources"]["per_point"]["strict"])
                                  for n in (name, "at")), m["sources"]["confidence"])
            assert f"vs at {100 * d['difference']:+.1f}" in rows[name][-1].replace("`", "")
    sentences = sections["What the unseen threats show"]["items"]
    assert any(s.replace("`", "").startswith("atop against at under L2 eps 1.5 (l2, not trained for)")
               for s in sentences), sentences


def _query_runs(family: str, section: dict | None, randomised: bool) -> list[str]:
    """The attacks a query family runs: one per k of its draws on a randomised defence (`<family>_k<k>` for k > 1),
    k = 1 only on a deterministic one; none when it is absent or disabled."""
    if not section or not section["enabled"]:
        return []
    ks = sorted(set(section.get("draws", [1]))) if randomised else [1]
    return [family if k == 1 else f"{family}_k{k}" for k in ks]


def test_query_attacks_run_through_the_k_draw_view_on_the_tiny_run(chain: Path) -> None:
    """`at` gets SPSA and HopSkipJump (one draw per query: it is deterministic); the randomised `at_noise` gets Square
    with one draw and with the mean of 4 per query, and SPSA with the mean of 4, each judged with the judge's fresh
    draws."""
    at = json.loads((chain / "eval" / "at" / "metrics.json").read_text())
    noisy = json.loads((chain / "eval" / "at_noise" / "metrics.json").read_text())
    assert {"spsa", "hopskipjump"} <= set(at["attacks"]) and at["attacks"]["hopskipjump"]["kind"] == "hopskipjump"
    assert {"square", "square_k4", "spsa_k4"} <= set(noisy["attacks"]) and "spsa" not in noisy["attacks"]
    assert noisy["attacks"]["square_k4"]["query_draws"] == 4 and noisy["attacks"]["spsa_k4"]["query_draws"] == 4
    assert noisy["attacks"]["square"]["query_draws"] == 1 and noisy["attacks"]["spsa_k4"]["n"] == 5
    assert noisy["attacks"]["spsa_k4"]["draws"] == noisy["verdict_draws"]  # judged with the judge's fresh draws
    assert "4 draws per query" in noisy["attacks"]["square_k4"]["title"]


@pytest.mark.parametrize("defence", ["carso", "atop_rt", "atop"])
def test_purifier_defences_are_randomised_and_attacked_with_eot(chain: Path, defence: str) -> None:
    at = json.loads((chain / "eval" / "at" / "metrics.json").read_text())
    m = json.loads((chain / "eval" / defence / "metrics.json").read_text())
    cfg = load_tiny()["evaluation"]["defences"][defence]
    assert at["randomised"] is False and at["verdict_repeats"] == at["verdict_draws"] == 1
    assert at["attacks"]["autoattack"]["version"] == "standard"
    assert m["randomised"] is True and (m["verdict_repeats"], m["verdict_draws"]) == (cfg["verdict_repeats"],
                                                                                      cfg["verdict_draws"])
    for run in (a for a in m["attacks"].values() if a["kind"] == "pgd"):
        assert run["eot"] == cfg["pgd"][0]["eot"] and run["step_size"] == pytest.approx(0.007 * 0.1 / (8 / 255))
    assert {"pgd_dlr", "pgd_ce"} <= set(m["attacks"])  # cross-entropy and a margin loss by default
    aa = m["attacks"].get("autoattack")
    assert (aa is not None and aa["version"] == "rand" and aa["order"] == ["apgd-dlr", "apgd-ce"]) == \
        cfg["autoattack"]["enabled"]


def test_examples_hold_reconstructions_and_per_point_verdicts(chain: Path) -> None:
    tensors, _ = load_tensors(chain / "eval" / "carso" / "examples.safetensors")
    n_samples = load_tiny()["carso"]["n_samples"]
    assert tensors["recon_clean"].shape[1:] == (n_samples, 1, 28, 28)
    assert tensors["recon_adversarial_pred"].shape == (len(tensors["labels"]), n_samples)
    assert len(tensors["robust_worst_case"]) == load_tiny()["evaluation"]["defences"]["carso"]["n_points"]
    at, _ = load_tensors(chain / "eval" / "at" / "examples.safetensors")
    assert "recon_clean" not in at and len(at["robust_worst_case"]) == 20
    for name in ("atop_rt", "atop"):  # the transformed inputs and the purified image, with the classifier's labels
        atop, _ = load_tensors(chain / "eval" / name / "examples.safetensors")
        k = len(atop["labels"])
        assert atop["transformed_adversarial"].shape == (k, 1, 1, 28, 28)
        assert atop["purified_clean"].shape == (k, 1, 1, 28, 28) and atop["purified_clean_pred"].shape == (k, 1)
        assert (atop["transformed_clean"] == 0.5).float().mean() >= 12 / 49  # mid-grey masked blocks


def test_purifier_stage_writes_model_curve_and_metrics(chain: Path) -> None:
    tiny = load_tiny()["purifier"]
    curve = (chain / "purifier" / "curve.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,") and len(curve) == 1 + tiny["epochs"]
    metrics = json.loads((chain / "purifier" / "train_metrics.json").read_text())
    assert metrics["layers"] == ["conv1", "conv2"] and metrics["monitor_points"] == tiny["monitor_points"]
    assert 0.0 <= metrics["final_recon_adv_acc"] <= 1.0


def test_atop_stages_write_inpainters_curves_and_metrics(chain: Path) -> None:
    tiny = load_tiny()["atop"]
    for stage in ("pretrain", "finetune"):
        curve = (chain / "atop" / stage / "curve.csv").read_text().splitlines()
        assert curve[0].startswith("epoch,l1_coarse,l1_refined,d_loss,g_loss,ce,") and len(curve) == 1 + tiny[stage]["epochs"]
        metrics = json.loads((chain / "atop" / stage / "train_metrics.json").read_text())
        assert metrics["epochs"] == tiny[stage]["epochs"] and metrics["train_points"] == tiny[stage]["train_points"]
        assert metrics["precision"] in ("fp32", "bf16") and metrics["final_images_per_second"] > 0
    ce = [float(line.split(",")[5]) for line in (chain / "atop" / "finetune" / "curve.csv").read_text().splitlines()[1:]]
    assert ce[0] == 0 and ce[1] > 0  # the CE term starts at ce_from_epoch (2 in the tiny config)
    assert (chain / "atop" / "pretrain" / "discriminator.safetensors").exists()
    _, meta = load_tensors(chain / "atop" / "finetune" / "inpainter.safetensors")
    assert meta["stage"] == "finetune_inpainter" and meta["transform"]["kind"] == "rt2" and meta["classifier_sha256"]


def test_report_is_self_contained_and_shows_measured_numbers(chain: Path) -> None:
    html = (chain / "report" / "report.html").read_text()
    m = json.loads((chain / "eval" / "at" / "metrics.json").read_text())
    assert "data:image/png;base64," in html and "<table>" in html
    assert f"{100 * m['clean']['accuracy']:.2f}%" in html
    assert f"(n={m['attacks']['autoattack']['n']})" in html
    for name in DEFENCES:  # every attack of every defence has its row, with the figure the metrics hold
        for a in json.loads((chain / "eval" / name / "metrics.json").read_text())["attacks"].values():
            row = f"<td>{name}</td><td>{html_escape(a['title'])}</td><td>{a['kind']}</td><td>{100 * a['accuracy']:.2f}%"
            assert row in html, row
    md = (chain / "report" / "report.md").read_text()
    assert "| defence |" in md and (chain / "report" / "figures" / "training_curves.png").stat().st_size > 1000
    figures = ["headline", "purifier_curves", "inpainter_curves", *(f"examples_{name}" for name in DEFENCES)]
    for figure in figures:
        assert (chain / "report" / "figures" / f"{figure}.png").stat().st_size > 1000 and f"figures/{figure}.png" in md
    assert "`carso` (classifier + CARSO purifier)" in md and "the classifier alone on this run" in md
    for name in DEFENCES:
        assert f"| `{name}` (" in md
    assert md.count("It gives no figure for Fashion-MNIST at L-inf eps 0.1, this run's setting.") == 2  # both papers
    for pair in (("AToP", "the classifier alone"), ("AToP", "AToP without fine-tuning"), ("AToP", "CARSO")):
        assert re.search(rf"{pair[0]} (beat|did worse than|did not measurably beat) {pair[1]} on this run", md), pair


@pytest.fixture(scope="module")
def rendered_report(chain: Path) -> Rendered:
    """The report as Chromium renders it; its screenshot is kept in test-artifacts/."""
    return render(chain / "report" / "report.html", ARTIFACTS / "report.png")


def test_the_report_renders_in_a_browser_without_errors(chain: Path, rendered_report: Rendered) -> None:
    assert rendered_report.console == []  # no console error or warning, no uncaught script error
    html = (chain / "report" / "report.html").read_text()
    assert len(rendered_report.images) == html.count("<img ") >= 2 + len(DEFENCES)  # curves, one examples figure each
    assert all(image["ok"] for image in rendered_report.images), rendered_report.images  # every image decodes
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000

def test_the_report_opens_with_its_results_then_at_most_five_sentences(chain: Path, rendered_report: Rendered) -> None:
    """The first screen (1280 x 900 in Chromium) holds the results table: each defence's clean and headline figures
    (the metrics files'), the paired difference against `at` (recomputed) and its flags; then at most five sentences,
    the controls' first, the command that reproduces the run last."""
    from carso.report import _p, _pct, paired, point_outcomes

    assert list(rendered_report.sections)[:3] == ["Results", "In short", "Details"]
    assert rendered_report.first_table is not None and rendered_report.first_table["bottom"] <= 900
    (table,) = rendered_report.sections["Results"]["tables"]
    metrics = {n: json.loads((chain / "eval" / n / "metrics.json").read_text()) for n in DEFENCES}
    outcomes = {n: point_outcomes(chain / "eval" / n / "examples.safetensors") for n in DEFENCES}
    assert [row[0] for row in table[1:]] == list(DEFENCES)
    for name, clean, robust, versus, flags in table[1:]:
        assert (clean, robust) == (_pct(metrics[name]["clean_subset"]), _pct(metrics[name]["robust_worst_case"]))
        d = paired(name, "at", metrics, outcomes) if name != "at" else None
        assert versus == ("" if d is None else f"{100 * d['difference']:+.1f} points [{100 * d['ci_low']:+.1f}, "
                                               f"{100 * d['ci_high']:+.1f}] (n={d['n']}, {_p(d['p_value'])})")
        fired = [i for i in metrics[name].get("indicators", []) if i["fired"] and i["severity"] == "failure"]
        assert (flags == "none") == (not fired and not metrics[name]["gradient_masking"]
                                     and not name.startswith("ctl_"))
    short = rendered_report.sections["In short"]["items"]
    assert 3 <= len(short) <= 5
    assert short[0].startswith(("The protocol broke all 3 positive controls", "EVALUATION FAILED"))
    assert short[-1] == "Reproduce: bash run.sh pipeline (settings: params.yaml, below)."


def test_a_variant_is_evaluated_with_its_own_settings(chain: Path) -> None:
    """carso_zero (z = 0: every reconstruction equal) loads carso's purifier through its `set`: AutoAttack's
    randomness check finds it deterministic where carso is randomised, and its metrics name the variant."""
    params = load_tiny()
    section = params["evaluation"]["defences"]["carso"]
    params["evaluation"]["defences"]["carso_zero"] = {**section, "variant_of": "carso", "set": {"carso.latent": "zero"},
                                                      "pgd": section["pgd"][:1], "square": {**section["square"],
                                                                                            "enabled": False}}
    write_params(chain.parent.parent / "variant.yaml", params)
    out = f"{D}/eval/carso_zero"
    result = run_cli(["evaluate", "--params", "variant.yaml", "--dataset", "fashion_mnist", "--defence", "carso_zero",
                      "--model", CLF, "--artifacts", *DEFENCES["carso"], "--data", f"{D}/dataset", "--adversarial",
                      f"{D}/adversarial", "--sources", f"{D}/sources/crafted/training", "--out", out],
                     cwd=chain.parent.parent)
    assert result.returncode == 0, result.stderr
    zero, carso = (json.loads((chain / "eval" / n / "metrics.json").read_text()) for n in ("carso_zero", "carso"))
    assert (zero["defence"], zero["variant_of"], zero["set"]) == ("carso_zero", "carso", {"carso.latent": "zero"})
    assert zero["randomised"] is False and carso["randomised"] is True


def test_report_names_the_command_that_reproduces_it(chain: Path) -> None:
    assert "Reproduce: `bash run.sh pipeline` (settings: params.yaml, below)." in (chain / "report" / "report.md").read_text()


def test_report_fails_clearly_without_inputs(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml", load_tiny())
    result = run_cli(["report", "--dataset", "fashion_mnist", "--root", "data/none", "--out", "r"], cwd=tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_evaluation_uses_fp32_even_if_training_used_bf16(chain: Path) -> None:
    tensors, _ = load_tensors(chain / "classifier" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize("defence", ["carso", "atop"])
def test_evaluation_without_the_trained_files_says_what_to_pass(chain: Path, defence: str) -> None:
    root = chain.parent.parent
    result = run_cli(["evaluate", "--dataset", "fashion_mnist", "--defence", defence, "--model", CLF,
                      "--data", f"{D}/dataset", "--adversarial", f"{D}/adversarial", "--out", "elsewhere"], cwd=root)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--artifacts {DEFENCES[defence][0]}" in result.stderr
    assert not (root / "elsewhere" / "metrics.json").exists()


def _agrees(shown: dict[str, float], entry: dict[str, Any]) -> bool:
    """A figure as printed (accuracy to 0.01 points, interval to 0.1) is the metrics entry's, rounded."""
    return (shown["n"] == entry["n"] and abs(shown["accuracy"] - entry["accuracy"]) <= 5e-5 + 1e-9
            and abs(shown["ci_low"] - entry["ci_low"]) <= 5e-4 + 1e-9
            and abs(shown["ci_high"] - entry["ci_high"]) <= 5e-4 + 1e-9)


def _one(cell: str) -> dict[str, float]:
    (shown,) = figures(cell)
    return shown


@pytest.mark.parametrize("kind", ["html", "md", "browser"])
def test_every_number_of_the_report_is_the_metrics_files(chain: Path, kind: str, request: pytest.FixtureRequest) -> None:
    """Results, each attack alone, the cascade and the masking checks, read from the HTML source, the Markdown and
    the page as Chromium renders it, against metrics.json of every defence; the comparison sentences against paired
    differences recomputed from the per-point verdicts; the interval level printed is the configured one (tests/tiny:
    90%)."""
    if kind == "browser":
        sections = request.getfixturevalue("rendered_report").sections
    else:
        page = (chain / "report" / f"report.{kind}").read_text()
        sections = html_sections(page) if kind == "html" else md_sections(page)
    conf = load_tiny()["evaluation"]["confidence"]
    metrics = {n: json.loads((chain / "eval" / n / "metrics.json").read_text()) for n in DEFENCES}
    assert conf != 0.95 and all(m["robust_worst_case"]["confidence"] == conf for m in metrics.values())
    (results,) = sections[f"Robust accuracy ({100 * conf:g}% Wilson intervals, fp32 attacks)"]["tables"]
    assert [row[0].split(" ")[0] for row in results[1:]] == list(DEFENCES)
    for row in results[1:]:
        m = metrics[row[0].split(" ")[0]]
        strongest = min(a["accuracy"] for a in m["attacks"].values() if not a.get("surrogate"))
        assert _agrees(_one(row[2]), m["clean"]) and _agrees(_one(row[3]), m["clean_subset"])
        assert _agrees(_one(row[5]), m["robust_worst_case"]) and abs(_one(row[4])["accuracy"] - strongest) <= 5e-5
        assert _agrees(_one(row[6]), m["robust_worst_case"]["strict"])
    (rules,) = sections["The headline and the strict bound"]["tables"]
    assert [row[0] for row in rules[1:]] == list(DEFENCES)
    for name, randomised, draws, clean, clean_strict, worst, worst_strict, gap in rules[1:]:
        m = metrics[name]
        assert randomised == ("yes" if m["randomised"] else "no")
        assert draws == f"{m['verdict_draws']} + {m['verdict_draws']} / {m['verdict_repeats']}"
        for cell, entry in ((clean, m["clean_subset"]), (clean_strict, m["clean_subset"]["strict"]),
                            (worst, m["robust_worst_case"]), (worst_strict, m["robust_worst_case"]["strict"])):
            assert _agrees(_one(cell), entry)
        w = m["robust_worst_case"]
        assert gap == f"{100 * (w['strict']['accuracy'] - w['accuracy']):+.1f} points"
    (alone,) = sections["Each attack alone (on the same first points)"]["tables"]
    assert len(alone) - 1 == sum(len(m["attacks"]) for m in metrics.values())
    for defence, title, kind_, figure, strict, _ in alone[1:]:
        (entry,) = [a for a in metrics[defence]["attacks"].values() if a["title"] == title]
        assert entry["kind"] == kind_ and _agrees(_one(figure), entry) and _agrees(_one(strict), entry["strict"])
    (cascade,) = sections["Attack cascade (cumulative)"]["tables"]
    shown = [(row[0], row[1], int(row[2]), int(row[3]), _one(row[5]), _one(row[6])) for row in cascade[1:]]
    steps = [(n, s["attack"], s["attacked_points"], s["picked_points"], s) for n, m in metrics.items()
             for s in m["cascade"]]
    assert [r[:4] for r in shown] == [s[:4] for s in steps]
    assert all(_agrees(a[4], b[4]) and _agrees(a[5], b[4]["strict"]) for a, b in zip(shown, steps))
    (checks,) = sections["Gradient-masking checks (alone, on the same first points)"]["tables"]
    for defence, base, more, large, masking in checks[1:]:
        sanity = metrics[defence]["sanity"]
        assert _agrees(_one(base), sanity["base_steps"]) and _agrees(_one(more), sanity["more_steps"])
        assert all(_agrees(a, b) for a, b in zip(figures(large), sanity["large_eps"].values(), strict=True))
        assert (masking == "none seen") == (not metrics[defence]["gradient_masking"])
    _check_comparisons(chain, sections["Details"]["items"], conf)


def _check_comparisons(chain: Path, sentences: list[str], conf: float) -> None:
    """Each comparison sentence's figures and verdict, recomputed from the two defences' per-point outcomes on the
    headline (paired interval, sign-flip test), and the negative control's sentence."""
    from carso.defences import DEFENCES as REGISTRY
    from carso.report import point_outcomes
    from carso.stats import paired_expected, paired_verdicts

    names = {spec.label: name for name, spec in REGISTRY.items()}
    outcomes = {n: point_outcomes(chain / "eval" / n / "examples.safetensors") for n in DEFENCES}
    found = [m for s in sentences if (m := COMPARISON.match(s))]
    assert {(names[m["a"]], names[m["b"]]) for m in found} == {
        (n, other) for n in DEFENCES for other in REGISTRY[n].compare_with}
    for m in found:
        (a, sa), (b, sb), n = outcomes[names[m["a"]]], outcomes[names[m["b"]]], int(m["n"])
        assert n == min(len(a), len(b)) and float(m["level"]) == pytest.approx(100 * conf)
        d = paired_expected(a[:n], b[:n], conf)
        for key in ("d", "lo", "hi"):
            value = {"d": d["difference"], "lo": d["ci_low"], "hi": d["ci_high"]}[key]
            assert abs(float(m[key]) - 100 * value) <= 0.05 + 1e-9, (m[0], key)
        for shown, values in ((m["acc_a"], a[:n]), (m["acc_b"], b[:n])):  # printed to 2 decimals
            assert abs(float(shown) - 100 * sum(values) / n) <= 5e-3 + 1e-9
        assert (int(m["more_a"]), int(m["more_b"])) == (d["more_first"], d["more_second"])
        expected = ("did not measurably beat" if d["verdict"] != "real" or d["difference"] == 0 else
                    "beat" if d["difference"] > 0 else "did worse than")
        assert m["verdict"] == expected
        strict = paired_verdicts(sa[:n], sb[:n], conf)
        says = ("did not measurably beat" if strict["verdict"] != "real" or strict["difference"] == 0 else
                "beat" if strict["difference"] > 0 else "did worse than")
        assert (m["strict"] is None) == (says == expected), m[0]  # the strict rule is named where it disagrees
    (control,) = [s for s in sentences if s.startswith("Negative control")]
    d = paired_expected(outcomes["at_noise"][0][:20], outcomes["at"][0][:20], conf)
    assert control.startswith("Negative control passed" if d["verdict"] != "real" else "Negative control FAILED")
    assert f"difference {100 * d['difference']:+.1f} points" in control


def test_the_negative_control_has_the_headline_of_at_on_the_tiny_run(chain: Path) -> None:
    """`at_noise` is `at` with harmless noise on its logits: on the same first points its headline equals `at`'s
    (the headline's paired test finds no difference and the difference's interval holds 0), its clean accuracy is
    within a point of `at`'s, and the report says the control passed."""
    from carso.report import point_outcomes
    from carso.stats import paired_expected

    m = {n: json.loads((chain / "eval" / n / "metrics.json").read_text()) for n in ("at", "at_noise")}
    n = m["at_noise"]["robust_worst_case"]["n"]
    noisy, _ = point_outcomes(chain / "eval" / "at_noise" / "examples.safetensors")
    at, _ = point_outcomes(chain / "eval" / "at" / "examples.safetensors")
    d = paired_expected(noisy, at[:n], 0.9)
    assert m["at_noise"]["randomised"] and not m["at"]["randomised"]
    assert d["verdict"] == "within noise" and d["ci_low"] <= 0 <= d["ci_high"]
    assert abs(m["at_noise"]["clean"]["accuracy"] - m["at"]["clean"]["accuracy"]) <= 0.01 + 1e-9
    summary = md_sections((chain / "report" / "report.md").read_text())["Details"]["items"]
    assert summary[1].startswith("Negative control passed: the classifier alone with noisy logits")


def test_the_reports_first_sentence_says_whether_the_protocol_broke_each_positive_control(chain: Path) -> None:
    """The tiny run evaluates the positive controls: the report's first sentence names every one, and says the
    evaluation failed exactly when one of them ends more than 5 points above `plain` on the same points (the paired
    difference recomputed from the per-point outcomes); each control's naive figure is in its metrics."""
    from carso.report import CONTROL_MARGIN, point_outcomes
    from carso.stats import paired_expected

    summary = md_sections((chain / "report" / "report.md").read_text())["Details"]["items"]
    base, _ = point_outcomes(chain / "eval" / "plain" / "examples.safetensors")
    standing = []
    for name in ("ctl_scaled", "ctl_quant", "ctl_resize"):
        m = json.loads((chain / "eval" / name / "metrics.json").read_text())
        assert m["naive"]["n"] > 0 and f"{name} " in summary[0]  # (the reader drops the backticks)
        mine, _ = point_outcomes(chain / "eval" / name / "examples.safetensors")
        n = min(len(mine), len(base))
        d = paired_expected(mine[:n], base[:n], 0.9)
        assert f"{name} {100 * m['robust_worst_case']['accuracy']:.1f}%" in summary[0]
        if d["difference"] > CONTROL_MARGIN:
            standing.append(name)
    assert summary[0].startswith("EVALUATION FAILED" if standing else "The protocol broke every positive control")
    assert all(name in summary[0].split(":")[0] for name in standing)


def test_compare_says_which_differences_between_two_runs_are_real(chain: Path) -> None:
    """Two runs that differ in one evaluation key (`at` attacked on 10 points instead of 20, under its own
    output_root; the other defences' results are what their unchanged settings give): `carso compare` lists that key
    alone, puts each defence's figures side by side, pairs the worst-case outcomes on the points both attacked (the
    headline's test and the strict rule's, recomputed here), and its page renders in a browser without errors."""
    from carso.stats import paired_outcomes as paired_test
    from carso.report import point_outcomes

    project = chain.parent.parent
    params = load_tiny()
    params["output_root"] = "runs/fewer"
    params["evaluation"]["defences"]["at"]["n_points"] = 10
    write_params(project / "fewer.yaml", params)
    fewer = project / "runs" / "fewer" / D
    for part in ("dataset", "classifier", "adversarial", "purifier", "atop", "eval", "sources"):
        shutil.copytree(chain / part, fewer / part, dirs_exist_ok=True)
    shutil.rmtree(fewer / "eval" / "at")
    step = next(s for s in STEPS if s[:3] == ["evaluate", "--defence", "at"])
    result = run_cli([step[0], "--params", "fewer.yaml", "--dataset", "fashion_mnist",
                      *[a.replace(D, f"runs/fewer/{D}") for a in step[1:]]], cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(["compare", "params.yaml", "fewer.yaml", "--dataset", "fashion_mnist", "--out", "cmp"], cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]

    rendered = render(project / "cmp" / "compare.html", ARTIFACTS / "compare.png")
    assert rendered.console == [] and rendered.images == []
    for sections in (rendered.sections, md_sections((project / "cmp" / "compare.md").read_text())):
        (differences,) = sections["Parameter differences"]["tables"]
        assert differences == [["key", "params.yaml", "fewer.yaml"], ["evaluation.defences.at.n_points", "20", "10"]]
        (side,) = [s["tables"][0] for h, s in sections.items() if h.startswith("Results side by side (90% Wilson")]
        (tests,) = sections["Paired tests of the worst case (same first points)"]["tables"]
        assert [row[:2] for row in side[1:]] == [[d, r] for d in DEFENCES for r in ("params.yaml", "fewer.yaml")]
        assert [row[0] for row in tests[1:]] == list(DEFENCES)
        for first, second, test_row in zip(side[1::2], side[2::2], tests[1:]):
            name = first[0]
            before = json.loads((chain / "eval" / name / "metrics.json").read_text())
            after = json.loads((fewer / "eval" / name / "metrics.json").read_text())
            assert _agrees(_one(first[2]), before["clean"]) and _agrees(_one(first[3]), before["robust_worst_case"])
            assert _agrees(_one(second[2]), after["clean"]) and _agrees(_one(second[3]), after["robust_worst_case"])
            assert _agrees(_one(first[4]), before["robust_worst_case"]["strict"])
            a, b = (point_outcomes(r / "eval" / name / "examples.safetensors") for r in (chain, fewer))
            n = min(len(a[0]), len(b[0]))
            assert int(test_row[3]) == n == (10 if name == "at" else len(a[0]))
            t = paired_test(a, b, 0.9)
            assert test_row[6] == f"{t['more_first']} / {t['more_second']}" and test_row[8] == t["verdict"]
            strict = t["strict"]
            assert test_row[9] == f"{100 * strict['difference']:+.1f}, p {strict['p_value']:.3g}, {strict['verdict']}"
            if name != "at":  # unchanged settings: the same verdicts, no difference
                assert (test_row[6], test_row[8]) == ("0 / 0", "within noise")
    assert (ARTIFACTS / "compare.png").stat().st_size > 5_000


def test_compare_names_the_run_that_has_not_finished(chain: Path) -> None:
    project = chain.parent.parent
    params = load_tiny()
    params["output_root"] = "runs/never"
    write_params(project / "never.yaml", params)
    result = run_cli(["compare", "params.yaml", "never.yaml", "--dataset", "fashion_mnist", "--out", "cmp2"],
                     cwd=project)
    assert result.returncode == 2 and not (project / "cmp2").exists()
    assert "never.yaml: no results for defence 'at' in runs/never/data/fashion_mnist/eval/at; run " \
           "`snakemake --cores all --config params_file=never.yaml` first." in result.stderr
