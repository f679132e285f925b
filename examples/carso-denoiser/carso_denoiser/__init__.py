"""Example plugin: a small residual convolutional denoiser in front of carso's adversarially-trained classifier.

Two methods, each an entry point of the group `carso.methods` (pyproject.toml):
- METHOD (`denoiser`): stage train_denoiser fits the denoiser on the stored adversarial training examples; defence
  `denoiser` loads what it wrote.
- FILE_METHOD (`denoiser_file`): no stage; defence `denoiser_file` loads your own weights file
  (params `denoiser_file.weights`), as safetensors.
"""
from carso.plugin import DefenceSpec, MethodSpec, StageSpec

_MODEL = "denoiser/model.safetensors"

METHOD = MethodSpec(
    name="denoiser",
    title="Residual denoiser in front of the classifier (example plugin carso-denoiser)",
    sections=("denoiser",),
    stages=(StageSpec("train_denoiser", "carso_denoiser.training:stage",
                      (("--adversarial", "generate_adversarial's folder"),
                       ("--out", "folder for the denoiser, its checkpoint and curve")),
                      help="fit the example plugin's denoiser on the stored adversarial training examples",
                      settings=("denoiser", "adversarial.attacks", "runtime.seed"), after=("generate_adversarial",),
                      out="denoiser", args=(("--adversarial", "adversarial"),),
                      reads=("adversarial/train.safetensors",),
                      writes=(_MODEL, "denoiser/train_metrics.json"), curves=("denoiser/curve.csv",), mem_mb=2000),),
    defences=(DefenceSpec("denoiser", "classifier behind a residual denoiser fitted on adversarial examples (plugin)",
                          "the denoiser", "carso_denoiser.defence:load", artifacts=(_MODEL,),
                          settings=("denoiser.width",), compare_with=("at",)),),
    report="carso_denoiser.report:sections",
    report_files=("denoiser/train_metrics.json",),
    api=1,
)

FILE_METHOD = MethodSpec(
    name="denoiser_file",
    title="Residual denoiser loaded from a weights file (example loader-only plugin)",
    sections=("denoiser_file",),
    stages=(),
    defences=(DefenceSpec("denoiser_file", "classifier behind a residual denoiser loaded from a file (plugin)",
                          "the denoiser from a file", "carso_denoiser.defence:load_file",
                          settings=("denoiser_file",), files=("denoiser_file.weights",), compare_with=("at",)),),
    api=1,
)
