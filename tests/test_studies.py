"""Studies (carso/study.py, workflow/rules/study.smk): every shipped study's DAG reuses exactly the stages that no
changed key reaches, a bad study file is one sentence, and a real study of the tiny configuration trains nothing
again and writes a comparison page that opens in a browser and holds the variants' numbers."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from browser import render
from conftest import ARTIFACTS, HANG_GUARD_S, LOCAL_CORES, REPO, load_tiny, make_project, run_tool, sh, write_params
from report_reader import md_sections

STUDIES = sorted(p.stem for p in (REPO / "studies").glob("*.yaml"))

# Jobs per rule of each shipped study on the tiny configuration (which has the default's structure and values at
# the axes: carso.n_samples 4, peel, every conv layer, rt2, eps 0.1 with pgd_strong and fine-tuning at 0.1), counted
# by hand from which stage reads which key. A variant equal to the base on every key is the base run itself.
SHARED = {"fetch": 1, "train_classifier": 1, "generate_adversarial": 1, "train_plain": 1, "finetune_resize": 1,
          "train_sources": 1, "compare_study": 1}
EXPECTED = {  # every study evaluates the base's controls (at_noise, plain, ctl_scaled, ctl_quant, ctl_resize) once, or
    # (eps_curve) at every radius
    # n_samples is read by carso's evaluation alone: 4 more carso evaluations (N = 4 is the base's), 4 more reports
    "carso_samples": {"train_purifier": 1, "pretrain_inpainter": 1, "finetune_inpainter": 1, "evaluate": 13,
                      "evaluate_threat": 3, "craft_sources": 1, "craft_sources_threat": 2, "report": 5},
    "carso_aggregation": {"train_purifier": 1, "pretrain_inpainter": 1, "finetune_inpainter": 1, "evaluate": 11,
                          "evaluate_threat": 3, "craft_sources": 1, "craft_sources_threat": 2, "report": 3},
    # purifier.layers: 2 more purifiers, each evaluated once
    "carso_representation": {"train_purifier": 3, "pretrain_inpainter": 1, "finetune_inpainter": 1, "evaluate": 11,
                             "evaluate_threat": 3, "craft_sources": 1, "craft_sources_threat": 2, "report": 3},
    # the transform: both AToP trainings and both AToP defences per transform; at, carso and the controls once
    "atop_transform": {"train_purifier": 1, "pretrain_inpainter": 3, "finetune_inpainter": 3, "evaluate": 13,
                       "evaluate_threat": 5, "craft_sources": 1, "craft_sources_threat": 2, "report": 3},
    # the radius: every evaluation at each of 3 new radii; fine-tuning again only at eps 0.05 (its adversary's).
    # The unseen threats (at under l2 and l1, atop under l2: 3 jobs) read none of these axes but AToP's trainings;
    # the sources' points are crafted again at each radius of the training threat (4), once per unseen threat (2)
    "eps_curve": {"train_purifier": 1, "pretrain_inpainter": 1, "finetune_inpainter": 2, "evaluate": 36,
                  "evaluate_threat": 4, "craft_sources": 4, "craft_sources_threat": 2, "report": 4},
}


def study_project(tmp_path: Path) -> Path:
    """A throw-away project whose params.yaml is the tiny configuration (root `.`), with the shipped studies."""
    project = make_project(tmp_path / "project", load_tiny())
    shutil.copytree(REPO / "studies", project / "studies")
    return project


def dry_run(project: Path, study: str, *how: str) -> tuple[dict[str, int], list[str]]:
    result = run_tool(["snakemake", "-n", "-p", *(how or ("--cores", "1")), "--config", f"study=studies/{study}.yaml"],
                      cwd=project, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    table = dict(re.findall(r"^(\w+)\s+(\d+)$", output.split("Job stats:")[1], flags=re.M))
    commands = re.findall(r"^Shell command: (python -m carso .*)$", output, flags=re.M)
    return {k: int(v) for k, v in table.items() if k not in ("all", "total")}, commands


def _option(command: str, flag: str) -> str:
    return re.search(rf"{flag} (\S+)", command).group(1)


def _value(params: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        params = params[part]
    return params


@pytest.mark.parametrize("study", STUDIES)
def test_a_shipped_study_runs_each_stage_once_per_distinct_value_of_what_it_reads(tmp_path: Path, study: str) -> None:
    """The job counts of the study's DAG are the hand-counted ones, every stage that no axis reaches runs with the
    base params file under the base's folders, and every job that an axis reaches runs with a params file holding
    one variant's values, under runs/studies/<study>/."""
    project = study_project(tmp_path)
    counts, commands = dry_run(project, study)
    assert counts == {**SHARED, **EXPECTED[study]}
    on_slurm, _ = dry_run(project, study, "--profile", "workflow/profiles/slurm")  # the same DAG on the cluster
    assert on_slurm == counts
    spec = yaml.safe_load((project / "studies" / f"{study}.yaml").read_text())
    variants = [dict(zip(spec["axes"], values)) for values in
                (zip(*spec["axes"].values()) if spec.get("mode") == "zip" else _grid(spec["axes"]))]
    for command in commands:
        if command.startswith("python -m carso compare"):
            assert command.startswith(f"python -m carso compare --study studies/{study}.yaml"), command
            continue
        stage, params_file = command.split()[3], _option(command, "--params")
        if stage in ("fetch", "train-classifier", "generate-adversarial"):
            assert params_file == "params.yaml", command
        out = _option(command, "--out")
        if params_file == "params.yaml":
            assert not out.startswith("runs/"), command
            continue
        assert out.startswith(f"runs/studies/{study}/") and params_file.startswith(f"runs/studies/{study}/")
        params = yaml.safe_load((project / params_file).read_text())
        assert any(all(_value(params, k) == v for k, v in variant.items()) for variant in variants), command
    assert not (project / "data").exists()


