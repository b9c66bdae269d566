"""Rule filter: raw.h5ad -> filtered.h5ad."""
from cellrl.preprocess import filter_file
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    filter_file(snakemake.input.raw, snakemake.input.base_grn, snakemake.output[0],
                expression=snakemake.params.expression, **snakemake.params.settings)
