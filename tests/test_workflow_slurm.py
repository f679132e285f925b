"""The whole tiny DAG on a real single-node Slurm through workflow/profiles/slurm, as the README's cluster command
runs it: every rule runs as a Slurm job, Slurm grants each job what the profile and the rules ask for (the model
stages one GPU, `evaluate` of a named GPU model; fetch and report none), and the results are bit-identical to
the local run's.

The cluster is tools/local_slurm.py (munged, slurmctld, slurmd started by hand, with two placeholder GPUs;
`bash run.sh setup` installs the packages). Under CI a missing Slurm fails the test instead of skipping it."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import yaml

from carso.io import sha256_file
from conftest import LOCAL_CORES, REPO, load_tiny, make_dvc_repo, make_project, run_tool, sh, without_timings

pytestmark = pytest.mark.slow
LOCAL_SLURM = REPO / "tools" / "local_slurm.py"
SLURM_COMMANDS = ["munged", "slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "scontrol"]
D = "data/fashion_mnist"
PROFILE = Path("workflow") / "profiles" / "slurm" / "config.yaml"
MODEL_RULES = ("train_classifier", "generate_adversarial", "train_purifier", "pretrain_inpainter", "finetune_inpainter",
               "train_plain", "finetune_resize", "train_sources", "craft_sources",
               "craft_sources_threat", "evaluate", "evaluate_threat")
GPU_MODEL = "placeholder"  # the GPU type tools/local_slurm.py advertises


def unavailable(reason: str) -> None:
    """CI must run this test: there a missing Slurm is a failure; elsewhere the test is skipped."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI needs it: run `bash run.sh setup` (installs slurmctld slurmd slurm-client munge)")
    pytest.skip(f"{reason} (`bash run.sh setup` installs Slurm)")


