# Public inputs fetched through their owners' loaders (scanpy, CellOracle), for config/examples/paul15_full.yaml.
# Local rules: on a cluster they run on the submit host, which usually has the network that compute nodes lack.


localrules:
    download_paul15,
    download_mouse_base_grn,


rule download_paul15:
    """Full Paul et al. 2015 data (2,730 cells x 3,451 genes, raw UMI counts) via scanpy.datasets.paul15()."""
    output:
        "resources/downloads/paul15/paul15.h5ad",
    params:
        cache="resources/downloads/scanpy",
    log:
        "results/logs/download_paul15.log",
    benchmark:
        "results/benchmarks/download_paul15.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/download.py"


rule download_mouse_base_grn:
    """CellOracle's mm10 promoter base GRN (gimmemotifs v5, fpr 1 %) via its data.load_mouse_promoter_base_GRN()."""
    output:
        "resources/downloads/celloracle/mm10_promoter_base_GRN.parquet",
    params:
        version="mm10_gimmemotifsv5_fpr1",
    log:
        "results/logs/download_mouse_base_grn.log",
    benchmark:
        "results/benchmarks/download_mouse_base_grn.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/download.py"
