"""Rule split: filtered.h5ad -> split.tsv (+ split_report.json)."""
from cellrl.smk import log_to
from cellrl.split import split_file

with log_to(snakemake.log[0]):
    split_file(snakemake.input[0], snakemake.output.tsv, report_path=snakemake.output.report,
               **snakemake.params.settings)
