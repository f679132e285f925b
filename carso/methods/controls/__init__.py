"""Controls of the evaluation protocol: defences whose true robustness is known in advance, evaluated beside the
real ones, so that a report shows the protocol measuring what it should (Carlini et al. 2019, "On Evaluating
Adversarial Robustness": attack defences known to be broken).

Negative control, `at_noise`: the classifier alone with Gaussian noise of a small sigma on its logits, drawn afresh
at every pass. The noise never moves the input and flips a prediction only where the classifier's margin is within
its reach, so the expected predictions are the classifier's nearly everywhere: its headline must equal `at`'s within
the interval, while the strict rule (every repeat correct) charges it for its noise alone. Gaussian noise on the
input is no such control: at an attacker's point, at the edge of the ball the classifier was trained on, it pushes
the input further out, and measured here it costs real robustness (docs/performance.md, 2026-12-05).

Positive controls: a classifier trained without adversarial training (`plain`, stage train_plain: the undefended
base, itself evaluated) behind a wrapper that fools a naive evaluation and nothing else. The protocol must bring
each down to `plain`'s figure; each names the attacks of a naive evaluation (`naive`), whose figure the report
shows beside the protocol's:
- `ctl_scaled` (stand-in for defensive distillation): logits times a large temperature; cross-entropy and its
  gradient are exactly 0 in fp32, the argmax unchanged. Naive: PGD on cross-entropy.
- `ctl_quant` (bit-depth reduction, Xu et al. 2018): the input rounded to a few grey levels, a true zero gradient for
  every loss. Naive: every white-box PGD run. Broken by Square, transfer and a straight-through (BPDA identity)
  surrogate, `controls.quantise.straight_through`, named by a PGD run's `surrogate:`.
- `ctl_resize` (random resize and pad, Xie et al. 2018): the image shrunk by a random factor and placed at a random
  offset, in front of `plain` fine-tuned under that transform (stage finetune_resize). Naive: PGD with one draw per
  step (the EoT gain check's run), judged by one draw.
Params section: `controls`; schema in schema.yaml.
"""
from carso.methods import DefenceSpec, MethodSpec, StageSpec

_DATA = ("dataset/train.safetensors", "dataset/test.safetensors", "dataset/manifest.json")
_PLAIN = "controls/plain/model.safetensors"
_RESIZE = "controls/resize/model.safetensors"
# The classifier's settings train_plain trains with (its epochs are controls.plain.epochs, and it has no attack; its
# per-epoch PGD-10 check runs at the classifier's training radius, classifier.attack.eps).
CLASSIFIER_KEYS = ("arch", "arch_kwargs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
                   "warmup_fraction", "augment", "precision", "channels_last", "monitor_points")
_SETTINGS = (*(f"classifier.{k}" for k in CLASSIFIER_KEYS), "classifier.attack.eps", "evaluation.norm", "runtime.seed")
_LOAD = "carso.methods.controls.defence:load_"

METHOD = MethodSpec(
    name="controls",
    title="Controls of the evaluation protocol",
    sections=("controls",),
    stages=(StageSpec("train_plain", "carso.methods.controls.training:plain_stage",
                      (("--data", "fetched dataset folder"), ("--out", "folder for the model and its curves")),
                      help="train classifier.arch without adversarial training (the positive controls' base)",
                      settings=(*_SETTINGS, "controls.plain"), after=("fetch",), out="controls/plain",
                      args=(("--data", "dataset"),), reads=_DATA,
                      writes=(_PLAIN, "controls/plain/train_metrics.json"), curves=("controls/plain/curve.csv",),
                      mem_mb=4000),
            StageSpec("finetune_resize", "carso.methods.controls.training:resize_stage",
                      (("--data", "fetched dataset folder"), ("--plain", "train_plain's folder"),
                       ("--out", "folder for the model and its curves")),
                      help="fine-tune the plain classifier under random resize-and-pad (a positive control)",
                      settings=(*_SETTINGS, "controls.plain", "controls.resize"), after=("fetch", "train_plain"),
                      out="controls/resize", args=(("--data", "dataset"), ("--plain", "controls/plain")),
                      reads=(*_DATA, _PLAIN), writes=(_RESIZE, "controls/resize/train_metrics.json"),
                      curves=("controls/resize/curve.csv",), mem_mb=4000)),
    defences=(DefenceSpec("at_noise", "the classifier alone with harmless Gaussian noise on its logits (negative "
                          "control)", "the classifier alone with noisy logits", "carso.methods.controls.defence:load_noise",
                          settings=("controls.at_noise",), negative_control_of="at"),
              DefenceSpec("plain", "classifier trained without adversarial training (the positive controls' base)",
                          "the undefended classifier", _LOAD + "plain", artifacts=(_PLAIN,)),
              DefenceSpec("ctl_scaled", "undefended classifier, logits x a large temperature (positive control: "
                          "defensive distillation's saturated cross-entropy)", "scaled logits", _LOAD + "scaled",
                          artifacts=(_PLAIN,), settings=("controls.scaled",), positive_control_of="plain",
                          naive=("pgd_ce",)),
              DefenceSpec("ctl_quant", "undefended classifier behind input quantisation (positive control: a zero "
                          "gradient)", "input quantisation", _LOAD + "quantised", artifacts=(_PLAIN,), settings=("controls.quantise",),
                          positive_control_of="plain", naive=("pgd_ce", "pgd_dlr")),
              DefenceSpec("ctl_resize", "undefended classifier behind random resize-and-pad (positive control: "
                          "randomness an attacker averages out)", "random resize-and-pad", _LOAD + "resized",
                          artifacts=(_RESIZE,), settings=("controls.resize.min_scale",), positive_control_of="plain",
                          naive=("eot_single",))),
)
