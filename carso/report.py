"""The report: results table with confidence intervals, the settings that produced them, training curves.

Writes `report.html` (self-contained: the figure is embedded) and `report.md` (+ `training_curves.png`).
Every number comes from the metrics files the pipeline wrote; nothing here is computed anew.
"""
from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any

import yaml

from carso.io import atomic_path, read_json, write_text

DEFENCE_NAMES = {"at": "adversarially-trained classifier alone"}


def _pct(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "not run"
    return (f"{100 * entry['accuracy']:.2f}% [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}] "
            f"(n={entry['n']})")


def read_curve(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def curves_png(curve: list[dict[str, float]]) -> bytes:
    """Loss and accuracies per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in curve]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [r["train_loss"] for r in curve], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="adversarial training loss", title="Training loss")
    for key, label in (("train_adv_acc", "train (adversarial batches)"), ("test_clean_acc", "test clean"),
                       ("test_adv_acc", "test PGD-10")):
        ax_acc.plot(epochs, [100 * r[key] for r in curve], marker="o", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy per epoch")
    ax_acc.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def results_rows(evals: dict[str, dict[str, Any]]) -> list[list[str]]:
    header = ["defence", "clean (full test set)", "clean (attacked points)", "PGD", "AutoAttack",
              "robust (worst case)"]
    rows = [header]
    for name, m in evals.items():
        aa = m.get("autoattack")
        rows.append([f"`{name}` ({DEFENCE_NAMES.get(name, name)})", _pct(m["clean"]), _pct(m["clean_subset"]),
                     f"{_pct(m['pgd'])}, {m['pgd']['steps']} steps x {m['pgd']['restarts']}",
                     f"{_pct(aa)}, {aa['version']}" if aa else "not run", _pct(m["robust_worst_case"])])
    return rows


def adversarial_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = [["split", "attack", "eps", "steps", "accuracy", "success rate"]]
    for split in ("train", "test"):
        for name, s in summary[split].items():
            if isinstance(s, dict):
                rows.append([split, name, f"{s['eps']:.4g}", str(s.get("steps", 1)),
                             f"{100 * s['accuracy']:.2f}%", f"{100 * s['success_rate']:.2f}%"])
    return rows


def _md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.replace('`', ''))}</td>" for c in r) + "</tr>"
                   for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_sentences(evals: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for name, m in evals.items():
        rc = m["robust_worst_case"]
        out.append(f"`{name}`: clean accuracy {100 * m['clean']['accuracy']:.2f}% on {m['clean']['n']} test "
                   f"images; robust accuracy (a point counts only if it survives every attack) "
                   f"{100 * rc['accuracy']:.2f}% on {rc['n']} points, {int(100 * rc['confidence'])}% CI "
                   f"[{100 * rc['ci_low']:.1f}, {100 * rc['ci_high']:.1f}], L-inf eps {m['eps']:.4g}, fp32; "
                   f"AutoAttack's randomness check found the model "
                   f"{'randomised' if m.get('randomised') else 'deterministic'}.")
    return out


def gather(root: Path) -> dict[str, Any]:
    """Read every metrics file of one dataset's results folder."""
    evals = {p.parent.name: read_json(p) for p in sorted((root / "eval").glob("*/metrics.json"))}
    return {"manifest": read_json(root / "dataset" / "manifest.json"),
            "train": read_json(root / "classifier" / "train_metrics.json"),
            "curve": read_curve(root / "classifier" / "curve.csv"),
            "adversarial": read_json(root / "adversarial" / "summary.json"), "evals": evals}


def write_report(dataset: str, root: Path, params: dict[str, Any], out_dir: Path) -> None:
    facts = gather(root)
    png = curves_png(facts["curve"])
    sections = _sections(dataset, facts, params)
    md = [f"# {params['report']['title']} ({dataset})"]
    body = [f"<h1>{html.escape(params['report']['title'])} ({dataset})</h1>"]
    for title, kind, content in sections:
        md.append(f"\n## {title}\n")
        body.append(f"<h2>{html.escape(title)}</h2>")
        if kind == "table":
            md.append(_md_table(content))
            body.append(_html_table(content))
        elif kind == "figure":
            md.append("![training curves](training_curves.png)")
            body.append(f'<img alt="training curves" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
        elif kind == "code":
            md.append(f"```yaml\n{content}```")
            body.append(f"<pre>{html.escape(content)}</pre>")
        else:
            md.append("\n".join(f"- {s}" for s in content))
            body.append("<ul>" + "".join(f"<li>{html.escape(s.replace('`', ''))}</li>" for s in content) + "</ul>")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "training_curves.png") as tmp:
        tmp.write_bytes(png)
    write_text(out_dir / "report.md", "\n".join(md) + "\n")
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #999;padding:.3em .6em}pre{background:#f4f4f4;padding:1em}")
    write_text(out_dir / "report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>"
               f"{html.escape(dataset)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _sections(dataset: str, facts: dict[str, Any], params: dict[str, Any]) -> list[tuple[str, str, Any]]:
    train, man = facts["train"], facts["manifest"]["splits"]
    data_lines = [f"{split}: {info['count']} images of shape {info['shape']}, sha256 {info['sha256_images'][:16]}..."
                  for split, info in man.items()]
    train_lines = [f"{train['epochs']} epochs in {train['train_seconds']:.0f} s on {train['device']} "
                   f"({train['threads']} threads), precision {train['precision']}, channels_last "
                   f"{train['channels_last']}; last epoch: clean {100 * train['final_test_clean_acc']:.2f}% and "
                   f"PGD-10 {100 * train['final_test_adv_acc']:.2f}% on the first {train['monitor_points']} test images."]
    settings = {k: params[k] for k in ("runtime", "data", "classifier", "adversarial", "evaluation")}
    return [("Summary", "list", summary_sentences(facts["evals"])),
            ("Robust accuracy (95% Wilson intervals, fp32 attacks)", "table", results_rows(facts["evals"])),
            ("Data", "list", data_lines),
            ("Adversarial training", "list", train_lines),
            ("Training curves", "figure", None),
            ("Adversarial examples against the classifier (success rate over the clean-correct points)", "table",
             adversarial_rows(facts["adversarial"])),
            ("Settings (params.yaml)", "code", yaml.safe_dump(settings, sort_keys=False))]
