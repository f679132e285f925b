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
        " --adversarial {params.adversarial} --out {params.out} --threads {threads} --log-file {log}"
