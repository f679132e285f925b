"""Versioning a Snakemake run with DVC: each finished job leaves a record, the workflow commits what they made.

A stage's job (`python -m carso <stage> ... --out DIR --log-file logs/<dataset>/<stage>.log`, whichever engine
runs it) writes `logs/<dataset>/<stage>.record.json` when, and only when, it succeeds: first a start marker, whose
modification time is the job's start on the clock of the file system that holds the outputs (so a cluster's
skewed node clocks do not matter), then, after every output, the record itself (atomically) with the MD5 of every
file it wrote under its --out folder and the git commit of the code it ran (carso.leaderboard shows it). A failed
or killed job leaves no record (an older one is removed when the job starts).

When the workflow ends (the Snakefile's onsuccess and onerror hooks, which Snakemake runs once, in the process
that drives the workflow, never in cluster jobs), `record_run` commits to DVC (`dvc commit`: dvc.lock and the
cache) every stage of the run's pipeline files whose record shows that:
- every dep (code, data, the params file) was last modified before the job started, so the outputs were made
  from exactly the deps DVC now hashes (a file edited during the run, even one a job had already read, keeps
  its stage out of dvc.lock);
- every out has the content the job wrote (its MD5 in the record; Snakemake touches outputs after a job, so
  their times cannot tell).
A committed record is renamed <stage>.recorded.json, so a later run commits only what its own jobs made. Anything
else is left as it was and named in one line; `dvc status` then shows it as changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SUFFIX = ".record.json"        # a finished job's record, waiting to be committed
RECORDED = ".recorded.json"    # the same once committed to DVC (a later recording skips it)
STARTED = ".started"


def record_path(log_file: str | Path) -> Path:
    """The record of the job that logs to `log_file` (logs/<dataset>/<stage>.log -> <stage>.record.json)."""
    return Path(log_file).with_suffix(SUFFIX)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 writes the record


def md5(path: Path) -> str:
    """A file's MD5, as DVC hashes it."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _written(out_dir: str | None) -> dict[str, str]:
    """The MD5 of every file under the job's --out folder, by path relative to the working directory."""
    if not out_dir or not Path(out_dir).is_dir():
        return {}
    return {os.path.relpath(f): md5(f) for f in _files(Path(out_dir)) if not f.name.startswith(".")}


@contextmanager
def job_record(log_file: str | None, argv: list[str], out_dir: str | None = None) -> Iterator[None]:
    """Around a stage's work: remove the old record, mark the start, and write the record if the block succeeds."""
    if not log_file or not _is_main_process():
        yield
        return
    record = record_path(log_file)
    marker = record.with_name(record.name + STARTED)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)
    Path(log_file).with_suffix(RECORDED).unlink(missing_ok=True)
    marker.write_text(f"{os.getpid()}\n")
    started_ns = marker.stat().st_mtime_ns
    commit = git_commit()
    yield
    tmp = record.with_name(f".{record.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"argv": argv, "started_ns": started_ns, "commit": commit, "outs": _written(out_dir)})
                   + "\n")
    os.replace(tmp, record)
    marker.unlink(missing_ok=True)


def git_commit() -> str:
    """The commit the job's code is at (`git describe --always --dirty`: -dirty when tracked files differ from it), or
    "unknown" outside a git repository; the leaderboard names it beside each evaluation."""
    try:
        result = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _files(path: Path) -> list[Path]:
    """`path` itself, or every file under it (a folder out such as report/figures)."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def check(deps: list[Path], outs: list[Path], record: Path) -> str | None:
    """Why the stage of `record` may not be recorded (None when it may)."""
    content = json.loads(record.read_text())
    started, written = content["started_ns"], content.get("outs", {})
    for dep in deps:
        for f in _files(dep):
            if not f.exists():
                return f"{f} is missing"
            if f.stat().st_mtime_ns > started:
                return f"{f} changed after its job started"
    for out in outs:
        if not out.exists():
            return f"{out} is missing"
        for f in _files(out):
            if f.name.startswith("."):  # not part of the artifact (.snakemake_timestamp; .dvcignore)
                continue
            if written.get(os.path.relpath(f)) != md5(f):
                return f"{f} is not what its job wrote"
    return None


def _stages(files: list[Path], datasets: list[str]) -> list[tuple[str, list[Path], list[Path], Path]]:
    """Each stage of the pipeline files, for the run's datasets: its DVC target, deps, outs and record."""
    from dvc.repo import Repo

    wanted = {f.resolve() for f in files}
    found = []
    with Repo(".") as repo:
        for st in repo.index.stages:
            dvcfile = Path(st.dvcfile.path).resolve()
            name, _, dataset = st.name.partition("@")
            if dvcfile not in wanted or dataset not in datasets:
                continue
            folder = os.path.relpath(dvcfile.parent)
            prefix = "" if folder == "." else f"{folder}/"
            target = f"{os.path.relpath(dvcfile)}:{st.name}"
            deps = [Path(os.path.relpath(d.fs_path)) for d in st.deps]  # params deps: their params file
            outs = [Path(os.path.relpath(o.fs_path)) for o in st.outs]
            found.append((target, deps, outs, record_path(f"{prefix}logs/{dataset}/{name}.log")))
    return found


def _keep_times(times: dict[Path, os.stat_result]) -> None:
    """Give every out its modification time back, upstream first, should the cache's link type have changed it
    (DVC moves a file into its cache and hardlinks it back, which keeps it; a copy would not): Snakemake compares
    times, and an upstream out newer than a downstream one would rerun the downstream stage."""
    for f, before in times.items():
        if f.exists() and f.stat().st_mtime_ns != before.st_mtime_ns:
            os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))


def record_run(files: list[Path], datasets: list[str]) -> list[str]:
    """Commit to DVC every stage of `files` that a finished job made from its current deps; returns the targets."""
    if not Path(".dvc").is_dir():
        print("DVC: not a DVC repository (no .dvc/ here): nothing recorded; `dvc init` to version runs",
              file=sys.stderr)
        return []
    begin = time.monotonic()
    targets, records, left, times = [], [], [], {}
    for target, deps, outs, record in _stages(files, datasets):  # upstream stages first
        if not record.exists():  # no job finished since the last recording (or none ever ran)
            continue
        reason = check(deps, outs, record)
        if reason is None:
            targets.append(target)
            records.append(record)
            times.update({f: f.stat() for out in outs for f in _files(out)})
        else:
            left.append(f"{target} ({reason})")
    if targets:
        result = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *targets],
                                capture_output=True, text=True)
        if result.returncode != 0:
            print(f"DVC: dvc commit failed, nothing recorded:\n{(result.stdout + result.stderr)[-3000:]}",
                  file=sys.stderr)
            return []
        _keep_times(times)
        for record in records:
            os.replace(record, record.with_name(record.name.removesuffix(SUFFIX) + RECORDED))
    print(f"DVC: recorded {len(targets)} stage(s) in dvc.lock and the cache in {time.monotonic() - begin:.1f} s",
          file=sys.stderr)
    if left:
        print(f"DVC: not recorded (`dvc status` shows them as changed; rerun them): {'; '.join(left)}",
              file=sys.stderr)
    return targets
