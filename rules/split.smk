rule split:
    """Seeded train/val/test split per cell type; split_report.json lists types too small for val/test."""
    input:
        "results/{dataset}/rna/filtered.h5ad",
    output:
        tsv="results/{dataset}/split.tsv",
        report="results/{dataset}/split_report.json",
    params:
        settings=settings("split"),
        code=code_version("split"),
    log:
        "results/{dataset}/logs/split.log",
    benchmark:
        "results/{dataset}/benchmarks/split.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/split.py"
