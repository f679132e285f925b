"""The report's generalisation part: every defence under the threats it was not trained for (evaluation.threats)
and under the attack families that use no gradient of it, beside its figure under the training threat, each with
its interval and n and the paired difference against the classifier alone (`at`) on the same points."""
from __future__ import annotations

from typing import Any

from carso.io import read_json
from carso.layout import Results
from carso.report import Outcomes, Section, _pct, _threat, paired, point_outcomes
from carso.stages import TRAINING_BALL, crafted_folder, threat_folder, unseen

QUERY_KINDS = {"spsa": "gradient-free (SPSA)", "hopskipjump": "decision-based (HopSkipJump)"}
REFERENCE = "at"


def gather_threats(results: Results, params: dict[str, Any]) -> dict[str, tuple[dict[str, Any], Outcomes]]:
    """Per unseen threat: each evaluated defence's metrics and per-point outcomes under it."""
    found: dict[str, tuple[dict[str, Any], Outcomes]] = {}
    for name, threat in unseen(params):
        evals, outcomes = found.setdefault(threat, ({}, {}))
        evals[name] = read_json(results.path(f"{threat_folder(name, threat)}/metrics.json"))
        outcomes[name] = point_outcomes(results.path(f"{threat_folder(name, threat)}/examples.safetensors"))
    return found


