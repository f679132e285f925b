# A study (`--config study=studies/<name>.yaml`, carso/study.py): once every variant is evaluated, one page compares
# them (python -m carso compare --study): parameter differences, results side by side, paired tests, and the plot
# against the axis of a one-axis study.


def study_inputs(wildcards):
    """Every variant's evaluations and dataset manifest, wherever the plan put them."""
    files = set()
    for i in range(len(PLAN.variants)):
        results = PLAN.results(i, wildcards.dataset)
        files.add(str(results.path("dataset/manifest.json")))
        for name in DEFENCES:
            files |= {str(results.path(f"eval/{name}/{f}")) for f in ("metrics.json", "examples.safetensors")}
    return {"code": code("compare"), "study": config["study"],
            "results": sorted(files)}


rule compare_study:
    input:
        unpack(study_inputs),
    output:
        html=report(
            f"{STUDY.root}/compare/{{dataset}}/compare.html",
            caption="../report/study_page.rst",
            category="Study",
        ),
        md=f"{STUDY.root}/compare/{{dataset}}/compare.md",
    params:
        out=subpath(output.html, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        f"{STUDY.root}/logs/{{dataset}}/compare.log",
    resources:
        mem_mb=2000,
    shell:
        "python -m carso compare --study {input.study} --dataset {wildcards.dataset} --out {params.out}"
        " --log-file {log}"
