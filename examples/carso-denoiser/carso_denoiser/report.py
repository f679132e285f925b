"""The plugin's part of carso's report: how the denoiser trained (called as f(results, params))."""
from __future__ import annotations

from typing import Any

from carso.plugin import read_json


def sections(results: Any, params: dict[str, Any]) -> list[tuple[str, str, Any]]:
    m = read_json(results.path("denoiser/train_metrics.json"))
    return [("Denoiser (example plugin carso-denoiser)", "list",
             [f"{m['epochs']} epoch(s) on {m['train_pairs']} (noisy, clean) pairs, the clean images and their "
              f"{', '.join(m['attacks'])} versions; final mean squared error {m['final_mse']:.5f}."])]
