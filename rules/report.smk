rule software_env:
    """Versions of the key packages and the git commit that produced this dataset's results.

    Takes the evaluation summaries as input so it is rewritten whenever an evaluation (and hence anything
    upstream of it) reruns, instead of keeping the versions of the first run forever.
    """
    input:
        summaries=expand("results/{{dataset}}/benchmark/{run}/summary.json", run=RUNS),
    output:
        "results/{dataset}/software.json",
    params:
        code=code_version("report"),
    log:
        "results/{dataset}/logs/software_env.log",
    benchmark:
        "results/{dataset}/benchmarks/software_env.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/software_env.py"


rule report:
    """Self-contained HTML report: oracle, transitions, training, evaluation, ground truth, plots."""
    input:
        summaries=expand("results/{{dataset}}/benchmark/{run}/summary.json", run=RUNS),
        plots=expand("results/{{dataset}}/benchmark/{run}/plots", run=RUNS),
        train_summaries=expand("results/{{dataset}}/models/{run}/train_summary.json", run=RUNS),
        oracle_stats="results/{dataset}/oracle/stats.json",
        transition_stats="results/{dataset}/transitions/stats.json",
        software="results/{dataset}/software.json",
        actions="results/{dataset}/transitions/actions.tsv",
        regulators=regulator_list,
    output:
        html="results/{dataset}/report.html",
        per_action="results/{dataset}/transition_actions.tsv",
    params:
        code=code_version("report"),
    log:
        "results/{dataset}/logs/report.log",
    benchmark:
        "results/{dataset}/benchmarks/report.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/report.py"
