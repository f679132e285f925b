"""Command-line entry points, one per stage: parse arguments, call one library function, write outputs.

The shared stages are here; each method's training stages come from the registry (carso.defences), those of the
plugins that the --params file names included.

The same command runs from Snakemake, from DVC, by hand on a GPU box and from the tests:
    python -m carso fetch --dataset fashion_mnist --out data/fashion_mnist/dataset
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from carso.defences import (DEFENCES, check_models, plugin_of, plugins_named, resolve, stage_owner, training_stages,
                            use_plugins)
from carso.errors import UserError
from carso.methods import StageSpec

if TYPE_CHECKING:  # the stages import torch lazily, so that `--help` and bad params answer at once
    import torch

    from carso.distributed import Team

log = logging.getLogger("carso")


def _setup_logging(log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("auto-attack").setLevel(logging.DEBUG)  # AutoAttack reports progress at DEBUG


def _runtime(params: dict[str, Any], threads: int | None,
             data_parallel: bool = False) -> tuple[torch.device, Team]:
    """Threads, seeds, the device and the team of processes for a stage: torchrun's, for the `data_parallel`
    stages (the others refuse a torchrun launch), else a single process."""
    import torch

    from carso.device import configure_threads, seed_everything, select_device
    from carso.distributed import join, require_single, team_from_env

    team = team_from_env()
    if not data_parallel:
        require_single()
    configure_threads(threads, share=team.local_size)
    seed_everything(params["runtime"]["seed"])
    device = select_device(params["runtime"]["device"], team.local_rank)
    log.info("device %s, %d threads per process", device, torch.get_num_threads())
    return device, join(team, device)


def cmd_fetch(args: argparse.Namespace, params: dict[str, Any]) -> None:
    from carso.data import fetch_dataset

    manifest = fetch_dataset(args.dataset, params["data"], Path(args.out))
    for split, info in manifest["splits"].items():
        log.info("%s: %d images of shape %s", split, info["count"], info["shape"])


def cmd_train_classifier(args: argparse.Namespace, params: dict[str, Any]) -> None:
    from carso.distributed import leave
    from carso.pretrained import import_classifier
    from carso.training import train_classifier

    device, team = _runtime(params, args.threads, data_parallel=True)
    if params["classifier"].get("pretrained"):  # imported, not trained: one process does it all
        if team.is_main:
            import_classifier(args.dataset, Path(args.data), Path(args.out), params["classifier"], device,
                              Path(params["data"]["download_root"]) / "robustbench")
    else:
        train_classifier(args.dataset, Path(args.data), Path(args.out), params["classifier"],
                         params["runtime"]["seed"], device, team, params["evaluation"]["norm"])
    leave(team)


def cmd_generate_adversarial(args: argparse.Namespace, params: dict[str, Any]) -> None:
    from carso.advgen import generate_adversarial
    from carso.checkpoint import load_classifier

    device, _ = _runtime(params, args.threads)
    model = load_classifier(Path(args.model), args.dataset)
    generate_adversarial(model, Path(args.data), Path(args.out), params["adversarial"], device,
                         params["evaluation"]["norm"])


def cmd_evaluate(args: argparse.Namespace, params: dict[str, Any]) -> None:
    from carso.data import load_split
    from carso.defences import defence, resolve
    from carso.evaluation import evaluate_defence, example_tensors, headline, unseen_section
    from carso.params import defence_params, pgd_run_name, with_overrides
    from carso.io import save_tensors, write_json
    from carso.sources import load_crafted

    device, _ = _runtime(params, args.threads)
    if args.defence not in params["evaluation"]["defences"]:
        raise UserError(f"defence '{args.defence}' has no section in evaluation.defences of {args.params}; "
                        f"add one (see the default params.yaml).")
    spec = defence(args.defence, params)
    built = defence_params(params, args.defence, args.params)  # a variant's `set` applied
    common, x_transfer, threat = _evaluation_threat(args, params, built)
    if len(args.artifacts) != len(spec.artifacts):
        wanted = " ".join(f"data/{args.dataset}/{a}" for a in spec.artifacts) or "nothing"
        raise UserError(f"defence '{args.defence}' loads {len(spec.artifacts)} trained file(s) but --artifacts gave "
                        f"{len(args.artifacts)}; pass --artifacts {wanted} (the files its training stages write).")
    sources = _sources_folder(args, params, threat)
    load = lambda p: resolve(spec.load)(Path(args.model), [Path(a) for a in args.artifacts], args.dataset, p)  # noqa: E731
    model = load(built)
    cfg = params["evaluation"]["defences"][args.defence]
    surrogates = {pgd_run_name(run): load(with_overrides(built, run["surrogate"], args.params))
                  for run in cfg["pgd"] if run.get("surrogate")}
    x, y = load_split(Path(args.data), "test")
    if threat:
        cfg = unseen_section(cfg, params["evaluation"]["threats"][threat])
    out = Path(args.out)
    metrics, adversarial, robust = evaluate_defence(model, x, y, x_transfer, common, cfg, device,
                                                    params["runtime"]["seed"], out, surrogates,
                                                    section=f"evaluation.defences.{args.defence} of {args.params}",
                                                    naive=() if threat else spec.naive,
                                                    sources=load_crafted(sources / "points.safetensors",
                                                                         common.get("norm", "Linf"), common["eps"], y)
                                                    if sources else None)
    metrics = {"threat": threat or "training", **metrics}
    examples = example_tensors(model, x, adversarial[metrics["strongest_pgd"]], y, device)
    save_tensors(out / "examples.safetensors",
                 {**examples, "robust_expected": robust.estimate, "robust_worst_case": robust.ok},
                 {"defence": args.defence, "adversarial": f"the evaluation's strongest PGD run ({metrics['strongest_pgd']})",
                  "robust_expected": "per attacked point: the share of fresh estimate draws that classified it correctly "
                                     "under the strongest attack found for it (the headline's per-point value)",
                  "robust_worst_case": "per attacked point, the strict rule: survived every attack, every repeat correct"})
    variant = {"variant_of": spec.variant_of, "set": cfg["set"]} if spec.variant_of else {}
    plugin = plugin_of(spec.base)  # a plugin's defence: the distribution, version and code digest it ran with
    provenance = {"plugin": plugin.record()} if plugin else {}
    write_json(out / "metrics.json", {"dataset": args.dataset, "defence": args.defence, **variant, **provenance,
                                      **metrics})
    write_json(out / "headline.json", headline(metrics))


def _evaluation_threat(args: argparse.Namespace, params: dict[str, Any], built: dict[str, Any]
                       ) -> tuple[dict[str, Any], Any, str | None]:
    """The evaluation settings, the stored transfer points and the unseen threat's name (None: the training threat)
    of an evaluate command. Under an unseen threat the norm and radius are its own and there are no transfer points
    (they were crafted in the training threat's ball)."""
    from carso.data import load_adversarial

    threats = params["evaluation"].get("threats") or {}
    if args.threat is not None:
        if args.threat not in threats:
            raise UserError(f"--threat {args.threat}: evaluation.threats of {args.params} has no such threat "
                            f"({', '.join(threats) or 'it declares none'}); add it there or drop --threat.")
        if args.defence not in threats[args.threat]["defences"]:
            raise UserError(f"--threat {args.threat}: defence '{args.defence}' is not in "
                            f"evaluation.threats.{args.threat}.defences of {args.params}; add it there.")
        t = threats[args.threat]
        return {**built["evaluation"], "norm": t["norm"], "eps": t["eps"]}, None, args.threat
    if args.adversarial is None:
        raise UserError("evaluate under the training threat needs --adversarial (generate_adversarial's folder, "
                        "e.g. data/fashion_mnist/adversarial) for the transfer attack; or give --threat NAME.")
    transfer = built["evaluation"]["transfer_attack"]
    stored = load_adversarial(Path(args.adversarial) / "test.safetensors", [transfer])
    return built["evaluation"], stored[transfer], None


def _sources_folder(args: argparse.Namespace, params: dict[str, Any], threat: str | None) -> Path | None:
    """craft_sources' folder for this evaluation's threat (--sources: the points crafted on the unseen source
    models), or None when params declares no `sources`."""
    from carso.stages import crafted_folder

    if not params.get("sources"):
        if args.sources is not None:
            raise UserError(f"--sources {args.sources}: {args.params} declares no `sources` section; add one (see "
                            "the default params.yaml) or drop --sources.")
        return None
    if args.sources is None:
        raise UserError(f"{args.params} declares `sources` (transfer from unseen models): give --sources, "
                        f"craft_sources' folder for this threat (data/{args.dataset}/{crafted_folder(threat)}), or "
                        "remove the `sources` section.")
    return Path(args.sources)


def cmd_train_sources(args: argparse.Namespace, params: dict[str, Any]) -> None:
    from carso.distributed import leave
    from carso.sources import train_sources

    device, team = _runtime(params, args.threads, data_parallel=True)
    _require_sources(params, args)
    train_sources(args.dataset, Path(args.data), Path(args.out), params, device, team)
    leave(team)


def cmd_craft_sources(args: argparse.Namespace, params: dict[str, Any]) -> None:
    from carso.sources import craft_sources
    from carso.stages import TRAINING_BALL

    device, _ = _runtime(params, args.threads)
    _require_sources(params, args)
    craft_sources(args.dataset, Path(args.data), Path(args.models), Path(args.out), params,
                  args.threat or TRAINING_BALL, device)


def _require_sources(params: dict[str, Any], args: argparse.Namespace) -> None:
    if not params.get("sources"):
        raise UserError(f"{args.params} declares no `sources` section (the unseen source models); add one (see the "
                        "default params.yaml).")


def cmd_report(args: argparse.Namespace, params: dict[str, Any]) -> None:
    from carso.layout import Results
    from carso.report import write_report

    write_report(args.dataset, Results.parse(args.root, args.folders), params, Path(args.out), args.params)


def method_stage(stage: StageSpec) -> Callable[[argparse.Namespace, dict[str, Any]], None]:
    """A method's training stage (from the registry) as a CLI command: the runtime, then the stage's function."""
    def run(args: argparse.Namespace, params: dict[str, Any]) -> None:
        from carso.distributed import leave

        check_models([stage_owner(stage.name)], params, args.params)
        device, team = _runtime(params, args.threads, data_parallel=stage.data_parallel)
        resolve(stage.run)(args, params, device, team)
        leave(team)
    return run


Options = list[tuple[str, str]]
Stage = tuple[Callable[[argparse.Namespace, dict[str, Any]], None], Options, str]
SHARED_STAGES: dict[str, Stage] = {
    "fetch": (cmd_fetch, [("--out", "folder for train/test tensors and manifest.json")], "fetch a dataset"),
    "train-classifier": (cmd_train_classifier, [("--data", "fetched dataset folder"),
                                                ("--out", "folder for the model, checkpoint and curves")],
                         "adversarially train (or import) the classifier"),
    "generate-adversarial": (cmd_generate_adversarial, [("--model", "classifier .safetensors"),
                                                        ("--data", "fetched dataset folder"),
                                                        ("--out", "folder for the adversarial examples")],
                             "attack the classifier alone; store the examples"),
    "train-sources": (cmd_train_sources, [("--data", "fetched dataset folder"),
                                          ("--out", "folder for one subfolder per source model")],
                      "train the unseen source models of `sources` (transfer attacks from models no defence saw)"),
    "craft-sources": (cmd_craft_sources, [("--models", "train_sources' folder"), ("--data", "fetched dataset folder"),
                                          ("--threat?", "an unseen threat of evaluation.threats (default: the "
                                                        "training threat)"),
                                          ("--out", "folder for points.safetensors and summary.json")],
                      "craft sources.attacks on every source model in one threat"),
}
FINAL_STAGES: dict[str, Stage] = {
    "evaluate": (cmd_evaluate, [("--defence", f"a defence: {', '.join(DEFENCES)}, or a variant declared in params"),
                                ("--model", "classifier .safetensors"),
                                ("--artifacts*", "the defence's trained files, in the order of its registry entry"),
                                ("--data", "fetched dataset folder"),
                                ("--adversarial?", "generate_adversarial's folder (the transfer attack; needed "
                                                   "without --threat)"),
                                ("--threat?", "an unseen threat of evaluation.threats (default: the training threat, "
                                              "evaluation.norm and eps, with the defence's full suite)"),
                                ("--sources?", "craft_sources' folder for this threat (transfer from unseen models; "
                                               "needed when params declares `sources`)"),
                                ("--out", "folder for metrics.json, headline.json and examples.safetensors")],
                 "evaluate one defence with the full protocol"),
    "report": (cmd_report, [("--root", "the dataset's results folder, e.g. data/fashion_mnist"),
                            ("--folders*", "stage folders kept elsewhere (a study's shared stages): FOLDER=PATH, "
                                           "e.g. eval/at=data/fashion_mnist/eval/at"),
                            ("--out", "folder for report.html, report.md and figures/")], "write the report"),
}


def stages() -> dict[str, Stage]:
    """Every stage's subcommand: the shared ones, each registered method's training stages, evaluate and report."""
    methods = {s.command: (method_stage(s), list(s.options), s.help) for s in training_stages().values()}
    return {**SHARED_STAGES, **methods, **FINAL_STAGES}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carso", description="Hybrid adversarial defences: pipeline stages.")
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, (_, options, text) in stages().items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
        p.add_argument("--dataset", required=True, help="dataset name, one of params.yaml `datasets`")
        p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
        p.add_argument("--log-file", default=None, help="also write the log to this file")
        for flag, help_text in options:  # a trailing "*" marks an optional list of values, "?" an optional value
            if flag.endswith("*"):
                p.add_argument(flag.rstrip("*"), nargs="*", default=[], help=help_text)
            elif flag.endswith("?"):
                p.add_argument(flag.rstrip("?"), default=None, help=help_text)
            else:
                p.add_argument(flag, required=True, help=help_text)
    text = "compare runs (each named by its params file): parameter differences, figures, paired tests"
    p = sub.add_parser("compare", help=text, description=text)
    p.add_argument("runs", nargs="*", metavar="PARAMS", help="the runs' params files (their output_root holds the results)")
    p.add_argument("--rev", action="append", default=[], metavar="REV",
                   help="a git revision or DVC experiment of this DVC project as one more run (repeatable)")
    p.add_argument("--study", default=None, help="instead: a study file; compares its variants (studies/*.yaml)")
    p.add_argument("--dataset", required=True, help="dataset the runs evaluated")
    p.add_argument("--out", required=True, help="folder for compare.html and compare.md")
    p.add_argument("--log-file", default=None, help="also write the log to this file")
    text = ("every run of this project on one page: one table per dataset and threat model, ranked by the headline "
            "worst case (carso/leaderboard.py; reads results only)")
    p = sub.add_parser("leaderboard", help=text, description=text)
    p.add_argument("--root", default=".", help="the project whose output roots to gather (default: .)")
    p.add_argument("--out", required=True, help="folder for leaderboard.html and leaderboard.md")
    p.add_argument("--paired", action="store_true",
                   help="add the paired test of each defence evaluated on the same points in several runs")
    p.add_argument("--log-file", default=None, help="also write the log to this file")
    text = "write dvc.yaml (params.yaml's pipeline) from the registry, or check that it has not drifted"
    p = sub.add_parser("dvc-yaml", help=text, description=text)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if dvc.yaml differs")
    p.add_argument("--log-file", default=None, help=argparse.SUPPRESS)
    text = ("record a finished Snakemake run in DVC (dvc.lock and the cache): what the workflow does when it ends; "
            "for a run made with --no-hooks")
    p = sub.add_parser("record", help=text, description=text)
    p.add_argument("--params", default="params.yaml", help="the run's params file (default: params.yaml)")
    p.add_argument("--study", default=None, help="instead: a study file (studies/*.yaml); records its variants")
    p.add_argument("--log-file", default=None, help=argparse.SUPPRESS)
    return parser


def cmd_compare(args: argparse.Namespace) -> int:
    """Not a stage: reads finished runs (carso.compare), so no stage depends on its code."""
    from carso.compare import write_comparison

    write_comparison(args.runs, args.dataset, Path(args.out), args.study, args.rev)
    log.info("wrote %s", Path(args.out) / "compare.html")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """Not a stage: reads every finished run (carso.leaderboard), so no stage depends on its code."""
    from carso.leaderboard import write_leaderboard

    rows = write_leaderboard(Path(args.root), Path(args.out), args.paired)
    log.info("wrote %s (%d evaluations)", Path(args.out) / "leaderboard.html", len(rows))
    return 0


def cmd_dvc_yaml(args: argparse.Namespace) -> int:
    """Not a stage: dvc.yaml from params.yaml and the registry (carso.pipeline)."""
    from carso.params import load_params
    from carso.pipeline import ROOT_FILE, root_text
    from carso.study import write_if_changed

    text = root_text(load_params("params.yaml"))
    if args.check:
        if not Path(ROOT_FILE).exists() or Path(ROOT_FILE).read_text() != text:
            log.error("dvc.yaml differs from what the registry and params.yaml give: run `python -m carso dvc-yaml` "
                      "and commit it")
            return 1
        log.info("dvc.yaml is up to date")
        return 0
    log.info("wrote %s" if write_if_changed(Path(ROOT_FILE), text) else "%s was up to date", ROOT_FILE)
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """Not a stage: what the Snakefile's hooks do when a workflow ends (carso.record)."""
    from carso.params import load_params
    from carso.pipeline import write_generated
    from carso.record import record_run
    from carso.study import Plan, base_of, load_study

    params_file = base_of(args.study) if args.study else args.params
    params = load_params(params_file)
    plan = Plan(params_file, params, load_study(args.study) if args.study else None)
    record_run(write_generated(plan), params["datasets"])
    return 0


COMMANDS = {"compare": cmd_compare, "leaderboard": cmd_leaderboard, "dvc-yaml": cmd_dvc_yaml,
            "record": cmd_record}  # not stages


def _named_plugins(argv: list[str]) -> list[str]:
    """The plugins the command's --params file names (read before the parser is built, so that their stages are
    subcommands); the file itself is validated later, with the stage."""
    import yaml

    flag = next((i for i, a in enumerate(argv) if a == "--params" or a.startswith("--params=")), None)
    path = "params.yaml" if flag is None else (argv[flag].partition("=")[2] or (argv[flag + 1:] or [""])[0])
    try:
        return plugins_named(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError):
        return []  # the stage's own loading says what is wrong with the file


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    try:
        use_plugins(_named_plugins(words))
    except UserError as err:
        _setup_logging(None)
        log.error("%s", err)
        return 2
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_file)
    try:
        if args.stage in COMMANDS:
            return COMMANDS[args.stage](args)
        from carso.params import load_params
        from carso.record import job_record

        with job_record(args.log_file, sys.argv[1:] if argv is None else argv, getattr(args, "out", None)):
            params = load_params(args.params)
            if args.dataset not in params["datasets"]:
                raise UserError(f"dataset '{args.dataset}' is not in `datasets` of {args.params} "
                                f"({params['datasets']}); add it there first.")
            stages()[args.stage][0](args, params)
    except UserError as err:
        log.error("%s", err)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to resume from the last checkpoint")
        return 130
    return 0
