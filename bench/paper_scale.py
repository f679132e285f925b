"""Paper-scale cost of CARSO and AToP on CIFAR: FLOPs per image and per stage, CPU throughput here, H100 GPU-hours.

Any config's dataset works (`--config params.yaml` counts the default Fashion-MNIST run); AutoAttack's later
components are charged for the published robust fraction where there is one, for every point otherwise.

1. Counts, with torch.utils.flop_counter.FlopCounterMode, the FLOPs per image of every pass the pipeline makes
   with a config's models (WRN-28-10 `dm_wide_resnet`, the CIFAR purifier on its 26 hooked layers): classifier
   forward and attack pass (forward + backward to the input), CARSO's representation, decoder and whole defence
   (N reconstructions), one purifier training step, and AToP's defence (transform + inpainter + classifier) and its
   pre-training and fine-tuning steps (inpainter + discriminator; FGSM + CE). The models are built on the meta device: shapes only,
   so counting takes a second. FlopCounterMode counts matrix products and convolutions (2 FLOPs per
   multiply-add); element-wise work (BatchNorm, activations) is left out.
2. Multiplies them by the config's stage settings (adversarial examples for the training and test sets with its
   attacks, the purifier's epochs over the training set, PGD-EoT and AutoAttack on `n_points`, the sanity checks)
   into FLOPs per stage, then GPU-hours on one H100 at an assumed sustained throughput (printed with the result).
3. Times real fp32 forward + backward passes on this machine's CPU for a small batch, for comparison.

Run: python bench/paper_scale.py [--config configs/cifar10.yaml configs/cifar100.yaml] [--threads N]
     python bench/paper_scale.py --study studies/*.yaml   # each study's GPU lower bound beyond its base run
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from carso.data import dataset_spec
from carso.methods.carso.defence import CarsoDefence
from carso.device import autocast, configure_threads
from carso.models import build_classifier
from carso.params import load_params
from carso.study import Plan, load_study
from carso.methods.atop.defence import AtopDefence, AtopPurifier
from carso.methods.atop.inpainter import Inpainter, InpainterConfig, PatchDiscriminator
from carso.methods.atop.training import make_networks, train_step
from carso.methods.atop.transforms import TransformConfig
from carso.methods.carso.purifier import PurifierConfig, build_purifier, purifier_loss
from defence_throughput import rate  # bench/, beside this script

# One H100 SXM5 (NVIDIA's datasheet, dense, no sparsity). Every attack runs in fp32 and carso.device turns TF32
# off, so the attacks get the CUDA-core fp32 rate; purifier training runs under bf16 autocast (tensor cores).
PEAK = {"fp32": 67e12, "bf16": 989e12}
EFFICIENCY = {"fp32": 0.5, "bf16": 0.3}  # assumed share of the peak sustained on these convnets (not measured)
SPLITS = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000),  # training and test set sizes
          "fashion_mnist": (60_000, 10_000), "mnist": (60_000, 10_000)}
# AutoAttack attacks a point with its next component only while the point is still robust. The first
# component is charged for every point; the later ones for the published robust fraction (METHOD.md table).
PUBLISHED_ROBUST = {("cifar10", "at"): 0.6773, ("cifar10", "carso"): 0.7613,
                    ("cifar100", "at"): 0.3918, ("cifar100", "carso"): 0.6665,
                    ("cifar10", "atop_rt"): 0.5957, ("cifar10", "atop"): 0.7285,  # AToP's AutoAttack, RT2 + GAN
                    ("cifar100", "atop_rt"): 0.3889, ("cifar100", "atop"): 0.4355}
AA_ITERS = 100  # APGD / FAB iterations in AutoAttack; APGD makes one more gradient pass before its loop
AA_TARGETS, SQUARE_QUERIES = 9, 5000  # standard: APGD-T and FAB-T on 9 target classes; Square's query budget


def flops(fn: Callable[[], Any], batch: int) -> float:
    """FLOPs per image of `fn` (which processes `batch` images)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch


