rule evaluate:
    input:
        code=CODE["evaluate"],
        model="data/{dataset}/classifier/model.safetensors",
        test="data/{dataset}/dataset/test.safetensors",
    output:
        metrics="data/{dataset}/eval/{defence}/metrics.json",
    params:
        settings=settings("evaluation", "runtime.seed"),
        params_file=PARAMS_FILE,
        data=subpath(input.test, parent=True),
        out=subpath(output.metrics, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        "logs/{dataset}/evaluate_{defence}.log",
    benchmark:
        "benchmarks/{dataset}/evaluate_{defence}.tsv"
    threads: workflow.cores
    resources:
        **heavy_resources(mem_mb=8000),
    shell:
        "python -m carso evaluate --params {params.params_file} --dataset {wildcards.dataset}"
        " --defence {wildcards.defence} --model {input.model} --data {params.data} --out {params.out}"
        " --threads {threads} --log {log}"
