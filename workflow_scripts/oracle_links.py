"""Rule oracle_links: one cluster's CellOracle link list -> oracle/links/{cluster}.parquet."""
from cellrl.oracle import cluster_links_file
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    cluster_links_file(snakemake.input.links_input, snakemake.input.info, snakemake.wildcards.cluster,
                       snakemake.output[0], threads=snakemake.threads, **snakemake.params.settings)
