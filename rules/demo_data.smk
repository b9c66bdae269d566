rule demo_data:
    """Synthetic differentiation atlas (counts + TFinfo base GRN + planted ground truth), offline."""
    output:
        counts="resources/demo/counts.h5ad",
        tfinfo="resources/demo/base_grn_tfinfo.parquet",
        truth="resources/demo/ground_truth.json",
    params:
        settings=config.get("demo_data", {}),
        code=code_version("demo_data"),
    log:
        "results/logs/demo_data.log",
    benchmark:
        "results/benchmarks/demo_data.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/demo_data.py"


rule demo_recipes:
    """The demo's known-recipe table from its planted truth (evidence "planted"), for the recipe benchmark.

    A rule of its own so that editing cellrl/recipes.py reruns only the evaluation, not the atlas."""
    input:
        truth="resources/demo/ground_truth.json",
    output:
        "resources/demo/recipes.tsv",
    params:
        code=code_version("demo_recipes"),
    log:
        "results/logs/demo_recipes.log",
    benchmark:
        "results/benchmarks/demo_recipes.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/demo_recipes.py"


rule synthetic_data:
    """A further synthetic atlas (config `synthetic.<name>`, same generator and settings as the demo), offline."""
    output:
        counts="resources/synthetic/{atlas}/counts.h5ad",
        tfinfo="resources/synthetic/{atlas}/base_grn_tfinfo.parquet",
        truth="resources/synthetic/{atlas}/ground_truth.json",
    params:
        settings=lambda w: config["synthetic"][w.atlas],
        code=code_version("demo_data"),
    log:
        "results/logs/synthetic_data_{atlas}.log",
    benchmark:
        "results/benchmarks/synthetic_data_{atlas}.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/demo_data.py"


rule synthetic_recipes:
    """A synthetic atlas's known-recipe table from its planted truth (as demo_recipes)."""
    input:
        truth="resources/synthetic/{atlas}/ground_truth.json",
    output:
        "resources/synthetic/{atlas}/recipes.tsv",
    params:
        code=code_version("demo_recipes"),
    log:
        "results/logs/synthetic_recipes_{atlas}.log",
    benchmark:
        "results/benchmarks/synthetic_recipes_{atlas}.tsv"
    conda:
        "../envs/cellrl.yaml"
    script:
        "../workflow_scripts/demo_recipes.py"
