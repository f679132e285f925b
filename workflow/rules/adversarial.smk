rule generate_adversarial:
    input:
        code=code("generate_adversarial"),
        model=src("data/{dataset}/classifier/model.safetensors"),
        train=src("data/{dataset}/dataset/train.safetensors"),
        test=src("data/{dataset}/dataset/test.safetensors"),
    output:
        train=out("data/{dataset}/adversarial/train.safetensors"),
        test=out("data/{dataset}/adversarial/test.safetensors"),
        summary=out("data/{dataset}/adversarial/summary.json"),
    params:
        settings=settings("generate_adversarial"),
        params_file=params_file,
        data=subpath(input.train, parent=True),
        out=subpath(output.summary, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/generate_adversarial.log"),
    benchmark:
        out("benchmarks/{dataset}/generate_adversarial.tsv")
    threads: workflow.cores
    resources:
        **heavy_resources(mem_mb=8000),
    shell:
        "python -m carso generate-adversarial --params {params.params_file} --dataset {wildcards.dataset}"
        " --model {input.model} --data {params.data} --out {params.out} --threads {threads} --log-file {log}"
