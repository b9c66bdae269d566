"""Rule transitions: model.npz -> table.npy (cells x actions), actions.tsv, stats.json."""
from cellrl.smk import log_to
from cellrl.transitions import transitions_files

with log_to(snakemake.log[0]):
    transitions_files(snakemake.input.model, snakemake.output.table, snakemake.output.actions,
                      snakemake.output.stats, chunk_dir=snakemake.params.chunk_dir,
                      threads=snakemake.threads, **snakemake.params.settings)
