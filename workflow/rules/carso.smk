rule train_purifier:
    input:
        code=code("train_purifier"),
        model=src("data/{dataset}/classifier/model.safetensors"),
        train=src("data/{dataset}/adversarial/train.safetensors"),
        test=src("data/{dataset}/adversarial/test.safetensors"),
    output:
        model=out("data/{dataset}/purifier/model.safetensors"),
        curve=report(
            out("data/{dataset}/purifier/curve.csv"),
            caption="../report/curve.rst",
            category="Training",
        ),
        metrics=out("data/{dataset}/purifier/train_metrics.json"),
    params:
        settings=settings("train_purifier"),
        params_file=params_file,
        launch=launcher,
        adversarial=subpath(input.train, parent=True),
        out=subpath(output.model, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/train_purifier.log"),
    benchmark:
        out("benchmarks/{dataset}/train_purifier.tsv")
    threads: workflow.cores
    resources:
        **training_resources(mem_mb=8000),
    shell:
        "{params.launch} train-purifier --params {params.params_file} --dataset {wildcards.dataset}"
        " --model {input.model} --adversarial {params.adversarial} --out {params.out}"
        " --threads {threads} --log-file {log}"
