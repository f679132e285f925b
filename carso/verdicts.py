"""Verdicts: what the defence makes of each attack's final points, judged with fresh draws that no attack saw.

The attacker picks, the judge re-draws. Every attack returns one point per test point, chosen with its own queries
of the defence (its EoT draws, its own noisy checks of success, AutoAttack's best iterate). The judge then classifies
each point with draws of the defence of its own, seeded from the points themselves (`seed_from`), in two independent
sets of `draws` draws each:

- the selection draws pick, per point, the strongest attack (the lowest share of correct draws; the earlier attack
  on a tie), and the first `repeats` of them give the strict rule (a point counts only if all were correct);
- the estimate draws give the probability that the defence classifies the picked point correctly. No draw that
  chose a point judges it, so picking the minimum over attacks (a selection on noise) cannot bias the estimate.

The headline of a defence is the mean over the attacked points of that probability: its expected accuracy under the
strongest attack found for each point (carso.stats.mean_interval gives its interval). A deterministic defence is
judged once (`draws` = `repeats` = 1): its probabilities are 0 or 1 and the two rules coincide.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from carso.attacks import eot_chunks, eot_logits, predict
from carso.io import sha256_tensor
from carso.stats import mean_interval, summarise


@dataclass
class Verdict:
    """An outcome on n attacked points: the strict rule's verdict and the two shares of correct fresh draws."""

    ok: torch.Tensor        # (n,) bool: the strict rule: each of the first `repeats` selection draws was correct
    select: torch.Tensor    # (n,) float: share of the `draws` selection draws that were correct (picks; never reported)
    estimate: torch.Tensor  # (n,) float: share of the `draws` estimate draws that were correct (the figure)
    draws: int = 1
    repeats: int = 1

    @classmethod
    def certain(cls, correct: torch.Tensor) -> "Verdict":
        """Verdicts without noise (a deterministic defence, or an attack's own certain outcome)."""
        share = correct.float()
        return cls(correct.bool(), share, share.clone())

    def picks(self, later: "Verdict") -> torch.Tensor:
        """(n,) bool: where `later` is the stronger attack: a lower share of correct selection draws (ties keep
        this one, so a point whose selection share is already 0 is never picked again)."""
        return later.select < self.select

    def __and__(self, later: "Verdict") -> "Verdict":
        """Both outcomes per point: the strict rule needs both; the shares are the stronger attack's (`picks`)."""
        take = self.picks(later)
        return Verdict(self.ok & later.ok, torch.where(take, later.select, self.select),
                       torch.where(take, later.estimate, self.estimate), max(self.draws, later.draws),
                       max(self.repeats, later.repeats))

    def head(self, m: int) -> "Verdict":
        return Verdict(self.ok[:m], self.select[:m], self.estimate[:m], self.draws, self.repeats)

    def entry(self, confidence: float, **extra: object) -> dict[str, object]:
        """The headline figure (expected accuracy over the estimate draws) with its interval, and the strict rule's
        accuracy beside it with its Wilson interval and its number of repeats."""
        strict = {**summarise(self.ok.tolist(), confidence), "repeats": self.repeats}
        return {**mean_interval(self.estimate.tolist(), confidence), "confidence": confidence,
                "draws": self.draws, "strict": strict, **extra}


def neutral(n: int) -> Verdict:
    """The outcome of no attack: correct, never picked."""
    return Verdict.certain(torch.ones(n, dtype=torch.bool))


def scatter(verdict: Verdict, idx: torch.Tensor, n: int) -> Verdict:
    """A verdict on the points `idx` as one on all `n` points, neutral on the others."""
    full = neutral(n)
    full.ok[idx], full.select[idx], full.estimate[idx] = verdict.ok, verdict.select, verdict.estimate
    full.draws, full.repeats = verdict.draws, verdict.repeats
    return full


def seed_from(points: torch.Tensor) -> None:
    """Seed the global RNG from `points`, so a randomised defence's verdict on them does not depend on what ran
    before it: an evaluation resumed from stored batches gives the same verdicts as an uninterrupted one."""
    torch.manual_seed(int(sha256_tensor(points)[:12], 16))


@torch.no_grad()
def correct_draws(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int, device: torch.device,
                  batch_size: int, pass_images: int | None = None) -> torch.Tensor:
    """(draws, n) bool: whether each of `draws` independent passes of `model` classifies each point correctly, the
    draws of a batch computed in passes of up to `pass_images` images (carso.attacks.eot_logits)."""
    rows = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        parts = [(eot_logits(model, xb, d).argmax(1) == yb.repeat(d)).view(d, -1).cpu()
                 for d in eot_chunks(model, len(xb), draws, pass_images)]
        rows.append(torch.cat(parts))
    return torch.cat(rows, dim=1) if rows else torch.zeros(draws, 0, dtype=torch.bool)


class Judge:
    """Judges final points: once for a deterministic defence; for a randomised one, `draws` selection draws and
    `draws` estimate draws per point (the strict rule: the first `repeats` selection draws), seeded from the points."""

    def __init__(self, model: nn.Module, randomised: bool, draws: int, repeats: int, device: torch.device,
                 batch_size: int, pass_images: int | None = None) -> None:
        self.model, self.randomised, self.device, self.batch_size = model, randomised, device, batch_size
        self.draws, self.repeats = (draws, repeats) if randomised else (1, 1)
        self.pass_images = pass_images

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Verdict:
        if not self.randomised:
            return Verdict.certain(predict(self.model, x, self.device, self.batch_size) == y)
        seed_from(x)
        correct = correct_draws(self.model, x, y, 2 * self.draws, self.device, self.batch_size, self.pass_images)
        chosen, fresh = correct[:self.draws], correct[self.draws:]  # (draws, n) each
        return Verdict(chosen[:self.repeats].all(dim=0), chosen.float().mean(dim=0), fresh.float().mean(dim=0),
                       self.draws, self.repeats)
