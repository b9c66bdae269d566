"""Rule demo_data: synthetic differentiation atlas with planted ground truth."""
from cellrl.smk import log_to
from cellrl.synthetic import write_demo_dataset

with log_to(snakemake.log[0]):
    write_demo_dataset(snakemake.output.counts, snakemake.output.tfinfo, snakemake.output.truth,
                       **snakemake.params.settings)
