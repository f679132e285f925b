"""The cascade of one defence's attacks and its per-point worst case."""
from __future__ import annotations

import functools
import logging
import operator
from typing import Any, Callable

import torch

from carso.verdicts import Verdict

log = logging.getLogger(__name__)

Runner = Callable[[torch.Tensor], tuple[Verdict, torch.Tensor]]  # indices -> (their verdict, their attacked points)


def worst_of(verdicts: list[Verdict]) -> Verdict:
    """Several attacks' verdicts on the same points as one: per point the strongest (`Verdict.__and__`)."""
    return functools.reduce(operator.and_, verdicts)


class Cascade:
    """The attacked points of one defence and what the attacks so far left of them.

    The first `m` points (the standalone subset, `sanity.n_points`) get every attack, so each attack's own
    figure and the gradient-masking checks that compare attacks stand on the same points. The other points get
    an attack only while the judge's selection draws still found the defence correct at least once on the point
    picked so far (AutoAttack's own practice, for a deterministic defence: while every earlier attack left it
    correct). That threshold, a selection share of exactly 0, loses nothing: the pick keeps the earlier attack on a
    tie and no share is below 0, so no later attack could be picked there, and both figures, the headline and the
    strict rule (already broken), are those of running every attack on every point. A point whose selection draws
    never find the defence correct clean is attacked by nothing and keeps its clean figures.

    `picked` records, per point, which attack the selection draws picked as the strongest so far (0: none beat the
    clean point)."""

    def __init__(self, clean: Verdict, m: int, confidence: float) -> None:
        self.clean, self.worst, self.confidence, self.m = clean, clean, confidence, m
        self.subset = torch.arange(len(clean.ok)) < m
        self.steps: list[dict[str, Any]] = []
        self.names = ["clean"]
        self.picked = torch.zeros(len(clean.ok), dtype=torch.long)

    def targets(self, subset_only: bool = False) -> torch.Tensor:
        """Indices of the points the next attack runs on: some selection draw correct clean, and in the subset or
        some selection draw still correct on the point picked so far."""
        wanted = self.subset if subset_only else self.subset | (self.worst.select > 0)
        return ((self.clean.select > 0) & wanted).nonzero().squeeze(1)

    def record(self, name: str, verdict: Verdict, attacked: int, seconds: float) -> None:
        """Fold an attack's verdict (neutral on the points it did not run on) into the worst case."""
        self.picked[self.worst.picks(verdict)] = len(self.names)
        self.names.append(name)
        self.worst = self.worst & verdict
        self.steps.append({"attack": name, "attacked_points": attacked, "seconds": round(seconds, 1),
                           **self.worst.entry(self.confidence)})
        log.info("cascade: after %s (%d points attacked, %.0f s) expected accuracy %.4f (strict %.4f) on %d points",
                 name, attacked, seconds, self.worst.estimate.mean().item(), self.worst.ok.float().mean().item(),
                 len(self.worst.ok))

    def strongest(self) -> dict[str, int]:
        """How many points each attack was finally picked on as the strongest (clean: none beat the clean point)."""
        return {name: int((self.picked == i).sum()) for i, name in enumerate(self.names)}

    def summary(self) -> list[dict[str, Any]]:
        """Each step as it ran (the worst case after it), with the points where that attack was finally picked."""
        picked = self.strongest()
        return [{**step, "picked_points": picked[step["attack"]]} for step in self.steps]

    def standalone(self, verdict: Verdict, points: int | None = None) -> Verdict:
        """An attack's own verdict on the subset (the clean point and this attack's, the stronger per point); on its
        first `points` only, for an attack capped below the subset (a query attack's `n_points`)."""
        return (self.clean & verdict).head(self.m if points is None else min(self.m, points))


def place(x: torch.Tensor, idx: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """`x` with the points `idx` replaced by `part`."""
    out = x.clone()
    out[idx] = part
    return out