def _grid(axes: dict[str, list[Any]]) -> list[tuple[Any, ...]]:
    import itertools
    return list(itertools.product(*axes.values()))


def _study(tmp_path: Path, text: str, params: dict[str, Any] | None = None) -> Path:
    write_params(tmp_path / "base.yaml", params or load_tiny())
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


BAD = {
    "unknown key": ("axes: {carso.n_sample: [1, 2]}", "'carso.n_sample' is not a key of the params"),
    "refused value": ("axes: {carso.aggregation: [peel, mean]}", "(variant aggregation=mean): 'carso.aggregation'"),
    "fixed key": ("axes: {output_root: [a, b]}", "'output_root' cannot be an axis"),
    "zip lengths": ("mode: zip\naxes: {carso.n_samples: [1, 2], carso.aggregation: [peel]}",
                    "with mode zip every axis needs as many values"),
    "unsafe label": ("axes: {report.title: [a/b, c]}", "the value label 'a/b' of axis 'report.title' cannot name a folder"),
    "no axes": ("axes: {}", "'axes' must map dotted params keys to lists of values"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_study_file_is_one_sentence_naming_what_to_fix(tmp_path: Path, case: str) -> None:
    from carso.errors import UserError
    from carso.study import load_study

    body, message = BAD[case]
    path = _study(tmp_path, f"name: bad\nbase: {tmp_path / 'base.yaml'}\n{body}\n")
    with pytest.raises(UserError) as err:
        load_study(path)
    assert message in str(err.value) and str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_an_axis_that_no_stage_of_the_base_reads_is_refused(tmp_path: Path) -> None:
    """carso.n_samples with a base that evaluates only `at` would make identical variants."""
    from carso.errors import UserError
    from carso.study import load_study

    params = load_tiny()
    params["evaluation"]["defences"] = {"at": params["evaluation"]["defences"]["at"]}
    params["evaluation"].pop("threats")  # (they name atop)
    path = _study(tmp_path, f"name: bad\nbase: {tmp_path / 'base.yaml'}\naxes: {{carso.n_samples: [1, 2]}}\n", params)
    with pytest.raises(UserError, match=r"no stage of .* reads 'carso.n_samples' \(its evaluation.defences: \['at'\]\)"):
        load_study(path)


def test_snakemake_stops_on_a_bad_study_with_the_sentence_and_writes_nothing(tmp_path: Path) -> None:
    project = study_project(tmp_path)
    (project / "studies" / "bad.yaml").write_text("name: bad\nbase: params.yaml\naxes: {carso.aggregation: [mean]}\n")
    result = run_tool(["snakemake", "-n", "--cores", "1", "--config", "study=studies/bad.yaml"], cwd=project)
    assert result.returncode != 0
    assert "error: studies/bad.yaml (variant aggregation=mean): 'carso.aggregation'" in result.stderr
    assert not (project / "runs").exists()
    both = run_tool(["snakemake", "-n", "--cores", "1", "--config", "study=studies/carso_samples.yaml",
                     "params_file=params.yaml"], cwd=project)
    assert both.returncode != 0 and "give --config study=... or --config params_file=..., not both" in both.stderr


def _jobs(log: str) -> list[tuple[str, str]]:
    """(rule, shell command) of every job a Snakemake run's output shows."""
    rules = re.findall(r"^(?:local)?rule (\w+):$", log, flags=re.M)
    return [(r, "") for r in rules if r != "all"]


def test_the_tiny_samples_study_trains_nothing_again_and_compares_its_variants(tiny_local_run: Path,
                                                                            tmp_path: Path) -> None:
    """On a copy of the finished tiny run, the shipped samples study runs only CARSO's evaluation at the four new N,
    their reports and the comparison page (the base run is N = 4: it trains the classifier and the purifier once,
    and here they exist already). The page opens in a browser without errors, its plot decodes, and its tables hold
    each variant's figures from the metrics files."""
    project = tmp_path / "copy"
    shutil.copytree(tiny_local_run, project, symlinks=True)
    shutil.copytree(REPO / "studies", project / "studies")
    result = run_tool(["snakemake", "--cores", str(LOCAL_CORES), "--config", "study=studies/carso_samples.yaml"],
                      cwd=project, timeout=2 * HANG_GUARD_S)
    assert result.returncode == 0, result.stderr[-4000:]
    rules = [r for r, _ in _jobs(result.stdout + result.stderr)]
    assert sorted(rules) == ["compare_study"] + ["evaluate"] * 4 + ["report"] * 4
    # versioned by DVC: each variant folder's own pipeline file and lock (CARSO's evaluation, the report), all clean
    assert "DVC: recorded 8 stage(s)" in result.stderr
    locks = sorted(p.parent.name for p in (project / "runs" / "studies" / "carso_samples").glob("*/dvc.lock"))
    assert locks == ["n_samples=1", "n_samples=16", "n_samples=2", "n_samples=8"]
    assert sh("dvc status", project).strip().endswith("Data and pipelines are up to date.")
    runs = {n: project / "data" / "fashion_mnist" if n == 4 else
            project / "runs" / "studies" / "carso_samples" / f"n_samples={n}" / "data" / "fashion_mnist"
            for n in (1, 2, 4, 8, 16)}
    for n, root in runs.items():
        params = yaml.safe_load((root.parent.parent / "params.yaml").read_text()) if n != 4 else load_tiny()
        assert params["carso"]["n_samples"] == n
        assert (root / "report" / "report.html").exists()
        if n != 4:  # only carso's evaluation is the variant's own
            assert sorted(p.name for p in (root / "eval").iterdir()) == ["carso"]

    page = project / "runs" / "studies" / "carso_samples" / "compare" / "fashion_mnist"
    rendered = render(page / "compare.html", ARTIFACTS / "study_compare.png")
    assert rendered.console == [] and [i["ok"] for i in rendered.images] == [True]  # the plot against N
    for sections in (rendered.sections, md_sections((page / "compare.md").read_text())):
        assert "Accuracy against carso.n_samples" in sections
        (side,) = [s["tables"][0] for h, s in sections.items() if h.startswith("Results side by side")]
        carso_rows = [row for row in side if row[0].strip("`") == "carso"]
        assert [row[1].strip("`") for row in carso_rows] == [f"n_samples={n}" for n in runs]
        for row, n in zip(carso_rows, runs):
            metrics = json.loads((runs[n] / "eval" / "carso" / "metrics.json").read_text())
            for cell, key in zip(row[2:], ("clean", "robust_worst_case")):
                assert cell.startswith(f"{100 * metrics[key]['accuracy']:.2f}% ") and f"(n={metrics[key]['n']})" in cell
        (tests,) = sections["Paired tests of the worst case (same first points)"]["tables"]
        assert {row[0].strip("`") for row in tests[1:]} == {"carso"} and len(tests) - 1 == 10  # 5 variants, pairs
    assert (ARTIFACTS / "study_compare.png").stat().st_size > 5_000
