"""Attacks in [0, 1] pixel space under an L-inf, L2 or L1 threat model: FGSM (optionally with random start), PGD,
and Square (score-based, no gradients, from pyautoattack).

Every attack returns a perturbed batch that lies inside the eps-ball around `x` and inside [0, 1].
The caller chooses the model's mode and precision: training wraps these in bf16 autocast when asked,
evaluation always runs them in fp32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from carso.engine import draws_per_pass


@dataclass(frozen=True)
class AttackSpec:
    """One attack: `fgsm` (one step of size `step_size`, random start if asked) or `pgd`, in the `norm` ball."""

    method: str               # "fgsm" | "pgd"
    eps: float                # radius of the ball, in [0, 1] pixel units
    steps: int = 1            # gradient steps (1 for FGSM)
    step_size: float | None = None  # per-step size; None: eps for FGSM, 2.5 * eps / steps for PGD
    random_start: bool = True  # start from a uniform point in the ball (PGD, FGSM-RS)
    restarts: int = 1          # PGD restarts; a point counts as broken if any restart breaks it
    eot: int = 1               # Expectation over Transformation: gradients averaged over this many
                               # forward/backward passes per step (for randomised defences)
    loss: str = "ce"           # what the attack maximises: ce (cross-entropy) | dlr (AutoAttack's difference of logits
                               # ratio) | cw (the logit margin); the margin losses ignore any scaling of the output
    zero_grad_patience: int | None = None  # PGD stops on a point after this many steps in a row whose (EoT)
                               # input gradient was exactly zero: it learns nothing there (None: never stop)
    norm: str = "Linf"         # threat model: Linf (signed-gradient steps) | L2 (steps along the normalised gradient)
                               # | L1 (sparse steps on the largest gradient coordinates, `ascent_direction`)
    pass_images: int | None = None  # EoT draws are batched into passes of up to this many images (each draw with its
                               # own randomness: the same gradient estimate in fewer, larger passes); None: one per pass

    @property
    def alpha(self) -> float:
        if self.step_size is not None:
            return self.step_size
        return self.eps if self.method == "fgsm" else 2.5 * self.eps / self.steps


NORMS = ("Linf", "L2", "L1")
L1_STEP_SHARE = 0.05  # an L1 step moves the largest 5% of the usable gradient coordinates (SLIDE's 95th percentile)


def _per_point(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-point value shaped to broadcast over the dimensions of `like`'s points."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def _l2(t: torch.Tensor) -> torch.Tensor:
    """Per-point L2 norm, shaped to broadcast over the point's dimensions."""
    return _per_point(t.flatten(1).norm(dim=1), t)


