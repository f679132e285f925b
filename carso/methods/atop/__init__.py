"""AToP (arXiv 2401.16352; ../shared/docs/METHOD.md, section 2): random transforms destroy the perturbation, a
generative inpainter restores the image, and the inpainter is fine-tuned with an adversarial loss against the
frozen classifier.

Modules: transforms (RT1 / RT2 / RT3), inpainter (gated-conv inpainter and SN-PatchGAN discriminator), training
(the pretrain_inpainter and finetune_inpainter stages), defence (the purifier and the defence, and their
loader), params (cross-key checks), report (its report part). Params section: `atop`; schema in schema.yaml.
"""
from carso.methods import DefenceSpec, MethodSpec, StageSpec

PUBLISHED = ("The AToP paper reports, on CIFAR-10 at eps 8/255 with AutoAttack on the whole RT2 + GAN-inpainter "
             "pipeline, 72.85% with fine-tuning and 59.57% without (CIFAR-100: 43.55% and 38.89%); its own "
             "evaluation used a 10-step AutoAttack without EoT.")
PUBLISHED_SETTINGS = (("cifar10", "Linf", 8 / 255), ("cifar100", "Linf", 8 / 255))
_OPTIONS = (("--model", "classifier .safetensors"),
            ("--data", "fetched dataset folder (clean training images)"),
            ("--adversarial", "generate_adversarial's folder (monitor images)"))
_ARGS = (("--model", "classifier/model.safetensors"), ("--data", "dataset"), ("--adversarial", "adversarial"))
_READS = ("classifier/model.safetensors", "dataset/train.safetensors", "dataset/manifest.json",
          "adversarial/test.safetensors")

METHOD = MethodSpec(
    name="atop",
    title="AToP (arXiv 2401.16352)",
    sections=("atop",),
    stages=(StageSpec("pretrain_inpainter", "carso.methods.atop.training:pretrain_stage",
                      (*_OPTIONS, ("--out", "folder for the inpainter, discriminator, checkpoint and curves")),
                      help="pre-train AToP's inpainter (L1 + GAN) behind the random transform",
                      settings=("atop.transform", "atop.inpainter", "atop.discriminator", "atop.pretrain",
                                "runtime.seed"),
                      after=("generate_adversarial",), out="atop/pretrain", args=_ARGS, reads=_READS,
                      writes=("atop/pretrain/inpainter.safetensors", "atop/pretrain/discriminator.safetensors",
                              "atop/pretrain/train_metrics.json"), curves=("atop/pretrain/curve.csv",)),
            StageSpec("finetune_inpainter", "carso.methods.atop.training:finetune_stage",
                      (*_OPTIONS, ("--pretrained", "pretrain_inpainter's folder"),
                       ("--out", "folder for the fine-tuned inpainter, checkpoint and curves")),
                      help="fine-tune the inpainter adversarially against the frozen classifier (AToP proper)",
                      settings=("atop.transform", "atop.inpainter", "atop.discriminator", "atop.finetune",
                                "evaluation.norm", "runtime.seed"),
                      after=("generate_adversarial", "pretrain_inpainter"), out="atop/finetune",
                      args=(*_ARGS, ("--pretrained", "atop/pretrain")),
                      reads=(*_READS, "atop/pretrain/inpainter.safetensors", "atop/pretrain/discriminator.safetensors"),
                      writes=("atop/finetune/inpainter.safetensors", "atop/finetune/train_metrics.json"),
                      curves=("atop/finetune/curve.csv",))),
    defences=(DefenceSpec("atop_rt", "random transform + pre-trained inpainter (AToP without fine-tuning)",
                          "AToP without fine-tuning", "carso.methods.atop.defence:load",
                          artifacts=("atop/pretrain/inpainter.safetensors",), settings=("atop.transform",),
                          compare_with=("at",)),
              DefenceSpec("atop", "random transform + adversarially fine-tuned inpainter (AToP)", "AToP",
                          "carso.methods.atop.defence:load", artifacts=("atop/finetune/inpainter.safetensors",),
                          settings=("atop.transform",), compare_with=("at", "atop_rt", "carso"),
                          published=PUBLISHED, published_settings=PUBLISHED_SETTINGS)),
    check_params="carso.methods.atop.params:check",
    report="carso.methods.atop.report:sections",
    report_files=("atop/pretrain/curve.csv", "atop/pretrain/train_metrics.json", "atop/finetune/curve.csv",
                  "atop/finetune/train_metrics.json"),
)
