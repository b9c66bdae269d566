"""Rule demo_recipes: the demo's planted truth as a known-recipe table."""
from cellrl.recipes import write_demo_recipes
from cellrl.smk import log_to

with log_to(snakemake.log[0]):
    write_demo_recipes(snakemake.input.truth, snakemake.output[0])
