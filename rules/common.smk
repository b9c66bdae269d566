# Shared helpers: config validation, per-dataset settings, code-version hashes, target lists.
import json
from pathlib import Path

from cellrl.config import config_layers, dataset_config, validate_config
from cellrl.provenance import code_version as _code_version

# each problem names the file that set the key: config/config.yaml, a --configfile overlay or --config
validate_config(config, "config/config.yaml (after --configfile/--config overrides)",
                layers=config_layers("config/config.yaml", getattr(workflow, "overwrite_configfiles", None) or [],
                                     getattr(getattr(workflow, "config_settings", None), "config", None)))

DATASETS = sorted(config["datasets"])
RUNS = sorted(config["runs"])
RESULTS = "results"


wildcard_constraints:
    dataset="[A-Za-z0-9_.-]+",
    run="[A-Za-z0-9_.-]+",
    worker="[0-9]+",
    phase="[12]",
    atlas="[A-Za-z0-9_.-]+",
    cluster="[0-9]{3}_[A-Za-z0-9_.-]+",


def settings(stage, run=False):
    """params function: the merged settings of one stage for the job's dataset (and run)."""

    def _get(wildcards):
        r = wildcards.run if run else None
        return dataset_config(config, wildcards.dataset, r)[stage]

    return _get


def persistent_run(wildcards):
    """Whether the job's run has env.perturbation_model: persistent (after dataset and run overrides)."""
    return dataset_config(config, wildcards.dataset, wildcards.run)["env"]["perturbation_model"] == "persistent"


def engine_settings(wildcards):
    """params function: the transitions settings of the persistent engine for a run with
    env.perturbation_model: persistent; None for table runs (a setting the table does not use reruns nothing)."""
    if not persistent_run(wildcards):
        return None
    return dataset_config(config, wildcards.dataset, wildcards.run)["transitions"]


def dataset_entry(key):
    """params function: a dataset's own entry (rna / base_grn) from `datasets:`."""
    return lambda wildcards: config["datasets"][wildcards.dataset][key]


# Library code that each stage runs: `params: code=code_version(stage)` is a hash of the cellrl modules the stage
# runs (cellrl/provenance.py), read from this workflow's own cellrl/. Editing the transition engine reruns
# transitions and its descendants, nothing upstream.
_CELLRL = Path(workflow.basedir) / "cellrl"


def code_version(stage):
    """Short sha256 of the source of every cellrl module the stage runs (cellrl.provenance.code_version)."""
    return _code_version(stage, _CELLRL)


def rna_input(wildcards):
    """Rule ingest's inputs: the matrix (file or 10x folder) plus the cell-type table when one is configured."""
    rna = config["datasets"][wildcards.dataset]["rna"]
    table = (rna.get("cell_type") or {}).get("table")
    return [rna["path"]] + ([table] if table else [])


def grn_inputs(wildcards):
    """Rule base_grn's input files: the TFinfo/table file, or the scATAC peaks, peak-gene table, genome FASTA
    and motif file (dataset entry first, then the base_grn.atac settings)."""
    src = config["datasets"][wildcards.dataset]["base_grn"]
    files = [src[k] for k in ("path", "peaks", "peak_gene") if src.get(k)]
    if src.get("source") == "atac":
        atac = dataset_config(config, wildcards.dataset)["base_grn"].get("atac", {})
        files += [src.get(k) or atac.get(k) for k in ("genome_fasta", "motifs") if src.get(k) or atac.get(k)]
    return files


def grn_settings(wildcards):
    """params of the base_grn rule, i.e. the base_grn settings, without the atac block unless the source is
    atac (so that changing motif settings reruns only the datasets that scan motifs)."""
    s = dict(dataset_config(config, wildcards.dataset)["base_grn"])
    if config["datasets"][wildcards.dataset]["base_grn"].get("source") != "atac":
        s.pop("atac", None)
    return s


def truth_input(wildcards):
    """Rule evaluate's planted truth: the ground_truth.json beside a synthetic atlas (the demo's, or one of
    `synthetic:`), none for real data."""
    path = Path(config["datasets"][wildcards.dataset]["rna"]["path"])
    synthetic = path.parts[:2] == ("resources", "demo") or (path.parts[:2] == ("resources", "synthetic")
                                                            and len(path.parts) == 4)
    return [str(path.parent / "ground_truth.json")] if synthetic else []


def regulator_list(wildcards):
    """The TF list of oracle.regulators (per dataset, after overrides), when one is set."""
    path = dataset_config(config, wildcards.dataset)["oracle"].get("regulators")
    return [path] if path else []


def bfs_input(wildcards):
    """Rule evaluate's BFS optimum and its checksum: table runs only (a persistent run is scored against exact
    search over sets, so it neither needs nor waits for the BFS table)."""
    if persistent_run(wildcards):
        return {}
    return {"bfs": f"results/{wildcards.dataset}/benchmark/bfs.parquet",
            "bfs_stats": f"results/{wildcards.dataset}/benchmark/bfs_stats.json"}


def recipes_input(wildcards):
    """Rule evaluate's recipe table (datasets.<name>.recipes), when the dataset sets one."""
    path = config["datasets"][wildcards.dataset].get("recipes")
    return [path] if path else []


# fit_oracle in three steps (rules/fit_oracle.smk): the oracle settings each step uses
PREPARE_KEYS = ("n_pcs", "knn_k_fraction", "embedding", "seed")
LINKS_KEYS = ("alpha", "bagging_number")


def oracle_settings(keys=None):
    """params function: the dataset's oracle settings, or only ``keys`` of them (what that step uses)."""

    def _get(wildcards):
        s = dataset_config(config, wildcards.dataset)["oracle"]
        return dict(s) if keys is None else {k: s[k] for k in keys}

    return _get


def cluster_link_files(wildcards):
    """Gather input: one link list per cluster that oracle_prepare found."""
    info = checkpoints.oracle_prepare.get(dataset=wildcards.dataset).output.info
    slugs = sorted(json.loads(Path(info).read_text())["slugs"])
    return [f"results/{wildcards.dataset}/oracle/links/{s}.parquet" for s in slugs]


def all_targets():
    """Each dataset's report plus the artifacts users open outside the workflow (the oracle for CellOracle,
    model.npz, the table and agents for `cellrl plan`): a plain rerun rebuilds any of them that a killed
    `--forcerun` deleted, even when the report downstream of it is still up to date."""
    out = []
    for d in DATASETS:
        out.append(f"{RESULTS}/{d}/report.html")
        out += [f"{RESULTS}/{d}/oracle/{f}" for f in ("oracle.celloracle.oracle", "model.npz")]
        out += [f"{RESULTS}/{d}/transitions/table.npy", f"{RESULTS}/{d}/benchmark/bfs.parquet"]
        out += [f"{RESULTS}/{d}/models/{r}/model.zip" for r in RUNS]
    return out


def train_hpo_input(wildcards):
    use_hpo = dataset_config(config, wildcards.dataset, wildcards.run)["train"]["use_hpo"]
    return [f"results/{wildcards.dataset}/hpo/best_params.yaml"] if use_hpo else []
