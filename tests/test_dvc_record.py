"""Every run versioned by DVC (carso/record.py, carso/pipeline.py): a job leaves a record only when it succeeds,
the workflow commits exactly the stages whose jobs finished from the deps DVC now hashes, the pipeline file of
every params file is generated from the registry, and a run made by Snakemake can be diffed, rerun in part,
shared through a remote, restored at an earlier commit and compared by revision."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import HANG_GUARD_S, REPO, dry_run_config, load_tiny, make_project, run_cli, run_tool, sh, shell, \
    write_params
from test_workflow import D, normalise, snakemake_jobs, stage_name

from carso.record import RECORDED, SUFFIX, check, job_record

KILLER = Path(__file__).with_name("kill_after_first_epoch.py")


# --- the record of one job -------------------------------------------------------------------------------------------

def test_a_job_leaves_a_record_only_when_it_succeeds(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "train_classifier.log"
    record = log_file.with_suffix(SUFFIX)
    with pytest.raises(RuntimeError), job_record(str(log_file), ["train-classifier"]):
        raise RuntimeError("the stage failed")
    assert not record.exists()
    with job_record(str(log_file), ["train-classifier"]):
        pass
    started = json.loads(record.read_text())["started_ns"]
    assert started <= record.stat().st_mtime_ns and not record.with_name(record.name + ".started").exists()
    record.rename(log_file.with_suffix(RECORDED))  # committed by an earlier recording
    with pytest.raises(KeyboardInterrupt), job_record(str(log_file), ["train-classifier"]):
        raise KeyboardInterrupt  # a rerun that dies removes the old records: nothing of the stage stays recordable
    assert not record.exists() and not log_file.with_suffix(RECORDED).exists()


def _times(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns))


def test_a_stage_is_recorded_only_with_the_deps_it_started_from_and_the_outs_it_wrote(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    dep, out = Path("dep.safetensors"), Path("out") / "model.safetensors"
    dep.write_text("d")
    log_file = Path("logs") / "stage.log"
    with job_record(str(log_file), ["stage"], "out"):
        out.parent.mkdir()
        out.write_text("o")
    record = log_file.with_suffix(SUFFIX)
    started = json.loads(record.read_text())["started_ns"]
    _times(dep, started - 1)
    assert check([dep], [out.parent], record) is None
    _times(out, started + 10**12)  # touched later (as Snakemake does to every output): still what the job wrote
    assert check([dep], [out], record) is None
    _times(dep, started + 1)  # edited while the job ran: its outs were made from the old content
    assert check([dep], [out], record) == f"{dep} changed after its job started"
    _times(dep, started - 1)
    out.write_text("edited")  # changed after the job ended (by hand, or by another job)
    assert check([dep], [out.parent], record) == f"{out} is not what its job wrote"
    out.unlink()
    assert check([dep], [out], record) == f"{out} is missing"


# --- the pipeline files ----------------------------------------------------------------------------------------------

def test_dvc_yaml_is_the_one_the_registry_generates() -> None:
    """CI's drift check: the tracked dvc.yaml equals `python -m carso dvc-yaml`'s output for params.yaml."""
    result = run_cli(["dvc-yaml", "--check"], cwd=REPO)
    assert result.returncode == 0, result.stderr


def pipeline_stages(project: Path, dvcfile: str) -> dict[str, dict[str, Any]]:
    """The stages of one pipeline file of `project`, as DVC resolves them (paths relative to the project root)."""
    from dvc.dependency import ParamsDependency
    from dvc.repo import Repo

    stages = {}
    with Repo(str(project), uninitialized=True) as repo:
        for st in repo.index.stages:
            if Path(st.dvcfile.path).resolve() != (project / dvcfile).resolve():
                continue
            rel = lambda item: os.path.relpath(item.fs_path, project)  # noqa: E731
            stages[st.name] = {"cmd": st.cmd, "wdir": os.path.relpath(st.wdir, project),
                               "outs": sorted(rel(o) for o in st.outs),
                               "deps": sorted(rel(d) for d in st.deps if not isinstance(d, ParamsDependency)),
                               "params": {rel(d): sorted(d.params) for d in st.deps if isinstance(d, ParamsDependency)}}
    return stages


def _same_dag(project: Path, jobs: list[dict[str, Any]], files: dict[str, str]) -> None:
    """Each job equals the stage of the pipeline file under its root: command, deps, outs, params file."""
    stages = {f: pipeline_stages(project, f) for f in files}
    for job in jobs:
        root = next(f for f, prefix in files.items() if all(o.startswith(prefix) for o in job["output"]))
        stage = stages[root].pop(stage_name(job))
        assert stage["wdir"] == "." and normalise(job["shell"]) == normalise(stage["cmd"]), stage_name(job)
        assert sorted(job["output"]) == stage["outs"] and sorted(job["input"]) == stage["deps"], stage_name(job)
        params_file = re.search(r"--params (\S+)", job["shell"]).group(1)
        assert list(stage["params"]) == [params_file], stage_name(job)
    assert not any(stages.values()), stages


def test_a_config_run_and_a_study_get_pipeline_files_of_their_own(tmp_path: Path) -> None:
    """configs/<name>.yaml: runs/<name>/dvc.yaml, written at parse time, holds the same jobs as Snakemake's DAG; a
    study: one pipeline file per variant folder with only the stages written there (deps on the base run's)."""
    _, _, project = dry_run_config(tmp_path / "config", "configs/l2_fashion_mnist.yaml")
    jobs = snakemake_jobs(project, "--config", "params_file=configs/l2_fashion_mnist.yaml")
    assert len(jobs) == 12  # (the L2 config evaluates no positive control)
    _same_dag(project, jobs, {"runs/l2_fashion_mnist/dvc.yaml": "runs/l2_fashion_mnist/"})

    project = make_project(tmp_path / "study", load_tiny())
    (project / "studies").mkdir()
    (project / "studies" / "carso_samples.yaml").write_text((REPO / "studies" / "carso_samples.yaml").read_text())
    jobs = [j for j in snakemake_jobs(project, "--forceall", "--config", "study=studies/carso_samples.yaml")
            if j["rule"] != "compare_study"]
    variants = sorted(p.parent.name for p in (project / "runs" / "studies" / "carso_samples").glob("*/dvc.yaml"))
    assert variants == ["n_samples=1", "n_samples=16", "n_samples=2", "n_samples=8"]
    files = {f"runs/studies/carso_samples/{v}/dvc.yaml": f"runs/studies/carso_samples/{v}/" for v in variants}
    _same_dag(project, jobs, {**files, "dvc.yaml": ""})
    for f in files:  # a variant's own stages: CARSO's evaluation and its report, reading the base run's files
        assert sorted(pipeline_stages(project, f)) == ["evaluate_carso@fashion_mnist", "report@fashion_mnist"]


# --- a real run ------------------------------------------------------------------------------------------------------

def _status(project: Path) -> dict[str, Any]:
    return json.loads(sh("dvc status --json", project).strip().splitlines()[-1])


def _outs(lock: dict[str, Any]) -> dict[str, str]:
    return {o["path"]: o.get("md5") for st in lock["stages"].values() for o in st.get("outs", [])}


# at's evaluation under the training threat, under the tiny config's unseen threats (they read at's section too), and
# the report: what a change to evaluation.defences.at reaches
AT_STAGES = {"evaluate_at@fashion_mnist", "evaluate_at_under_l2@fashion_mnist", "evaluate_at_under_l1@fashion_mnist",
             "report@fashion_mnist"}


def test_a_snakemake_run_is_versioned_shared_restored_and_compared(tiny_local_run: Path, tmp_path: Path) -> None:
    project = tiny_local_run
    said = (project / "logs" / "snakemake.stderr").read_text()
    assert re.search(r"DVC: recorded 25 stage\(s\) in dvc.lock and the cache in [\d.]+ s", said), said[-2000:]
    assert _status(project) == {}  # every stage recorded, nothing changed
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert len(lock["stages"]) == 25
    model = project / D / "classifier" / "model.safetensors"
    md5 = _outs(lock)[f"{D}/classifier/model.safetensors"]
    cached = project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    assert cached.exists() and os.path.samefile(cached, model)  # linked, not copied: no second copy on disk
    assert snakemake_jobs(project) == []  # recording left Snakemake nothing to redo
    assert list(project.glob("logs/fashion_mnist/*.record.json")) == []  # every record committed

    params = load_tiny()
    params["evaluation"]["defences"]["at"]["n_points"] = 10
    write_params(project / "params.yaml", params)
    try:  # a changed evaluation key reaches exactly that evaluation and the report, in DVC as in Snakemake
        assert set(_status(project)) == AT_STAGES
        dry = sh("dvc repro --dry", project)
        assert set(re.findall(r"Running stage '([^']+)'", dry)) == AT_STAGES
    finally:
        write_params(project / "params.yaml", load_tiny())
    assert _status(project) == {}

    remote = tmp_path / "remote"
    sh(f"dvc remote add -d store {remote} && git add -A && git commit -qm 'the tiny run' && dvc push -q", project)
    sh(f"python -m carso compare --rev HEAD params.yaml --dataset fashion_mnist --out {tmp_path / 'cmp'}", project)
    assert "at" in (tmp_path / "cmp" / "compare.md").read_text()

    clone = tmp_path / "clone"
    sh(f"git clone -q {project} {clone}", tmp_path)
    sh("dvc pull -q", clone)
    assert _status(clone) == {}  # nothing to recompute
    for path, digest in _outs(lock).items():  # bit-identical
        files = sorted(p for p in (clone / path).rglob("*") if p.is_file()) if (clone / path).is_dir() else [clone / path]
        for f in files:
            assert f.read_bytes() == (project / f.relative_to(clone)).read_bytes(), f

    write_params(clone / "params.yaml", params)  # at on 10 points, through DVC this time
    ran = sh("dvc repro", clone, timeout=2 * HANG_GUARD_S)
    assert set(re.findall(r"Running stage '([^']+)'", ran)) == AT_STAGES
    headline = clone / D / "eval" / "at" / "headline.json"
    assert json.loads(headline.read_text())["worst_case"]["n"] == 10
    sh("git commit -qam 'at on 10 points' && git checkout -q HEAD~1 && dvc checkout -q", clone)
    assert headline.read_bytes() == (project / D / "eval" / "at" / "headline.json").read_bytes()  # n = 20 again
    assert _status(clone) == {}
    sh("git checkout -q -", clone)

    _a_killed_job_records_nothing(clone)


def _a_killed_job_records_nothing(project: Path) -> None:
    """A classifier retraining SIGKILLed after its first epoch: recording afterwards leaves its stage as it was in
    dvc.lock (the old epochs) and `dvc status` still shows it changed."""
    sh("dvc checkout -q", project)
    params = load_tiny()
    params["evaluation"]["defences"]["at"]["n_points"] = 10
    params["classifier"]["epochs"] += 1
    write_params(project / "params.yaml", params)
    before = (project / "dvc.lock").read_text()
    args = ["train-classifier", "--params", "params.yaml", "--dataset", "fashion_mnist", "--data", f"{D}/dataset",
            "--out", f"{D}/classifier", "--threads", "2", "--log-file", "logs/fashion_mnist/train_classifier.log"]
    killed = subprocess.run([sys.executable, str(KILLER), *args], cwd=project, capture_output=True, text=True,
                            timeout=HANG_GUARD_S)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    recorded = run_cli(["record"], cwd=project)
    assert recorded.returncode == 0 and "DVC: recorded 0 stage(s)" in recorded.stderr, recorded.stderr
    assert (project / "dvc.lock").read_text() == before
    assert "train_classifier@fashion_mnist" in _status(project)


def test_a_run_that_is_not_a_dvc_repository_says_so(tmp_path: Path) -> None:
    project = make_project(tmp_path / "plain", load_tiny())
    result = run_cli(["record"], cwd=project)
    assert result.returncode == 0 and "not a DVC repository (no .dvc/ here): nothing recorded" in result.stderr
