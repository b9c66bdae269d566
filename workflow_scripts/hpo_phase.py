"""Rule hpo_phase: summarise a finished phase (best params, importances, plots)."""
from cellrl.hpo import finish_phase
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    finish_phase(snakemake.params.study_dir, int(snakemake.wildcards.phase), snakemake.output[0],
                 hpo=snakemake.params.settings)
