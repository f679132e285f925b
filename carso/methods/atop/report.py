"""AToP's part of the report: how the inpainter was pre-trained and fine-tuned, and its curves."""
from __future__ import annotations

from typing import Any

from carso.io import read_json
from carso.layout import Results
from carso.report import Section, png, pyplot, read_curve


def inpainter_curves_png(pretrain: list[dict[str, float]], finetune: list[dict[str, float]]) -> bytes:
    """Losses and the classifier's accuracy on purified test images per epoch, fine-tuning after pre-training."""
    plt = pyplot()
    rows = [("pre-training", r["epoch"], r) for r in pretrain]
    rows += [("fine-tuning", len(pretrain) + r["epoch"], r) for r in finetune]
    x = [e for _, e, _ in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    panels = [(axes[0], (("l1_coarse", "L1, coarse stage"), ("l1_refined", "L1, refined")), "L1 (per pixel)", "log"),
              (axes[1], (("d_loss", "D hinge"), ("g_loss", "G hinge"), ("ce", "CE on purified FGSM (fine-tuning)")),
               "GAN and CE terms", "linear"),
              (axes[2], (("purified_clean_acc", "purified clean test"), ("purified_adv_acc", "purified stored attack")),
               "classifier accuracy (%)", "linear")]
    for ax, series, title, scale in panels:
        for key, label in series:
            scale_by = 100 if "acc" in key else 1
            ax.plot(x, [scale_by * r[key] for _, _, r in rows], marker="o", label=label)
        if pretrain and finetune:
            ax.axvline(len(pretrain) + 0.5, color="grey", linestyle=":")
        ax.set(xlabel="epoch (pre-training, then fine-tuning)", title=title, yscale=scale)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def stage_lines(m: dict[str, Any]) -> list[str]:
    t = m["transform"]
    lines = [f"{m['stage']}: {m['epochs']} epochs on {m['train_points']} training images in {m['train_seconds']:.0f} s "
             f"on {m['device']} ({m['threads']} threads), precision {m['precision']}; {m['parameters']:,} inpainter "
             f"parameters; transform {t['kind']} ({t['grid']} x {t['grid']} blocks, missing share "
             f"{t['missing_share']:g}, noise sigma {t['noise_sigma']:g}); last epoch {m['final_images_per_second']:.0f} "
             "training images/s.",
             f"Last epoch: L1 {m['final_l1_coarse']:.4f} (coarse) / {m['final_l1_refined']:.4f} (refined), D "
             f"{m['final_d_loss']:.3f}, G {m['final_g_loss']:.3f}, CE {m['final_ce']:.3f}; the classifier on purified "
             f"test images: {100 * m['final_purified_clean_acc']:.2f}% of {m['monitor_points']} clean ones, "
             f"{100 * m['final_purified_adv_acc']:.2f}% of their {m['monitor_attack']} versions."]
    if m["stage"] == "finetune_inpainter":
        adv = m["adversary"]
        lines.append(f"Fine-tuning term: {m['ce_weight']:g} x CE of the classifier on the purified FGSM image (eps "
                     f"{adv['eps']:g}, crafted against {'the classifier alone' if adv['target'] == 'classifier' else 'the whole purified pipeline'}), "
                     f"from epoch {m['ce_from_epoch']}.")
    return lines


def sections(results: Results, params: dict[str, Any]) -> list[Section]:
    """The inpainter's pre-training and fine-tuning summaries and curves."""
    pre, fine = results.path("atop/pretrain"), results.path("atop/finetune")
    lines = stage_lines(read_json(pre / "train_metrics.json")) + stage_lines(read_json(fine / "train_metrics.json"))
    figure = inpainter_curves_png(read_curve(pre / "curve.csv"), read_curve(fine / "curve.csv"))
    return [("AToP: inpainter training", "list", lines),
            ("AToP: inpainter training curves", "figure", ("inpainter_curves", figure))]
