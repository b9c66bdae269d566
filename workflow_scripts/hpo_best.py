"""Rule hpo_best: best parameters over both phases -> best_params.yaml."""
from cellrl.hpo import write_best_params
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    write_best_params(snakemake.input.phase1, snakemake.input.phase2, snakemake.output[0])
