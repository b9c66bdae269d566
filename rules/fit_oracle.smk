rule fit_oracle:
    """Real CellOracle: PCA, kNN imputation, get_links per cell type, filter_links, fit_GRN_for_simulation."""
    input:
        adata="results/{dataset}/rna/filtered.h5ad",
        tf_targets="results/{dataset}/grn/tf_targets.json",
        split="results/{dataset}/split.tsv",
        regulators=regulator_list,
    output:
        oracle="results/{dataset}/oracle/oracle.celloracle.oracle",
        links="results/{dataset}/oracle/links.celloracle.links",
        model="results/{dataset}/oracle/model.npz",
        stats="results/{dataset}/oracle/stats.json",
    params:
        expression=lambda w: config["datasets"][w.dataset]["rna"]["expression"],
        settings=settings("oracle"),
        code=code_version("fit_oracle"),
    threads: 2
    resources:
        mem_mb=16000,
    log:
        "results/{dataset}/logs/fit_oracle.log",
    benchmark:
        "results/{dataset}/benchmarks/fit_oracle.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/fit_oracle.py"
