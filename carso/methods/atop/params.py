"""Cross-key checks of AToP's params.yaml section (`atop`) that the schema cannot express."""
from __future__ import annotations

from typing import Any

from carso.datasets import dataset_spec
from carso.errors import UserError


def check(params: dict[str, Any], source: str) -> None:
    """The grid must fit every dataset, the masks must be drawable, the adversary must stay inside the threat
    model and the monitored attack must be a stored one."""
    atop = params["atop"]
    _check_grid(atop["transform"], params["datasets"], source)
    eps, threat = atop["finetune"]["adversary"]["eps"], params["evaluation"]["eps"]
    if eps > threat + 1e-12:
        raise UserError(f"{source}: 'atop.finetune.adversary.eps' ({eps}) is larger than evaluation.eps ({threat}); "
                        "the fine-tuning adversary must stay inside the threat model, so lower it to at most that.")
    attacks = params["adversarial"]["attacks"]
    for stage in ("pretrain", "finetune"):
        name = atop[stage]["monitor_attack"]
        if name not in attacks:
            raise UserError(f"{source}: 'atop.{stage}.monitor_attack' names '{name}', which is not in "
                            f"adversarial.attacks ({', '.join(attacks)}); use one of those names or add the attack there.")


def _check_grid(transform: dict[str, Any], datasets: list[str], source: str) -> None:
    grid = transform["grid"]
    for name in datasets:
        side = dataset_spec(name).side
        if side % grid:
            divisors = ", ".join(str(d) for d in range(2, side + 1) if side % d == 0)
            raise UserError(f"{source}: 'atop.transform.grid' ({grid}) does not divide the {side}-pixel side of {name}'s "
                            f"images; use a divisor of {side} ({divisors}).")
    blocks = grid ** 2
    missing = round(transform["missing_share"] * blocks)
    if transform["kind"] != "rt3" and not 0 < missing < blocks:
        raise UserError(f"{source}: 'atop.transform.missing_share' ({transform['missing_share']}) masks {missing} of the "
                        f"{blocks} blocks of a {grid} x {grid} grid; choose a share that masks at least one block and "
                        "leaves one.")
    if transform["kind"] == "rt3" and transform["rt3_masks"] > blocks:
        raise UserError(f"{source}: 'atop.transform.rt3_masks' ({transform['rt3_masks']}) exceeds the {blocks} blocks of "
                        f"a {grid} x {grid} grid; every complementary mask needs at least one block.")
