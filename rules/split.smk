rule split:
    """Seeded train/val/test split per cell type."""
    input:
        "results/{dataset}/rna/filtered.h5ad",
    output:
        "results/{dataset}/split.tsv",
    params:
        settings=settings("split"),
        code=code_version("split"),
    log:
        "results/{dataset}/logs/split.log",
    benchmark:
        "results/{dataset}/benchmarks/split.tsv"
    script:
        "../workflow_scripts/split.py"
