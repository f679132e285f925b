"""CARSO's building blocks: aggregation, representation hooks, the purifier and the defence module."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from carso.methods.carso.aggregation import aggregate_count, aggregate_logit, aggregate_peel, aggregate_prob, get_aggregation
from carso.data import load_split
from carso.methods.carso.defence import CarsoDefence
from carso.errors import UserError
from carso.models import build_classifier
from carso.methods.carso.purifier import Purifier, PurifierConfig, beta_schedule, purifier_loss
from carso.methods.carso.representation import RepresentationExtractor

# two images, two samples, three classes
LOGITS = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]],
                       [[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])


def test_logit_aggregation_is_the_mean() -> None:
    assert torch.allclose(aggregate_logit(LOGITS), torch.tensor([[0.5, 0.5, 1.0], [1.5, 0.0, 0.0]]))


def test_prob_aggregation_by_hand() -> None:
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    q = (sig(0.0) + sig(1.0)) / 2
    assert aggregate_prob(LOGITS)[0, 0].item() == pytest.approx(math.log(q / (1 - q)), rel=1e-5)


def test_peel_aggregation_by_hand() -> None:
    s = [math.exp(0) + math.exp(1), math.exp(1) + math.exp(0), math.exp(2) + math.exp(0)]  # image 0
    z = sum(math.exp(v) for v in s)
    p = [math.exp(v) / z for v in s]
    expected = [math.log(pk / (1 - pk)) for pk in p]
    assert aggregate_peel(LOGITS)[0].tolist() == pytest.approx(expected, rel=1e-5)


def test_peel_is_stable_for_large_logits() -> None:
    out = aggregate_peel(torch.tensor([[[30.0, 0.0, 0.0]] * 8]))
    assert torch.isfinite(out).all() and out.argmax(1).item() == 0


def test_count_is_a_majority_vote() -> None:
    assert aggregate_count(LOGITS).tolist() == [[1.0, 0.0, 1.0], [2.0, 0.0, 0.0]]


def test_unknown_aggregation_is_named() -> None:
    with pytest.raises(UserError, match="choose one of"):
        get_aggregation("median")


@pytest.fixture(scope="module")
def parts(fm_subset: Path):
    torch.manual_seed(0)
    clf = build_classifier("cnn_small", in_channels=1, num_classes=10, image_size=28,
                           mean=[0.286], std=[0.353]).eval()
    extractor = RepresentationExtractor(clf)
    x, y = load_split(fm_subset, "train", limit=64)
    cfg = PurifierConfig(condition_dim=32, latent_dim=16, decoder_channels=(16, 8, 8))
    purifier = Purifier(cfg, extractor.shapes(x), (1, 28, 28), [0.286], [0.353])
    return clf, extractor, purifier, x, y


def test_extractor_hooks_every_conv_layer_by_default(parts) -> None:
    clf, extractor, _, x, _ = parts
    assert extractor.layers == ["conv1", "conv2"]
    acts = extractor(x[:4])
    assert [tuple(a.shape) for a in acts] == [(4, 32, 28, 28), (4, 64, 14, 14)]


def test_extractor_rejects_unknown_layer_and_lists_names(parts) -> None:
    clf = parts[0]
    with pytest.raises(UserError, match="layer 'conv9' does not exist.*conv1, conv2, fc1, fc2"):
        RepresentationExtractor(clf, ["conv9"])


def test_purifier_reconstructs_images_in_unit_range(parts) -> None:
    _, extractor, purifier, x, _ = parts
    recon, mu, logvar = purifier.train()(x[:8], extractor(x[:8]))
    assert recon.shape == (8, 1, 28, 28) and 0 <= recon.min().item() and recon.max().item() <= 1
    assert mu.shape == logvar.shape == (8, 16)


def test_decoder_sizes_must_reach_the_image_side(parts) -> None:
    _, extractor, _, x, _ = parts
    with pytest.raises(UserError, match="decoder_start_side"):
        Purifier(PurifierConfig(decoder_start_side=8), extractor.shapes(x), (1, 28, 28), [0.3], [0.3])


def test_purifier_loss_falls_on_real_images(parts) -> None:
    _, extractor, purifier, x, _ = parts
    torch.manual_seed(0)
    opt = torch.optim.Adam(purifier.parameters(), lr=3e-3)
    purifier.train()
    losses = []
    for _ in range(30):
        with torch.no_grad():
            acts = extractor(x)
        recon, mu, logvar = purifier(x, acts)
        loss, _, _ = purifier_loss(recon, x, mu, logvar, beta=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_beta_warm_up_follows_the_published_schedule() -> None:
    assert beta_schedule(0, 100) == 0.0 and beta_schedule(12, 100) == 0.0
    assert 0.0 < beta_schedule(14, 100) < 1.0
    assert beta_schedule(17, 100) == 1.0 and beta_schedule(99, 100) == 1.0


def test_defence_shape_determinism_and_batched_samples(parts) -> None:
    clf, extractor, purifier, x, _ = parts
    defence = CarsoDefence(clf, purifier, extractor, n_samples=4)
    torch.manual_seed(3)
    a = defence(x[:5])
    torch.manual_seed(3)
    b = defence(x[:5])
    assert a.shape == (5, 10) and torch.equal(a, b)
    torch.manual_seed(4)
    assert not torch.equal(a, defence(x[:5]))  # stochastic across seeds
    calls = []
    handle = clf.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    defence(x[:5])
    handle.remove()
    assert calls == [5, 20]  # one pass for the representation, one batch of B x N for the samples


def test_gradients_reach_the_input_through_the_whole_defence(parts) -> None:
    clf, extractor, purifier, x, y = parts
    defence = CarsoDefence(clf, purifier, extractor, n_samples=4)
    xa = x[:6].clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(defence(xa), y[:6])
    (grad,) = torch.autograd.grad(loss, xa)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in clf.parameters())


def test_balanced_batches_mix_sources_as_configured() -> None:
    from carso.methods.carso.training import balanced_batches, gather_inputs

    gen = torch.Generator().manual_seed(0)
    batches = list(balanced_batches(20, 10, ["fgsm", "pgd"], 0.4, gen))
    assert len(batches) == 2
    idx, sources = batches[0]
    assert sources.count("fgsm") == sources.count("pgd") == 2 and sources.count("clean") == 6
    tensors = {"clean": torch.zeros(20, 1, 2, 2), "fgsm": torch.ones(20, 1, 2, 2), "pgd": 2 * torch.ones(20, 1, 2, 2)}
    x = gather_inputs(tensors, idx, sources)
    assert x[:, 0, 0, 0].tolist() == [1.0, 2.0, 1.0, 2.0] + [0.0] * 6


def test_train_purifier_lowers_reconstruction_loss_and_resumes(parts, tmp_path: Path) -> None:
    from carso.attacks import AttackSpec, attack_dataset
    from carso.methods.carso.training import train_purifier

    clf, extractor, _, x, y = parts
    torch.manual_seed(0)
    purifier = Purifier(PurifierConfig(condition_dim=32, latent_dim=16, decoder_channels=(16, 8, 8)),
                        extractor.shapes(x), (1, 28, 28), [0.286], [0.353])
    data = {"clean": x, "labels": y,
            "fgsm": attack_dataset(clf, x, y, AttackSpec("fgsm", 0.1, 1, 0.1, False), torch.device("cpu"), 64)}
    cfg = {"epochs": 6, "batch_size": 8, "attacks": ["fgsm"], "adversarial_fraction": 0.5, "lr": 3e-3,
           "weight_decay": 0.0, "lookahead": True, "precision": "fp32",
           "beta_warmup": {"delay": 0.125, "ramp": 0.042}}
    torch.manual_seed(0)
    curve = train_purifier(purifier, extractor, data, cfg, 0, torch.device("cpu"), tmp_path / "ckpt.pt", "k")
    assert [r["epoch"] for r in curve] == [1, 2, 3, 4, 5, 6]
    assert curve[-1]["bce"] < 0.97 * curve[0]["bce"]
    assert curve[0]["beta"] == 0.0 and curve[-1]["beta"] == 1.0
    again = train_purifier(purifier, extractor, data, cfg, 0, torch.device("cpu"), tmp_path / "ckpt.pt", "k")
    assert again == curve  # complete checkpoint: nothing left to train


def test_autoattack_randomness_check_flags_carso_but_not_the_classifier(parts) -> None:
    from carso.evaluation import is_randomised

    clf, extractor, purifier, x, y = parts
    assert not is_randomised(clf, x[:16], y[:16])
    assert is_randomised(CarsoDefence(clf, purifier, extractor, n_samples=2), x[:16], y[:16])


def test_pgd_eot_step_is_scaled_from_the_reference() -> None:
    from carso.evaluation import pgd_eot_spec

    spec = pgd_eot_spec(0.1)
    assert (spec.steps, spec.eot) == (200, 20)
    assert spec.alpha == pytest.approx(0.007 * 0.1 / (8 / 255))
    assert pgd_eot_spec(8 / 255).alpha == pytest.approx(0.007)


def test_the_judge_draws_once_for_a_deterministic_defence_and_two_sets_for_carso(parts) -> None:
    from carso.verdicts import Judge

    clf, extractor, purifier, x, y = parts
    v = Judge(clf, False, 8, 3, torch.device("cpu"), 16)(x[:32], y[:32])
    assert (v.draws, v.repeats) == (1, 1) and torch.equal(v.ok.float(), v.select) and torch.equal(v.select, v.estimate)
    defence = CarsoDefence(clf, purifier, extractor, n_samples=2)
    judge = Judge(defence, True, 8, 5, torch.device("cpu"), 16, pass_images=64)
    v = judge(x[:32], y[:32])
    assert (v.draws, v.repeats) == (8, 5)
    for share in (v.select, v.estimate):  # shares of 8 draws
        assert torch.equal(share * 8, (share * 8).round()) and 0 <= share.min() and share.max() <= 1
    assert bool((v.select[v.ok] >= 5 / 8).all())  # the strict rule: its first 5 picking draws were all correct
    again = judge(x[:32], y[:32])  # seeded from the points: the same verdict
    assert all(torch.equal(getattr(v, k), getattr(again, k)) for k in ("ok", "select", "estimate"))


def test_purifier_and_defence_work_on_cifar_shapes_with_a_wide_resnet() -> None:
    """3x32x32 inputs and a WideResNet: every conv (shortcuts included) is hooked, as for a WRN-28-10."""
    torch.manual_seed(0)
    clf = build_classifier("wide_resnet", in_channels=3, num_classes=10, image_size=32, mean=[0.5] * 3,
                           std=[0.25] * 3, depth=10, width=1).eval()
    extractor = RepresentationExtractor(clf)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    assert len(extractor.layers) == sum(isinstance(m, torch.nn.Conv2d) for m in clf.modules())
    cfg = PurifierConfig(condition_dim=32, latent_dim=16, decoder_start_side=4, decoder_channels=(32, 16, 8, 8))
    purifier = Purifier(cfg, extractor.shapes(x), (3, 32, 32), [0.5] * 3, [0.25] * 3).eval()
    defence = CarsoDefence(clf, purifier, extractor, n_samples=3)
    assert defence.reconstructions(x).shape == (2, 3, 3, 32, 32)
    (grad,) = torch.autograd.grad(defence(x).sum(), x)
    assert grad.abs().sum() > 0


def test_latent_zero_gives_n_identical_reconstructions_and_a_deterministic_defence(parts) -> None:
    from carso.evaluation import is_randomised

    clf, extractor, purifier, x, y = parts
    purifier.eval()
    zero = CarsoDefence(clf, purifier, extractor, n_samples=3, latent="zero")
    recon = zero.reconstructions(x[:4])
    assert torch.equal(recon[:, 0], recon[:, 1]) and torch.equal(recon[:, 0], recon[:, 2])
    assert not is_randomised(zero, x[:16], y[:16])
    sampled = CarsoDefence(clf, purifier, extractor, n_samples=3).reconstructions(x[:4])
    assert not torch.equal(sampled[:, 0], sampled[:, 1])
