rule ingest:
    """Read raw scRNA (h5ad, 10x h5/mtx, CSV/TSV), attach cell types, normalise gene symbols."""
    input:
        rna_input,
    output:
        "results/{dataset}/rna/raw.h5ad",
    params:
        rna=dataset_entry("rna"),
        settings=settings("ingest"),
        code=code_version("ingest"),
    log:
        "results/{dataset}/logs/ingest.log",
    benchmark:
        "results/{dataset}/benchmarks/ingest.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/ingest.py"