def build(params: dict[str, Any], dataset: str) -> tuple[nn.Module, CarsoDefence]:
    spec = dataset_spec(dataset)
    clf = build_classifier(params["classifier"]["arch"], in_channels=spec.channels, num_classes=spec.num_classes,
                           image_size=spec.side, mean=spec.mean, std=spec.std, **params["classifier"]["arch_kwargs"])
    clf = clf.eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    purifier, extractor = build_purifier(clf, dataset, PurifierConfig.from_params(params["purifier"]),
                                         params["purifier"]["layers"])
    return clf, CarsoDefence(clf, purifier, extractor, params["carso"]["n_samples"], params["carso"]["aggregation"])


def attack_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """Forward + backward to the input (what every attack step costs); parameters stay frozen."""
    def run() -> None:
        xa = x.detach().clone().requires_grad_(True)
        F.cross_entropy(model(xa), y, reduction="sum").backward()
    return run


def training_step(defence: CarsoDefence, x: torch.Tensor, precision: str) -> Callable[[], None]:
    """One purifier step as carso.methods.carso.training runs it: frozen representation, then the CVAE, backward."""
    device = x.device if x.device.type != "meta" else torch.device("cpu")

    def run() -> None:
        with torch.no_grad(), autocast(device, precision):
            acts = [a.float() for a in defence.extractor(x)]
        with autocast(device, precision):
            recon, mu, logvar = defence.purifier(x, acts)
        purifier_loss(recon.float(), x, mu.float(), logvar.float(), 1.0)[0].backward()
    return run


