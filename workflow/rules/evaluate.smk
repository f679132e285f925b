def evaluate_inputs(wildcards):
    """Both defences need the classifier, the test set and the stored transfer examples; carso its purifier."""
    inputs = {
        "code": CODE["evaluate"],
        "model": f"data/{wildcards.dataset}/classifier/model.safetensors",
        "test": f"data/{wildcards.dataset}/dataset/test.safetensors",
        "adversarial": f"data/{wildcards.dataset}/adversarial/test.safetensors",
    }
    if wildcards.defence == "carso":
        inputs["purifier"] = f"data/{wildcards.dataset}/purifier/model.safetensors"
    return inputs


def evaluate_settings(wildcards):
    """The keys one defence's evaluation depends on: a change to the other defence's section leaves it be."""
    keys = ["evaluation.eps", "evaluation.confidence", "evaluation.transfer_attack",
            f"evaluation.defences.{wildcards.defence}", "runtime.seed"]
    return settings(*keys, *(["carso"] if wildcards.defence == "carso" else []))


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        metrics="data/{dataset}/eval/{defence}/metrics.json",
        examples="data/{dataset}/eval/{defence}/examples.safetensors",
    params:
        settings=evaluate_settings,
        params_file=PARAMS_FILE,
        purifier=lambda wildcards, input: f" --purifier {input.purifier}" if "purifier" in input.keys() else "",
        data=lambda wildcards, input: str(Path(input.test).parent),
        adversarial=lambda wildcards, input: str(Path(input.adversarial).parent),
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
        " --defence {wildcards.defence} --model {input.model}{params.purifier} --data {params.data}"
        " --adversarial {params.adversarial} --out {params.out} --threads {threads} --log {log}"
