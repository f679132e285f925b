"""The whole DAG on the tiny configuration, through Snakemake and through DVC, and the two kept in step."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ARTIFACTS, GIT_ENV, HANG_GUARD_S, REPO, load_tiny, make_project, run_tool, without_timings, write_params
from report_reader import md_sections

pytestmark = pytest.mark.slow
D = "data/fashion_mnist"
DEFENCES = ["at", "carso", "atop_rt", "atop", "at_noise", "plain", "ctl_scaled", "ctl_quant", "ctl_resize"]
UNSEEN = [("at", "l2"), ("atop", "l2"), ("at", "l1")]  # the tiny config's evaluation.threats: (defence, threat)
UNSEEN_STAGES = [f"evaluate_{name}_under_{threat}" for name, threat in UNSEEN]
OUTPUTS = [f"{D}/dataset/manifest.json", f"{D}/classifier/model.safetensors", f"{D}/classifier/curve.csv",
           f"{D}/adversarial/train.safetensors", f"{D}/adversarial/summary.json", f"{D}/purifier/model.safetensors",
           f"{D}/atop/pretrain/inpainter.safetensors", f"{D}/atop/pretrain/discriminator.safetensors",
           f"{D}/atop/finetune/inpainter.safetensors", f"{D}/atop/finetune/curve.csv",
           f"{D}/controls/plain/model.safetensors", f"{D}/controls/resize/model.safetensors",
           *(f"{D}/sources/models/{m}/model.safetensors" for m in ("std", "adv")),
           *(f"{D}/sources/crafted/{b}/{f}" for b in ("training", "l2", "l1") for f in ("points.safetensors", "summary.json")),
           *(f"{D}/eval/{name}/{f}" for name in DEFENCES for f in ("metrics.json", "headline.json",
                                                                     "examples.safetensors")),
           *(f"{D}/threats/{threat}/{name}/{f}" for name, threat in UNSEEN
             for f in ("metrics.json", "headline.json", "examples.safetensors")),
           f"{D}/report/report.html", f"{D}/report/report.md", f"{D}/report/figures/examples_carso.png",
           f"{D}/report/figures/examples_atop.png", f"{D}/report/figures/inpainter_curves.png"]
TRAININGS = ["train_classifier", "generate_adversarial", "train_purifier", "pretrain_inpainter", "finetune_inpainter",
             "train_plain", "finetune_resize", "train_sources"]
CRAFTS = {"training": "craft_sources", "l2": "craft_sources_under_l2", "l1": "craft_sources_under_l1"}  # DVC's names


def snakemake_jobs(project: Path, *extra: str) -> list[dict[str, Any]]:
    """The jobs of a dry run, as {rule, input, output, log, shell} (parsed from `snakemake -n -p`)."""
    result = run_tool(["snakemake", "-n", "-p", "--cores", "2", *extra], cwd=project, timeout=120)
    assert result.returncode == 0, result.stderr
    jobs: list[dict[str, Any]] = []
    for line in result.stdout.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            jobs.append({"rule": m.group(1), "input": [], "output": [], "log": [], "shell": None})
        elif jobs and (m := re.match(r"^    (input|output|log): (.*)$", line)):
            jobs[-1][m.group(1)] = m.group(2).split(", ")
        elif jobs and line.startswith("Shell command: "):
            jobs[-1]["shell"] = line.removeprefix("Shell command: ")
    return [j for j in jobs if j["rule"] != "all"]


def normalise(cmd: str) -> list[str]:
    """A stage command without the thread count, which only Snakemake passes."""
    words = shlex.split(cmd)
    if "--threads" in words:
        i = words.index("--threads")
        del words[i:i + 2]
    return words


def dvc_stages(project: Path) -> dict[str, dict[str, Any]]:
    from dvc.dependency import ParamsDependency
    from dvc.repo import Repo

    stages = {}
    with Repo(str(project), uninitialized=True) as repo:
        for st in repo.index.stages:
            if Path(st.dvcfile.path).resolve() != (project / "dvc.yaml").resolve():
                continue  # the pipeline files of other runs (runs/*/dvc.yaml), if any
            stages[st.name] = {
                "cmd": st.cmd, "outs": sorted(o.def_path for o in st.outs),
                "deps": sorted(d.def_path for d in st.deps if not isinstance(d, ParamsDependency)),
                "params": sorted(p for d in st.deps if isinstance(d, ParamsDependency) for p in d.params)}
    return stages


def stage_name(job: dict[str, Any]) -> str:
    """The DVC stage a Snakemake job corresponds to: evaluate runs as one DVC stage per defence."""
    dataset = re.search(r"--dataset (\w+)", job["shell"]).group(1)
    if job["rule"] == "evaluate":
        defence = re.search(r"--defence (\w+)", job["shell"]).group(1)
        return f"evaluate_{defence}@{dataset}"
    if job["rule"] == "evaluate_threat":
        defence, threat = (re.search(rf"--{flag} (\w+)", job["shell"]).group(1) for flag in ("defence", "threat"))
        return f"evaluate_{defence}_under_{threat}@{dataset}"
    if job["rule"] == "craft_sources_threat":
        threat = re.search(r"--threat (\w+)", job["shell"]).group(1)
        return f"craft_sources_under_{threat}@{dataset}"
    return f"{job['rule']}@{dataset}"


def expected_settings(job: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """What each rule declares through `settings(stage)`: the keys carso.stages says the stage reads (per defence
    for evaluate, through carso.defences.evaluation_keys; per method for the report)."""
    from carso.stages import evaluate_stage, graph

    stage = job["rule"]
    if stage == "evaluate":
        stage = evaluate_stage(re.search(r"--defence (\w+)", job["shell"]).group(1))
    if stage == "evaluate_threat":
        stage = evaluate_stage(*(re.search(rf"--{flag} (\w+)", job["shell"]).group(1) for flag in ("defence", "threat")))
    if stage == "craft_sources_threat":
        stage = "craft_sources@" + re.search(r"--threat (\w+)", job["shell"]).group(1)
    return sorted(graph(params)[stage].keys)


def test_dvc_yaml_and_snakefile_describe_the_same_dag(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = ["fashion_mnist", "mnist"]  # a second wildcard value must line up too
    params["data"]["mirror"]["mnist"] = "/nonexistent"
    project = make_project(tmp_path / "p", params)
    jobs = snakemake_jobs(project, "--forceall")
    stages = dvc_stages(project)
    assert len(jobs) == len(stages) == 60  # 30 per dataset: 7 trainings, 9 evaluations, 8 under unseen threats,
    # fetch, report, the sources' training and their crafting in 3 threats
    for job in jobs:
        name = stage_name(job)
        stage = stages.pop(name)
        assert normalise(job["shell"]) == normalise(stage["cmd"]), name
        assert sorted(job["output"]) == stage["outs"], name
        assert sorted(job["input"]) == stage["deps"], name
        assert expected_settings(job, params) == stage["params"], name
    assert not stages


def test_snakemake_runs_the_whole_dag(tiny_local_run: Path) -> None:
    for out in OUTPUTS:
        assert (tiny_local_run / out).exists(), out
    for rule in (*TRAININGS, *(f"evaluate_{name}" for name in DEFENCES), *UNSEEN_STAGES,
                 *CRAFTS.values()):
        bench = (tiny_local_run / "benchmarks" / "fashion_mnist" / f"{rule}.tsv").read_text()
        assert bench.startswith("s\t")
    assert "clean accuracy" in (tiny_local_run / "logs" / "fashion_mnist" / "evaluate_at.log").read_text()
    for name in ("carso", "atop"):  # (the tiny config runs atop_rt without AutoAttack)
        assert "AutoAttack (rand)" in (tiny_local_run / "logs" / "fashion_mnist" / f"evaluate_{name}.log").read_text()


def evaluation_changes() -> list[tuple[str, Any, set[str]]]:
    """Each key of the evaluation (the shared ones, and each defence's section), a new value for it, and the stages
    a change to it must rerun: the evaluations that read it and the report, nothing upstream."""
    every = {f"evaluate_{name}@fashion_mnist" for name in DEFENCES}  # under the training threat
    unseen = {f"{stage}@fashion_mnist" for stage in UNSEEN_STAGES}
    changes = [("evaluation.eps", 0.12, every | {"craft_sources@fashion_mnist"}),
               ("evaluation.confidence", 0.8, every | unseen), ("evaluation.transfer_attack", "pgd_weak", every),
               ("evaluation.threats.l2.eps", 1.0, {"evaluate_at_under_l2@fashion_mnist",
                                                   "evaluate_atop_under_l2@fashion_mnist",
                                                   "craft_sources_under_l2@fashion_mnist"}),
               *((f"evaluation.defences.{name}.verdict_repeats", 3, {f"evaluate_{name}@fashion_mnist", *(
                   f"evaluate_{name}_under_{t}@fashion_mnist" for n, t in UNSEEN if n == name)}) for name in DEFENCES)]
    return [(key, value, stages | {"report@fashion_mnist"}) for key, value, stages in changes]


def with_value(params: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    node = params
    for part in dotted.split(".")[:-1]:
        node = node[part]
    node[dotted.split(".")[-1]] = value
    return params


def test_snakemake_reruns_exactly_what_each_evaluation_key_reaches(tiny_local_run: Path) -> None:
    try:
        for key, value, stages in evaluation_changes():
            write_params(tiny_local_run / "params.yaml", with_value(load_tiny(), key, value))
            assert {stage_name(j) for j in snakemake_jobs(tiny_local_run)} == stages, key
    finally:
        write_params(tiny_local_run / "params.yaml", load_tiny())


def test_snakemake_reruns_only_evaluation_after_an_evaluation_change(tiny_local_run: Path) -> None:
    assert snakemake_jobs(tiny_local_run) == []  # nothing to do after a complete run
    params = load_tiny()  # a variant added: its evaluation and the report, on the run's trained files
    defences = params["evaluation"]["defences"]
    defences["carso_logit"] = {**defences["carso"], "variant_of": "carso", "set": {"carso.aggregation": "logit"}}
    write_params(tiny_local_run / "params.yaml", params)
    try:
        assert sorted(stage_name(j) for j in snakemake_jobs(tiny_local_run)) == [
            "evaluate_carso_logit@fashion_mnist", "report@fashion_mnist"]
    finally:
        write_params(tiny_local_run / "params.yaml", load_tiny())
    params = load_tiny()
    params["evaluation"]["defences"]["at"]["n_points"] = 10
    write_params(tiny_local_run / "params.yaml", params)
    try:  # one defence's evaluation settings rerun that defence's evaluation and the report only
        assert sorted(stage_name(j) for j in snakemake_jobs(tiny_local_run)) == [
            "evaluate_at@fashion_mnist", "evaluate_at_under_l1@fashion_mnist", "evaluate_at_under_l2@fashion_mnist", "report@fashion_mnist"]
        atop_eval = params["evaluation"]["defences"]["atop"]
        repeats, atop_eval["verdict_repeats"] = atop_eval["verdict_repeats"], 3  # nothing of AToP's retrains
        write_params(tiny_local_run / "params.yaml", params)
        assert sorted(stage_name(j) for j in snakemake_jobs(tiny_local_run)) == [
            "evaluate_at@fashion_mnist", "evaluate_at_under_l1@fashion_mnist", "evaluate_at_under_l2@fashion_mnist", "evaluate_atop@fashion_mnist",
            "evaluate_atop_under_l2@fashion_mnist", "report@fashion_mnist"]
        atop_eval["verdict_repeats"] = repeats  # (back, so that each step below checks one change)
        params["purifier"]["epochs"] = 3
        write_params(tiny_local_run / "params.yaml", params)
        assert sorted(stage_name(j) for j in snakemake_jobs(tiny_local_run)) == [
            "evaluate_at@fashion_mnist", "evaluate_at_under_l1@fashion_mnist", "evaluate_at_under_l2@fashion_mnist", "evaluate_carso@fashion_mnist",
            "report@fashion_mnist", "train_purifier@fashion_mnist"]
        params["atop"]["finetune"]["ce_weight"] = 0.1  # AToP's fine-tuning: its stage and its defence only
        write_params(tiny_local_run / "params.yaml", params)
        assert sorted(stage_name(j) for j in snakemake_jobs(tiny_local_run)) == [
            "evaluate_at@fashion_mnist", "evaluate_at_under_l1@fashion_mnist", "evaluate_at_under_l2@fashion_mnist", "evaluate_atop@fashion_mnist",
            "evaluate_atop_under_l2@fashion_mnist", "evaluate_carso@fashion_mnist", "finetune_inpainter@fashion_mnist",
            "report@fashion_mnist", "train_purifier@fashion_mnist"]
        params["atop"]["transform"]["missing_share"] = 0.5  # the transform: both AToP trainings and defences
        write_params(tiny_local_run / "params.yaml", params)
        assert {"pretrain_inpainter@fashion_mnist", "evaluate_atop_rt@fashion_mnist"} <= {
            stage_name(j) for j in snakemake_jobs(tiny_local_run)}
        params["classifier"]["epochs"] = 3
        write_params(tiny_local_run / "params.yaml", params)
        assert len(snakemake_jobs(tiny_local_run)) == 18  # a classifier change reruns everything downstream
        # (not the controls' trainings: classifier.epochs is not one of their settings)
    finally:
        write_params(tiny_local_run / "params.yaml", load_tiny())


def _shell(cmd: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, **GIT_ENV, "DVC_NO_ANALYTICS": "1"}
    venv_bin = Path(os.sys.executable).parent
    env["PATH"] = f"{venv_bin}{os.pathsep}{env['PATH']}"
    return subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _sh(cmd: str, cwd: Path, timeout: int = 600) -> str:  # `dvc repro` of the tiny DAG: 2 to 4 min (conftest)
    result = _shell(cmd, cwd, timeout)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def _sh_fails(cmd: str, cwd: Path) -> str:
    """A command that must fail: its output."""
    result = _shell(cmd, cwd, HANG_GUARD_S)
    assert result.returncode != 0, result.stdout
    return result.stdout + result.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_dvc_repro_matches_snakemake_and_reruns_only_evaluation_also_as_a_queued_experiment(tmp_path: Path, tiny_local_run: Path) -> None:
    project = make_project(tmp_path / "dvc", load_tiny())
    shutil.copy(REPO / ".gitignore", project / ".gitignore")  # data/ ignored by git, as in the repo
    _sh("git init -q && dvc init -q && dvc config core.analytics false && git add -A && git commit -qm init",
        project)
    first = _sh("dvc repro", project)
    assert {s.split("@")[0] for s in ran_stages(first)} == {
        "fetch", *TRAININGS, *CRAFTS.values(), *(f"evaluate_{name}" for name in DEFENCES), *UNSEEN_STAGES, "report"}
    for path in sorted((tiny_local_run / D).rglob("*")):  # the same artifacts as Snakemake's, bit for bit
        name = path.relative_to(tiny_local_run)
        if path.suffix == ".safetensors":
            assert (project / name).read_bytes() == path.read_bytes(), name
        elif path.suffix == ".json":
            assert without_timings(json.loads((project / name).read_text())) == without_timings(
                json.loads(path.read_text())), name
    _sh("git add -A && git commit -qm results", project)
    shutil.copy(project / D / "eval" / "at" / "headline.json", tmp_path / "first_at_headline.json")

    for key, value, stages in evaluation_changes():  # what DVC would rerun for each evaluation key
        write_params(project / "params.yaml", with_value(load_tiny(), key, value))
        _sh(f"dvc status --json > {tmp_path / 'status.json'}", project)
        assert set(json.loads((tmp_path / "status.json").read_text())) == stages, key
    write_params(project / "params.yaml", load_tiny())
    model = project / D / "classifier" / "model.safetensors"
    before = model.stat().st_mtime_ns
    params = load_tiny()
    params["evaluation"]["defences"]["at"]["n_points"] = 10
    write_params(project / "params.yaml", params)
    second = _sh("dvc repro", project)
    assert ran_stages(second) == {"evaluate_at@fashion_mnist", "evaluate_at_under_l2@fashion_mnist",
                                  "evaluate_at_under_l1@fashion_mnist", "report@fashion_mnist"}
    assert model.stat().st_mtime_ns == before and model.exists()
    assert "evaluation.defences.at.n_points" in _sh("dvc params diff", project)
    _sh(f"dvc metrics diff --json > {tmp_path / 'diff.json'}", project)
    diff = json.loads((tmp_path / "diff.json").read_text())
    assert set(diff) == {f"{D}/eval/at/headline.json"}, diff  # what changed, and nothing else (at's unseen
    # threats reran, on their own 8 points: the same figures)
    assert (diff[f"{D}/eval/at/headline.json"]["worst_case.n"]["old"],
            diff[f"{D}/eval/at/headline.json"]["worst_case.n"]["new"]) == (20, 10)
    _sh(f"dvc metrics show --json > {tmp_path / 'show.json'}", project)
    [workspace] = json.loads((tmp_path / "show.json").read_text()).values()  # one revision: the working tree
    shown = workspace["data"]
    assert set(shown) == {f"{D}/eval/{name}/headline.json" for name in DEFENCES} | {
        f"{D}/threats/{threat}/{name}/headline.json" for name, threat in UNSEEN}  # only the headlines
    for name, entry in shown.items():
        assert entry["data"] == json.loads((project / name).read_text())
        assert len(entry["data"]["alone"]) <= 7  # at most 2 x (2 + 7) columns per defence
    _sh("git add -A && git commit -qm 'at on 10 points'", project)
    _queued_experiment_reruns_only_what_its_key_reaches(project, tmp_path)


def _queued_experiment_reruns_only_what_its_key_reaches(project: Path, tmp_path: Path) -> None:
    """The README's DVC experiment example: `dvc exp run --queue -S key=value`, `dvc queue start`, then
    `dvc exp show`: the experiment reruns only the stages the key reaches, and its figures are the ones a plain run
    with that value gives (here the first run's, at on 20 points again)."""
    queued = _sh("dvc exp run --queue -S evaluation.defences.at.n_points=20", project)
    (name,) = re.findall(r"Queued experiment '([\w-]+)'", queued)
    _sh("dvc queue start", project)
    deadline = time.monotonic() + HANG_GUARD_S
    while not re.search(rf"{name}.*(Success|Failed)", status := _sh("dvc queue status", project)):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert re.search(rf"{name}.*Success", status), _sh(f"dvc queue logs {name}", project)
    assert ran_stages(_sh(f"dvc queue logs {name}", project)) == {
        "evaluate_at@fashion_mnist", "evaluate_at_under_l2@fashion_mnist", "evaluate_at_under_l1@fashion_mnist",
        "report@fashion_mnist"}
    _sh(f"dvc exp show --json > {tmp_path / 'exps.json'}", project)
    rows = [exp for rev in json.loads((tmp_path / "exps.json").read_text())
            for exp in [rev, *[e for e in (rev.get("experiments") or []) for e in e.get("revs", [])]]]
    (exp,) = [r for r in rows if r.get("name") == name]
    headline = exp["data"]["metrics"][f"{D}/eval/at/headline.json"]["data"]
    first = json.loads((tmp_path / "first_at_headline.json").read_text())
    assert headline == first and headline["worst_case"]["n"] == 20
    assert exp["data"]["params"]["params.yaml"]["data"]["evaluation"]["defences"]["at"]["n_points"] == 20
    _compare_revisions(project, name)


def _compare_revisions(project: Path, experiment: str) -> None:
    """`carso compare --rev`: git revisions and a DVC experiment as runs, their results read from DVC's cache. The
    first run (HEAD~1, at on 20 points), the second (HEAD, 10 points) and the experiment (20 again): the page lists
    the one changed key, and pairs at's verdicts on the points both attacked (the experiment's equal the first's)."""
    _sh(f"python -m carso compare --rev HEAD~1 --rev HEAD --rev {experiment} --dataset fashion_mnist --out cmp",
        project)
    sections = md_sections((project / "cmp" / "compare.md").read_text())
    assert sections["Parameter differences"]["tables"] == [[
        ["key", "HEAD~1", "HEAD", experiment], ["evaluation.defences.at.n_points", "20", "10", "20"]]]
    (tests,) = sections["Paired tests of the worst case (same first points)"]["tables"]
    at = {(row[1], row[2]): row for row in tests[1:] if row[0] == "at"}
    same = at[("HEAD~1", experiment)]
    assert (same[3], same[6], same[8]) == ("20", "0 / 0", "within noise")
    assert at[("HEAD~1", "HEAD")][3] == "10" and at[("HEAD", experiment)][3] == "10"
    missing = _sh_fails("python -m carso compare --rev HEAD --rev no-such-rev --dataset fashion_mnist --out cmp2",
                        project)
    assert "--rev no-such-rev: cannot read params.yaml at that revision" in missing


def test_snakemake_lint_is_clean() -> None:
    result = run_tool(["snakemake", "--lint"], cwd=REPO, timeout=120)
    assert result.returncode == 0 and "Lints for" not in result.stdout + result.stderr, result.stdout


def test_snakemake_profile_and_gpu_resources_are_real(tmp_path: Path) -> None:
    """Heavy rules ask for a GPU unless runtime.device is cpu; the default profile is picked up."""
    params = load_tiny()
    params["runtime"]["device"] = "auto"  # (the tests' configuration runs on the CPU on any machine)
    project = make_project(tmp_path / "gpu", params)
    result = run_tool(["snakemake", "-n", "--cores", "2"], cwd=project)
    assert "Using workflow specific profile workflow/profiles/default" in result.stdout + result.stderr
    out = result.stdout
    train = out[out.index("rule train_classifier:"):]
    assert "gpu=1" in train[:train.index("Shell command")]
    params["runtime"]["device"] = "cpu"
    write_params(project / "params.yaml", params)
    out = run_tool(["snakemake", "-n", "--cores", "2"], cwd=project).stdout
    train = out[out.index("rule train_classifier:"):]
    assert "gpu=0" in train[:train.index("Shell command")]


def test_training_rules_go_data_parallel_when_given_several_gpus_or_processes(tmp_path: Path) -> None:
    project = make_project(tmp_path / "ddp", load_tiny())
    plain = {j["rule"]: j["shell"] for j in snakemake_jobs(project)}
    assert plain["train_classifier"].startswith("python -m carso train-classifier ")
    wide = {j["rule"]: j["shell"] for j in snakemake_jobs(
        project, "--set-resources", "train_classifier:processes=2", "train_purifier:gpu=4")}
    torchrun = "python -m torch.distributed.run --standalone --nproc_per_node"
    assert wide["train_classifier"].startswith(f"{torchrun} 2 -m carso train-classifier ")
    assert wide["train_purifier"].startswith(f"{torchrun} 4 -m carso train-purifier ")
    assert wide["generate_adversarial"].startswith("python -m carso generate-adversarial ")
    # torchrun's own parser must hand every stage argument to carso untouched: it takes an abbreviation of
    # one of its options (`--log` for `--log-dir`) anywhere on the line, even after the module name
    from torch.distributed.run import get_args_parser

    for rule in ("train_classifier", "train_purifier"):
        launch = get_args_parser().parse_args(shlex.split(wide[rule])[3:])
        assert launch.module and launch.training_script == "carso"
        assert launch.training_script_args == shlex.split(plain[rule])[3:]


def test_a_variant_is_one_more_evaluation_of_its_base_s_trained_files(tmp_path: Path) -> None:
    params = load_tiny()
    defences = params["evaluation"]["defences"]
    defences["carso_logit"] = {**defences["carso"], "variant_of": "carso", "set": {"carso.aggregation": "logit"}}
    jobs = snakemake_jobs(make_project(tmp_path / "p", params))
    job = next(j for j in jobs if j["rule"] == "evaluate" and f"{D}/eval/carso_logit/metrics.json" in j["output"])
    assert f"{D}/purifier/model.safetensors" in job["input"] and "carso/methods/carso/defence.py" in job["input"]
    assert "--defence carso_logit" in job["shell"] and "--artifacts data/fashion_mnist/purifier" in job["shell"]
    assert [j["rule"] for j in jobs].count("train_purifier") == 1  # no training of its own
    report = next(j for j in jobs if j["rule"] == "report")
    assert f"{D}/eval/carso_logit/metrics.json" in report["input"]


def test_another_params_file_is_passed_to_every_stage_and_writes_under_its_own_root(tmp_path: Path) -> None:
    """A try of another params file (the tiny one, a paper configuration) never touches the default run's files:
    every file its jobs read or write (code aside) is under its output_root."""
    project = make_project(tmp_path / "p", load_tiny())
    write_params(project / "other.yaml", {**load_tiny(), "output_root": "runs/other"})
    jobs = snakemake_jobs(project, "--config", "params_file=other.yaml")
    assert len(jobs) == 25 and all("--params other.yaml" in j["shell"] for j in jobs)
    files = [f for j in jobs for f in j["input"] + j["output"] + j["log"] if not f.startswith("carso/")]
    assert len(files) > 40 and all(f.startswith("runs/other/") for f in files), files
    assert all(" --out runs/other/data/fashion_mnist/" in j["shell"] for j in jobs if " --out " in j["shell"])
    default = [f for j in snakemake_jobs(project) for f in j["output"] + j["log"]]
    assert all(f.startswith(("data/fashion_mnist/", "logs/fashion_mnist/")) for f in default), default


def test_params_yaml_keeps_the_layout_dvc_uses(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", {**load_tiny(), "output_root": "runs/mine"})
    result = run_tool(["snakemake", "-n", "--cores", "1"], cwd=project, timeout=120)
    assert result.returncode != 0 and "params.yaml: output_root must stay `.`" in result.stderr + result.stdout


def test_snakemake_s_own_report_holds_the_results_with_their_provenance(tiny_local_run: Path) -> None:
    """`snakemake --report`: the standard Snakemake report (rules, code, software, run times) with our report page,
    its figures, every defence's headline and the training curves, each with its caption; it opens in Chromium
    without a script error (its screenshot is kept in test-artifacts/)."""
    from browser import render

    target = ARTIFACTS / "snakemake_report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    result = run_tool(["snakemake", "--cores", "1", "--report", str(target)], cwd=tiny_local_run)
    assert result.returncode == 0, result.stderr[-3000:]
    page = target.read_text()
    for rule in ("fetch", "train_classifier", "generate_adversarial", "train_purifier", "pretrain_inpainter",
                 "finetune_inpainter", "evaluate", "report"):
        assert f'"{rule}"' in page, rule
    for name in ("report.html", "headline.png", *(f"eval/{d}/headline.json" for d in DEFENCES), "purifier/curve.csv",
                 "The pipeline's own report for fashion_mnist", "Headline figures of defence carso"):
        assert name in page, name
    rendered = render(target, ARTIFACTS / "snakemake_report.png")
    assert not [m for m in rendered.console if m.startswith("page error")], rendered.console
