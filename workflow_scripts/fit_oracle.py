"""Rule fit_oracle: prepared oracle + per-cluster links + split.tsv -> CellOracle objects, model.npz, stats.json."""
from cellrl.oracle import gather_oracle_files
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    gather_oracle_files(snakemake.input.oracle, snakemake.input.info, snakemake.input.links, snakemake.input.split,
                        final_oracle_path=snakemake.output.oracle, links_path=snakemake.output.links,
                        model_path=snakemake.output.model, stats_path=snakemake.output.stats,
                        expression=snakemake.params.expression, **snakemake.params.settings)