def images(dataset: str, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`b` random images of `dataset`'s shape and their labels."""
    spec = dataset_spec(dataset)
    return torch.rand(b, spec.channels, spec.side, spec.side), torch.zeros(b, dtype=torch.long)


def build_atop(params: dict[str, Any], clf: nn.Module, channels: int) -> AtopDefence:
    atop = params["atop"]
    inpainter = Inpainter(InpainterConfig.from_params(atop["inpainter"]), channels)
    return AtopDefence(clf, AtopPurifier(TransformConfig.from_params(atop["transform"]), inpainter))


def stand_in_fgsm(x: torch.Tensor, y: torch.Tensor, precision: str) -> torch.Tensor:
    """Fine-tuning's adversary without its own pass (FlopCounterMode cannot follow autograd.grad): per_image_flops
    adds FGSM's cost as one classifier attack pass per image."""
    return x.clone()


def atop_training_step(params: dict[str, Any], clf: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       stage: str) -> Callable[[], None]:
    """One AToP training step as carso.methods.atop.training runs it (discriminator, then generator; fine-tuning
    adds the CE term on the purified FGSM images), in fp32 for the count."""
    atop = params["atop"]
    cfg = {**atop[stage], "precision": "fp32", "channels_last": False}
    channels = x.shape[1]
    nets = make_networks(Inpainter(InpainterConfig.from_params(atop["inpainter"]), channels),
                         PatchDiscriminator(channels, atop["discriminator"]["channels"]),
                         TransformConfig.from_params(atop["transform"]), cfg, x.device)
    adversary = stand_in_fgsm if stage == "finetune" else None
    return lambda: train_step(nets, clf, x, y, cfg, adversary)


def per_image_flops(params: dict[str, Any], dataset: str) -> dict[str, float]:
    """FLOPs per image of every pass, counted on the meta device."""
    b = 2  # BatchNorm1d in training mode needs more than one row
    with torch.device("meta"):
        clf, defence = build(params, dataset)
        x, y = images(dataset, b)
        pur = defence.purifier
        c = torch.zeros(b, pur.cfg.condition_dim)
        z = torch.zeros(b, pur.cfg.latent_dim)
        out = {"classifier forward": flops(lambda: clf(x), b),
               "classifier attack pass (fwd+bwd to input)": flops(attack_pass(clf, x, y), b),
               "representation + condition (incl. classifier fwd)": flops(lambda: pur.condition(defence.extractor(x)), b),
               "decoder, one sample": flops(lambda: pur.decode(z, c), b),
               "pre-encoder + encoder (training only)": flops(lambda: pur.encode(x, c), b),
               "CARSO defence forward (N samples)": flops(lambda: defence(x), b),
               "CARSO attack pass (fwd+bwd to input)": flops(attack_pass(defence, x, y), b)}
        pur.train()
        out["purifier training step (fwd+bwd)"] = flops(training_step(defence, x, "fp32"), b)
        pur.eval()
        out["one-reconstruction check (monitor)"] = flops(
            lambda: clf(pur.decode(z, pur.condition(defence.extractor(x)))), b)
        atop = build_atop(params, clf, x.shape[1])
        out["AToP inpainting (one transform, both stages)"] = flops(lambda: atop.purifier(x), b)
        out["AToP defence forward"] = flops(lambda: atop(x), b)
        out["AToP attack pass (fwd+bwd to input)"] = flops(attack_pass(atop, x, y), b)
    for stage in ("pretrain", "finetune"):  # real tensors on the CPU (the optimizers step), a batch of 2
        clf_cpu, _ = build(params, dataset)
        xc, yc = images(dataset, b)
        out[f"AToP {stage} step (G + D)"] = flops(atop_training_step(params, clf_cpu, xc, yc, stage), b)
    out["AToP finetune step (G + D)"] += out["classifier attack pass (fwd+bwd to input)"]  # its FGSM
    return out


def stage_flops(params: dict[str, Any], dataset: str, f: dict[str, float]) -> list[tuple[str, str, str, float, str]]:
    """(stage, part, precision, FLOPs, what was counted) for every stage of the config."""
    clf_fwd, clf_att = f["classifier forward"], f["classifier attack pass (fwd+bwd to input)"]
    def_fwd, def_att = f["CARSO defence forward (N samples)"], f["CARSO attack pass (fwd+bwd to input)"]
    cls, adv, pur, ev = params["classifier"], params["adversarial"], params["purifier"], params["evaluation"]
    m = cls["monitor_points"]
    rows = [("train_classifier", "import check", "fp32", m * (2 * clf_fwd + 10 * clf_att),
             f"clean + PGD-10 on {m} test images")]
    train_set, test_set = SPLITS[dataset]
    n_train, n_test = adv["train_points"] or train_set, adv["test_points"] or test_set
    steps = sum(a.get("steps", 1) if a["method"] == "pgd" else 1 for a in adv["attacks"].values())
    rows.append(("generate_adversarial", "attacks", "fp32",
                 (n_train + n_test) * ((1 + len(adv["attacks"])) * clf_fwd + steps * clf_att),
                 f"{len(adv['attacks'])} attacks = {steps} gradient passes per image, {n_train:,} + {n_test:,} images"))
    rows.append(("train_purifier", "training", "bf16", pur["epochs"] * n_train * f["purifier training step (fwd+bwd)"],
                 f"{pur['epochs']} epochs x {n_train:,} images (batch {pur['batch_size']})"))
    rows.append(("train_purifier", "monitor", "fp32",
                 pur["epochs"] * 2 * pur["monitor_points"] * f["one-reconstruction check (monitor)"],
                 f"{pur['monitor_points']} clean + {pur['monitor_points']} attacked test images per epoch"))
    atop, atop_fwd, atop_att = params["atop"], f["AToP defence forward"], f["AToP attack pass (fwd+bwd to input)"]
    for stage in ("pretrain", "finetune"):
        cfg = atop[stage]
        n = cfg["train_points"] or train_set
        rows.append((f"{stage}_inpainter", "training", "bf16", cfg["epochs"] * n * f[f"AToP {stage} step (G + D)"],
                     f"{cfg['epochs']} epochs x {n:,} images (batch {cfg['batch_size']})"))
        rows.append((f"{stage}_inpainter", "monitor", "fp32", cfg["epochs"] * 2 * cfg["monitor_points"] * atop_fwd,
                     f"{cfg['monitor_points']} clean + {cfg['monitor_points']} attacked test images per epoch"))
    for name, fwd, att in (("at", clf_fwd, clf_att), ("carso", def_fwd, def_att), ("atop_rt", atop_fwd, atop_att),
                           ("atop", atop_fwd, atop_att)):
        cfg = ev["defences"][name]
        n, reps, s = cfg["n_points"], 2 * cfg["verdict_draws"] if name != "at" else 1, cfg["sanity"]  # picking + estimate
        stage = f"evaluate_{name}"
        for pgd in cfg["pgd"]:  # an upper bound: every run on every point (the cascade gives later runs fewer)
            via = " via surrogate" if pgd.get("surrogate") else ""
            rows.append((stage, f"PGD-{pgd['steps']} ({pgd['loss']}{via}) x EoT {pgd['eot']}", "fp32",
                         n * pgd["restarts"] * pgd["steps"] * pgd["eot"] * att,
                         f"{n:,} points, {pgd['restarts']} restart(s)"))
        if cfg["square"]["enabled"]:
            rows.append((stage, f"Square ({cfg['square']['n_queries']} queries)", "fp32",
                         n * cfg["square"]["n_queries"] * fwd, f"{n:,} points, at most (it stops on success)"))
        pgd = next((r for r in cfg["pgd"] if not r.get("surrogate")), cfg["pgd"][0])
        losses = len({r["loss"] for r in cfg["pgd"] if not r.get("surrogate")}) or 1
        if cfg["autoattack"]["enabled"]:
            r, version = PUBLISHED_ROBUST.get((dataset, name), 1.0), cfg["autoattack"]["version"]
            if version == "rand":  # APGD-DLR, then APGD-CE on the survivors, each with EoT 20
                aa = n * (1 + r) * (AA_ITERS + 1) * 20 * att
            else:  # standard: APGD-CE, then APGD-T, FAB-T and Square on the survivors
                aa = n * (AA_ITERS + 1) * att + n * r * (
                    AA_TARGETS * (AA_ITERS + 1) * att + AA_TARGETS * AA_ITERS * (att + fwd) + SQUARE_QUERIES * fwd)
            rows.append((stage, f"AutoAttack {version}", "fp32", aa,
                         f"{n:,} points; components after the first on {100 * r:.2f}% " + (
                             "(published robust accuracy)" if (dataset, name) in PUBLISHED_ROBUST
                             else "(no published figure: all points, an upper bound)")))
        rows.append((stage, "sanity checks", "fp32",
                     s["n_points"] * ((s["more_steps_factor"] - 1) * pgd["steps"] * pgd["eot"] * att
                                      + losses * s["large_eps_steps"] * pgd["eot"] * att + 2 * reps * fwd),
                     f"{s['n_points']} points: PGD continued to {s['more_steps_factor']}x, PGD at eps {s['large_eps']} "
                     f"with each of {losses} loss(es)"))
        rows.append((stage, "clean + verdicts", "fp32", test_set * fwd + n * 4 * reps * fwd,
                     f"clean accuracy on {test_set:,}; {reps} judged draw(s) per point on 4 point sets"))
    return rows


def stage_seconds(params: dict[str, Any]) -> dict[str, float]:
    """Seconds of one H100 per stage of a config at the assumed sustained rates (`stage_flops`): a lower bound."""
    dataset = params["datasets"][0]
    seconds: dict[str, float] = {}
    for stage, _, precision, value, _ in stage_flops(params, dataset, per_image_flops(params, dataset)):
        seconds[stage] = seconds.get(stage, 0.0) + value / (PEAK[precision] * EFFICIENCY[precision])
    return seconds


def study_seconds(path: str) -> tuple[float, list[str]]:
    """One H100's seconds for the stages a study runs beyond its base run (carso.study.Plan: each job once, with the
    params of the folder it writes under), and those jobs."""
    study = load_study(path)
    plan = Plan(study.base, study.base_params, study)
    jobs = sorted({(plan.prefix(stage, v), stage) for v in range(len(plan.variants)) for stage in plan.graph
                   if plan.prefix(stage, v) != plan.base_prefix})
    per_folder = {prefix: stage_seconds(plan.params_of(prefix)) for prefix, _ in jobs}  # its jobs share its params
    total, counted = 0.0, []
    for prefix, stage in jobs:
        name = stage.replace(":", "_")  # evaluate:carso -> evaluate_carso, as stage_flops names it
        seconds = per_folder[prefix].get(name)
        if seconds is not None:  # fetch and report do no model work
            total += seconds
            counted.append(f"{prefix.rstrip('/').rsplit('/', 1)[-1]} {name} {seconds:.1f} s")
    return total, counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["configs/cifar10.yaml", "configs/cifar100.yaml"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the timing (default: all)")
    parser.add_argument("--cpu-batch", type=int, default=4, help="images per timed classifier pass")
    parser.add_argument("--skip-cpu", action="store_true", help="only count FLOPs")
    parser.add_argument("--study", nargs="+", default=None,
                        help="instead: one H100's seconds (FLOP lower bound) for each study's runs beyond its base run")
    args = parser.parse_args()
    configure_threads(args.threads)
    if args.study:
        for path in args.study:
            total, counted = study_seconds(path)
            print(f"{path}: {total:.1f} s of one H100 beyond the base run (a FLOP lower bound): {'; '.join(counted)}")
        return
    print(f"# H100 assumption: fp32 {PEAK['fp32'] / 1e12:.0f} TFLOP/s peak x {EFFICIENCY['fp32']:.0%} sustained, "
          f"bf16 {PEAK['bf16'] / 1e12:.0f} TFLOP/s dense peak x {EFFICIENCY['bf16']:.0%} sustained; one GPU")
    for path in args.config:
        params = load_params(path)
        dataset = params["datasets"][0]
        f = per_image_flops(params, dataset)
        print(f"\n## {path} ({dataset}): FLOPs per image (FlopCounterMode, 2 per multiply-add)")
        for name, value in f.items():
            print(f"{name:<52}{value / 1e9:>12.4f} GFLOP")
        print(f"\n{'stage / part':<44}{'precision':>9}{'PFLOP':>10}{'H100 GPU-h':>12}  counted")
        per_stage: dict[str, float] = {}
        for stage, part, precision, value, what in stage_flops(params, dataset, f):
            hours = value / (PEAK[precision] * EFFICIENCY[precision]) / 3600
            per_stage[stage] = per_stage.get(stage, 0.0) + hours
            print(f"{stage + ' / ' + part:<44}{precision:>9}{value / 1e15:>10.1f}{hours:>12.2f}  {what}")
        print("GPU-hours per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in per_stage.items())
              + f"; total {sum(per_stage.values()):.1f}")
    if args.skip_cpu:
        return
    params = load_params(args.config[0])
    dataset = params["datasets"][0]
    torch.manual_seed(0)
    clf, defence = build(params, dataset)
    f = per_image_flops(params, dataset)
    b = args.cpu_batch
    x, y = images(dataset, b)
    x1, y1 = x[:1], y[:1]
    print(f"\n## this CPU ({torch.get_num_threads()} threads), fp32, random weights, {args.config[0]}")
    timed = [("classifier attack pass", attack_pass(clf, x, y), b, f["classifier attack pass (fwd+bwd to input)"]),
             ("purifier training step", training_step(defence, x, "fp32"), b, f["purifier training step (fwd+bwd)"]),
             ("CARSO attack pass (N samples)", attack_pass(defence, x1, y1), 1, f["CARSO attack pass (fwd+bwd to input)"])]
    speed = {}  # FLOP/s of each pass here
    for name, fn, n, per_image in timed:
        defence.purifier.train(name == "purifier training step")
        r = rate(fn, n, iters=2, warmup=1)
        speed[name] = r * per_image
        print(f"{name:<40} batch {n:>3}: {r:8.2f} img/s, {speed[name] / 1e9:7.1f} GFLOP/s")
    rate_of = {"train_purifier": speed["purifier training step"], "evaluate_carso": speed["CARSO attack pass (N samples)"]}
    rate_of["evaluate_atop_rt"] = rate_of["evaluate_atop"] = speed["classifier attack pass"]  # the WRN dominates
    days: dict[str, float] = {}
    for stage, _, _, value, _ in stage_flops(params, dataset, f):
        days[stage] = days.get(stage, 0.0) + value / rate_of.get(stage, speed["classifier attack pass"]) / 86400
    print("at these rates this CPU would need (days): " + ", ".join(f"{k} {v:,.0f}" for k, v in days.items()))


if __name__ == "__main__":
    main()
