"""A leaderboard across runs: every evaluation this project holds, under params.yaml's output root and every
runs/<name>/ (a configs/*.yaml run, a study's variant, a plugin's run), on one page per project, HTML and Markdown.

One table per (dataset, threat model), one row per (run, defence), ranked by the headline worst case: clean accuracy,
the worst case with its interval and n, the strict bound, the attacks of the suite, the strongest attack alone,
the flags the diagnostics and the run's controls raised, the params file, the commit and date of the evaluation and
a link to the run's own report. An evaluation made with a weaker protocol than the current one (a family of attacks
missing, a randomised defence without EoT or judged by one draw, no indicators of attack failure, a positive control
of its run left standing) is marked with the reason and listed below the ranked rows, never ranked beside them. An
evaluation still running (its job's start marker there) is listed as in progress; one whose folder has no metrics.json
and whose job is not running (killed, or never finished) as unfinished.

It reads results only (metrics.json, examples.safetensors for the paired tests, the jobs' records in logs/) and
never reruns a stage. `python -m carso leaderboard --out leaderboard` writes it; `--paired` adds, for each defence
evaluated on the same points in several runs, the paired test `compare` uses and whether each difference is real.
"""
from __future__ import annotations

import datetime
import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carso.defences import DEFENCES
from carso.io import read_json, write_text
from carso.methods import DefenceSpec
from carso.record import RECORDED, STARTED, SUFFIX
from carso.report import _direction, _flags, _html_table, _level, _md_table, _pct, _strongest_alone, _threat, \
    paired, point_outcomes, positive_controls

# The attack families the current protocol runs: under the training threat every defence gets all four; under an
# unseen threat the lighter suite (carso.evaluation.threat) keeps AutoAttack and PGD.
TRAINING_FAMILIES = ("transfer", "autoattack", "square", "pgd")
UNSEEN_FAMILIES = ("autoattack", "pgd")


