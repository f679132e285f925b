# Transfer from models no defence saw (carso/sources.py), when params declares `sources`: train_sources trains each
# source model, craft_sources crafts each of sources.attacks on each in the training threat (craft_sources_threat: in
# an unseen threat of evaluation.threats), and every evaluation in that threat reads the points.


rule train_sources:
    input:
        code=code("train_sources"),
        train=src("data/{dataset}/dataset/train.safetensors"),
        test=src("data/{dataset}/dataset/test.safetensors"),
        manifest=src("data/{dataset}/dataset/manifest.json"),
    output:
        models=[out(f"data/{{dataset}}/sources/models/{m}/model.safetensors") for m in SOURCES],
        metrics=[out(f"data/{{dataset}}/sources/models/{m}/train_metrics.json") for m in SOURCES],
        curves=[out(f"data/{{dataset}}/sources/models/{m}/curve.csv") for m in SOURCES],
    params:
        settings=settings("train_sources"),
        params_file=params_file,
        launch=launcher,
        data=subpath(input.manifest, parent=True),
        out=lambda wildcards, output: str(Path(output.models[0]).parent.parent),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/train_sources.log"),
    benchmark:
        out("benchmarks/{dataset}/train_sources.tsv")
    threads: workflow.cores
    resources:
        **training_resources(mem_mb=4000),
    shell:
        "{params.launch} train-sources --params {params.params_file} --dataset {wildcards.dataset}"
        " --data {params.data} --out {params.out} --threads {threads} --log-file {log}"


rule craft_sources:
    input:
        code=code("craft_sources"),
        models=lambda wildcards: [made(wildcards, f"data/{{dataset}}/sources/models/{m}/model.safetensors")
                                  for m in SOURCES],
        test=src("data/{dataset}/dataset/test.safetensors"),
    output:
        points=out("data/{dataset}/sources/crafted/training/points.safetensors"),
        summary=out("data/{dataset}/sources/crafted/training/summary.json"),
    params:
        settings=settings(craft_stage()),
        params_file=params_file,
        models=lambda wildcards, input: str(Path(input.models[0]).parent.parent),
        data=lambda wildcards, input: str(Path(input.test).parent),
        out=subpath(output.points, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/craft_sources.log"),
    benchmark:
        out("benchmarks/{dataset}/craft_sources.tsv")
    threads: workflow.cores
    resources:
        **heavy_resources(mem_mb=4000),
    shell:
        "python -m carso craft-sources --params {params.params_file} --dataset {wildcards.dataset}"
        " --models {params.models} --data {params.data} --out {params.out} --threads {threads} --log-file {log}"


rule craft_sources_threat:  # the same in an unseen threat of evaluation.threats
    input:
        code=code("craft_sources"),
        models=lambda wildcards: [made(wildcards, f"data/{{dataset}}/sources/models/{m}/model.safetensors")
                                  for m in SOURCES],
        test=src("data/{dataset}/dataset/test.safetensors"),
    output:
        points=out("data/{dataset}/sources/crafted/{threat}/points.safetensors"),
        summary=out("data/{dataset}/sources/crafted/{threat}/summary.json"),
    params:
        settings=settings(lambda wildcards: craft_stage(wildcards.threat)),
        params_file=params_file,
        models=lambda wildcards, input: str(Path(input.models[0]).parent.parent),
        data=lambda wildcards, input: str(Path(input.test).parent),
        out=subpath(output.points, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/craft_sources_under_{threat}.log"),
    benchmark:
        out("benchmarks/{dataset}/craft_sources_under_{threat}.tsv")
    threads: workflow.cores
    resources:
        **heavy_resources(mem_mb=4000),
    shell:
        "python -m carso craft-sources --params {params.params_file} --dataset {wildcards.dataset}"
        " --threat {wildcards.threat} --models {params.models} --data {params.data} --out {params.out}"
        " --threads {threads} --log-file {log}"
