"""Rule hpo_phase: summarise a finished phase (best params, importances, phase-2 space, plots)."""
from cellrl.hpo import finish_phase
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    finish_phase(snakemake.params.study_dir, int(snakemake.wildcards.phase), snakemake.output.summary,
                 hpo=snakemake.params.settings, worker_files=list(snakemake.input))
