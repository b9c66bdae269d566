rule evaluate:
    """Test protocol: trained agent vs greedy, random and BFS optimum; episodes, summary and plots."""
    input:
        unpack(bfs_input),  # table runs only
        model="results/{dataset}/oracle/model.npz",
        table="results/{dataset}/transitions/table.npy",
        actions="results/{dataset}/transitions/actions.tsv",
        transition_stats="results/{dataset}/transitions/stats.json",
        agent="results/{dataset}/models/{run}/model.zip",
        train_summary="results/{dataset}/models/{run}/train_summary.json",
        progress="results/{dataset}/models/{run}/progress.csv",
        truth=truth_input,
        recipes=recipes_input,
    output:
        episodes="results/{dataset}/benchmark/{run}/episodes.parquet",
        summary="results/{dataset}/benchmark/{run}/summary.json",
        plots=directory("results/{dataset}/benchmark/{run}/plots"),
        recipes="results/{dataset}/benchmark/{run}/recipes.tsv",
    params:
        env=settings("env", run=True),
        settings=settings("evaluate", run=True),
        transitions=engine_settings,
        code=code_version("evaluate"),
    log:
        "results/{dataset}/logs/evaluate_{run}.log",
    benchmark:
        "results/{dataset}/benchmarks/evaluate_{run}.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/evaluate.py"
