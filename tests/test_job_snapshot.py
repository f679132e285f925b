"""The jobs of the default run and of the tiny run are exactly the committed snapshots (tools/job_snapshot.py):
inputs, outputs, logs, benchmarks, resources and commands. A change meant to alter them rewrites the snapshot
(`python tools/job_snapshot.py PARAMS --write tests/snapshots/...`), so the diff shows every job it changed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
from job_snapshot import snapshot  # noqa: E402

CASES = {"params.yaml": "jobs_params.json", "tests/tiny/params.yaml": "jobs_tiny.json"}


@pytest.mark.parametrize("params_file", list(CASES))
def test_jobs_match_the_snapshot(params_file: str) -> None:
    expected = json.loads((Path(REPO) / "tests" / "snapshots" / CASES[params_file]).read_text())
    jobs = snapshot(params_file)
    assert [j["rule"] for j in jobs] == [j["rule"] for j in expected]
    for job, want in zip(jobs, expected):
        assert job == want, f"job {want['rule']} {want.get('wildcards')} changed"
