# AToP (carso/methods/atop): the inpainter is pre-trained behind the random transform, then fine-tuned
# adversarially against the frozen classifier; evaluate's `atop_rt` and `atop` defences load the two.


rule pretrain_inpainter:
    input:
        code=code("pretrain_inpainter"),
        model=src("data/{dataset}/classifier/model.safetensors"),
        train=src("data/{dataset}/dataset/train.safetensors"),
        manifest=src("data/{dataset}/dataset/manifest.json"),
        test=src("data/{dataset}/adversarial/test.safetensors"),
    output:
        model=out("data/{dataset}/atop/pretrain/inpainter.safetensors"),
        discriminator=out("data/{dataset}/atop/pretrain/discriminator.safetensors"),
        curve=report(
            out("data/{dataset}/atop/pretrain/curve.csv"),
            caption="../report/curve.rst",
            category="Training",
        ),
        metrics=out("data/{dataset}/atop/pretrain/train_metrics.json"),
    params:
        settings=settings("pretrain_inpainter"),
        params_file=params_file,
        data=subpath(input.train, parent=True),
        adversarial=subpath(input.test, parent=True),
        out=subpath(output.model, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/pretrain_inpainter.log"),
    benchmark:
        out("benchmarks/{dataset}/pretrain_inpainter.tsv")
    threads: workflow.cores
    resources:
        **heavy_resources(mem_mb=8000),
    shell:
        "python -m carso pretrain-inpainter --params {params.params_file} --dataset {wildcards.dataset}"
        " --model {input.model} --data {params.data} --adversarial {params.adversarial} --out {params.out}"
        " --threads {threads} --log-file {log}"


rule finetune_inpainter:
    input:
        code=code("finetune_inpainter"),
        model=src("data/{dataset}/classifier/model.safetensors"),
        train=src("data/{dataset}/dataset/train.safetensors"),
        manifest=src("data/{dataset}/dataset/manifest.json"),
        test=src("data/{dataset}/adversarial/test.safetensors"),
        inpainter=src("data/{dataset}/atop/pretrain/inpainter.safetensors"),
        discriminator=src("data/{dataset}/atop/pretrain/discriminator.safetensors"),
    output:
        model=out("data/{dataset}/atop/finetune/inpainter.safetensors"),
        curve=report(
            out("data/{dataset}/atop/finetune/curve.csv"),
            caption="../report/curve.rst",
            category="Training",
        ),
        metrics=out("data/{dataset}/atop/finetune/train_metrics.json"),
    params:
        settings=settings("finetune_inpainter"),
        params_file=params_file,
        data=subpath(input.train, parent=True),
        adversarial=subpath(input.test, parent=True),
        pretrained=subpath(input.inpainter, parent=True),
        out=subpath(output.model, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/finetune_inpainter.log"),
    benchmark:
        out("benchmarks/{dataset}/finetune_inpainter.tsv")
    threads: workflow.cores
    resources:
        **heavy_resources(mem_mb=8000),
    shell:
        "python -m carso finetune-inpainter --params {params.params_file} --dataset {wildcards.dataset}"
        " --model {input.model} --data {params.data} --adversarial {params.adversarial}"
        " --pretrained {params.pretrained} --out {params.out} --threads {threads} --log-file {log}"