def gather_sources(results: Results, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per threat the sources were crafted in (`training` first, then each unseen one): craft_sources' summary.json
    (none when params declares no `sources`)."""
    if not params.get("sources"):
        return {}
    balls = [None, *(params["evaluation"].get("threats") or {})]
    return {ball or TRAINING_BALL: read_json(results.path(f"{crafted_folder(ball)}/summary.json")) for ball in balls}


def source_outcomes(evals: dict[str, dict[str, Any]]) -> Outcomes:
    """Per defence, the transfer from the unseen sources as one family: its per-point outcomes on the standalone
    subset (metrics' `sources.per_point`), for the paired test against `at`."""
    return {name: (m["sources"]["per_point"]["expected"], m["sources"]["per_point"]["strict"])
            for name, m in evals.items() if "per_point" in m.get("sources", {})}


def versus(name: str, evals: dict[str, Any], outcomes: Outcomes) -> dict[str, Any] | None:
    """`name` minus `at` on the first points both were attacked on, under one threat (None: either is missing)."""
    return None if name == REFERENCE else paired(name, REFERENCE, evals, outcomes)


def _difference(d: dict[str, Any] | None) -> str:
    if d is None:
        return ""
    real = "" if d["verdict"] == "real" else ", not significant"
    return f"; vs `at` {100 * d['difference']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]{real}"


def _query_entry(m: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The strongest run of a query family alone (its draws per query: the k-draw view), or None if it did not run."""
    runs = [a for a in m["attacks"].values() if a["kind"] == kind]
    return min(runs, key=lambda a: a["accuracy"]) if runs else None


def generalisation_rows(evals: dict[str, dict[str, Any]], outcomes: Outcomes,
                        threats: dict[str, tuple[dict[str, Any], Outcomes]]) -> list[list[str]]:
    """Rows the defences; columns the worst case under the training threat, under each unseen threat and each query
    family's strongest run alone, each with its interval and n and (threats, the unseen sources) the paired
    difference against `at`."""
    kinds = [k for k in QUERY_KINDS if any(_query_entry(m, k) for m in evals.values())]
    sources = any("sources" in m for m in evals.values())
    training = next(iter(evals.values()))
    header = ["defence", f"training threat ({_threat(training)}), worst case"]
    header += [f"unseen: {_threat(next(iter(e.values())))} ({t}), worst case" for t, (e, _) in threats.items()]
    header += [f"{QUERY_KINDS[k]}, alone (training threat)" for k in kinds]
    header += ["transfer from unseen models, strongest per point (training threat)"] if sources else []
    rows = [header]
    for name, m in evals.items():
        row = [f"`{name}`", _pct(m["robust_worst_case"]) + _difference(versus(name, evals, outcomes))]
        for t_evals, t_outcomes in threats.values():
            row.append(_pct(t_evals[name]["robust_worst_case"]) + _difference(versus(name, t_evals, t_outcomes))
                       if name in t_evals else "not evaluated")
        row += [_pct(q) if (q := _query_entry(m, k)) else "not run" for k in kinds]
        row += [_pct(m["sources"]) + _difference(versus(name, evals, source_outcomes(evals)))
                if "sources" in m else "not run"] if sources else []
        rows.append(row)
    return rows


def _gap(d: dict[str, Any]) -> str:
    return f"{100 * d['difference']:+.1f} points [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"


def generalisation_sentences(evals: dict[str, dict[str, Any]], outcomes: Outcomes,
                             threats: dict[str, tuple[dict[str, Any], Outcomes]]) -> list[str]:
    """Per defence and unseen threat: its paired difference against `at` there, beside the one under the training
    threat, and whether the gap narrowed or widened beyond both intervals (a defence that generalises better than
    `at` gains on it under threats it was not trained for)."""
    out = []
    for threat, (t_evals, t_outcomes) in threats.items():
        label = _threat(next(iter(t_evals.values())))
        for name in t_evals:
            unseen_d, trained_d = versus(name, t_evals, t_outcomes), versus(name, evals, outcomes)
            if unseen_d is None or trained_d is None:
                continue
            if unseen_d["ci_low"] > trained_d["ci_high"]:
                trend = "it closes on `at` under the unseen threat: the intervals do not overlap"
            elif unseen_d["ci_high"] < trained_d["ci_low"]:
                trend = "it falls further behind `at` under the unseen threat: the intervals do not overlap"
            else:
                trend = "the two intervals overlap, so this run cannot tell whether it generalises better or worse"
            out.append(f"`{name}` against `at` under {label} ({threat}, not trained for): {_gap(unseen_d)} "
                       f"(n={unseen_d['n']}); under the training threat: {_gap(trained_d)} (n={trained_d['n']}); "
                       f"{trend}.")
    return out


GENERALISATION_NOTE = (
    "Unseen threats (evaluation.threats) use each defence's own suite, lighter: its AutoAttack version, its first PGD "
    "runs with their step size scaled to the radius, surrogate runs, Square where enabled, the masking checks at the "
    "threat's large radius; no transfer points (crafted in the training threat's ball) and no query attacks. "
    "Differences against `at` are paired on the same first points, with the headline's paired interval; a "
    "difference marked not significant is one the sign-flip test does not support.")


def source_rows(crafted: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per (threat, source model): what it is, its clean accuracy on the crafted points and its own accuracy
    on each attack crafted on it (white-box there: near 0 says the attack did its job before it was transferred)."""
    attacks = list(dict.fromkeys(a for c in crafted.values() for s in c["sources"].values() for a in s["attacks"]))
    rows = [["threat", "source", "model", "clean", *(f"{a}: on the source itself" for a in attacks)]]
    for ball, c in crafted.items():
        for name, source in c["sources"].items():
            rows.append([f"{ball} ({c['norm']} eps {c['eps']:.4g})", f"`{name}`", source["description"],
                         f"{100 * source['clean_accuracy']:.1f}% (n={c['points']})",
                         *(f"{100 * source['attacks'][a]['white_box_accuracy']:.1f}%" if a in source["attacks"]
                           else "" for a in attacks)])
    return rows


SOURCES_NOTE = (
    "Each source model was trained here with the classifier's settings but its own architecture, epochs and attack "
    "(params `sources`), and no defence saw it. The attacks crafted on it in each threat are judged on every defence "
    "evaluated in that threat (the attacks table names each one's source: src_<source>_<attack>); the generalisation "
    "table gives, per defence, the strongest of them per point. A source's own accuracy near 0 on an attack says the "
    "attack worked on the source; a transfer figure far above it says the points did not carry over.")


def generalisation_sections(evals: dict[str, dict[str, Any]], outcomes: Outcomes,
                            threats: dict[str, tuple[dict[str, Any], Outcomes]],
                            crafted: dict[str, dict[str, Any]] | None = None) -> list[Section]:
    """The report's generalisation table, its sentences and the unseen source models (none without unseen threats
    or sources)."""
    if not threats and not crafted:
        return []
    sections: list[Section] = [("Generalisation: threats and attack families the defences were not trained for",
                                "table", generalisation_rows(evals, outcomes, threats))]
    if threats:
        sections.append(("What the unseen threats show", "list",
                         [*generalisation_sentences(evals, outcomes, threats), GENERALISATION_NOTE]))
    if crafted:
        sections += [("Transfer from unseen models: the source models", "table", source_rows(crafted)),
                     ("About the source models", "list", [SOURCES_NOTE])]
    return sections
