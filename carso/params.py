"""Loading and validating params.yaml against workflow/schemas/params.schema.yaml and each method's schema.yaml.

A bad value ends in one sentence that names the key and what is allowed (a `UserError`), never in a
traceback from deep inside a stage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from carso.defences import DEFENCES, METHODS, method_dir, resolve
from carso.errors import UserError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "params.schema.yaml"


def load_schema() -> dict[str, Any]:
    """The shared schema, completed from the registry: each method's sections (from its schema.yaml) and an
    evaluation.defences.<defence> entry for every registered defence."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    for method in METHODS:
        sections = yaml.safe_load((method_dir(method) / "schema.yaml").read_text())["sections"]
        schema["properties"].update(sections)
        schema["required"] += list(method.sections)
    defences = schema["properties"]["evaluation"]["properties"]["defences"]["properties"]
    defences.update({name: {"$ref": "#/$defs/defence_evaluation"} for name in DEFENCES})
    return schema


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
        return f"{source}: the key '{'.'.join(filter(None, [_key(error.absolute_path) if error.absolute_path else '', missing]))}' is missing; add it (see the default params.yaml)."
    if error.validator in ("minItems", "uniqueItems", "minProperties"):
        return f"{source}: '{where}' must be a non-empty list or mapping without duplicates (got {error.instance!r})."
    if error.validator == "propertyNames":
        return f"{source}: '{where}' holds an invalid name; names must match [a-z][a-z0-9_]* (got {error.instance!r})."
    return f"{source}: '{where}' must be {_allowed(error, root)} (got {error.instance!r})."


def validate(params: dict[str, Any], source: str = "params.yaml") -> dict[str, Any]:
    """Validate `params` against the schema, then the rules a schema cannot express."""
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(params), key=lambda e: (len(e.absolute_path), _key(e.absolute_path)))
    if errors:
        raise UserError(explain(errors[0], schema, source))
    _check_relations(params, source)
    return params


def _check_relations(params: dict[str, Any], source: str) -> None:
    """The shared cross-key rules, then each method's own (`MethodSpec.check_params`)."""
    for name, spec in params["adversarial"]["attacks"].items():
        if spec["method"] == "pgd" and "steps" not in spec:
            raise UserError(f"{source}: 'adversarial.attacks.{name}.steps' is missing; a pgd attack needs "
                            "steps (an integer >= 1) and step_size.")
        if spec["method"] == "pgd" and "step_size" not in spec:
            raise UserError(f"{source}: 'adversarial.attacks.{name}.step_size' is missing; a pgd attack needs "
                            "a step_size > 0.")
    _check_evaluation(params, source)
    for method in METHODS:
        if method.check_params:
            resolve(method.check_params)(params, source)
    for name in params["datasets"]:
        mirror = params["data"]["mirror"]
        if params["data"]["source"] == "mirror" and not mirror.get(name):
            raise UserError(f"{source}: 'data.mirror.{name}' is not set but data.source is 'mirror'; set it "
                            "to the folder that holds the dataset, or set data.source to 'download'.")


def _check_evaluation(params: dict[str, Any], source: str) -> None:
    """The transfer attack must be a stored one inside the threat model; the sizes must fit each other."""
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
        if cfg["sanity"]["n_points"] > cfg["n_points"]:
            raise UserError(f"{source}: 'evaluation.defences.{name}.sanity.n_points' ({cfg['sanity']['n_points']}) "
                            f"exceeds its n_points ({cfg['n_points']}); the checks run on a part of the attacked points.")


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
