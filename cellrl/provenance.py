"""Code versions: which cellrl modules a stage runs, and a hash of their source.

Snakemake's code trigger sees only a rule's script file, so each rule gets ``params: code=code_version(stage)``
(rules/common.smk), a hash of the cellrl modules it runs: its entry modules below plus every cellrl module they
import, followed through the package (``ast``, so imports inside functions count too). Training puts the same
hash in its checkpoint fingerprint, so a checkpoint made under other code is never resumed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_SHARED = ("__init__", "smk")  # imported by every workflow script
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "demo_data": ("synthetic",),
    "demo_recipes": ("recipes",),
    "ingest": ("ingest",),
    "filter": ("preprocess",),
    "split": ("split",),
    "base_grn": ("grn",),
    "fit_oracle": ("oracle", "model"),
    "transitions": ("transitions", "model", "xp"),
    "hpo": ("hpo", "train", "env", "model"),
    "train": ("train", "env", "model"),
    "bfs": ("bfs", "env", "model"),
    "evaluate": ("evaluate", "bfs", "env", "train", "model"),
    "report": ("report", "plots"),
}


def _module_file(root: Path, mod: str) -> Path:
    p = root / f"{mod.replace('.', '/')}.py"
    return p if p.exists() else root / mod.replace(".", "/") / "__init__.py"


@functools.lru_cache(maxsize=None)
def _imports(root: Path, mod: str, mtime_ns: int) -> frozenset[str]:
    """Names of the cellrl modules that ``root/<mod>`` imports anywhere in its source."""
    path = _module_file(root, mod)
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError):  # missing or broken: hashed as bytes; the job itself reports the error
        return frozenset()
    package = mod.split(".")[:-1] if path.name != "__init__.py" else mod.split(".")
    found: set[str] = set()
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
    return frozenset(m for m in found if m and _module_file(root, m).exists())


def stage_modules(stage: str, root: Path = PACKAGE_DIR) -> list[str]:
    """Every cellrl module a stage runs: its entry modules and their imports within cellrl, sorted."""
    todo, seen = list(_SHARED + STAGE_MODULES[stage]), set()
    while todo:
        mod = todo.pop()
        path = _module_file(root, mod)
        if mod not in seen and path.exists():
            seen.add(mod)
            todo.extend(_imports(root, mod, path.stat().st_mtime_ns))
    return sorted(seen)


def code_version(stage: str, root: str | Path = PACKAGE_DIR) -> str:
    """Short sha256 of the source of every cellrl module the stage runs (see :func:`stage_modules`)."""
    root = Path(root).resolve()
    h = hashlib.sha256()
    for mod in stage_modules(stage, root):
        h.update(mod.encode())
        h.update(_module_file(root, mod).read_bytes())
    return h.hexdigest()[:16]
