rule train_classifier:
    input:
        code=code("train_classifier"),
        train=src("data/{dataset}/dataset/train.safetensors"),
        test=src("data/{dataset}/dataset/test.safetensors"),
        manifest=src("data/{dataset}/dataset/manifest.json"),
    output:
        model=out("data/{dataset}/classifier/model.safetensors"),
        curve=report(
            out("data/{dataset}/classifier/curve.csv"),
            caption="../report/curve.rst",
            category="Training",
        ),
        metrics=out("data/{dataset}/classifier/train_metrics.json"),
    params:
        settings=settings("train_classifier"),
        params_file=params_file,
        launch=launcher,
        data=subpath(input.manifest, parent=True),
        out=subpath(output.model, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/train_classifier.log"),
    benchmark:
        out("benchmarks/{dataset}/train_classifier.tsv")
    threads: workflow.cores
    resources:
        **training_resources(mem_mb=8000),
    shell:
        "{params.launch} train-classifier --params {params.params_file} --dataset {wildcards.dataset}"
        " --data {params.data} --out {params.out} --threads {threads} --log-file {log}"
