"""Rule bfs: exact shortest paths for every (test cell, target type) -> benchmark/bfs.parquet."""
from cellrl.bfs import bfs_file
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    bfs_file(snakemake.input.model, snakemake.input.table, snakemake.output.bfs, env=snakemake.params.env)
