"""CARSO's part of the report: how the purifier trained, its curves, and a note on posterior collapse."""
from __future__ import annotations

from typing import Any

from carso.io import read_json
from carso.layout import Results
from carso.report import Section, png, pyplot, read_curve

COLLAPSE_KL = 1.0  # nats per image: below this the latent carries almost no information


def purifier_curves_png(curve: list[dict[str, float]]) -> bytes:
    """The purifier's loss terms and the accuracy on one reconstruction per monitor point, per epoch."""
    plt = pyplot()
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
    return png(fig)


def purifier_lines(pur: dict[str, Any]) -> list[str]:
    return [f"{pur['epochs']} epochs on {pur['train_points']} training points in {pur['train_seconds']:.0f} s on "
            f"{pur['device']} ({pur['threads']} threads), precision {pur['precision']}, last epoch "
            f"{pur['final_images_per_second']:.0f} images/s; {pur['parameters']:,} "
            f"parameters; representation from layers {', '.join(pur['layers'])}.",
            f"Last epoch: loss {pur['final_loss']:.2f} (BCE {pur['final_bce']:.2f}, KL {pur['final_kl']:.2f}); the "
            f"classifier on one reconstruction: {100 * pur['final_recon_clean_acc']:.2f}% of {pur['monitor_points']} "
            f"clean test images, {100 * pur['final_recon_adv_acc']:.2f}% of their {pur['monitor_attack']} versions.",
            *([f"The KL term ended at {pur['final_kl']:.3f} nats per image: the decoder nearly ignores z (posterior "
               "collapse), so CARSO's N samples are close to one reconstruction determined by the representation, "
               "and the defence is only weakly random."] if pur["final_kl"] < COLLAPSE_KL else [])]


def sections(results: Results, params: dict[str, Any]) -> list[Section]:
    """The purifier's training summary and curves (train_purifier's files)."""
    curve = read_curve(results.path("purifier/curve.csv"))
    return [("CARSO: purifier training", "list", purifier_lines(read_json(results.path("purifier/train_metrics.json")))),
            ("CARSO: purifier training curves", "figure", ("purifier_curves", purifier_curves_png(curve)))]
