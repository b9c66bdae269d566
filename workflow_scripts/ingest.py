"""Rule ingest: raw scRNA -> results/{dataset}/rna/raw.h5ad."""
from cellrl.ingest import ingest_file
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    ingest_file(snakemake.params.rna, snakemake.output[0], dataset=snakemake.wildcards.dataset,
                **snakemake.params.settings)
