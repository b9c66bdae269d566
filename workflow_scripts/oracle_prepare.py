"""Rule oracle_prepare: filtered.h5ad + tf_targets.json -> imputed CellOracle oracle + clusters.json."""
from cellrl.oracle import prepare_oracle_files
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    prepare_oracle_files(snakemake.input.adata, snakemake.input.tf_targets, oracle_out=snakemake.output.oracle,
                         info_out=snakemake.output.info,
                         links_input_out=snakemake.output.links_input, dataset=snakemake.wildcards.dataset,
                         regulators=snakemake.input.regulators[0] if snakemake.input.regulators else None,
                         expression=snakemake.params.expression, threads=snakemake.threads,
                         **snakemake.params.settings)
