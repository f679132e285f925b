"""AToP's building blocks: the random transforms, the inpainter and discriminator, the defence module, and the
training step (the GAN term trains the generator; fine-tuning lowers the classifier's CE on purified FGSM images)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from carso.attacks import AttackSpec, attack
from carso.data import load_split
from carso.evaluation import is_randomised
from carso.methods.atop.defence import AtopDefence, AtopPurifier
from carso.methods.atop.inpainter import Inpainter, InpainterConfig, PatchDiscriminator
from carso.methods.atop.training import Adversary, make_networks, purified_accuracy, train_epoch, train_step
from carso.methods.atop.transforms import TransformConfig, apply, draw, draw_masks
from carso.models import build_classifier

CPU = torch.device("cpu")
RT2 = TransformConfig()  # the paper's RT2: 7 x 7 blocks at 28 px, 25% missing, sigma 0.25


def block_flags(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, M, 1, H, W) pixel masks -> (B, M, grid * grid) per-block flags (a block is uniform by construction)."""
    cell = masks.shape[-1] // grid
    return masks[..., ::cell, ::cell].flatten(2)


@pytest.mark.parametrize("share, grid, side", [(0.25, 7, 28), (0.25, 8, 32), (0.5, 4, 28), (0.1, 14, 28)])
def test_rt1_and_rt2_mask_exactly_the_configured_share_of_blocks(share: float, grid: int, side: int) -> None:
    cfg = TransformConfig(kind="rt2", grid=grid, missing_share=share)
    masks = draw_masks(cfg, 64, side, CPU)
    assert masks.shape == (64, 1, 1, side, side)
    flags = block_flags(masks, grid)
    expected = round(share * grid * grid)
    assert (flags.sum(dim=2) == expected).all()  # every image: exactly that many blocks
    cell = side // grid  # blocks are whole: every pixel of a block has its block's flag
    assert torch.equal(masks, flags.view(64, 1, 1, grid, grid).repeat_interleave(cell, 3).repeat_interleave(cell, 4))
    assert len({tuple(f.flatten().tolist()) for f in flags}) > 1  # one mask per image, not one per batch


def test_rt3_masks_are_complementary_and_cover_every_block_once() -> None:
    cfg = TransformConfig(kind="rt3", rt3_masks=4)
    masks = draw_masks(cfg, 32, 28, CPU)
    assert masks.shape == (32, 4, 1, 28, 28)
    assert torch.equal(masks.sum(dim=1), torch.ones(32, 1, 28, 28))  # every pixel missing in exactly one mask
    per_mask = block_flags(masks, 7).sum(dim=2)  # 49 blocks into 4 groups: 12 or 13 each
    assert set(per_mask.flatten().tolist()) <= {12.0, 13.0} and (per_mask.sum(dim=1) == 49).all()


def test_one_mask_per_batch_when_asked() -> None:
    masks = draw_masks(TransformConfig(per="batch"), 16, 28, CPU)
    assert all(torch.equal(masks[0], m) for m in masks)


def test_transforms_are_fresh_at_every_call_and_reproducible_under_a_seed() -> None:
    x = torch.rand(8, 1, 28, 28)
    torch.manual_seed(0)
    first, second = draw(RT2, x), draw(RT2, x)
    assert not torch.equal(first.masks, second.masks) and not torch.equal(first.noise, second.noise)
    torch.manual_seed(0)
    again = draw(RT2, x)
    assert torch.equal(first.masks, again.masks) and torch.equal(first.noise, again.noise)
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(draw(RT2, x, gen).masks, draw(RT2, x, torch.Generator().manual_seed(5)).masks)


