"""Loading and validating params.yaml against workflow/schemas/params.schema.yaml and each method's schema.yaml.

A bad value ends in one sentence that names the key and what is allowed (a `UserError`), never in a
traceback from deep inside a stage.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from carso.defences import DEFENCES, METHODS, THREAT_KEYS, method_dir, method_of, plugins_named, resolve, use_plugins
from carso.errors import UserError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "params.schema.yaml"


def load_schema(params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shared schema, completed from the registry: each method's sections (from its schema.yaml; required only
    for the methods whose defences `params` evaluates) and an evaluation.defences.<defence> entry for every
    registered defence."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    used = used_methods(params or {})
    for method in METHODS:
        sections = yaml.safe_load((method_dir(method) / "schema.yaml").read_text())["sections"]
        schema["properties"].update({k: v for k, v in sections.items() if k in method.sections})  # its own only
        schema["required"] += list(method.sections) if method.name in used else []
    defences = schema["properties"]["evaluation"]["properties"]["defences"]["properties"]
    defences.update({name: {"$ref": "#/$defs/defence_evaluation"} for name in DEFENCES})
    return schema


def used_methods(params: dict[str, Any]) -> set[str]:
    """The methods behind the defences (and the variants' bases) that `params` evaluates, as far as they are known."""
    defences = (params.get("evaluation") or {}).get("defences") or {}
    bases = [n if n in DEFENCES else (c if isinstance(c, dict) else {}).get("variant_of") for n, c in defences.items()]
    return {m.name for m in (method_of(b) for b in bases if b in DEFENCES) if m is not None}


def _key(path: Any) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return text or "(top level)"


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    return schema


def _allowed(error: jsonschema.ValidationError, root: dict[str, Any]) -> str:
    """What the schema allows at the failing place, in words."""
    schema = _resolve(error.schema, root)
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    if "oneOf" in schema:
        return " or ".join(_allowed_of(_resolve(s, root)) for s in schema["oneOf"])
    return _allowed_of(schema)


def _allowed_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type", "a value")
    kinds = " or ".join(kind) if isinstance(kind, list) else kind
    bounds = []
    for word, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if word in schema:
            bounds.append(f"{op} {schema[word]}")
    return f"{'an' if kinds[0] in 'aeiou' else 'a'} {kinds}" + (f" {' and '.join(bounds)}" if bounds else "")


def explain(error: jsonschema.ValidationError, root: dict[str, Any], source: str) -> str:
    """Turn a jsonschema error into one sentence for the user."""
    where = _key(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(_resolve(error.schema, root).get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return (f"{source}: unknown key '{'.'.join(filter(None, [where if error.absolute_path else '', extra[0]]))}'; "
                f"the keys allowed here are: {', '.join(allowed)}.")
    if error.validator == "required":
        missing = error.message.split("'")[1]
        owner = next((m for m in METHODS if missing in m.sections and not error.absolute_path), None)
        if owner is not None:
            return (f"{source}: the key '{missing}' is missing; {owner.title} needs it because evaluation.defences "
                    f"evaluates its defences ({', '.join(d.name for d in owner.defences)}): add the section (see the "
                    "default params.yaml), or evaluate none of them.")
        return f"{source}: the key '{'.'.join(filter(None, [_key(error.absolute_path) if error.absolute_path else '', missing]))}' is missing; add it (see the default params.yaml)."
    if error.validator in ("minItems", "uniqueItems", "minProperties"):
        return f"{source}: '{where}' must be a non-empty list or mapping without duplicates (got {error.instance!r})."
    if error.validator == "pattern" and "propertyNames" not in error.schema_path:  # a value, not a name
        return f"{source}: '{where}' must match {error.validator_value} (got {error.instance!r})."
    if error.validator == "pattern":  # (a propertyNames pattern reports the name as the instance)
        return (f"{source}: '{where}' holds an invalid name; names must match {error.validator_value} "
                f"(got {error.instance!r}).")
    if error.validator == "propertyNames":
        return f"{source}: '{where}' holds an invalid name; names must match [a-z][a-z0-9_]* (got {error.instance!r})."
    return f"{source}: '{where}' must be {_allowed(error, root)} (got {error.instance!r})."


def validate(params: dict[str, Any], source: str = "params.yaml", derived: bool = True) -> dict[str, Any]:
    """Validate `params` against the schema, then the rules a schema cannot express (`derived`: also build and
    check the params of each defence variant and of each PGD run's surrogate)."""
    try:
        use_plugins(plugins_named(params))
    except UserError as err:
        raise UserError(f"{source}: {err}") from None
    schema = load_schema(params)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(params), key=lambda e: (len(e.absolute_path), _key(e.absolute_path)))
    if errors:
        raise UserError(explain(errors[0], schema, source))
    _check_relations(params, source, derived)
    return params


def _check_relations(params: dict[str, Any], source: str, derived: bool = True) -> None:
    """The shared cross-key rules, each method's own (`MethodSpec.check_params`), then (`derived`) the params each
    variant and each surrogate builds."""
    for name, spec in params["adversarial"]["attacks"].items():
        if spec["method"] == "pgd" and "steps" not in spec:
            raise UserError(f"{source}: 'adversarial.attacks.{name}.steps' is missing; a pgd attack needs "
                            "steps (an integer >= 1) and step_size.")
        if spec["method"] == "pgd" and "step_size" not in spec:
            raise UserError(f"{source}: 'adversarial.attacks.{name}.step_size' is missing; a pgd attack needs "
                            "a step_size > 0.")
    _check_evaluation(params, source)
    for method in METHODS:  # each method whose sections the params file has
        if method.check_params and all(s in params for s in method.sections):
            resolve(method.check_params)(params, source)
    for name in params["datasets"]:
        mirror = params["data"]["mirror"]
        if params["data"]["source"] == "mirror" and not mirror.get(name):
            raise UserError(f"{source}: 'data.mirror.{name}' is not set but data.source is 'mirror'; set it "
                            "to the folder that holds the dataset, or set data.source to 'download'.")
    for name in params["evaluation"]["defences"] if derived else []:  # after every check of the params themselves,
        _check_surrogates(params, name, source)  # so that a key's own error is reported in its own words


def _radii(params: dict[str, Any]) -> dict[str, float]:
    """Every radius of the threat model in params, by its dotted key."""
    trained = params["classifier"]["attack"]["eps"]
    found = {"evaluation.eps": params["evaluation"]["eps"]}
    found.update({"classifier.attack.eps": trained} if not isinstance(trained, list) else
                 {f"classifier.attack.eps[{i}]": e for i, e in enumerate(trained)})
    found.update({f"adversarial.attacks.{k}.eps": a["eps"] for k, a in params["adversarial"]["attacks"].items()})
    found.update({f"evaluation.defences.{k}.sanity.large_eps": d["sanity"]["large_eps"]
                  for k, d in params["evaluation"]["defences"].items()})
    return found


def _check_evaluation(params: dict[str, Any], source: str) -> None:
    """The threat model's radii fit its norm; the transfer attack must be a stored one inside the threat model;
    the sizes must fit each other; each variant names a defence and settings it reads; each defence's PGD runs
    have distinct names (their surrogates: `_check_surrogates`)."""
    if params["evaluation"]["norm"] == "Linf":
        for key, eps in _radii(params).items():
            if eps > 1:
                raise UserError(f"{source}: '{key}' is {eps}, but an L-inf radius in [0, 1] pixel units is at most "
                                "1; lower it (or set evaluation.norm to L2 or L1, whose radii can exceed 1).")
    for name, d in params["evaluation"]["defences"].items():
        hsj = d.get("hopskipjump") or {}
        if hsj.get("enabled") and params["evaluation"]["norm"] == "L1":
            raise UserError(f"{source}: 'evaluation.defences.{name}.hopskipjump' is enabled but evaluation.norm is L1, "
                            "and HopSkipJump (ART) has L-inf and L2 versions only; set its enabled to false.")
        if hsj and hsj["init_eval"] > hsj["max_eval"]:
            raise UserError(f"{source}: 'evaluation.defences.{name}.hopskipjump.init_eval' ({hsj['init_eval']}) is "
                            f"larger than its max_eval ({hsj['max_eval']}); HopSkipJump grows its gradient estimate "
                            "from init_eval up to max_eval queries, so lower init_eval or raise max_eval.")
    _check_threats(params, source)
    attacks = params["adversarial"]["attacks"]
    transfer = params["evaluation"]["transfer_attack"]
    if transfer not in attacks:
        raise UserError(f"{source}: 'evaluation.transfer_attack' names '{transfer}', which is not in "
                        f"adversarial.attacks ({', '.join(attacks)}); use one of those names or add the attack there.")
    if attacks[transfer]["eps"] > params["evaluation"]["eps"] + 1e-12:
        raise UserError(f"{source}: 'evaluation.transfer_attack' ({transfer}) has eps {attacks[transfer]['eps']}, "
                        f"larger than evaluation.eps {params['evaluation']['eps']}; pick an attack inside the threat model.")
    test_points = params["adversarial"]["test_points"]
    for name, cfg in params["evaluation"]["defences"].items():
        if test_points is not None and test_points < cfg["n_points"]:
            raise UserError(f"{source}: 'adversarial.test_points' ({test_points}) is smaller than "
                            f"'evaluation.defences.{name}.n_points' ({cfg['n_points']}); the transfer attack needs "
                            "a stored example for every attacked point, so raise test_points (or null).")
        if cfg["verdict_repeats"] > cfg["verdict_draws"]:
            raise UserError(f"{source}: 'evaluation.defences.{name}.verdict_repeats' ({cfg['verdict_repeats']}) "
                            f"exceeds its verdict_draws ({cfg['verdict_draws']}); the strict rule's repeats are the "
                            "first of the selection draws, so raise verdict_draws or lower verdict_repeats.")
        if cfg["sanity"]["n_points"] > cfg["n_points"]:
            raise UserError(f"{source}: 'evaluation.defences.{name}.sanity.n_points' ({cfg['sanity']['n_points']}) "
                            f"exceeds its n_points ({cfg['n_points']}); the checks run on a part of the attacked points.")
        _check_variant(params, name, source)
        _check_run_names(params, name, source)


def _check_threats(params: dict[str, Any], source: str) -> None:
    """Each unseen threat (evaluation.threats) names evaluated defences, has radii its norm allows with the masking
    check's radius beyond the threat's, and is not the training threat (evaluate_<defence> covers that one)."""
    evaluation = params["evaluation"]
    for name, threat in (evaluation.get("threats") or {}).items():
        key = f"evaluation.threats.{name}"
        missing = [d for d in threat["defences"] if d not in evaluation["defences"]]
        if missing:
            raise UserError(f"{source}: '{key}.defences' names {', '.join(missing)}, which evaluation.defences does "
                            f"not evaluate ({', '.join(evaluation['defences'])}); list only those, or add a section.")
        if threat["norm"] == "Linf" and max(threat["eps"], threat["large_eps"]) > 1:
            raise UserError(f"{source}: '{key}' is an L-inf threat with a radius above 1 (eps {threat['eps']}, "
                            f"large_eps {threat['large_eps']}); an L-inf radius in [0, 1] pixel units is at most 1.")
        if threat["large_eps"] <= threat["eps"]:
            raise UserError(f"{source}: '{key}.large_eps' ({threat['large_eps']}) is not larger than its eps "
                            f"({threat['eps']}); the masking check attacks at a radius where every defence must "
                            "fall, so make it much larger (e.g. the whole image's norm).")
        if name == "training":
            raise UserError(f"{source}: '{key}': `training` names the training threat (evaluation.norm and eps) among "
                            "the points crafted on the source models (sources); give this threat another name.")
        if (threat["norm"], threat["eps"]) == (evaluation["norm"], evaluation["eps"]):
            raise UserError(f"{source}: '{key}' is the training threat ({threat['norm']} eps {threat['eps']}: "
                            "evaluation.norm and evaluation.eps), which each defence's own evaluation already "
                            "attacks with its full suite; remove it or change its norm or radius.")


def pgd_run_name(cfg: dict[str, Any]) -> str:
    """A PGD run's name in the metrics: pgd_<loss>, with _surrogate when its gradients come from a surrogate."""
    return f"pgd_{cfg['loss']}" + ("_surrogate" if cfg.get("surrogate") else "")


VARIANT_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _check_variant(params: dict[str, Any], name: str, source: str) -> None:
    """A registered defence's section is not a variant; any other section is one: a plain name, a registered base,
    and only keys its base reads at inference (its trained files are the base's)."""
    cfg, key = params["evaluation"]["defences"][name], f"evaluation.defences.{name}"
    if name in DEFENCES:
        if "variant_of" in cfg or "set" in cfg:
            raise UserError(f"{source}: '{key}' is the registered defence '{name}', not a variant; remove its "
                            "variant_of and set, or give the variant a name of its own (e.g. carso_logit).")
        return
    base = cfg.get("variant_of")
    if base not in DEFENCES or "set" not in cfg:
        raise UserError(f"{source}: '{key}' is not a registered defence ({', '.join(DEFENCES)}); to evaluate a "
                        "variant of one, give it variant_of: <defence> and set: {<params key>: <value>}.")
    if not VARIANT_NAME.fullmatch(name):
        raise UserError(f"{source}: '{key}': a variant's name becomes a folder and a Snakemake wildcard; use lower "
                        "case letters, digits and underscores, starting with a letter.")
    reads = DEFENCES[base].settings
    for dotted in cfg["set"]:
        if dotted not in THREAT_KEYS and not any(dotted == s or dotted.startswith(f"{s}.") for s in reads):
            raise UserError(f"{source}: '{key}.set' changes '{dotted}', which defence '{base}' does not read at "
                            f"inference ({', '.join(reads) or 'it reads no params'}) and which is not one of the "
                            f"threat model's keys ({', '.join(THREAT_KEYS)}); a variant re-evaluates its base's "
                            "trained files, so a training setting needs a run of its own (another params file).")


def defence_params(params: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    """The params defence `name` is built with: `params`, with a variant's `set` applied."""
    cfg = params["evaluation"]["defences"][name]
    return with_overrides(params, cfg["set"], f"{source} ('evaluation.defences.{name}.set')") if "set" in cfg else params


def _check_surrogates(params: dict[str, Any], defence: str, source: str) -> None:
    """A variant's settings and a surrogate's (over them) must name keys of params and give valid params."""
    built = defence_params(params, defence, source)
    for i, run in enumerate(params["evaluation"]["defences"][defence]["pgd"]):
        if run.get("surrogate"):
            with_overrides(built, run["surrogate"], f"{source} ('evaluation.defences.{defence}.pgd[{i}].surrogate')")


def _check_run_names(params: dict[str, Any], defence: str, source: str) -> None:
    """Two runs of one defence may not share a name (loss, and whether through a surrogate)."""
    seen: set[str] = set()
    for i, run in enumerate(params["evaluation"]["defences"][defence]["pgd"]):
        key = f"evaluation.defences.{defence}.pgd[{i}]"
        name = pgd_run_name(run)
        if name in seen:
            raise UserError(f"{source}: '{key}' repeats the run {name} (the same loss, "
                            f"{'through a surrogate' if run.get('surrogate') else 'on the defence itself'}); "
                            "give each PGD run of a defence a different loss, or remove one.")
        seen.add(name)


def with_overrides(params: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of `params` with dotted keys set (e.g. {"carso.aggregation": "logit"}), validated: an unknown key or
    a value the schema refuses is one sentence naming it."""
    out = copy.deepcopy(params)
    for dotted, value in overrides.items():
        node, parts = out, dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node:
            raise UserError(f"{source}: '{dotted}' is not a key of the params; name an existing key "
                            "(dotted, e.g. carso.aggregation).")
        if isinstance(node[parts[-1]], dict):
            raise UserError(f"{source}: '{dotted}' is a whole section; name one of its keys instead.")
        node[parts[-1]] = value
    return validate(out, source, derived=False)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read and validate a params file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; run from the repository root or pass --params PATH.")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}; fix the syntax there.") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must be a mapping of stage sections (see the default params.yaml).")
    params.pop("params_file", None)
    return validate(params, str(path))
