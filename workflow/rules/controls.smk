# Controls of the evaluation protocol (carso/methods/controls): the positive controls' undefended base is trained
# without adversarial training, then fine-tuned under random resize-and-pad; evaluate's `plain`, `ctl_scaled`,
# `ctl_quant` and `ctl_resize` defences load them (`at_noise`, the negative control, loads the classifier).


rule train_plain:
    input:
        code=code("train_plain"),
        train=src("data/{dataset}/dataset/train.safetensors"),
        test=src("data/{dataset}/dataset/test.safetensors"),
        manifest=src("data/{dataset}/dataset/manifest.json"),
    output:
        model=out("data/{dataset}/controls/plain/model.safetensors"),
        curve=report(
            out("data/{dataset}/controls/plain/curve.csv"),
            caption="../report/curve.rst",
            category="Training",
        ),
        metrics=out("data/{dataset}/controls/plain/train_metrics.json"),
    params:
        settings=settings("train_plain"),
        params_file=params_file,
        data=subpath(input.train, parent=True),
        out=subpath(output.model, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/train_plain.log"),
    benchmark:
        out("benchmarks/{dataset}/train_plain.tsv")
    threads: workflow.cores
    resources:
        **heavy_resources(mem_mb=4000),
    shell:
        "python -m carso train-plain --params {params.params_file} --dataset {wildcards.dataset}"
        " --data {params.data} --out {params.out} --threads {threads} --log-file {log}"


rule finetune_resize:
    input:
        code=code("finetune_resize"),
        train=src("data/{dataset}/dataset/train.safetensors"),
        test=src("data/{dataset}/dataset/test.safetensors"),
        manifest=src("data/{dataset}/dataset/manifest.json"),
        plain=src("data/{dataset}/controls/plain/model.safetensors"),
    output:
        model=out("data/{dataset}/controls/resize/model.safetensors"),
        curve=report(
            out("data/{dataset}/controls/resize/curve.csv"),
            caption="../report/curve.rst",
            category="Training",
        ),
        metrics=out("data/{dataset}/controls/resize/train_metrics.json"),
    params:
        settings=settings("finetune_resize"),
        params_file=params_file,
        data=subpath(input.train, parent=True),
        plain=subpath(input.plain, parent=True),
        out=subpath(output.model, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/finetune_resize.log"),
    benchmark:
        out("benchmarks/{dataset}/finetune_resize.tsv")
    threads: workflow.cores
    resources:
        **heavy_resources(mem_mb=4000),
    shell:
        "python -m carso finetune-resize --params {params.params_file} --dataset {wildcards.dataset}"
        " --data {params.data} --plain {params.plain} --out {params.out} --threads {threads} --log-file {log}"
