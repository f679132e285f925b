rule fetch:
    input:
        code=code("fetch"),
    output:
        train=out("data/{dataset}/dataset/train.safetensors"),
        test=out("data/{dataset}/dataset/test.safetensors"),
        manifest=out("data/{dataset}/dataset/manifest.json"),
    params:
        settings=settings("fetch"),
        params_file=params_file,
        out=subpath(output.manifest, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/fetch.log"),
    resources:
        mem_mb=4000,
    shell:
        "python -m carso fetch --params {params.params_file} --dataset {wildcards.dataset}"
        " --out {params.out} --log-file {log}"
