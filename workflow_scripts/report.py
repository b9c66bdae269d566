"""Rule report: one self-contained HTML report per dataset."""
from cellrl.report import write_report
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    write_report(snakemake.output.html, dataset=snakemake.wildcards.dataset, summaries=list(snakemake.input.summaries),
                 plot_dirs=list(snakemake.input.plots), oracle_stats=snakemake.input.oracle_stats,
                 transition_stats=snakemake.input.transition_stats, software=snakemake.input.software,
                 actions=snakemake.input.actions,
                 regulators=snakemake.input.regulators[0] if snakemake.input.regulators else None,
                 per_action_out=snakemake.output.per_action,
                 train_summaries=list(snakemake.input.train_summaries))
