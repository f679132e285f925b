rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        metrics=out("data/{dataset}/eval/{defence}/metrics.json"),
        headline=report(
            out("data/{dataset}/eval/{defence}/headline.json"),
            caption="../report/headline.rst",
            category="Evaluation",
            subcategory="{defence}",
        ),
        examples=out("data/{dataset}/eval/{defence}/examples.safetensors"),
    params:
        settings=settings(lambda wildcards: evaluate_stage(wildcards.defence)),
        params_file=params_file,
        artifacts=lambda wildcards, input: (
            f" --artifacts {' '.join(input.artifacts)}" if "artifacts" in input.keys() else ""
        ),
        data=lambda wildcards, input: str(Path(input.test).parent),
        adversarial=lambda wildcards, input: str(Path(input.adversarial).parent),
        sources=sources_option,
        out=subpath(output.metrics, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/evaluate_{defence}.log"),
    benchmark:
        out("benchmarks/{dataset}/evaluate_{defence}.tsv")
    threads: workflow.cores
    resources:
        **heavy_resources(mem_mb=8000),
    shell:
        "python -m carso evaluate --params {params.params_file} --dataset {wildcards.dataset}"
        " --defence {wildcards.defence} --model {input.model}{params.artifacts} --data {params.data}"
        " --adversarial {params.adversarial}{params.sources} --out {params.out} --threads {threads} --log-file {log}"


rule evaluate_threat:  # one defence under one unseen threat of evaluation.threats (its own suite: carso.evaluation.threat)
    input:
        unpack(threat_inputs),
    output:
        metrics=out("data/{dataset}/threats/{threat}/{defence}/metrics.json"),
        headline=report(
            out("data/{dataset}/threats/{threat}/{defence}/headline.json"),
            caption="../report/headline.rst",
            category="Unseen threats",
            subcategory="{threat}: {defence}",
        ),
        examples=out("data/{dataset}/threats/{threat}/{defence}/examples.safetensors"),
    params:
        settings=settings(lambda wildcards: evaluate_stage(wildcards.defence, wildcards.threat)),
        params_file=params_file,
        artifacts=lambda wildcards, input: (
            f" --artifacts {' '.join(input.artifacts)}" if "artifacts" in input.keys() else ""
        ),
        data=lambda wildcards, input: str(Path(input.test).parent),
        sources=sources_option,
        out=subpath(output.metrics, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/evaluate_{defence}_under_{threat}.log"),
    benchmark:
        out("benchmarks/{dataset}/evaluate_{defence}_under_{threat}.tsv")
    threads: workflow.cores
    resources:
        **heavy_resources(mem_mb=8000),
    shell:
        "python -m carso evaluate --params {params.params_file} --dataset {wildcards.dataset}"
        " --defence {wildcards.defence} --threat {wildcards.threat} --model {input.model}{params.artifacts}"
        " --data {params.data}{params.sources} --out {params.out} --threads {threads} --log-file {log}"
