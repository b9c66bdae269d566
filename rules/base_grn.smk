rule base_grn:
    """Base GRN (long tf/target/source table + TF -> targets dict) from a CellOracle TFinfo parquet, a
    TF-target table, or scATAC peaks + peak-gene links + a gimmemotifs scan of a local genome FASTA."""
    input:
        grn_inputs,
    output:
        table="results/{dataset}/grn/base_grn.parquet",
        tf_targets="results/{dataset}/grn/tf_targets.json",
    params:
        source=dataset_entry("base_grn"),
        settings=grn_settings,
        code=code_version("base_grn"),
    threads: lambda wildcards: 4 if config["datasets"][wildcards.dataset]["base_grn"]["source"] == "atac" else 1
    log:
        "results/{dataset}/logs/base_grn.log",
    benchmark:
        "results/{dataset}/benchmarks/base_grn.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/base_grn.py"
