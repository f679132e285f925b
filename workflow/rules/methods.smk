# The training stages of the methods behind evaluation.defences (carso/methods/<name>/ and installed plugins), one
# rule each, generated from their registry entries (`StageSpec`): the files a stage reads are its inputs, those it
# writes and its curves its outputs, and its command passes each of its `args` as the path under data/<dataset>/
# it names, in the root of the stage that wrote it. dvc.yaml's stages come from the same entries (carso/pipeline.py).


for _stage in (s for m in METHODS for s in m.stages):

    rule:
        name:
            _stage.name
        input:
            unpack(stage_inputs(_stage)),
        output:
            stage_outputs(_stage),
        params:
            settings=settings(_stage.name),
            command=stage_command(_stage),
        conda:
            "../envs/carso.yaml"
        log:
            out(f"logs/{{dataset}}/{_stage.name}.log"),
        benchmark:
            out(f"benchmarks/{{dataset}}/{_stage.name}.tsv")
        threads: workflow.cores
        resources:
            **stage_resources(_stage),
        shell:
            "{params.command} --threads {threads} --log-file {log}"