def distance(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-point `norm` distance between `x_adv` and `x` (a vector)."""
    delta = (x_adv - x).flatten(1)
    orders = {"Linf": float("inf"), "L2": 2.0, "L1": 1.0}
    if norm not in orders:
        raise ValueError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    return delta.norm(p=orders[norm], dim=1)


def inside(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, slack: float = 1e-4) -> torch.Tensor:
    """Per point: does `x_adv` lie in the `norm` ball of radius `eps` around `x` (up to float32 rounding, `slack`
    relative to eps: an L1 distance sums the rounding of every pixel moved) and in [0, 1]?"""
    in_ball = distance(x_adv, x, norm) <= eps * (1 + slack)
    in_box = (x_adv.flatten(1).amin(dim=1) >= 0) & (x_adv.flatten(1).amax(dim=1) <= 1)
    return in_ball & in_box


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str = "Linf") -> torch.Tensor:
    """`x_adv` moved into the `norm` ball of radius `eps` around `x`, and into [0, 1].

    L2: the perturbation is scaled onto the ball; clipping to [0, 1] afterwards only shortens it (each
    coordinate moves towards `x`, which lies in [0, 1]), so the result stays in the ball. L1: the exact projection
    onto the intersection of the ball and the box (pyautoattack's, the one APGD-L1 uses), as clipping after an L1
    projection would leave budget unused."""
    if norm == "Linf":
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    if norm == "L2":
        delta = x_adv - x
        scale = (eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (x + delta * scale).clamp_(0.0, 1.0)
    if norm != "L1":
        raise ValueError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    from pyautoattack.autopgd_base import L1_projection

    delta = x_adv - x
    return (x + delta + L1_projection(x, delta, eps).to(x.dtype)).clamp_(0.0, 1.0)


def ascent_direction(grad: torch.Tensor, norm: str, x_adv: torch.Tensor | None = None) -> torch.Tensor:
    """The steepest-ascent step of unit size in `norm`: the gradient's sign (L-inf), its direction (L2), or (L1) a
    sparse step: the sign on the largest `L1_STEP_SHARE` of the coordinates that can still move that way (given
    `x_adv`, a pixel at 0 or 1 pushed outward is left out, as APGD-L1 does), scaled to unit L1 norm (Tramer & Boneh
    2019; a dense L1 step would spread its budget over every pixel and reach nothing). A zero gradient gives a zero
    step in every norm."""
    if norm == "Linf":
        return grad.sign()
    if norm == "L2":
        return grad / _l2(grad).clamp_min(1e-12)
    if norm != "L1":
        raise ValueError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    g = grad.flatten(1).clone()
    if x_adv is not None:
        pixel = x_adv.flatten(1)
        g[((pixel <= 0) & (g < 0)) | ((pixel >= 1) & (g > 0))] = 0
    k = max(1, round(L1_STEP_SHARE * g.shape[1]))
    top = g.abs().topk(k, dim=1).values[:, -1:]
    sparse = torch.where((g.abs() >= top) & (g != 0), g.sign(), torch.zeros_like(g))
    sparse = sparse / sparse.abs().sum(dim=1, keepdim=True).clamp_min(1.0)
    return sparse.view_as(grad)


LOSSES = ("ce", "dlr", "cw")


def attack_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-point loss an attack maximises (the point is misclassified once a margin loss is above 0).

    ce: cross-entropy, which saturates to exactly 0 (and so does its gradient) on steeply scaled outputs;
    cw: max over other classes of z_i, minus z_y (Carlini & Wagner's margin, without a confidence clamp);
    dlr: that margin over z_(1) - z_(3), the gap between the largest and third-largest logit (Croce & Hein 2020),
    invariant to any scaling and shift of the logits."""
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if kind not in LOSSES:
        raise ValueError(f"unknown attack loss {kind!r}; use one of {', '.join(LOSSES)}")
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    margin = other - true
    if kind == "cw":
        return margin
    top = logits.topk(3, dim=1).values
    return margin / (top[:, 0] - top[:, 2] + 1e-12)


def eot_logits(model: nn.Module, x: torch.Tensor, draws: int) -> torch.Tensor:
    """`draws` independent passes of `model` on `x` as one batch: (draws * B, K), pass d in rows d*B .. d*B + B-1.
    A defence with a `draws` method computes what does not change between passes once (CARSO's condition)."""
    if draws == 1:
        return model(x)
    if hasattr(model, "draws"):
        return model.draws(x, draws)
    return model(x.repeat(draws, *([1] * (x.dim() - 1))))


def eot_chunks(model: nn.Module, batch: int, eot: int, pass_images: int | None) -> list[int]:
    """The draws of one EoT estimate on `batch` points, grouped into passes (`carso.engine.draws_per_pass`)."""
    per_pass = draws_per_pass(model, batch, eot, pass_images)
    full, rest = divmod(eot, per_pass)
    return [per_pass] * full + ([rest] if rest else [])


def eot_passes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int, loss: str, pass_images: int | None,
               autocast: contextlib.AbstractContextManager | None = None
               ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The passes of one `eot`-draw estimate on `x` (`eot_chunks`): for each, its number of draws, their logits
    (fp32, pass d in rows d*B .. d*B + B-1), their per-point `loss` and its summed gradient w.r.t. `x`."""
    x = x.detach().requires_grad_(True)
    for draws in eot_chunks(model, len(x), eot, pass_images):
        with torch.enable_grad(), autocast or contextlib.nullcontext():
            logits = eot_logits(model, x, draws).float()
            value = attack_loss(logits, y.repeat(draws), loss)
            (grad,) = torch.autograd.grad(value.sum(), x)
        yield draws, logits.detach(), value.detach(), grad


class BatchedEoT(nn.Module):
    """A randomised defence as pyautoattack's APGD sees it through its model-computes-the-loss interface
    (`is_tf_model`): in each step APGD asks `eot` times for logits, per-point loss and input gradient, each a fresh
    draw of the defence, and sums the gradients. The first request of a step computes all `eot` draws in batched
    passes (`eot_logits`, up to `pass_images` images each: CARSO's condition once per pass); the following
    requests on the same input are answered from them, draw by draw. Each answer carries its own draw's logits and
    loss and 1/eot of the summed gradient, so APGD's sum, and the logits and loss of its last draw that it
    keeps, are those its own loop would compute with the same draws (`tests/test_engine.py` checks it).
    Losses are `attack_loss`'s (cross-entropy; DLR as in AutoAttack), fp32."""

    def __init__(self, model: nn.Module, eot: int, pass_images: int | None) -> None:
        super().__init__()
        self.model, self.eot, self.pass_images = model, eot, pass_images
        self._x: torch.Tensor | None = None  # the input whose remaining draws are queued
        self._queue: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def get_logits_loss_grad_xent(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._answer(x, y, "ce")

    def get_logits_loss_grad_dlr(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._answer(x, y, "dlr")

    def get_logits_loss_grad_target(self, x: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor) -> tuple:
        raise NotImplementedError("batched EoT serves AutoAttack's untargeted APGD (version rand) only")

    def _answer(self, x: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, ...]:
        if self._x is not x or not self._queue:
            self._x, self._queue = x, self._draw_all(x, y, loss)
        return self._queue.pop(0)

    def _draw_all(self, x: torch.Tensor, y: torch.Tensor, loss: str) -> list[tuple[torch.Tensor, ...]]:
        total = torch.zeros_like(x)
        logits, losses = [], []
        for draws, out, per_point, grad in eot_passes(self.model, x, y, self.eot, loss, self.pass_images):
            total += grad
            logits += out.chunk(draws)
            losses += per_point.chunk(draws)
        share = total / self.eot
        return [(z, v, share) for z, v in zip(logits, losses)]


def _input_gradient(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
                    autocast: contextlib.AbstractContextManager | None, eot: int = 1, loss: str = "ce",
                    pass_images: int | None = None) -> torch.Tensor:
    """Gradient of the summed attack loss w.r.t. the input, averaged over `eot` draws (batched up to `pass_images`)."""
    total = torch.zeros_like(x_adv)
    for *_, grad in eot_passes(model, x_adv, y, eot, loss, pass_images, autocast):
        total += grad
    return total / eot


def _random_start(x: torch.Tensor, eps: float, norm: str = "Linf") -> torch.Tensor:
    """A uniform point of the L-inf ball; (L2) a random direction at a radius drawn uniformly in [0, eps]; (L1) a
    Laplace direction, scaled to unit L1 norm, at such a radius (then projected into the box)."""
    if norm == "Linf":
        return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0)
    radius = _per_point(torch.rand(len(x), device=x.device, dtype=x.dtype) * eps, x)
    if norm == "L2":
        return project(x + ascent_direction(torch.randn_like(x), "L2") * radius, x, eps, "L2")
    direction = torch.distributions.Laplace(0.0, 1.0).sample(x.shape).to(x)
    direction = direction / _per_point(direction.flatten(1).abs().sum(dim=1).clamp_min(1e-12), x)
    return project(x + direction * radius, x, eps, norm)


def pgd_single(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
               autocast: contextlib.AbstractContextManager | None = None,
               x_start: torch.Tensor | None = None) -> torch.Tensor:
    """One run of projected signed-gradient ascent on `spec.loss` (FGSM when steps == 1),
    from `x_start` when given (to continue an earlier run), else from a random or the clean point."""
    if x_start is not None:
        x_adv = project(x_start.clone(), x, spec.eps, spec.norm)
    else:
        x_adv = _random_start(x, spec.eps, spec.norm) if spec.random_start else x.clone()
    if spec.zero_grad_patience is not None:
        return _pgd_with_patience(model, x, y, x_adv, spec, autocast)
    for _ in range(spec.steps):
        grad = _input_gradient(model, x_adv, y, autocast, spec.eot, spec.loss, spec.pass_images)
        x_adv = project(x_adv.detach() + spec.alpha * ascent_direction(grad, spec.norm, x_adv), x, spec.eps, spec.norm)
    return x_adv.detach()


def _pgd_with_patience(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, spec: AttackSpec,
                       autocast: contextlib.AbstractContextManager | None) -> torch.Tensor:
    """PGD steps on the points still active: a point whose gradient was exactly zero for `zero_grad_patience`
    steps in a row (a saturated loss: its sign step does not move it) leaves the batch where it stands."""
    x_adv = x_adv.detach().clone()
    active = torch.arange(len(x), device=x.device)
    zero_run = torch.zeros(len(x), dtype=torch.long, device=x.device)
    for _ in range(spec.steps):
        if len(active) == 0:
            break
        grad = _input_gradient(model, x_adv[active], y[active], autocast, spec.eot, spec.loss, spec.pass_images)
        step = spec.alpha * ascent_direction(grad, spec.norm, x_adv[active])
        x_adv[active] = project(x_adv[active] + step, x[active], spec.eps, spec.norm)
        zero = grad.flatten(1).abs().amax(dim=1) == 0
        zero_run[active] = torch.where(zero, zero_run[active] + 1, 0)
        active = active[zero_run[active] < spec.zero_grad_patience]
    return x_adv


def pgd_tracked(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
                x_start: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`spec` (PGD, or FGSM when steps == 1) as the evaluation runs it: each point returns its best iterate, not
    only its last one, and the run's trajectory comes back for the attack-failure indicators.

    Every iterate is scored by the attacker's own queries, the `spec.eot` draws its gradient step computes anyway
    (the last iterate: one more pass without gradients): the share of those draws that classify it correctly, then
    its mean loss. A point returns the iterate with the lowest share, the highest loss among equal shares, the
    latest among equal both. For a deterministic defence an iterate that fooled the model mid-run and was lost
    by a later step (a silent success) is kept; for a randomised one the pick uses the attacker's noisy draws, and
    the evaluation judges it again with fresh ones (carso.verdicts).

    Returns the points and, per point: `loss` and `correct` (steps + 1 columns: the attack loss averaged over the
    draws and their share classified correctly, at each iterate; a point stopped by `zero_grad_patience` repeats
    its last values), `picked` (the index of the returned iterate) and `last` (the share at the last iterate).
    Restarts: a further run replaces a point's pick where its share is lower; the trajectory is the first run's."""
    x_adv, trace = _tracked_run(model, x, y, spec, x_start)
    for _ in range(spec.restarts - 1):
        idx = (trace["best"] > 0).nonzero().squeeze(1)
        if len(idx) == 0:
            break
        x_new, again = _tracked_run(model, x[idx], y[idx], spec, None)
        better = again["best"] < trace["best"][idx]
        x_adv[idx[better]] = x_new[better]
        trace["best"][idx[better]] = again["best"][better]
    return x_adv, trace


def _scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, grad: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per point: the share of `spec.eot` draws that classify `x` correctly, the mean attack loss over them, and
    (with `grad`) the mean input gradient, in the batched passes of `eot_passes`."""
    correct = torch.zeros(len(x), device=x.device)
    loss = torch.zeros(len(x), device=x.device)
    if not grad:
        with torch.no_grad():
            for draws in eot_chunks(model, len(x), spec.eot, spec.pass_images):
                logits = eot_logits(model, x, draws).float()
                correct += (logits.argmax(1) == y.repeat(draws)).float().view(draws, -1).sum(0)
                loss += attack_loss(logits, y.repeat(draws), spec.loss).view(draws, -1).sum(0)
        return correct / spec.eot, loss / spec.eot, None
    total = torch.zeros_like(x)
    for draws, logits, value, g in eot_passes(model, x, y, spec.eot, spec.loss, spec.pass_images):
        correct += (logits.argmax(1) == y.repeat(draws)).float().view(draws, -1).sum(0)
        loss += value.view(draws, -1).sum(0)
        total += g
    return correct / spec.eot, loss / spec.eot, total / spec.eot


def _tracked_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
                 x_start: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One run of `pgd_tracked` (its docstring); the trace also holds `best`, the returned iterate's share."""
    if x_start is not None:
        x_adv = project(x_start.clone(), x, spec.eps, spec.norm)
    else:
        x_adv = _random_start(x, spec.eps, spec.norm) if spec.random_start else x.clone()
    x_adv, n = x_adv.detach(), len(x)
    loss_t = torch.zeros(n, spec.steps + 1, device=x.device)
    correct_t = torch.zeros(n, spec.steps + 1, device=x.device)
    x_best, best = x_adv.clone(), torch.full((n,), 2.0, device=x.device)
    best_loss, picked = torch.full((n,), float("-inf"), device=x.device), torch.zeros(n, dtype=torch.long)
    active = torch.arange(n, device=x.device)
    zero_run = torch.zeros(n, dtype=torch.long, device=x.device)

    def keep(t: int, idx: torch.Tensor, share: torch.Tensor, value: torch.Tensor) -> None:
        loss_t[idx, t:], correct_t[idx, t:] = value[:, None], share[:, None]  # stopped points repeat their values
        better = (share < best[idx]) | ((share == best[idx]) & (value >= best_loss[idx]))
        chosen = idx[better]
        x_best[chosen], best[chosen], best_loss[chosen] = x_adv[chosen], share[better], value[better]
        picked[chosen.cpu()] = t

    for t in range(spec.steps):
        if len(active) == 0:
            break
        share, value, grad = _scores(model, x_adv[active], y[active], spec, grad=True)
        keep(t, active, share, value)
        step = spec.alpha * ascent_direction(grad, spec.norm, x_adv[active])
        x_adv[active] = project(x_adv[active] + step, x[active], spec.eps, spec.norm)
        if spec.zero_grad_patience is not None:
            zero = grad.flatten(1).abs().amax(dim=1) == 0
            zero_run[active] = torch.where(zero, zero_run[active] + 1, 0)
            active = active[zero_run[active] < spec.zero_grad_patience]
    if len(active):
        share, value, _ = _scores(model, x_adv[active], y[active], spec, grad=False)
        keep(spec.steps, active, share, value)
    trace = {"loss": loss_t.cpu(), "correct": correct_t.cpu(), "picked": picked, "last": correct_t[:, -1].cpu().clone(),
             "best": best.cpu()}
    return x_best.detach(), trace


@torch.no_grad()
def _is_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
           autocast: contextlib.AbstractContextManager | None = None,
           x_start: torch.Tensor | None = None) -> torch.Tensor:
    """Run `spec` on a batch; with restarts, keep for each point the first restart that fools the model.
    `x_start` (optional) is where the first run starts."""
    x_best = pgd_single(model, x, y, spec, autocast, x_start)
    if spec.restarts == 1:
        return x_best
    still_correct = _is_correct(model, x_best, y)
    for _ in range(spec.restarts - 1):
        if not still_correct.any():
            break
        idx = still_correct.nonzero().squeeze(1)
        x_new = pgd_single(model, x[idx], y[idx], spec, autocast)
        fooled = ~_is_correct(model, x_new, y[idx])
        x_best[idx[fooled]] = x_new[fooled]
        still_correct[idx[fooled]] = False
    return x_best


def momentum_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, steps: int,
                    decay: float = 1.0, loss: str = "ce") -> torch.Tensor:
    """MI-FGSM (Dong et al. 2018, "Boosting adversarial attacks with momentum"): `steps` steps of size eps / steps
    from the clean point along the steepest-ascent direction (`ascent_direction`) of an accumulated gradient,
    g <- decay * g + grad / ||grad||_1, each projected onto the `norm` ball and [0, 1]. The momentum keeps the
    direction stable across steps, so the points transfer to other models better than PGD's (its purpose here)."""
    x_adv, g = x.clone(), torch.zeros_like(x)
    for _ in range(steps):
        grad = _input_gradient(model, x_adv, y, None, 1, loss)
        g = decay * g + grad / _per_point(grad.flatten(1).abs().sum(dim=1).clamp_min(1e-12), grad)
        x_adv = project(x_adv.detach() + eps / steps * ascent_direction(g, norm, x_adv), x, eps, norm)
    return x_adv.detach()


# Batched helpers over whole datasets (fp32 unless the caller wraps them in autocast).

@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    """Predicted labels for `x`, in fp32, batch by batch."""
    preds = [model(x[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int) -> float:
    return (predict(model, x, device, batch_size) == y).float().mean().item()


def gradient_diagnostics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int, device: torch.device,
                         batch_size: int, loss: str = "ce", pass_images: int | None = None) -> dict[str, float | int]:
    """How usable an attack loss's input gradient is on `x` (averaged over `eot` passes, as the attacks see it):
    the shares of points whose gradient is exactly zero, whose loss is exactly 0 on every pass, and whose
    outputs or gradient are not finite, and the median L1 norm of the gradient (the dual of L-inf: eps times it
    is a sign step's first-order gain). A saturated loss (exactly 0, zero gradient) blinds every attack on it."""
    zero_grad, zero_loss, nonfinite, norms = [], [], [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        yb = y[i:i + batch_size].to(device)
        grad, loss_abs, bad = torch.zeros_like(xb), torch.zeros(len(xb), device=device), torch.zeros(
            len(xb), dtype=torch.bool, device=device)
        for draws, logits, value, g in eot_passes(model, xb, yb, eot, loss, pass_images):
            grad += g / eot
            loss_abs = torch.maximum(loss_abs, value.abs().view(draws, -1).amax(dim=0))
            bad |= ~torch.isfinite(logits).all(dim=1).view(draws, -1).all(dim=0)
        flat = grad.flatten(1)
        bad |= ~torch.isfinite(flat).all(dim=1)
        zero_grad.append((flat.abs().amax(dim=1) == 0).cpu())
        zero_loss.append((loss_abs == 0).cpu())
        nonfinite.append(bad.cpu())
        norms.append(flat.abs().sum(dim=1).cpu())
    if not norms:
        return {"points": 0}
    share = lambda parts: torch.cat(parts).float().mean().item()  # noqa: E731
    return {"points": len(x), "zero_gradient_share": share(zero_grad), "zero_loss_share": share(zero_loss),
            "nonfinite_share": share(nonfinite), "median_gradient_l1": torch.cat(norms).median().item()}


def attack_dataset(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
                   device: torch.device, batch_size: int, desc: str | None = None) -> torch.Tensor:
    """Adversarial versions of all of `x`, crafted in fp32, on the CPU at the end."""
    out = []
    batches = range(0, len(x), batch_size)
    for i in tqdm(batches, desc=desc, unit="batch", leave=False, disable=desc is None, mininterval=5):
        out.append(attack(model, x[i:i + batch_size].to(device), y[i:i + batch_size].to(device), spec).cpu())
    return torch.cat(out)


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
                    device: torch.device, batch_size: int) -> float:
    x_adv = attack_dataset(model, x, y, spec, device, batch_size)
    return accuracy(model, x_adv, y, device, batch_size)


def square_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, n_queries: int,
                  p_init: float, seed: int, device: torch.device) -> torch.Tensor:
    """Square (Andriushchenko et al. 2020, pyautoattack's reference code): a score-based random search on the
    margin loss that uses no gradients, so no masking of gradients can blind it. At most `n_queries` forward
    passes per point; returns the adversarial points (the clean one where it found none), on the CPU."""
    from pyautoattack.square import SquareAttack

    square = SquareAttack(model, norm=norm, n_queries=n_queries, eps=eps, p_init=p_init, n_restarts=1, seed=seed,
                          device=device, loss="margin")
    with torch.no_grad():
        return square.perturb(x.to(device), y.to(device)).detach().cpu()
