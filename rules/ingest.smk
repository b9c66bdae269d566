def ingest_inputs(wildcards):
    """The matrix (file or 10x folder) plus the cell-type table when one is configured."""
    rna = config["datasets"][wildcards.dataset]["rna"]
    table = (rna.get("cell_type") or {}).get("table")
    return [rna["path"]] + ([table] if table else [])


rule ingest:
    """Read raw scRNA (h5ad, 10x h5/mtx, CSV/TSV), attach cell types, normalise gene symbols."""
    input:
        ingest_inputs,
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
    script:
        "../workflow_scripts/ingest.py"
