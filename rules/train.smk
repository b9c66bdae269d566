rule train:
    """MaskablePPO with the reference network, curriculum, checkpoints (exact resume) and logging."""
    input:
        model="results/{dataset}/oracle/model.npz",
        table="results/{dataset}/transitions/table.npy",
        hpo=train_hpo_input,
    output:
        model="results/{dataset}/models/{run}/model.zip",
        summary="results/{dataset}/models/{run}/train_summary.json",
        progress="results/{dataset}/models/{run}/progress.csv",
    params:
        env=settings("env", run=True),
        train=settings("train", run=True),
        transitions=engine_settings,
        out_dir=lambda w: f"results/{w.dataset}/models/{w.run}",
        code=code_version("train"),
    threads: 1  # torch intra-op threads: one, so training does not compete with other jobs on small machines
    resources:
        gpu=1,
    log:
        "results/{dataset}/logs/train_{run}.log",
    benchmark:
        "results/{dataset}/benchmarks/train_{run}.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/train.py"
