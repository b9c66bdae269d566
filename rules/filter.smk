rule filter:
    """QC, stratified cell cap, Pearson-residual HVGs (+ expressed regulators), log-normalise, PCA, kNN, UMAP."""
    input:
        raw="results/{dataset}/rna/raw.h5ad",
        base_grn="results/{dataset}/grn/base_grn.parquet",
    output:
        "results/{dataset}/rna/filtered.h5ad",
    params:
        expression=lambda w: config["datasets"][w.dataset]["rna"]["expression"],
        settings=settings("filter"),
        code=code_version("filter"),
    threads: 2
    log:
        "results/{dataset}/logs/filter.log",
    benchmark:
        "results/{dataset}/benchmarks/filter.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/filter.py"