def test_noise_then_mid_grey_mask() -> None:
    x = torch.rand(8, 1, 28, 28)
    for kind, noisy in (("rt1", False), ("rt2", True)):
        d = draw(TransformConfig(kind=kind), x)
        out, masks = apply(x, d)
        hidden, shown = masks.bool().expand_as(out), ~masks.bool().expand_as(out)
        assert (out[hidden] == 0.5).all()
        assert 0 <= out.min() and out.max() <= 1
        kept = out[shown] - x.unsqueeze(1)[shown]
        assert (kept.abs().max() > 0.05) == noisy  # rt1 keeps the visible pixels, rt2 adds noise to them
    assert draw(TransformConfig(kind="rt1"), x).noise is None


@pytest.fixture(scope="module")
def classifier(fm_subset: Path) -> torch.nn.Module:
    """A small classifier trained for a few seconds on the real subset (clean training): enough to have a CE to lower."""
    torch.manual_seed(0)
    clf = build_classifier("cnn_small", in_channels=1, num_classes=10, image_size=28, mean=[0.286], std=[0.353],
                           width=8, hidden=32)
    x, y = load_split(fm_subset, "train")
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    for _ in range(15):
        for i in range(0, len(x), 100):
            opt.zero_grad()
            F.cross_entropy(clf(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
    clf.zero_grad(set_to_none=True)
    for p in clf.parameters():
        p.requires_grad_(False)
    return clf.eval()


def _defence(classifier: torch.nn.Module, kind: str = "rt2", **kw) -> AtopDefence:
    torch.manual_seed(0)
    inpainter = Inpainter(InpainterConfig(width=4, refine_width=4, dilations=(2,), **kw), 1)
    return AtopDefence(classifier, AtopPurifier(TransformConfig(kind=kind), inpainter))


@pytest.mark.parametrize("kind, attention", [("rt1", False), ("rt2", False), ("rt3", False), ("rt2", True)])
def test_gradients_reach_the_input_through_the_whole_defence(classifier, fm_subset: Path, kind: str,
                                                             attention: bool) -> None:
    defence = _defence(classifier, kind, contextual_attention=attention)
    x, y = load_split(fm_subset, "test", limit=6)
    xa = x.clone().requires_grad_(True)
    assert defence(xa).shape == (6, 10)
    grads = [torch.autograd.grad(F.cross_entropy(defence(xa), y), xa)[0] for _ in range(8)]  # 8 fresh draws
    assert all(torch.isfinite(g).all() for g in grads)
    # one draw leaves a pixel without gradient where it is masked (replaced by grey) or where noise clipped it to
    # [0, 1]; over fresh draws (EoT) every pixel's gradient gets through
    assert (torch.stack(grads).mean(dim=0) != 0).float().mean() > 0.9
    assert all(p.grad is None for p in classifier.parameters())
    stages = defence.stages(x)
    assert stages["transformed"].shape == (6, 4 if kind == "rt3" else 1, 1, 28, 28)
    assert stages["purified"].shape == (6, 1, 1, 28, 28)
    assert 0 <= stages["purified"].min() and stages["purified"].max() <= 1


def test_the_defence_is_randomised_for_autoattack(classifier, fm_subset: Path) -> None:
    x, y = load_split(fm_subset, "test", limit=16)
    assert is_randomised(_defence(classifier), x, y)
    assert not is_randomised(classifier, x, y)


def test_discriminator_scores_patches() -> None:
    disc = PatchDiscriminator(1, [8, 16])
    assert disc(torch.rand(3, 1, 28, 28), torch.zeros(3, 1, 28, 28)).shape == (3, 16 * 7 * 7)


CFG = {"lr": 1e-3, "betas": [0.5, 0.999], "gan_weight": 1.0, "ce_weight": 0.05, "precision": "fp32",
       "channels_last": False, "batch_size": 40}


def _nets(gan_weight_seed: int = 0):
    torch.manual_seed(gan_weight_seed)
    inpainter = Inpainter(InpainterConfig(width=4, refine_width=4, dilations=(2,)), 1)
    return make_networks(inpainter, PatchDiscriminator(1, [8, 16]), RT2, CFG, CPU)


def test_the_gan_term_trains_the_generator(classifier, fm_subset: Path) -> None:
    """The same step with and without the generator's GAN term moves the generator differently: the term is not
    detached. The discriminator's own step is the same in both."""
    x, y = load_split(fm_subset, "train", limit=40)
    states = {}
    for weight in (0.0, 1.0):
        nets = _nets()
        torch.manual_seed(1)
        train_step(nets, classifier, x, y, {**CFG, "gan_weight": weight}, None)
        states[weight] = (copy.deepcopy(nets.purifier.inpainter.state_dict()),
                          copy.deepcopy(nets.discriminator.state_dict()))
    g0, g1 = states[0.0][0], states[1.0][0]
    assert any(not torch.equal(g0[k], g1[k]) for k in g0)
    d0, d1 = states[0.0][1], states[1.0][1]
    assert all(torch.equal(d0[k], d1[k]) for k in d0)


def _restores_images(residual: bool, fm_subset: Path) -> bool:
    """Pre-train a tiny inpainter for 6 epochs on the real subset (L1 + GAN, no classifier): does it restore
    images, i.e. beat the L1-optimal constant image clearly and keep the test images apart?"""
    x, y = load_split(fm_subset, "train")
    torch.manual_seed(0)
    inpainter = Inpainter(InpainterConfig(width=4, refine_width=4, dilations=(2,), residual=residual), 1)
    nets = make_networks(inpainter, PatchDiscriminator(1, [8, 16]), RT2, CFG, CPU)
    for epoch in range(6):
        train_epoch(nets, None, x, y, CFG, None, CPU, torch.Generator().manual_seed(epoch), "test")
    xt, _ = load_split(fm_subset, "test")
    torch.manual_seed(0)
    with torch.no_grad():
        purified = nets.purifier.eval()(xt)
    constant_l1 = (xt - xt.median()).abs().mean()  # the best constant image, under L1
    spread = purified.std(dim=0).mean() / xt.std(dim=0).mean()  # 0 for a collapsed, constant output
    return bool((purified - xt).abs().mean() < 0.75 * constant_l1 and spread > 0.5)


def test_pretraining_does_not_collapse_to_a_constant_image(fm_subset: Path) -> None:
    """METHOD.md's trial: a plain tanh head trained from scratch with L1 collapsed to an all-black image (the L1
    optimum of a constant is the median pixel, 0 here; tanh saturates and its gradient dies). The default head,
    a correction to its input, must restore images; the same check run on the plain head catches its collapse."""
    assert _restores_images(residual=True, fm_subset=fm_subset)
    assert not _restores_images(residual=False, fm_subset=fm_subset)


def test_finetuning_lowers_the_ce_on_purified_fgsm_images(classifier, fm_subset: Path) -> None:
    """AToP's objective on a tiny real run: after fine-tuning with the CE term, the classifier's cross-entropy on
    purified FGSM images (same seeds, same points) is lower than before, and so is it without the term."""
    x, y = load_split(fm_subset, "train", limit=200)
    adversary = Adversary(classifier, 0.1)
    x_adv = attack(classifier, x, y, AttackSpec("fgsm", eps=0.1, steps=1, step_size=0.1, random_start=False))

    def ce(nets) -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return F.cross_entropy(classifier(nets.purifier.eval()(x_adv)), y).item()

    results = {}
    for weight in (0.0, 1.0):
        nets = _nets()
        before = ce(nets)
        for epoch in range(4):
            train_epoch(nets, classifier, x, y, {**CFG, "ce_weight": weight}, adversary, CPU,
                        torch.Generator().manual_seed(epoch), "test")
        results[weight] = ce(nets)
    assert results[1.0] < before and results[1.0] < results[0.0]
    assert 0 <= purified_accuracy(nets.purifier, classifier, x[:50], y[:50], CPU) <= 1
