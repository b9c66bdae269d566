rule bfs:
    """Exact shortest perturbation paths: one multi-source reverse BFS per target cell type."""
    input:
        model="results/{dataset}/oracle/model.npz",
        table="results/{dataset}/transitions/table.npy",
    output:
        bfs="results/{dataset}/benchmark/bfs.parquet",
        stats="results/{dataset}/benchmark/bfs_stats.json",
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
