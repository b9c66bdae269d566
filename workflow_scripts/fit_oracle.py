"""Rule fit_oracle: filtered.h5ad + base GRN + split -> CellOracle objects and portable model.npz."""
from cellrl.oracle import fit_oracle_files
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    fit_oracle_files(snakemake.input.adata, snakemake.input.tf_targets, snakemake.input.split,
                     oracle_path=snakemake.output.oracle, links_path=snakemake.output.links,
                     model_path=snakemake.output.model, stats_path=snakemake.output.stats,
                     expression=snakemake.params.expression, threads=snakemake.threads,
                     **snakemake.params.settings)
