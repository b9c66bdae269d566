rule transitions:
    """(cell, action) -> next cell for every cell and KO/OE action: vectorised CellOracle, CPU or GPU."""
    input:
        model="results/{dataset}/oracle/model.npz",
    output:
        table="results/{dataset}/transitions/table.npy",
        actions="results/{dataset}/transitions/actions.tsv",
        stats="results/{dataset}/transitions/stats.json",
    params:
        settings=settings("transitions"),
        chunk_dir=lambda w: f"results/{w.dataset}/transitions/chunks",
        code=code_version("transitions"),
    threads: 4  # chunk worker threads (capped at --cores locally; --cpus-per-task on SLURM)
    resources:
        gpu=1,
    log:
        "results/{dataset}/logs/transitions.log",
    benchmark:
        "results/{dataset}/benchmarks/transitions.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/transitions.py"
