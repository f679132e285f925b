"""Cross-key checks of CARSO's params.yaml sections (`purifier`, `carso`) that the schema cannot express."""
from __future__ import annotations

from typing import Any

from carso.errors import UserError


def check(params: dict[str, Any], source: str) -> None:
    """The purifier's attacks must be stored ones; the aggregation must be differentiable (the layers it hooks:
    carso.methods.carso.representation.check_layers, which builds the classifier)."""
    attacks = params["adversarial"]["attacks"]
    named = [("purifier.attacks", a) for a in params["purifier"]["attacks"]]
    named.append(("purifier.monitor_attack", params["purifier"]["monitor_attack"]))
    for key, name in named:
        if name not in attacks:
            raise UserError(f"{source}: '{key}' names '{name}', which is not in adversarial.attacks "
                            f"({', '.join(attacks)}); use one of those names or add the attack there.")
    if params["carso"]["aggregation"] == "count":
        raise UserError(f"{source}: 'carso.aggregation' is 'count', a majority vote without gradients that no "
                        "white-box attack can use; set it to peel, logit or prob.")
