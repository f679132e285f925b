"""The evaluation protocol, as a package (see `../shared/docs/STYLE.md`, "When attacks multiply"):

- `threat`: the threat model (norm, radius, projection), one small value passed to every attack;
- `families`: one module per attack family (transfer, AutoAttack, Square, PGD) behind one call shape, and the table
  of the order a suite runs them in;
- `cascade`: the cascade of a defence's attacks and its per-point worst case;
- `cache`: resumable attacks, batch by batch;
- `sanity`: gradient diagnostics and the gradient-masking probes;
- `checks`: the masking checks, the indicators of attack failure and a positive control's naive figure;
- `suite`: `evaluate_defence`, which runs all of it on one defence, and the `headline` figures DVC diffs.
"""
from carso.evaluation.cache import AttackCache, model_digest
from carso.evaluation.cascade import Cascade, worst_of
from carso.evaluation.families.autoattack import AUTOATTACK_ORDER, is_randomised, run_autoattack
from carso.evaluation.families.pgd import PgdRun, pgd_eot_spec, pgd_runs, pgd_spec
from carso.evaluation.checks import indicators, masking_checks, naive_figure
from carso.evaluation.suite import deterministic_protocol, evaluate_defence, example_tensors, headline
from carso.evaluation.threat import Threat, unseen_section

__all__ = ["AUTOATTACK_ORDER", "AttackCache", "Cascade", "PgdRun", "Threat", "deterministic_protocol",
           "evaluate_defence", "example_tensors", "headline", "indicators", "is_randomised", "masking_checks",
           "model_digest", "naive_figure", "pgd_eot_spec", "pgd_runs", "pgd_spec", "run_autoattack", "unseen_section",
           "worst_of"]
