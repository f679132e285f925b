"""What a query attack sees of a randomised defence.

One query of a randomised defence sees one random draw, so a query attack can lock in a lucky draw: Square keeps a
candidate whose noisy score beat the best so far, and a decision-based attack probes with steps smaller than the
defence's own noise. `DrawAverage` answers each query with the mean of the defence's probabilities over `k`
independent draws (as log-probabilities, so a margin on them is the logit margin when k is 1), and its decisions
are a majority over the k draws. With k = 1 it is the defence itself. The attacks' final points are judged apart,
with fresh draws that no query saw (carso.verdicts)."""
from __future__ import annotations

import torch
from torch import nn

from carso.attacks import eot_chunks, eot_logits


class DrawAverage(nn.Module):
    """`model` queried through `k` draws per input, computed in batched passes of up to `pass_images` images."""

    def __init__(self, model: nn.Module, k: int, pass_images: int | None = None) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"a query view averages at least one draw, not {k}")
        self.model, self.k, self.pass_images = model, k, pass_images

    def _draws(self, x: torch.Tensor) -> torch.Tensor:
        """(k, B, classes) logits, one row block per draw."""
        if self.k == 1:
            return self.model(x)[None]
        parts = [eot_logits(self.model, x, d).float().view(d, len(x), -1)
                 for d in eot_chunks(self.model, len(x), self.k, self.pass_images)]
        return torch.cat(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """log of the mean over the k draws of the softmax probabilities (the logits themselves when k is 1)."""
        logits = self._draws(x)
        if self.k == 1:
            return logits[0]
        return (logits.log_softmax(dim=2).logsumexp(dim=0) - torch.log(torch.tensor(float(self.k)))).to(x.dtype)

    @torch.no_grad()
    def decide(self, x: torch.Tensor) -> torch.Tensor:
        """Each input's label by a majority of the k draws' labels (ties: the smallest label)."""
        logits = self._draws(x)  # (k, B, classes)
        labels = logits.argmax(dim=2)
        votes = torch.zeros(len(x), logits.shape[2], dtype=torch.long, device=x.device)
        votes.scatter_add_(1, labels.T, torch.ones_like(labels.T))
        return votes.argmax(dim=1)
