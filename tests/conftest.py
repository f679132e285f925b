"""Shared fixtures: the tiny configuration, a small real Fashion-MNIST subset, and throw-away projects."""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TINY_PARAMS = REPO / "tests" / "tiny" / "params.yaml"
ARTIFACTS = REPO / "test-artifacts"  # what the tests keep for a person to look at (screenshots of the pages)
LOCAL_CORES = os.cpu_count() or 1  # threads of the local reference run, as `dvc repro` uses them: all cores
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def load_tiny() -> dict[str, Any]:
    """The tiny configuration as a throw-away project's own params.yaml: its outputs in the project's data/, logs/,
    benchmarks/ (`output_root: .`, the layout of dvc.yaml), where tests/tiny/params.yaml itself says runs/tiny."""
    return {**yaml.safe_load(TINY_PARAMS.read_text()), "output_root": "."}


@pytest.fixture()
def tiny_params() -> dict[str, Any]:
    return copy.deepcopy(load_tiny())


# Time limits in the tests are hang guards, never speed requirements: a tiny-config stage takes 1 to 90 s on the
# 2-core CPU, so HANG_GUARD_S (about 3x the slowest, under load) only ever stops a process that hangs (a deadlocked
# torchrun, a Snakemake waiting on a lock). A slow machine must not fail a test; raise it there if need be.
HANG_GUARD_S = 300


def run_cli(args: list[str], cwd: Path, timeout: int = HANG_GUARD_S) -> subprocess.CompletedProcess:
    """Run `python -m carso ARGS` the way Snakemake and DVC do."""
    return subprocess.run([sys.executable, "-m", "carso", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def run_tool(args: list[str], cwd: Path, timeout: int = HANG_GUARD_S,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run snakemake / dvc (or this virtualenv's python) from this virtualenv with a hard time limit; `env`: variables
    set on top of the environment (e.g. PYTHONPATH for a plugin installed into a folder)."""
    tool = Path(sys.executable).parent / args[0]
    env = {**os.environ, **(env or {}), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(tool), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def make_project(dest: Path, params: dict[str, Any]) -> Path:
    """A throw-away copy of the pipeline (workflow, code) with its own params.yaml and the dvc.yaml that
    `python -m carso dvc-yaml` writes for it (the repository's own, where the params are invalid on purpose)."""
    from carso.errors import UserError
    from carso.params import validate
    from carso.pipeline import root_text

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "workflow", dest / "workflow")
    shutil.copytree(REPO / "carso", dest / "carso", ignore=shutil.ignore_patterns("__pycache__"))
    try:
        (dest / "dvc.yaml").write_text(root_text(validate(copy.deepcopy(params))))
    except (UserError, KeyError, TypeError):
        shutil.copy(REPO / "dvc.yaml", dest / "dvc.yaml")
    write_params(dest / "params.yaml", params)
    return dest


def dry_run_config(tmp_path: Path, config: str) -> tuple[dict[str, int], list[str], Path]:
    """`snakemake -n -p --config params_file=CONFIG` in a throw-away project holding configs/: the job counts
    (Job stats), the stage commands, and the project (which must stay without data/)."""
    project = make_project(tmp_path / "project", load_tiny())
    shutil.copytree(REPO / "configs", project / "configs")
    result = run_tool(["snakemake", "-n", "-p", "--cores", "1", "--config", f"params_file={config}"], cwd=project,
                      timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    table = dict(re.findall(r"^(\w+)\s+(\d+)$", output.split("Job stats:")[1], flags=re.M))
    commands = re.findall(r"^Shell command: (python -m carso .*)$", output, flags=re.M)
    return {k: int(v) for k, v in table.items()}, commands, project


def without_timings(value: Any) -> Any:
    """A metrics file or curve row without its wall-clock figures (`seconds`, `train_seconds`,
    `images_per_second`, ...), which differ from run to run."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "second" not in k}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def write_params(path: Path, params: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="session")
def fm_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny configuration's real Fashion-MNIST subset (40 train / 10 test images per class)."""
    from carso.data import fetch_dataset

    out = tmp_path_factory.mktemp("fm_subset")
    fetch_dataset("fashion_mnist", load_tiny()["data"], out)
    return out


GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


def shell(cmd: str, cwd: Path, timeout: int = HANG_GUARD_S) -> subprocess.CompletedProcess:
    """A shell command with this virtualenv's tools first on PATH, git's identity set and DVC offline."""
    env = {**os.environ, **GIT_ENV, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def sh(cmd: str, cwd: Path, timeout: int = HANG_GUARD_S) -> str:
    """A shell command that must succeed: its output."""
    result = shell(cmd, cwd, timeout)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def make_dvc_repo(project: Path) -> Path:
    """`project` as a fresh clone is: a git repository (data/ ignored) with the repository's DVC config."""
    shutil.copy(REPO / ".gitignore", project / ".gitignore")
    sh("git init -q && dvc init -q", project)
    shutil.copy(REPO / ".dvc" / "config", project / ".dvc" / "config")
    shutil.copy(REPO / ".dvcignore", project / ".dvcignore")
    sh("git add -A && git commit -qm init", project)
    return project


@pytest.fixture(scope="session")
def tiny_local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny configuration through a local `snakemake --cores LOCAL_CORES` in a git and DVC repository (as a
    fresh clone is), once per session, with a hard 10-minute limit (the 18 jobs take 2 to 5 minutes on the 2-core
    machines seen, whose speed varies 2x from one hour to the next; a hang still fails): the reference that the DVC
    run (test_workflow.py) and the Slurm run (test_workflow_slurm.py) must reproduce bit for bit (the same thread
    count is what makes runs bit-identical), recorded by DVC when it ends (test_dvc_record.py)."""
    project = make_dvc_repo(make_project(tmp_path_factory.mktemp("smk"), load_tiny()))
    result = run_tool(["snakemake", "--cores", str(LOCAL_CORES)], cwd=project, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (project / "logs" / "snakemake.stderr").write_text(result.stderr)  # what the run said (its DVC recording too)
    return project


def tracked(pgd: Any) -> Any:
    """A stub attack `pgd(model, x, y, spec, x_start) -> points` as the evaluation calls its PGD runs
    (carso.attacks.pgd_tracked): the points and a trajectory in which nothing moved (every iterate as correct as the
    first, the last one returned)."""
    import torch

    def run(model: Any, x: Any, y: Any, spec: Any, x_start: Any = None) -> tuple[Any, dict[str, Any]]:
        n, steps = len(x), spec.steps
        trace = {"loss": torch.zeros(n, steps + 1), "correct": torch.ones(n, steps + 1),
                 "picked": torch.full((n,), steps), "last": torch.ones(n), "best": torch.ones(n)}
        return pgd(model, x, y, spec, x_start), trace
    return run
