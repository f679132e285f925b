rule report:
    input:
        code=CODE["report"],
        manifest="data/{dataset}/dataset/manifest.json",
        curve="data/{dataset}/classifier/curve.csv",
        train="data/{dataset}/classifier/train_metrics.json",
        adversarial="data/{dataset}/adversarial/summary.json",
        purifier_curve="data/{dataset}/purifier/curve.csv",
        purifier="data/{dataset}/purifier/train_metrics.json",
        evals=expand("data/{{dataset}}/eval/{defence}/metrics.json", defence=DEFENCES),
        examples="data/{dataset}/eval/carso/examples.safetensors",
    output:
        html="data/{dataset}/report/report.html",
        md="data/{dataset}/report/report.md",
        figure="data/{dataset}/report/training_curves.png",
        purifier_figure="data/{dataset}/report/purifier_curves.png",
        reconstructions="data/{dataset}/report/reconstructions.png",
    params:
        settings=settings("runtime", "data", "classifier", "adversarial", "purifier", "carso", "evaluation", "report"),
        params_file=PARAMS_FILE,
        root=lambda wildcards, input: str(Path(input.manifest).parent.parent),
        out=subpath(output.html, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        "logs/{dataset}/report.log",
    resources:
        mem_mb=2000,
    shell:
        "python -m carso report --params {params.params_file} --dataset {wildcards.dataset}"
        " --root {params.root} --out {params.out} --log-file {log}"
