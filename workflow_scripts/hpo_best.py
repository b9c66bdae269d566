"""Rule hpo_best: best parameters over both phases -> best_params.yaml; tuned vs reference on fresh seeds."""
from cellrl.hpo import compare_files, write_best_params
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    over = write_best_params(snakemake.input.phase1, snakemake.input.phase2, snakemake.output.best)
    compare_files(snakemake.input.model, snakemake.input.table, snakemake.output.comparison, over,
                  hpo=snakemake.params.settings, env=snakemake.params.env, train=snakemake.params.train,
                  threads=snakemake.threads)
