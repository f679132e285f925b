"""Aggregation of the N classifications of N reconstructions into one logit vector per image.

All functions take logits of shape (B, N, K) (image, sample, class) and return (B, K).
`peel`, `logit` and `prob` are differentiable, so an attack gets true gradients through them;
`count` (majority vote) is not, and is for reporting only.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from carso.errors import UserError


def aggregate_peel(logits: torch.Tensor) -> torch.Tensor:
    """p_k = softmax_k(sum_i exp(l_ik)); returns log(p_k / (1 - p_k)), computed in the log domain.

    With s_k = sum_i exp(l_ik): log p_k - log(1 - p_k) = s_k - logsumexp_{j != k} s_j.
    """
    s = logits.exp().sum(dim=1)  # (B, K)
    k = s.shape[1]
    others = s.unsqueeze(1).expand(-1, k, -1)  # (B, K, K): row k holds every s_j
    mask = torch.eye(k, dtype=torch.bool, device=s.device).unsqueeze(0)
    return s - others.masked_fill(mask, float("-inf")).logsumexp(dim=2)


def aggregate_logit(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the logits over the samples."""
    return logits.mean(dim=1)


def aggregate_prob(logits: torch.Tensor) -> torch.Tensor:
    """Mean over samples of sigmoid(l_ik), returned as its logit."""
    q = torch.sigmoid(logits).mean(dim=1).clamp(1e-7, 1 - 1e-7)
    return torch.log(q) - torch.log1p(-q)


def aggregate_count(logits: torch.Tensor) -> torch.Tensor:
    """Majority vote: the number of samples that predict each class (ties: the lower class index wins)."""
    return F.one_hot(logits.argmax(dim=2), logits.shape[2]).sum(dim=1).to(logits.dtype)


AGGREGATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "peel": aggregate_peel, "logit": aggregate_logit, "prob": aggregate_prob, "count": aggregate_count}


def get_aggregation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in AGGREGATIONS:
        raise UserError(f"aggregation '{name}' is unknown; choose one of {sorted(AGGREGATIONS)}.")
    return AGGREGATIONS[name]
