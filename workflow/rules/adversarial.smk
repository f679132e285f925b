rule generate_adversarial:
    input:
        code=code("generate_adversarial"),
        model="data/{dataset}/classifier/model.safetensors",
        train="data/{dataset}/dataset/train.safetensors",
        test="data/{dataset}/dataset/test.safetensors",
    output:
        train="data/{dataset}/adversarial/train.safetensors",
        test="data/{dataset}/adversarial/test.safetensors",
        summary="data/{dataset}/adversarial/summary.json",
    params:
        settings=settings("adversarial", "evaluation.norm", "runtime.seed"),
        params_file=PARAMS_FILE,
        data=subpath(input.train, parent=True),
        out=subpath(output.summary, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        "logs/{dataset}/generate_adversarial.log",
    benchmark:
        "benchmarks/{dataset}/generate_adversarial.tsv"
    threads: workflow.cores
    resources:
        **heavy_resources(mem_mb=8000),
    shell:
        "python -m carso generate-adversarial --params {params.params_file} --dataset {wildcards.dataset}"
        " --model {input.model} --data {params.data} --out {params.out} --threads {threads} --log-file {log}"