@dataclass
class Row:
    """One evaluation of one run: a defence under one threat model, finished or in progress."""

    run: str                   # "params.yaml's run" for the project root, else its root (runs/<name>)
    dataset: str
    defence: str
    threat: str                # "training" or the name of an unseen threat
    folder: Path               # where its metrics.json is (or will be)
    record: dict[str, Any]     # its job's record: argv, started_ns, commit (empty when none was kept)
    report: Path | None        # the run's own report.html, if written
    metrics: dict[str, Any] | None = None  # None: still running, or stopped before writing its metrics
    running: bool = False                  # its job's start marker is there (carso.record): it is running
    flags: list[str] = field(default_factory=list)
    marks: list[str] = field(default_factory=list)  # why it is not ranked

    @property
    def params_file(self) -> str:
        argv = self.record.get("argv", [])
        return argv[argv.index("--params") + 1] if "--params" in argv else "unknown"

    @property
    def commit(self) -> str:
        return self.record.get("commit", "not recorded")

    @property
    def date(self) -> str:
        started = self.record.get("started_ns")
        if started is None:
            return "unknown"
        return datetime.datetime.fromtimestamp(started / 1e9, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    @property
    def table(self) -> str:
        """Its table's title: the dataset and the threat model (norm and radius)."""
        if self.metrics:
            return f"{self.dataset}, {_threat(self.metrics)}"
        return f"{self.dataset}, {'in progress' if self.running else 'unfinished'}"


def roots(project: Path) -> list[tuple[str, Path]]:
    """Every output root under `project` that holds results: the project itself (params.yaml's `.`) and each folder
    of runs/ with a data/ of its own (runs/<name>, runs/studies/<study>/<variant>)."""
    found = [("params.yaml's run", project)] if (project / "data").is_dir() else []
    for data in sorted(project.glob("runs/**/data")):
        if data.is_dir() and not any(p.name == "data" for p in data.parent.relative_to(project).parents if p.name):
            found.append((data.parent.relative_to(project).as_posix(), data.parent))
    return found


def _record(root: Path, dataset: str, stage: str) -> dict[str, Any]:
    """The record its job left (carso.record): waiting to be committed to DVC, or committed."""
    for suffix in (SUFFIX, RECORDED):
        path = root / "logs" / dataset / f"{stage}{suffix}"
        if path.exists():
            return json.loads(path.read_text())
    return {}


def _evaluations(root: Path, dataset: str) -> list[tuple[str, str, Path, str]]:
    """(defence, threat, folder, job name) of every evaluation of `dataset` under `root`, finished or running."""
    base = root / "data" / dataset
    found = {(f.name, "training"): (f, f"evaluate_{f.name}") for f in sorted(base.glob("eval/*")) if f.is_dir()}
    found.update({(f.name, f.parent.name): (f, f"evaluate_{f.name}_under_{f.parent.name}")
                  for f in sorted(base.glob("threats/*/*")) if f.is_dir()})
    for marker in sorted((root / "logs" / dataset).glob(f"evaluate_*{SUFFIX}{STARTED}")):
        job = marker.name.removesuffix(f"{SUFFIX}{STARTED}")
        m = re.fullmatch(r"evaluate_(\w+?)(?:_under_(\w+))?", job)
        if m:
            defence, threat = m.group(1), m.group(2) or "training"
            folder = base / ("eval" if threat == "training" else f"threats/{threat}") / defence
            found.setdefault((defence, threat), (folder, job))
    return [(d, t, folder, job) for (d, t), (folder, job) in found.items()]


def gather(project: Path) -> list[Row]:
    """Every evaluation under `project`'s output roots, its flags and its marks."""
    rows = []
    for run, root in roots(project):
        for dataset_dir in sorted((root / "data").iterdir()):
            report = dataset_dir / "report" / "report.html"
            run_rows = []
            for defence, threat, folder, job in _evaluations(root, dataset_dir.name):
                started = (root / "logs" / dataset_dir.name / f"{job}{SUFFIX}{STARTED}").exists()
                metrics = read_json(folder / "metrics.json") if (folder / "metrics.json").exists() else None
                run_rows.append(Row(run, dataset_dir.name, defence, threat, folder,
                                    _record(root, dataset_dir.name, job), report if report.exists() else None,
                                    None if started or metrics is None else metrics, running=started))
            _judge(run_rows)
            rows += run_rows
    return rows


def _spec(name: str, m: dict[str, Any]) -> DefenceSpec:
    return DEFENCES.get(m.get("variant_of") or name) or DefenceSpec(name, name, name, "")


def _judge(rows: list[Row]) -> None:
    """Each finished row's flags (fired failure indicators, masking checks) and marks (a weaker protocol than the
    current one; a positive control of its run left standing marks every row of the run)."""
    done = [r for r in rows if r.metrics is not None]
    for r in done:
        m = r.metrics
        r.flags = _flags(r.defence, m, {})  # as the run's report names them
        kinds = {a["kind"] for a in m["attacks"].values()}
        wanted = TRAINING_FAMILIES if r.threat == "training" else UNSEEN_FAMILIES
        r.marks = [f"no {kind} attack" for kind in wanted if kind not in kinds]
        if m.get("randomised"):
            if max((a.get("eot") or 1 for a in m["attacks"].values() if a["kind"] == "pgd"), default=1) <= 1:
                r.marks.append("a randomised defence attacked without EoT")
            if m.get("verdict_draws", 1) <= 1:
                r.marks.append("a randomised defence judged by one draw")
        if "indicators" not in m:
            r.marks.append("evaluated before the indicators of attack failure")
    training = {r.defence: r for r in done if r.threat == "training"}
    if not training:
        return
    outcomes = {n: point_outcomes(r.folder / "examples.safetensors") for n, r in training.items()
                if (r.folder / "examples.safetensors").exists()}
    evals = {n: r.metrics for n, r in training.items()}
    standing = [n for n, c in positive_controls(evals, outcomes, {n: _spec(n, m) for n, m in evals.items()}).items()
                if not c["broken"]]
    for r in done if standing else []:
        r.marks.append(f"its run's positive control{'s' if len(standing) > 1 else ''} {', '.join(standing)} "
                       "left standing")


def ranked(rows: list[Row]) -> dict[str, list[Row]]:
    """The rows by table (dataset and threat model), each table's ranked rows first (by the headline worst case,
    then clean accuracy), then the marked ones, then those in progress."""
    tables: dict[str, list[Row]] = {}
    for r in rows:
        tables.setdefault(r.table, []).append(r)

    def key(r: Row) -> tuple:
        if r.metrics is None:
            return (2, 0.0, 0.0)
        return (1 if r.marks else 0, -r.metrics["robust_worst_case"]["accuracy"], -r.metrics["clean"]["accuracy"])
    return {t: sorted(rs, key=key) for t, rs in sorted(tables.items())}


HEADER = ["rank", "run", "defence", "clean", "worst case (headline)", "strict bound", "attacks", "strongest alone",
          "flags", "not ranked because", "params file", "commit", "evaluated", "report"]


def cells(rank: str, r: Row, out_dir: Path) -> list[str]:
    """One row's cells, as text."""
    link = _relative(r.report, out_dir) if r.report else "not written"
    if r.metrics is None:
        state = "in progress" if r.running else "unfinished: no metrics.json, and its job is not running"
        return [rank, r.run, r.defence, state, "", "", "", "", "", "", r.params_file, r.commit, r.date, link]
    m = r.metrics
    worst = m["robust_worst_case"]
    return [rank, r.run, r.defence, _pct(m["clean"]), _pct(worst), _pct(worst["strict"]),
            f"{len(m['attacks'])}: " + ", ".join(m["attacks"]), _strongest_alone(m), "; ".join(r.flags) or "none",
            "; ".join(r.marks), r.params_file, r.commit, r.date, link]


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def paired_rows(rows: list[Row]) -> list[list[str]]:
    """For each defence evaluated under the training threat in several runs on the same test set: each pair's paired
    difference of the headline (on the first points both attacked), its interval, the sign-flip test, and whether the
    difference is real (the test decides at the intervals' level)."""
    header = ["dataset", "defence", "first run", "second run", "n", "difference", "interval", "p", "verdict"]
    out = [header]
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.metrics is not None and r.threat == "training" and (r.folder / "examples.safetensors").exists():
            groups.setdefault((r.dataset, r.defence), []).append(r)
    for (dataset, defence), rs in sorted(groups.items()):
        for i, first in enumerate(rs):
            for second in rs[i + 1:]:
                if _test_set(first) != _test_set(second):
                    continue  # other test points: nothing to pair
                names = {"a": first, "b": second}
                d = paired("a", "b", {k: v.metrics for k, v in names.items()},
                           {k: point_outcomes(v.folder / "examples.safetensors") for k, v in names.items()})
                out.append([dataset, defence, first.run, second.run, str(d["n"]), f"{100 * d['difference']:+.1f} points",
                            f"{_level(d['confidence'])} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]",
                            f"{d['p_value']:.3g}", "real" if _direction(d) != "did not measurably beat" else
                            "not measurable"])
    return out


def _test_set(r: Row) -> str | None:
    """The digest of the test images the evaluation read (its run's fetched manifest)."""
    manifest = r.folder.parents[1 if r.threat == "training" else 2] / "dataset" / "manifest.json"
    return read_json(manifest)["splits"]["test"]["sha256_images"] if manifest.exists() else None


NOTE = ("Rows are ranked by the headline worst case (the expected accuracy under the strongest attack found for each "
        "point, fresh draws judging), with its interval and n; rows whose evaluation used a weaker protocol than the "
        "current one are listed below the ranked ones with the reason, and are not ranked. Click a column to sort; type "
        "in the box to filter the rows.")

SCRIPT = """
document.querySelectorAll("table.board").forEach(table => {
  table.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {
    const body = table.tBodies[0], rows = [...body.rows], up = th.dataset.up !== "1";
    const value = r => { const c = r.cells[col]; return c.dataset.sort !== undefined ? parseFloat(c.dataset.sort) : c.innerText; };
    rows.sort((a, b) => { const x = value(a), y = value(b);
      const o = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
      return up ? o : -o; });
    th.dataset.up = up ? "1" : "0";
    rows.forEach(r => body.appendChild(r));
  }));
});
document.getElementById("filter").addEventListener("input", e => {
  const words = e.target.value.toLowerCase();
  document.querySelectorAll("table.board tbody tr").forEach(r => {
    r.hidden = words !== "" && !r.innerText.toLowerCase().includes(words); });
});
"""

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222;line-height:1.4}h1{font-size:1.5em}"
         "h2{font-size:1.15em;margin-top:1.6em}table{border-collapse:collapse;font-size:.85em}"
         "th{background:#eef2f7;text-align:left;cursor:pointer}td,th{border:1px solid #c8ccd2;padding:.25em .5em;"
         "vertical-align:top}tr.marked{color:#777;background:#fbf6ea}tr.running{color:#777;font-style:italic}"
         "#filter{font-size:1em;padding:.3em;width:30em;margin:.5em 0}")


