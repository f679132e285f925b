"""The leaderboard (carso/leaderboard.py) over the tiny run and two more runs made from it: one table per threat model,
every (run, defence) row with the metrics files' figures, a weaker protocol marked and not ranked, a run in progress
listed as such, the paired test across runs, and the page sortable and filterable in Chromium without a console
error. It reads results only: no stage reruns."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from browser import browser_path
from conftest import ARTIFACTS, run_cli
from report_reader import md_sections

pytestmark = pytest.mark.slow
D = "data/fashion_mnist"


def _project(tiny_local_run: Path, tmp_path: Path) -> Path:
    """The tiny run, plus runs/older (the same results, carso's evaluated without AutoAttack, as an older protocol
    would have) and runs/running (at's evaluation started, nothing written yet; carso's folder without metrics)."""
    project = tmp_path / "project"
    shutil.copytree(tiny_local_run, project, symlinks=True)
    older = project / "runs" / "older"
    for folder in ("data", "logs"):
        shutil.copytree(project / folder, older / folder)
    metrics_file = older / D / "eval" / "carso" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    del metrics["attacks"]["autoattack"]
    metrics_file.write_text(json.dumps(metrics))
    running = project / "runs" / "running"
    (running / D / "eval" / "at").mkdir(parents=True)
    (running / "logs" / "fashion_mnist").mkdir(parents=True)
    (running / "logs" / "fashion_mnist" / "evaluate_at.record.json.started").write_text("1\n")
    (running / D / "eval" / "carso").mkdir()  # killed before its metrics: not running, unfinished
    return project


def test_the_leaderboard_gathers_ranks_and_marks_every_run(tiny_local_run: Path, tmp_path: Path) -> None:
    from carso.report import _pct

    project = _project(tiny_local_run, tmp_path)
    before = {f: f.stat().st_mtime_ns for f in project.rglob("*") if f.is_file()}
    result = run_cli(["leaderboard", "--out", "board", "--paired"], cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    after = {f: f.stat().st_mtime_ns for f in project.rglob("*") if f.is_file() and "board" not in f.parts}
    assert after == before  # it read results only: nothing written, nothing touched
    sections = md_sections((project / "board" / "leaderboard.md").read_text())
    assert {"fashion_mnist, L-inf eps 0.1", "fashion_mnist, L2 eps 1.5", "fashion_mnist, L1 eps 7.5",
            "fashion_mnist, in progress", "fashion_mnist, unfinished"} <= set(sections)
    (table,) = sections["fashion_mnist, L-inf eps 0.1"]["tables"]
    header, rows = table[0], table[1:]
    col = {h: i for i, h in enumerate(header)}
    defences = [p.name for p in sorted((project / D / "eval").iterdir())]
    assert sorted((r[col["run"]], r[col["defence"]]) for r in rows) == sorted(
        [(run, d) for run in ("params.yaml's run", "runs/older") for d in defences])
    lacking = set()  # the evaluations without one of the current protocol's attack families
    for r in rows:  # every figure is the metrics file's
        root = project if r[col["run"]] == "params.yaml's run" else project / r[col["run"]]
        m = json.loads((root / D / "eval" / r[col["defence"]] / "metrics.json").read_text())
        assert r[col["worst case (headline)"]] == _pct(m["robust_worst_case"])
        assert r[col["clean"]] == _pct(m["clean"])
        if {"transfer", "autoattack", "square", "pgd"} - {a["kind"] for a in m["attacks"].values()}:
            lacking.add((r[col["run"]], r[col["defence"]]))
    ranked = [r for r in rows if r[col["rank"]] != "-"]
    marked = [r for r in rows if r[col["rank"]] == "-"]
    assert [r[col["rank"]] for r in ranked] == [str(i) for i in range(1, len(ranked) + 1)]
    worst = [float(r[col["worst case (headline)"]].split("%")[0]) for r in ranked]
    assert worst == sorted(worst, reverse=True)
    assert {(r[col["run"]], r[col["defence"]]) for r in marked} == lacking  # (the tiny suites of some defences
    assert ("runs/older", "carso") in lacking                              # skip AutoAttack or Square)
    (older,) = [r for r in marked if (r[col["run"]], r[col["defence"]]) == ("runs/older", "carso")]
    assert older[col["not ranked because"]] == "no autoattack attack"
    assert min(rows.index(r) for r in marked) > max(rows.index(r) for r in ranked)  # listed below every ranked row
    assert ranked[0][col["params file"]] == "params.yaml" and ranked[0][col["commit"]]
    (progress,) = sections["fashion_mnist, in progress"]["tables"]
    assert [(r[1], r[2], r[3]) for r in progress[1:]] == [("runs/running", "at", "in progress")]
    (stopped,) = sections["fashion_mnist, unfinished"]["tables"]
    assert [(r[1], r[2]) for r in stopped[1:]] == [("runs/running", "carso")]
    assert stopped[1][3].startswith("unfinished: no metrics.json")
    (pairs,) = sections["The same defence across runs, on the same points (paired)"]["tables"]
    assert {(r[1], r[2], r[3]) for r in pairs[1:]} == {(d, "params.yaml's run", "runs/older") for d in defences}
    assert all(r[5] == "+0.0 points" and r[8] == "not measurable" for r in pairs[1:])  # identical results


def test_the_leaderboard_page_sorts_and_filters_in_chromium(tiny_local_run: Path, tmp_path: Path) -> None:
    project = _project(tiny_local_run, tmp_path)
    assert run_cli(["leaderboard", "--out", "board"], cwd=project).returncode == 0
    page_file = project / "board" / "leaderboard.html"
    code = f"""
import json, sys
from playwright.sync_api import sync_playwright
errors = []
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path={browser_path()!r}, args=["--no-sandbox"])
    page = browser.new_page(viewport={{"width": 1280, "height": 900}})
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto({page_file.resolve().as_uri()!r}, wait_until="load")
    table = "table.board >> nth=0"
    column = lambda name: page.eval_on_selector(table, "(t, name) => {{ const i = [...t.tHead.rows[0].cells]"
        ".findIndex(c => c.innerText === name); return [...t.tBodies[0].rows].map(r => r.cells[i].innerText); }}", name)
    page.click(table + " >> th:text-is('defence')")
    by_name = column("defence")
    page.click(table + " >> th:text-is('worst case (headline)')")
    worst_up = [float(v.split("%")[0]) for v in column("worst case (headline)")]
    page.fill("#filter", "runs/older")
    shown = page.eval_on_selector(table, "t => [...t.tBodies[0].rows].filter(r => !r.hidden).map(r => r.cells[1].innerText)")
    page.screenshot(path={str(ARTIFACTS / "leaderboard.png")!r}, full_page=True)
    browser.close()
print(json.dumps({{"errors": errors, "by_name": by_name, "worst_up": worst_up, "shown": shown}}))
"""
    ARTIFACTS.mkdir(exist_ok=True)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["errors"] == []
    assert seen["by_name"] == sorted(seen["by_name"])
    assert seen["worst_up"] == sorted(seen["worst_up"])
    assert seen["shown"] and set(seen["shown"]) == {"runs/older"}
