"""The whole tiny DAG on a real single-node Slurm through workflow/profiles/slurm: every rule runs as a
Slurm job, and the results are bit-identical to a local `snakemake --cores 2` run of the same configuration.

The cluster is tools/local_slurm.py (munged, slurmctld, slurmd started by hand; `bash run.sh setup`
installs the packages). Under CI a missing Slurm fails the test instead of skipping it."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import REPO, load_tiny, make_project, run_tool

pytestmark = pytest.mark.slow
LOCAL_SLURM = REPO / "tools" / "local_slurm.py"
SLURM_COMMANDS = ["munged", "slurmctld", "slurmd", "sinfo", "squeue", "sbatch"]
D = "data/fashion_mnist"
PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
# the CPUs of each model stage's Slurm job, hence its thread count; the local reference run uses as many
CPUS = yaml.safe_load(PROFILE.read_text())["default-resources"]["cpus_per_task"]


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
    if len(os.sched_getaffinity(0)) < CPUS:
        unavailable(f"the Slurm profile's jobs need {CPUS} CPUs")
    try:
        started = local_slurm("start")
        assert started.returncode == 0, started.stdout + started.stderr
        yield
    finally:
        stopped = local_slurm("stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def dag_jobs(project: Path) -> set[str]:
    """The DAG's jobs (`all` aside) as the Slurm plugin names them in --comment: rule_<rule>_wildcards_<values>."""
    result = run_tool(["snakemake", "-n", "--cores", str(CPUS)], cwd=project, timeout=120)
    assert result.returncode == 0, result.stderr
    jobs, rule = set(), None
    for line in result.stdout.splitlines():
        if m := re.match(r"^rule (\w+):$", line):
            rule = m.group(1)
        elif rule and (m := re.match(r"^    wildcards: (.*)$", line)):
            values = [kv.split("=", 1)[1] for kv in m.group(1).split(", ")]
            jobs.add(f"rule_{rule}_wildcards_{'_'.join(values)}")
            rule = None
    return jobs


def slurm_jobs() -> dict[str, dict[str, str]]:
    """Every job slurmctld remembers (MinJobAge is a day), by id: state, comment, name."""
    result = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%T|%k|%j"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    rows = (line.split("|", 3) for line in result.stdout.splitlines() if line.strip())
    return {jobid: {"state": state, "comment": comment, "name": name} for jobid, state, comment, name in rows}


def without_timings(value: Any) -> Any:
    """A metrics file without its wall-clock times (`seconds`, `train_seconds`, ...), which differ run to run."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def curve(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return [without_timings(row) for row in csv.DictReader(f)]


def lowest_priority(session_leader: int) -> None:
    """Nice 19 for a whole new session. With autogroup scheduling (Linux's default for desktops and many
    servers) a nice value only counts within its session's group, and groups share the CPU equally: the
    group itself has to be niced, or the reference run would take half the CPU from the Slurm jobs."""
    try:
        Path(f"/proc/{session_leader}/autogroup").write_text("19")
    except OSError:  # no autogroup scheduling: `nice` alone does it
        pass


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_rule_runs_as_a_slurm_job_with_the_local_results(slurm_cluster: None, tmp_path: Path) -> None:
    params = load_tiny()
    params["runtime"]["device"] = "cpu"  # the test node has no GPU: the model stages then ask for none
    on_slurm = make_project(tmp_path / "slurm", params)
    local = make_project(tmp_path / "local", params)
    expected = dag_jobs(on_slurm)
    assert {j.split("_wildcards_")[0] for j in expected} == {
        "rule_fetch", "rule_train_classifier", "rule_generate_adversarial", "rule_train_purifier", "rule_evaluate",
        "rule_report"}

    # The local reference run goes alongside, at the lowest CPU priority: it takes only the CPU the Slurm run
    # leaves idle (between status checks, while sbatch and Snakemake start), which keeps the test under
    # 3 minutes on 2 cores. Priority changes no result: both runs use the same thread count.
    venv_bin = Path(sys.executable).parent
    reference = subprocess.Popen(["nice", "-n", "19", str(venv_bin / "snakemake"), "--cores", str(CPUS)], cwd=local,
                                 env={**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lowest_priority(reference.pid)
    try:
        before = set(slurm_jobs())
        result = run_tool(["snakemake", "--profile", "workflow/profiles/slurm"], cwd=on_slurm, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        ran = {jobid: job for jobid, job in slurm_jobs().items() if jobid not in before}
        # one Slurm job per DAG job, all finished, all from this run (the plugin names them by its run id)
        assert sorted(job["comment"] for job in ran.values()) == sorted(expected)
        assert {job["state"] for job in ran.values()} == {"COMPLETED"}
        assert len({job["name"] for job in ran.values()}) == 1
        assert set(re.findall(r"submitted with SLURM jobid (\d+)", result.stderr)) == set(ran)
        _, reference_log = reference.communicate(timeout=240)
    finally:
        if reference.poll() is None:  # a failure above: stop the reference run and the stages it started
            os.killpg(reference.pid, signal.SIGKILL)
            reference.communicate(timeout=30)
    assert reference.returncode == 0, reference_log[-4000:]

    # same thread count in both runs (recorded in every metrics file as `threads`), hence bit-identical results
    for path in sorted((local / D).rglob("*")):
        name = str(path.relative_to(local))
        if path.suffix == ".safetensors":  # dataset, both models, adversarial and evaluation examples
            assert sha256(on_slurm / name) == sha256(path), name
        elif path.suffix == ".json":
            assert without_timings(json.loads((on_slurm / name).read_text())) == without_timings(
                json.loads(path.read_text())), name
        elif path.suffix == ".csv":
            assert curve(on_slurm / name) == curve(path), name
    metrics = json.loads((on_slurm / D / "eval" / "carso" / "metrics.json").read_text())
    assert metrics["threads"] == CPUS
