"""Controls of the evaluation protocol: defences whose true robustness is known in advance, evaluated beside the
real ones, so that a report shows the protocol measuring what it should.

`at_noise`, the negative control of the headline for randomised defences: the classifier alone with Gaussian noise
of a small sigma on its logits, drawn afresh at every pass. The noise never moves the input and flips a prediction
only where the classifier's margin is within its reach, so the expected predictions are the classifier's nearly
everywhere: its headline must equal `at`'s within the interval, while the strict rule (every repeat correct) charges
it for its noise alone. The report says whether it did (carso.report). Gaussian noise on the input is no such
control: at an attacker's point, at the edge of the ball the classifier was trained on, it pushes the input further
out, and measured here it costs real robustness (docs/performance.md, 2026-12-05).
Params section: `controls`; schema in schema.yaml. No training stage: it loads the classifier.
"""
from carso.methods import DefenceSpec, MethodSpec

METHOD = MethodSpec(
    name="controls",
    title="Controls of the evaluation protocol",
    sections=("controls",),
    stages=(),
    defences=(DefenceSpec("at_noise", "the classifier alone with harmless Gaussian noise on its logits (negative "
                          "control)", "the classifier alone with noisy logits", "carso.methods.controls.defence:load",
                          settings=("controls.at_noise",), negative_control_of="at"),),
)
