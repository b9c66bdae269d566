rule bfs:
    """Exact shortest perturbation paths: one multi-source reverse BFS per target cell type."""
    input:
        model="results/{dataset}/oracle/model.npz",
        table="results/{dataset}/transitions/table.npy",
    output:
        "results/{dataset}/benchmark/bfs.parquet",
    params:
        env=settings("env"),
        code=code_version("bfs"),
    log:
        "results/{dataset}/logs/bfs.log",
    benchmark:
        "results/{dataset}/benchmarks/bfs.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/bfs.py"