def _sort_value(column: str, r: Row) -> float | None:
    """The number a column sorts by (None: it sorts as text)."""
    if r.metrics is None:
        return None
    worst = r.metrics["robust_worst_case"]
    return {"clean": r.metrics["clean"]["accuracy"], "worst case (headline)": worst["accuracy"],
            "strict bound": worst["strict"]["accuracy"], "attacks": float(len(r.metrics["attacks"]))}.get(column)


def _table_rows(rows: list[Row], out_dir: Path) -> list[tuple[Row, list[str]]]:
    """Each row with its cells; a rank only for the rows ranked."""
    out, rank = [], 0
    for r in rows:
        ranked_row = r.metrics is not None and not r.marks
        rank += ranked_row
        out.append((r, cells(str(rank) if ranked_row else "-", r, out_dir)))
    return out


def _html_row(r: Row, values: list[str]) -> str:
    kind = "running" if r.metrics is None else ("marked" if r.marks else "ranked")
    tds = []
    for column, value in zip(HEADER, values):
        number = _sort_value(column, r)
        attr = f' data-sort="{number:.6f}"' if number is not None else ""
        if column == "report" and value != "not written":
            tds.append(f'<td><a href="{html.escape(value)}">report</a></td>')
        else:
            tds.append(f"<td{attr}>{html.escape(value)}</td>")
    return f'<tr class="{kind}">{"".join(tds)}</tr>'


