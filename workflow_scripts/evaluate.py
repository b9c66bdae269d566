"""Rule evaluate: agent vs greedy vs random vs BFS on the test protocol, with plots (persistent mode: agent vs
exact, beam and greedy search over sets)."""
from cellrl.evaluate import evaluate_files
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    evaluate_files(model=snakemake.input.model, table=snakemake.input.table, actions=snakemake.input.actions,
                   agent=snakemake.input.agent, progress=snakemake.input.progress, bfs=snakemake.input.get("bfs"),
                   truth=snakemake.input.truth[0] if snakemake.input.truth else None,
                   episodes_out=snakemake.output.episodes, summary_out=snakemake.output.summary,
                   plots_dir=snakemake.output.plots, transition_stats=snakemake.input.transition_stats,
                   recipes=snakemake.input.recipes[0] if snakemake.input.recipes else None,
                   recipes_out=snakemake.output.recipes,
                   env=snakemake.params.env, transitions=snakemake.params.transitions, **snakemake.params.settings)
