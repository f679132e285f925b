"""The report: results per defence with confidence intervals, gradient-masking checks, the CARSO versus
classifier-alone verdict, reconstructions, training curves, and the settings that produced them.

Writes `report.html` (self-contained: figures embedded) and `report.md` (+ the figures as PNG files).
Every number comes from the files the pipeline wrote; the only arithmetic here is the paired comparison
of the defences' per-point verdicts on the points both were attacked on.
"""
from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any

import yaml

from carso.io import atomic_path, load_tensors, read_json, write_text
from carso.stats import paired_difference

DEFENCE_NAMES = {"at": "adversarially-trained classifier alone", "carso": "classifier + CARSO purifier"}
COLLAPSE_KL = 1.0  # nats per image: below this the latent carries almost no information
PUBLISHED = ("The paper reports CARSO above its classifier alone on CIFAR-10 (AutoAttack rand 76.13% vs "
             "67.73%, eps 8/255) and CIFAR-100 (66.65% vs 39.18%); it gives no FashionMNIST figure at eps 0.1.")


def _pct(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "not run"
    return (f"{100 * entry['accuracy']:.2f}% [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}] "
            f"(n={entry['n']})")


def read_curve(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    return buf.getvalue()


def curves_png(curve: list[dict[str, float]]) -> bytes:
    """Loss and accuracies per epoch, as a PNG (a note instead when the classifier was imported: no epochs)."""
    plt = _pyplot()
    if not curve:
        fig = plt.figure(figsize=(10, 1.2))
        fig.text(0.5, 0.5, "No training curve: the classifier was imported (classifier.pretrained), not trained.",
                 ha="center", va="center")
        return _png(fig)
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
    return _png(fig)


def purifier_curves_png(curve: list[dict[str, float]]) -> bytes:
    """The purifier's loss terms and the accuracy on one reconstruction per monitor point, per epoch."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in curve]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("loss", "loss (BCE + beta KL)"), ("bce", "BCE (summed per image)"), ("kl", "KL")):
        ax_loss.plot(epochs, [r[key] for r in curve], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="per image", title="Purifier loss", yscale="log")
    ax_loss.legend()
    for key, label in (("recon_clean_acc", "clean test"), ("recon_adv_acc", "adversarial test (transfer)")):
        ax_acc.plot(epochs, [100 * r[key] for r in curve], marker="o", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Classifier on one reconstruction")
    ax_acc.legend()
    fig.tight_layout()
    return _png(fig)


def reconstructions_png(ex: dict[str, Any], samples: int = 3) -> bytes:
    """Per example: the clean image and reconstructions of it, the adversarial image and reconstructions
    of it, each titled with the true label (y) or the prediction (p) of the defence / the classifier."""
    plt = _pyplot()
    k, n = ex["clean"].shape[0], min(samples, ex["recon_clean"].shape[1])
    cols = [("clean", None), *[("recon_clean", i) for i in range(n)],
            ("adversarial", None), *[("recon_adversarial", i) for i in range(n)]]
    fig, axes = plt.subplots(k, len(cols), figsize=(1.3 * len(cols), 1.45 * k), squeeze=False)
    for row in range(k):
        for col, (name, i) in enumerate(cols):
            img = ex[name][row] if i is None else ex[name][row, i]
            ax = axes[row, col]
            ax.imshow(img.permute(1, 2, 0).squeeze(-1).float().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i is None:
                title = f"{name[:5]} y{int(ex['labels'][row])} p{int(ex['pred_' + name][row])}"
            else:
                title = f"recon p{int(ex[name + '_pred'][row, i])}"
            ax.set_title(title, fontsize=7)
    fig.suptitle("clean | reconstructions of clean | adversarial (PGD-EoT on CARSO) | reconstructions of it",
                 fontsize=8)
    fig.tight_layout()
    return _png(fig)


def results_rows(evals: dict[str, dict[str, Any]]) -> list[list[str]]:
    header = ["defence", "clean (full test set)", "clean (attacked points)", "PGD (EoT)", "AutoAttack",
              "transfer", "robust (worst case)"]
    rows = [header]
    for name, m in evals.items():
        aa, pgd, tr = m.get("autoattack"), m["pgd"], m.get("transfer")
        rows.append([f"`{name}` ({DEFENCE_NAMES.get(name, name)})", _pct(m["clean"]), _pct(m["clean_subset"]),
                     f"{_pct(pgd)}, {pgd['steps']} steps x {pgd.get('eot', 1)} EoT x {pgd['restarts']} restarts",
                     f"{_pct(aa)}, {aa['version']}" if aa else "not run",
                     f"{_pct(tr)}, {tr.get('attack', '')} from the classifier alone" if tr else "not run",
                     _pct(m["robust_worst_case"])])
    return rows


def sanity_rows(evals: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = [["defence", "PGD, base steps", "PGD, more steps (continued)", "PGD at a very large eps",
             "signs of gradient masking"]]
    for name, m in evals.items():
        san = m.get("sanity")
        if not san:
            rows.append([f"`{name}`", "not run", "not run", "not run", "; ".join(m.get("gradient_masking", [])) or "none"])
            continue
        rows.append([f"`{name}`", f"{_pct(san['base_steps'])}, {san['base_steps']['steps']} steps",
                     f"{_pct(san['more_steps'])}, {san['more_steps']['steps']} steps",
                     f"{_pct(san['large_eps'])}, eps {san['large_eps']['eps']:.3g}",
                     "; ".join(m.get("gradient_masking", [])) or "none seen"])
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
        repeats = m.get("verdict_repeats", 1)
        noisy = (f" A point counts only if all {repeats} repeated classifications of its final adversarial version "
                 f"were correct (mean single-verdict accuracy {100 * rc['mean_accuracy']:.2f}%)."
                 if repeats > 1 and "mean_accuracy" in rc else "")
        out.append(f"`{name}`: clean accuracy {100 * m['clean']['accuracy']:.2f}% on {m['clean']['n']} test "
                   f"images; robust accuracy (a point counts only if it survives every attack) "
                   f"{100 * rc['accuracy']:.2f}% on {rc['n']} points, {int(100 * rc['confidence'])}% CI "
                   f"[{100 * rc['ci_low']:.1f}, {100 * rc['ci_high']:.1f}], L-inf eps {m['eps']:.4g}, fp32; "
                   f"AutoAttack's randomness check found the model "
                   f"{'randomised' if m.get('randomised') else 'deterministic'}.{noisy}")
        if m.get("gradient_masking"):
            out.append(f"`{name}` shows signs of gradient masking, so its white-box figures may overstate its "
                       f"robustness: {'; '.join(m['gradient_masking'])}.")
    return out


def comparison_sentence(evals: dict[str, dict[str, Any]], robust: dict[str, Any]) -> str | None:
    """Did CARSO beat the classifier alone? Paired on the points both defences were attacked on."""
    if not {"at", "carso"} <= set(evals) or not {"at", "carso"} <= set(robust):
        return None
    n = min(len(robust["at"]), len(robust["carso"]))
    conf = evals["carso"]["robust_worst_case"]["confidence"]
    d = paired_difference(robust["carso"][:n], robust["at"][:n], conf)
    acc_c, acc_a = sum(robust["carso"][:n]) / n, sum(robust["at"][:n]) / n
    ci = f"{int(100 * conf)}% CI [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] points"
    if d["ci_low"] > 0:
        verdict = f"CARSO beat the classifier alone on this run, by {100 * d['difference']:+.1f} points ({ci})"
    elif d["ci_high"] < 0:
        verdict = (f"CARSO did worse than the classifier alone on this run, by {100 * d['difference']:+.1f} points "
                   f"({ci}): on this setting the defence is weaker than the paper's CIFAR results suggest")
    else:
        verdict = (f"CARSO did not measurably beat the classifier alone on this run: difference "
                   f"{100 * d['difference']:+.1f} points ({ci}, which includes 0)")
    return (f"{verdict}. Worst-case robust accuracy on the same first {n} test points: CARSO {100 * acc_c:.2f}%, "
            f"classifier alone {100 * acc_a:.2f}% ({d['only_first']} points survived only with CARSO, "
            f"{d['only_second']} only without it). {PUBLISHED}")


def gather(root: Path) -> dict[str, Any]:
    """Read every metrics file of one dataset's results folder."""
    evals = {p.parent.name: read_json(p) for p in sorted((root / "eval").glob("*/metrics.json"))}
    robust, examples = {}, None
    for name in evals:
        path = root / "eval" / name / "examples.safetensors"
        if path.exists():
            tensors, _ = load_tensors(path)
            robust[name] = tensors["robust_worst_case"].bool().tolist()
            if "recon_clean" in tensors:
                examples = tensors
    facts = {"manifest": read_json(root / "dataset" / "manifest.json"),
             "train": read_json(root / "classifier" / "train_metrics.json"),
             "curve": read_curve(root / "classifier" / "curve.csv"),
             "adversarial": read_json(root / "adversarial" / "summary.json"), "evals": evals,
             "robust": robust, "examples": examples, "purifier": None, "purifier_curve": None}
    if (root / "purifier" / "train_metrics.json").exists():
        facts["purifier"] = read_json(root / "purifier" / "train_metrics.json")
        facts["purifier_curve"] = read_curve(root / "purifier" / "curve.csv")
    return facts


def write_report(dataset: str, root: Path, params: dict[str, Any], out_dir: Path) -> None:
    facts = gather(root)
    figures = {"training_curves": curves_png(facts["curve"])}
    if facts["purifier_curve"]:
        figures["purifier_curves"] = purifier_curves_png(facts["purifier_curve"])
    if facts["examples"] is not None:
        figures["reconstructions"] = reconstructions_png(facts["examples"])
    sections = _sections(dataset, facts, params)
    md = [f"# {params['report']['title']} ({dataset})"]
    body = [f"<h1>{html.escape(params['report']['title'])} ({dataset})</h1>"]
    for title, kind, content in sections:
        if kind == "figure" and content not in figures:
            continue
        md.append(f"\n## {title}\n")
        body.append(f"<h2>{html.escape(title)}</h2>")
        if kind == "table":
            md.append(_md_table(content))
            body.append(_html_table(content))
        elif kind == "figure":
            md.append(f"![{content}]({content}.png)")
            data = base64.b64encode(figures[content]).decode()
            body.append(f'<img alt="{content}" style="max-width:100%" src="data:image/png;base64,{data}">')
        elif kind == "code":
            md.append(f"```yaml\n{content}```")
            body.append(f"<pre>{html.escape(content)}</pre>")
        else:
            md.append("\n".join(f"- {s}" for s in content))
            body.append("<ul>" + "".join(f"<li>{html.escape(s.replace('`', ''))}</li>" for s in content) + "</ul>")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        with atomic_path(out_dir / f"{name}.png") as tmp:
            tmp.write_bytes(png)
    write_text(out_dir / "report.md", "\n".join(md) + "\n")
    style = ("body{font-family:sans-serif;max-width:80em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #999;padding:.3em .6em}pre{background:#f4f4f4;padding:1em}")
    write_text(out_dir / "report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>"
               f"{html.escape(dataset)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _purifier_lines(pur: dict[str, Any] | None) -> list[str]:
    if not pur:
        return ["not trained"]
    return [f"{pur['epochs']} epochs on {pur['train_points']} training points in {pur['train_seconds']:.0f} s on "
            f"{pur['device']} ({pur['threads']} threads), precision {pur['precision']}; {pur['parameters']:,} "
            f"parameters; representation from layers {', '.join(pur['layers'])}.",
            f"Last epoch: loss {pur['final_loss']:.2f} (BCE {pur['final_bce']:.2f}, KL {pur['final_kl']:.2f}); the "
            f"classifier on one reconstruction: {100 * pur['final_recon_clean_acc']:.2f}% of {pur['monitor_points']} "
            f"clean test images, {100 * pur['final_recon_adv_acc']:.2f}% of their {pur['monitor_attack']} versions.",
            *([f"The KL term ended at {pur['final_kl']:.3f} nats per image: the decoder nearly ignores z (posterior "
               "collapse), so CARSO's N samples are close to one reconstruction determined by the representation, "
               "and the defence is only weakly random."] if pur["final_kl"] < COLLAPSE_KL else [])]


def _imported_lines(train: dict[str, Any]) -> list[str]:
    """The classifier section when train_classifier imported the classifier (classifier.pretrained)."""
    origin = f"{train['source']}" + (f", file {train['file']}" if train.get("file") else "")
    return [f"Not trained here: {train['name']} imported from {origin}; clean {100 * train['test_clean_acc']:.2f}% "
            f"and PGD-10 (eps {train['pgd10_eps']:.4g}) {100 * train['test_pgd10_acc']:.2f}% on the first "
            f"{train['monitor_points']} test images, in fp32 on {train['device']}."]


def _sections(dataset: str, facts: dict[str, Any], params: dict[str, Any]) -> list[tuple[str, str, Any]]:
    train, man = facts["train"], facts["manifest"]["splits"]
    data_lines = [f"{split}: {info['count']} images of shape {info['shape']}, sha256 {info['sha256_images'][:16]}..."
                  for split, info in man.items()]
    train_lines = [f"{train['epochs']} epochs in {train['train_seconds']:.0f} s on {train['device']} "
                   f"({train['threads']} threads), precision {train['precision']}, channels_last "
                   f"{train['channels_last']}; last epoch: clean {100 * train['final_test_clean_acc']:.2f}% and "
                   f"PGD-10 {100 * train['final_test_adv_acc']:.2f}% on the first {train['monitor_points']} test images."
                   ] if "source" not in train else _imported_lines(train)
    summary = summary_sentences(facts["evals"])
    if sentence := comparison_sentence(facts["evals"], facts["robust"]):
        summary.insert(0, sentence)
    keys = ("runtime", "data", "classifier", "adversarial", "purifier", "carso", "evaluation")
    settings = {k: params[k] for k in keys if k in params}
    return [("Summary", "list", summary),
            ("Robust accuracy (95% Wilson intervals, fp32 attacks)", "table", results_rows(facts["evals"])),
            ("Gradient-masking checks (on the first points of the attacked ones)", "table", sanity_rows(facts["evals"])),
            ("CARSO reconstructions", "figure", "reconstructions"),
            ("Data", "list", data_lines),
            ("Adversarial training of the classifier", "list", train_lines),
            ("Classifier training curves", "figure", "training_curves"),
            ("Purifier training", "list", _purifier_lines(facts["purifier"])),
            ("Purifier training curves", "figure", "purifier_curves"),
            ("Adversarial examples against the classifier (success rate over the clean-correct points)", "table",
             adversarial_rows(facts["adversarial"])),
            ("Settings (params.yaml)", "code", yaml.safe_dump(settings, sort_keys=False))]