def local_slurm(command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LOCAL_SLURM), command], capture_output=True, text=True, timeout=150)


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[None]:
    """A single-node Slurm for this module, stopped afterwards whatever happened (jobs cancelled, daemons gone)."""
    missing = [c for c in SLURM_COMMANDS if not shutil.which(c, path=f"{os.environ['PATH']}:/usr/sbin:/sbin")]
    if missing:
        unavailable(f"Slurm is not installed (missing {', '.join(missing)})")
    if os.geteuid() != 0:
        unavailable("the local Slurm needs root")
    try:
        started = local_slurm("start")
        assert started.returncode == 0, started.stdout + started.stderr
        yield
    finally:
        stopped = local_slurm("stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def edit_profile(project: Path) -> None:
    """What a user edits in the profile: here, a GPU model for the evaluations; and, on a machine with more cores
    than the profile's 2 CPUs per job, as many CPUs for the model stages as the local reference run used
    threads (the thread count decides the bits of the results)."""
    path = project / PROFILE
    profile = yaml.safe_load(path.read_text())
    for rule in ("evaluate", "evaluate_threat"):
        profile["set-resources"][rule]["gpu_model"] = GPU_MODEL
    for rule in MODEL_RULES:
        profile["set-resources"][rule]["cpus_per_task"] = LOCAL_CORES
    path.write_text(yaml.safe_dump(profile, sort_keys=False))


def planned_jobs(project: Path) -> dict[str, dict[str, str]]:
    """The DAG's jobs (`all` aside) with the resources Snakemake plans for them, by the name the Slurm plugin
    gives them in --comment: rule_<rule>_wildcards_<values>."""
    result = run_tool(["snakemake", "-n", "--profile", str(PROFILE)], cwd=project, timeout=120)
    assert result.returncode == 0, result.stderr
    jobs, rule, values = {}, None, []
    for line in result.stdout.splitlines():
        if m := re.match(r"^rule (\w+):$", line):
            rule, values = m.group(1), []
        elif rule and (m := re.match(r"^    wildcards: (.*)$", line)):
            values = [kv.split("=", 1)[1] for kv in m.group(1).split(", ")]
        elif rule not in (None, "all") and (m := re.match(r"^    resources: (.*)$", line)):
            resources = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
            jobs[f"rule_{rule}_wildcards_{'_'.join(values)}"] = resources
            rule = None
    return jobs


def minutes(time_limit: str) -> int:
    """Slurm's TimeLimit ([D-]HH:MM:SS) in minutes."""
    days, _, clock = time_limit.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def slurm_jobs() -> dict[str, dict[str, str]]:
    """Every job slurmctld remembers (MinJobAge is a day), by id, with what Slurm granted it."""
    result = subprocess.run(["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    fields = ("JobId", "JobName", "JobState", "Comment", "NumCPUs", "TimeLimit", "MinMemoryNode", "TresPerJob")
    jobs = {}
    for line in result.stdout.splitlines():
        job = {f: m.group(1) for f in fields if (m := re.search(rf"(?:^| ){f}=(\S+)", line))}
        if "JobId" in job:
            jobs[job["JobId"]] = job
    return jobs


def megabytes(memory: str) -> int:
    """Slurm's MinMemoryNode (4000M, 8G, ...) in MB."""
    return int(float(memory[:-1]) * {"M": 1, "G": 1024, "T": 1024 ** 2}[memory[-1]])


def granted(job: dict[str, str]) -> dict[str, Any]:
    return {"cpus": int(job["NumCPUs"]), "minutes": minutes(job["TimeLimit"]),
            "mem_mb": megabytes(job["MinMemoryNode"]), "gpus": job.get("TresPerJob")}


def asked(resources: dict[str, str]) -> dict[str, Any]:
    gpus = int(resources.get("gpu", 0))
    model = resources.get("gpu_model")
    return {"cpus": int(resources["cpus_per_task"]), "minutes": int(resources["runtime"]),
            "mem_mb": int(resources["mem_mb"]),
            "gpus": (f"gres:gpu:{model}:{gpus}" if model else f"gres:gpu:{gpus}") if gpus else None}


def curve(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return [without_timings(row) for row in csv.DictReader(f)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the local node's GPUs are placeholders: on a machine with real "
                    "GPUs its jobs would run on them, and GPU results cannot equal the local CPU run's bit for bit")
def test_every_rule_runs_as_a_slurm_job_with_the_local_results(slurm_cluster: None, tiny_local_run: Path,
                                                               tmp_path: Path) -> None:
    params = load_tiny()
    params["runtime"]["device"] = "auto"  # as in every params file: the model rules ask Slurm for a GPU
    on_slurm = make_dvc_repo(make_project(tmp_path / "slurm", params))
    edit_profile(on_slurm)
    plan = planned_jobs(on_slurm)
    rules = {name.split("_wildcards_")[0].removeprefix("rule_") for name in plan}
    assert rules == {"fetch", *MODEL_RULES, "report"}
    for name, resources in plan.items():  # the rules' own GPU requests, before Slurm sees them
        assert int(resources.get("gpu", 0)) == (0 if name.startswith(("rule_fetch_", "rule_report_")) else 1), name

    before = set(slurm_jobs())
    # the tiny DAG as 20 Slurm jobs, one at a time on the 2-CPU node: 5 to 10 min here (conftest: tiny_local_run)
    result = run_tool(["snakemake", "--profile", str(PROFILE)], cwd=on_slurm, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    # recorded in DVC once, by the process that drove the workflow, not by the 24 jobs
    assert len(re.findall(r"DVC: recorded 25 stage\(s\)", result.stderr)) == 1, result.stderr[-4000:]
    assert sh("dvc status", on_slurm).strip().endswith("Data and pipelines are up to date.")
    ran = {jobid: job for jobid, job in slurm_jobs().items() if jobid not in before}
    # one Slurm job per DAG job, all finished, all from this run (the plugin names them by its run id)
    assert sorted(job["Comment"] for job in ran.values()) == sorted(plan)
    assert {job["JobState"] for job in ran.values()} == {"COMPLETED"}
    assert len({job["JobName"] for job in ran.values()}) == 1
    assert set(re.findall(r"submitted with SLURM jobid (\d+)", result.stderr)) == set(ran)
    for job in ran.values():  # Slurm granted each job what the profile and the rule asked for
        assert granted(job) == asked(plan[job["Comment"]]), job["Comment"]
    assert {job["TresPerJob"] for job in ran.values() if "evaluate" in job["Comment"]} == {f"gres:gpu:{GPU_MODEL}:1"}

    # same thread count in both runs (recorded in every metrics file as `threads`), hence bit-identical results
    local = tiny_local_run
    for path in sorted((local / D).rglob("*")):
        name = str(path.relative_to(local))
        if path.suffix == ".safetensors":  # dataset, both models, adversarial and evaluation examples
            assert sha256_file(on_slurm / name) == sha256_file(path), name
        elif path.suffix == ".json":
            assert without_timings(json.loads((on_slurm / name).read_text())) == without_timings(
                json.loads(path.read_text())), name
        elif path.suffix == ".csv":
            assert curve(on_slurm / name) == curve(path), name
    metrics = json.loads((on_slurm / D / "eval" / "carso" / "metrics.json").read_text())
    assert metrics["threads"] == LOCAL_CORES and metrics["device"] == json.loads(
        (local / D / "eval" / "carso" / "metrics.json").read_text())["device"]
