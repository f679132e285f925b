"""The jobs of a params file's whole DAG (`snakemake --dry-run --forceall`), as JSON: for each job its rule,
wildcards, data inputs, outputs, log, benchmark, resources and shell command. The library files a job runs (its
code inputs, carso.codedeps) are left out: tests/test_code_deps.py checks those.

    python tools/job_snapshot.py PARAMS_FILE [--write tests/snapshots/NAME.json]

tests/test_job_snapshot.py compares the DAG of params.yaml and of the tiny configuration against the committed
snapshots, so a refactoring of the rules (e.g. generating them from the registry) can be shown to change no job;
a change that means to alter jobs rewrites the snapshot with --write and the diff shows what changed.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FIELDS = ("input", "output", "log", "benchmark", "wildcards", "resources")


def is_code(path: str) -> bool:
    """A library file among a job's inputs (carso/... or a plugin's module, anywhere)."""
    return path.endswith(".py")


def parse(text: str, with_code: bool = False) -> list[dict[str, Any]]:
    """The jobs of `snakemake -n -p` output, sorted by rule and wildcards (`with_code`: keep the code inputs)."""
    jobs: list[dict[str, Any]] = []
    for line in text.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            jobs.append({"rule": m.group(1)})
        elif jobs and (m := re.match(rf"^    ({'|'.join(FIELDS)}): (.*)$", line)):
            values = m.group(2).split(", ")
            if m.group(1) == "input" and not with_code:
                values = [v for v in values if not is_code(v)]
            if m.group(1) == "resources":
                values = [v for v in values if not v.startswith("tmpdir=")]
            jobs[-1][m.group(1)] = values if m.group(1) == "wildcards" else sorted(values)  # sets: order aside
        elif jobs and line.startswith("Shell command: "):
            jobs[-1]["shell"] = line.removeprefix("Shell command: ")
    jobs = [j for j in jobs if j["rule"] != "all"]
    return sorted(jobs, key=lambda j: (j["rule"], j.get("wildcards", []), j.get("output", [])))


def snapshot(params_file: str, cwd: Path = REPO) -> list[dict[str, Any]]:
    """The jobs of `params_file`'s DAG, every stage forced."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-n", "-p", "--forceall",
           "--cores", "2", "--config", f"params_file={params_file}"]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        sys.exit(f"snakemake's dry run failed:\n{result.stderr[-3000:]}")
    return parse(result.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("params", help="the params file whose DAG to snapshot")
    parser.add_argument("--write", default=None, help="write the snapshot here instead of printing it")
    args = parser.parse_args()
    text = json.dumps(snapshot(args.params), indent=1) + "\n"
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
