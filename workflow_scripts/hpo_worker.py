"""Rule hpo_worker: run trials of one phase on the shared Optuna study; the done file records the summary."""
from cellrl.hpo import run_worker
from cellrl.io import write_json
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    summary = run_worker(snakemake.input.model, snakemake.input.table, study_dir=snakemake.params.study_dir,
                         phase=int(snakemake.wildcards.phase), worker=int(snakemake.wildcards.worker),
                         hpo=snakemake.params.settings, env=snakemake.params.env, train=snakemake.params.train,
                         threads=snakemake.threads)
    write_json(snakemake.output[0], summary)
