"""Rule split: filtered.h5ad -> split.tsv."""
from cellrl.smk import log_to
from cellrl.split import split_file

with log_to(snakemake.log[0]):
    split_file(snakemake.input[0], snakemake.output[0], **snakemake.params.settings)
