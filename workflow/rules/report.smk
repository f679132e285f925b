rule report:
    input:
        unpack(report_inputs),
    output:
        html=report(
            out("data/{dataset}/report/report.html"),
            caption="../report/results_page.rst",
            category="Results",
        ),
        md=out("data/{dataset}/report/report.md"),
        figures=report(
            directory(out("data/{dataset}/report/figures")),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    params:
        settings=settings("report"),
        params_file=params_file,
        root="{root}data/{dataset}",
        folders=report_folders,
        out=subpath(output.html, parent=True),
    conda:
        "../envs/carso.yaml"
    log:
        out("logs/{dataset}/report.log"),
    resources:
        mem_mb=2000,
    shell:
        "python -m carso report --params {params.params_file} --dataset {wildcards.dataset}"
        " --root {params.root}{params.folders} --out {params.out} --log-file {log}"


# Every run of this project on one page (carso/leaderboard.py); it reads results only, so it is run on request:
# `snakemake --cores 1 leaderboard --forcerun leaderboard`
rule leaderboard:
    output:
        html="leaderboard/leaderboard.html",
        md="leaderboard/leaderboard.md",
    log:
        "leaderboard/leaderboard.log",
    localrule: True
    conda:
        "../envs/carso.yaml"
    shell:
        "python -m carso leaderboard --out leaderboard --log-file {log}"
