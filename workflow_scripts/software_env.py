"""Rule software_env: package versions and git commit -> software.json."""
from cellrl.report import write_software_env
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    write_software_env(snakemake.output[0])
