rule base_grn:
    """Base GRN from a CellOracle TFinfo parquet, a TF-target table, or scATAC peaks + motif scan."""
    input:
        grn_inputs,
    output:
        table="results/{dataset}/grn/base_grn.parquet",
        tf_targets="results/{dataset}/grn/tf_targets.json",
    params:
        source=dataset_entry("base_grn"),
        settings=settings("base_grn"),
        code=code_version("base_grn"),
    log:
        "results/{dataset}/logs/base_grn.log",
    benchmark:
        "results/{dataset}/benchmarks/base_grn.tsv"
    script:
        "../workflow_scripts/base_grn.py"
