# Shared helpers: config validation, per-dataset settings, code-version hashes, target lists.
import ast
import functools
import hashlib
from pathlib import Path

from cellrl.config import dataset_config, validate_config

validate_config(config, "config/config.yaml (after --config overrides)")

DATASETS = sorted(config["datasets"])
RUNS = sorted(config["runs"])
RESULTS = "results"


wildcard_constraints:
    dataset="[A-Za-z0-9_.-]+",
    run="[A-Za-z0-9_.-]+",
    worker="[0-9]+",
    phase="[12]",


def settings(stage, run=False):
    """params function: the merged settings of one stage for the job's dataset (and run)."""

    def _get(wildcards):
        r = wildcards.run if run else None
        return dataset_config(config, wildcards.dataset, r)[stage]

    return _get


def dataset_entry(key):
    """params function: a dataset's own entry (rna / base_grn) from `datasets:`."""
    return lambda wildcards: config["datasets"][wildcards.dataset][key]


# Library code that each stage runs. Snakemake's code trigger sees only a rule's script file, so each rule
# gets `params: code=code_version(...)`, a hash of the cellrl modules it runs: its entry modules below plus every
# cellrl module they import, followed through the package (ast, so imports inside functions count too). Editing
# the transition engine reruns transitions and its descendants, nothing upstream; a new helper module imported by
# a stage is picked up without touching this list.
_SHARED = ["__init__", "smk"]  # imported by every workflow script
STAGE_MODULES = {
    "demo_data": ["synthetic"],
    "ingest": ["ingest"],
    "filter": ["preprocess"],
    "split": ["split"],
    "base_grn": ["grn"],
    "fit_oracle": ["oracle", "model"],
    "transitions": ["transitions", "model", "xp"],
    "hpo": ["hpo", "train", "env", "model"],
    "train": ["train", "env", "model"],
    "bfs": ["bfs", "env", "model"],
    "evaluate": ["evaluate", "bfs", "env", "train", "model"],
    "report": ["report", "plots"],
}
_CELLRL = Path(workflow.basedir) / "cellrl"


def _module_file(mod):
    p = _CELLRL / f"{mod}.py"
    return p if p.exists() else _CELLRL / mod / "__init__.py"


@functools.lru_cache(maxsize=None)
def _cellrl_imports(mod):
    """Names of the cellrl modules that cellrl/<mod> imports anywhere in its source."""
    path = _module_file(mod)
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError):  # missing or broken: hashed as bytes; the job itself reports the error
        return frozenset()
    package = mod.split(".")[:-1] if path.name != "__init__.py" else mod.split(".")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import x
                base = package[: len(package) - node.level + 1]
                if node.module:
                    found.add(".".join(base + node.module.split(".")))
                else:
                    found.update(".".join(base + [a.name]) for a in node.names)
            elif node.module and node.module.split(".")[0] == "cellrl":
                rest = node.module.split(".")[1:]
                found.update([".".join(rest)] if rest else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("cellrl."))
    return frozenset(m for m in found if m and _module_file(m).exists())


def stage_modules(stage):
    """Every cellrl module a stage runs: its entry modules and their imports within cellrl, sorted."""
    todo, seen = list(_SHARED + STAGE_MODULES[stage]), set()
    while todo:
        mod = todo.pop()
        if mod not in seen and _module_file(mod).exists():
            seen.add(mod)
            todo.extend(_cellrl_imports(mod))
    return sorted(seen)


def code_version(stage):
    """Short sha256 of the source of every cellrl module the stage runs (see stage_modules)."""
    h = hashlib.sha256()
    for mod in stage_modules(stage):
        h.update(mod.encode())
        h.update(_module_file(mod).read_bytes())
    return h.hexdigest()[:16]


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


def demo_inputs_needed():
    """Demo inputs are generated by rule demo_data when a dataset points at resources/demo/."""
    return any(str(d["rna"]["path"]).startswith("resources/demo/") for d in config["datasets"].values())


def all_targets():
    out = []
    for d in DATASETS:
        out.append(f"{RESULTS}/{d}/report.html")
    return out


def train_hpo_input(wildcards):
    use_hpo = dataset_config(config, wildcards.dataset, wildcards.run)["train"]["use_hpo"]
    return [f"results/{wildcards.dataset}/hpo/best_params.yaml"] if use_hpo else []
