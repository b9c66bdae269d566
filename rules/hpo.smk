# Two-phase Optuna search shared by parallel workers (one study per phase in hpo/study.db or hpo/study.journal).
# `snakemake --jobs 8 --profile profiles/slurm` runs hpo.n_workers hpo_worker jobs of a phase at once; each
# runs trials until the phase's trial budget is used, so the study ends the same whatever the parallelism.


rule hpo_worker:
    """One Optuna worker: runs trials of phase {phase} on the shared study until the phase's budget is used."""
    input:
        model="results/{dataset}/oracle/model.npz",
        table="results/{dataset}/transitions/table.npy",
        previous=lambda w: [f"results/{w.dataset}/hpo/phase1.yaml"] if w.phase == "2" else [],
    output:
        "results/{dataset}/hpo/phase{phase}/worker{worker}.done",
    params:
        settings=settings("hpo"),
        env=settings("env"),
        train=settings("train"),
        study_dir=lambda w: f"results/{w.dataset}/hpo",
        code=code_version("hpo"),
    threads: 1
    resources:
        gpu=1,
    log:
        "results/{dataset}/logs/hpo_phase{phase}_worker{worker}.log",
    benchmark:
        "results/{dataset}/benchmarks/hpo_phase{phase}_worker{worker}.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/hpo_worker.py"


rule hpo_phase:
    """Finish a phase: best parameters, importances (phase 1 picks the top-k for phase 2), plots."""
    input:
        lambda w: [
            f"results/{w.dataset}/hpo/phase{w.phase}/worker{i}.done"
            for i in range(dataset_config(config, w.dataset)["hpo"]["n_workers"])
        ],
    output:
        summary="results/{dataset}/hpo/phase{phase}.yaml",
        plots=multiext("results/{dataset}/hpo/phase{phase}_", "history.png", "importances.png", "parallel.png",
                       "intermediate.png"),
    params:
        settings=settings("hpo"),
        study_dir=lambda w: f"results/{w.dataset}/hpo",
        code=code_version("hpo"),
    log:
        "results/{dataset}/logs/hpo_phase{phase}.log",
    benchmark:
        "results/{dataset}/benchmarks/hpo_phase{phase}.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/hpo_phase.py"


rule hpo_best:
    """Best parameters of the two-phase search, in the form `train` reads; tuned vs reference on fresh seeds."""
    input:
        phase1="results/{dataset}/hpo/phase1.yaml",
        phase2="results/{dataset}/hpo/phase2.yaml",
        model="results/{dataset}/oracle/model.npz",
        table="results/{dataset}/transitions/table.npy",
    output:
        best="results/{dataset}/hpo/best_params.yaml",
        comparison="results/{dataset}/hpo/tuned_vs_reference.json",
    params:
        settings=settings("hpo"),
        env=settings("env"),
        train=settings("train"),
        code=code_version("hpo"),
    threads: 1
    resources:
        gpu=1,
    log:
        "results/{dataset}/logs/hpo_best.log",
    benchmark:
        "results/{dataset}/benchmarks/hpo_best.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/hpo_best.py"
