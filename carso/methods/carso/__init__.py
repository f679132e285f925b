"""CARSO (arXiv 2306.06081; ../shared/docs/METHOD.md, section 1): a conditional VAE maps the classifier's internal
representation of a (possibly attacked) input to clean reconstructions; N of them are classified and aggregated.

Modules: representation (forward hooks), purifier (the conditional VAE), training (the train_purifier stage),
aggregation, defence (CarsoDefence and its loader), params (cross-key checks), report (its report part).
Params sections: `purifier` (training) and `carso` (inference); schema in schema.yaml.
"""
from carso.methods import DefenceSpec, MethodSpec, StageSpec

PUBLISHED = ("The CARSO paper reports CARSO above its classifier alone on CIFAR-10 (AutoAttack rand 76.13% vs 67.73%, "
             "eps 8/255) and CIFAR-100 (66.65% vs 39.18%).")
PUBLISHED_SETTINGS = (("cifar10", "Linf", 8 / 255), ("cifar100", "Linf", 8 / 255))

METHOD = MethodSpec(
    name="carso",
    title="CARSO (arXiv 2306.06081)",
    sections=("purifier", "carso"),
    stages=(StageSpec("train_purifier", "carso.methods.carso.training:stage",
                      (("--model", "classifier .safetensors"),
                       ("--adversarial", "generate_adversarial's folder"),
                       ("--out", "folder for the purifier, checkpoint and curves")),
                      data_parallel=True, help="train CARSO's purifier (the classifier frozen)",
                      settings=("purifier", "runtime.seed"), after=("generate_adversarial",), out="purifier",
                      args=(("--model", "classifier/model.safetensors"), ("--adversarial", "adversarial")),
                      reads=("classifier/model.safetensors", "adversarial/train.safetensors",
                             "adversarial/test.safetensors"),
                      writes=("purifier/model.safetensors", "purifier/train_metrics.json"),
                      curves=("purifier/curve.csv",)),),
    defences=(DefenceSpec("carso", "classifier + CARSO purifier", "CARSO", "carso.methods.carso.defence:load",
                          artifacts=("purifier/model.safetensors",), settings=("carso",), compare_with=("at",),
                          published=PUBLISHED, published_settings=PUBLISHED_SETTINGS),),
    check_params="carso.methods.carso.params:check",
    check_models="carso.methods.carso.representation:check_layers",
    report="carso.methods.carso.report:sections",
    report_files=("purifier/curve.csv", "purifier/train_metrics.json"),
)
