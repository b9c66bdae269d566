# Real CellOracle in three steps, so a cluster can spread the slow part: oracle_prepare (PCA + kNN imputation, a
# checkpoint that lists the cell-type clusters), oracle_links (get_links for one cluster per job, side by side),
# fit_oracle (gather: filter_links, fit_GRN_for_simulation, model.npz). Same maths as CellOracle's get_links.
checkpoint oracle_prepare:
    """CellOracle import, PCA and kNN imputation; clusters.json lists the clusters whose links run as jobs."""
    input:
        adata="results/{dataset}/rna/filtered.h5ad",
        tf_targets="results/{dataset}/grn/tf_targets.json",
        regulators=regulator_list,
    output:
        oracle="results/{dataset}/oracle/prepared.celloracle.oracle",
        info="results/{dataset}/oracle/clusters.json",
        links_input="results/{dataset}/oracle/links_input.npz",
    params:
        expression=lambda w: config["datasets"][w.dataset]["rna"]["expression"],
        settings=oracle_settings(PREPARE_KEYS),
        code=code_version("fit_oracle"),
    threads: 2
    resources:
        mem_mb=16000,
    log:
        "results/{dataset}/logs/oracle_prepare.log",
    benchmark:
        "results/{dataset}/benchmarks/oracle_prepare.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/oracle_prepare.py"


rule oracle_links:
    """CellOracle's get_links for one cell-type cluster (bagging ridge over every target gene)."""
    input:
        links_input="results/{dataset}/oracle/links_input.npz",
        info="results/{dataset}/oracle/clusters.json",
    output:
        "results/{dataset}/oracle/links/{cluster}.parquet",
    params:
        settings=oracle_settings(LINKS_KEYS),
        code=code_version("fit_oracle"),
    threads: 1  # CellOracle fits the genes one after another; two jobs side by side use two cores
    resources:
        mem_mb=4000,
    log:
        "results/{dataset}/logs/oracle_links/{cluster}.log",
    benchmark:
        "results/{dataset}/benchmarks/oracle_links/{cluster}.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/oracle_links.py"


rule fit_oracle:
    """Gather the clusters' links: filter_links, fit_GRN_for_simulation, portable model.npz and stats.json."""
    input:
        oracle="results/{dataset}/oracle/prepared.celloracle.oracle",
        info="results/{dataset}/oracle/clusters.json",
        links=cluster_link_files,
        split="results/{dataset}/split.tsv",
    output:
        oracle="results/{dataset}/oracle/oracle.celloracle.oracle",
        links="results/{dataset}/oracle/links.celloracle.links",
        model="results/{dataset}/oracle/model.npz",
        stats="results/{dataset}/oracle/stats.json",
    params:
        expression=lambda w: config["datasets"][w.dataset]["rna"]["expression"],
        settings=oracle_settings(),
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
