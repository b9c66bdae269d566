"""Rule fit_oracle: filtered.h5ad + tf_targets.json + split.tsv -> CellOracle objects, model.npz, stats.json."""
from cellrl.oracle import fit_oracle_files
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    fit_oracle_files(snakemake.input.adata, snakemake.input.tf_targets, snakemake.input.split,
                     oracle_path=snakemake.output.oracle, links_path=snakemake.output.links,
                     model_path=snakemake.output.model, stats_path=snakemake.output.stats,
                     dataset=snakemake.wildcards.dataset, expression=snakemake.params.expression,
                     threads=snakemake.threads, **snakemake.params.settings)