def write_leaderboard(project: Path, out_dir: Path, with_paired: bool = False) -> list[Row]:
    """Write leaderboard.html (self-contained: sortable and filterable without a server) and leaderboard.md."""
    rows = gather(project)
    tables = ranked(rows)
    finished = sum(r.metrics is not None for r in rows)
    running = sum(r.running for r in rows)
    runs = sorted({r.run for r in rows})
    intro = (f"{finished} evaluations of {len(runs)} runs ({', '.join(runs) or 'none'}), {running} in progress, "
             f"{len(rows) - finished - running} unfinished, under {project.resolve()}.")
    md = ["# Leaderboard", "", intro, "", NOTE]
    body = [f"<h1>Leaderboard</h1><p>{html.escape(intro)}</p><p>{html.escape(NOTE)}</p>",
            '<input id="filter" placeholder="filter rows: a run, a defence, a flag...">']
    for title, rs in tables.items():
        table = _table_rows(rs, out_dir)
        md += ["", f"## {title}", "", _md_table([HEADER, *(c for _, c in table)])]
        head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
        body.append(f"<h2>{html.escape(title)}</h2><table class='board'><thead><tr>{head}</tr></thead><tbody>"
                    + "".join(_html_row(r, c) for r, c in table) + "</tbody></table>")
    if with_paired:
        pairs = paired_rows(rows)
        title = "The same defence across runs, on the same points (paired)"
        md += ["", f"## {title}", "", _md_table(pairs) if len(pairs) > 1 else "No defence was evaluated on the same "
               "points in two runs."]
        body.append(f"<h2>{html.escape(title)}</h2>" + (_html_table(pairs) if len(pairs) > 1 else
                                                          "<p>No defence was evaluated on the same points in two runs.</p>"))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "leaderboard.md", "\n".join(md) + "\n")
    write_text(out_dir / "leaderboard.html", f"<!doctype html><html><head><meta charset='utf-8'><title>Leaderboard"
               f"</title><style>{STYLE}</style></head><body>{''.join(body)}<script>{SCRIPT}</script></body></html>\n")
    return rows
