"""Rule base_grn: TFinfo parquet / TF-target table / scATAC + motif scan -> grn/base_grn.parquet + tf_targets.json."""
from cellrl.grn import build_base_grn_file
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    build_base_grn_file(snakemake.params.source, snakemake.output.table, snakemake.output.tf_targets,
                        threads=snakemake.threads, **snakemake.params.settings)
