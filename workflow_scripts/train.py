"""Rule train: MaskablePPO on the transition table (persistent mode: on sets simulated on the fly)
-> models/{run}/model.zip (+ checkpoints, progress.csv)."""
from cellrl.smk import log_to
from cellrl.train import train_files

with log_to(snakemake.log[0]):
    train_files(snakemake.input.model, snakemake.input.table, snakemake.params.out_dir,
                env=snakemake.params.env, train=snakemake.params.train,
                hpo_params=snakemake.input.hpo[0] if snakemake.input.hpo else None,
                threads=snakemake.threads, transitions=snakemake.params.transitions)
