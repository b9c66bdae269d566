# Two-phase Optuna search shared by parallel workers (one study per phase in hpo/study.db or a journal).


def hpo_worker_ids(wildcards):
    n = dataset_config(config, wildcards.dataset)["hpo"]["n_workers"]
    return [
        f"results/{wildcards.dataset}/hpo/phase{wildcards.phase}/worker{i}.done"
        for i in range(n)
    ]


def hpo_previous_phase(wildcards):
    if wildcards.phase == "2":
        return [f"results/{wildcards.dataset}/hpo/phase1.yaml"]
    return []


rule hpo_worker:
    """One Optuna worker: runs trials of phase {phase} on the shared study until the phase's budget is used."""
    input:
        model="results/{dataset}/oracle/model.npz",
        table="results/{dataset}/transitions/table.npy",
        previous=hpo_previous_phase,
    output:
        touch("results/{dataset}/hpo/phase{phase}/worker{worker}.done"),
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
    script:
        "../workflow_scripts/hpo_worker.py"


rule hpo_phase:
    """Finish a phase: best parameters, importances (phase 1 picks the top-k for phase 2), plots."""
    input:
        hpo_worker_ids,
    output:
        "results/{dataset}/hpo/phase{phase}.yaml",
    params:
        settings=settings("hpo"),
        study_dir=lambda w: f"results/{w.dataset}/hpo",
        code=code_version("hpo"),
    log:
        "results/{dataset}/logs/hpo_phase{phase}.log",
    benchmark:
        "results/{dataset}/benchmarks/hpo_phase{phase}.tsv"
    script:
        "../workflow_scripts/hpo_phase.py"


rule hpo_best:
    """Best parameters of the two-phase search, in the form `train` reads."""
    input:
        phase1="results/{dataset}/hpo/phase1.yaml",
        phase2="results/{dataset}/hpo/phase2.yaml",
    output:
        "results/{dataset}/hpo/best_params.yaml",
    params:
        code=code_version("hpo"),
    log:
        "results/{dataset}/logs/hpo_best.log",
    benchmark:
        "results/{dataset}/benchmarks/hpo_best.tsv"
    script:
        "../workflow_scripts/hpo_best.py"
