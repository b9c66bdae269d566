"""Configuration: load ``config/config.yaml``, validate against ``config/schema.yaml``, merge overrides.

The Snakefile and the library use these same functions, so a config that loads in tests loads in the
pipeline and vice versa.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "config" / "schema.yaml"
DEFAULT_CONFIG = ROOT / "config" / "config.yaml"
STAGES = ("demo_data", "ingest", "filter", "split", "base_grn", "oracle", "transitions", "env", "train",
          "hpo", "evaluate")


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return ``base`` with ``over`` merged in recursively (``over`` wins; neither input is modified)."""
    out = copy.deepcopy(dict(base))
    for k, v in (over or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_schema() -> dict[str, Any]:
    """The JSON schema of the configuration."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _contains(data: Any, keys: Sequence[Any]) -> bool:
    """Whether the nested mapping ``data`` holds the key path ``keys``."""
    node = data
    for k in keys:
        if isinstance(node, Mapping) and k in node:
            node = node[k]
        elif isinstance(node, list) and isinstance(k, int) and 0 <= k < len(node):
            node = node[k]
        else:
            return False
    return True


def error_origin(keys: Sequence[Any], layers: Sequence[tuple[str, Mapping[str, Any]]]) -> str | None:
    """Label of the layer that set the key path ``keys``: the last layer (in merge order) holding the longest
    prefix of it that any layer holds; None when no layer holds even its first key."""
    for n in range(len(keys), 0, -1):
        holders = [label for label, data in layers if _contains(data, keys[:n])]
        if holders:
            return holders[-1]
    return None


def _error_keys(e: Any) -> list[list[Any]]:
    """Key paths a schema error is about: the unexpected keys of an additionalProperties error, the name of a
    propertyNames error, else the error's own path."""
    path = list(e.absolute_path)
    if e.validator == "additionalProperties" and isinstance(e.instance, Mapping):
        known = set(e.schema.get("properties", {}))
        extra = [k for k in e.instance if k not in known]
        if extra:
            return [path + [k] for k in extra]
    if "propertyNames" in e.absolute_schema_path:
        return [path + [e.instance]]
    return [path]


def validate_config(cfg: Mapping[str, Any], source: str | Path = "config",
                    layers: Sequence[tuple[str, Mapping[str, Any]]] | None = None) -> None:
    """Raise ConfigError naming the file, the key path and the problem for the first schema violations.

    ``layers``: the (label, raw mapping) pairs merged into ``cfg``, base first (config/config.yaml, each
    --configfile overlay, --config overrides); each problem then names the layer that set the key, and the
    message starts with those files instead of ``source``.
    """
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines, blamed = [], []
        for e in errors[:10]:
            key = ".".join(str(p) for p in e.absolute_path) or "<top level>"
            msg = e.message
            if "propertyNames" in e.absolute_schema_path:  # a dataset or run name
                msg = (f"name {e.instance!r} is not allowed: use only letters, digits and _ . - (the name becomes "
                       "results/<name>/ and a Snakemake wildcard value; spaces, ';' or '/' break both)")
            origins = [o for o in dict.fromkeys(error_origin(k, layers) for k in _error_keys(e)) if o] \
                if layers else []
            if origins:
                msg += f" (set in {', '.join(origins)})"
                blamed += [o for o in origins if o not in blamed]
            lines.append(f"  {key}: {msg}")
        head = ", ".join(blamed) if blamed else str(source)
        raise ConfigError(f"{head}: invalid configuration (see config/schema.yaml and config/README.md):\n"
                          + "\n".join(lines))
    lines = combination_problems(cfg)
    if lines:
        raise ConfigError(f"{source}: invalid combination of settings (see config/README.md):\n" + "\n".join(lines))


def combination_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Settings the schema accepts one by one but not together, per dataset and run (after overrides): the HPO
    study tunes table-mode agents only, so a persistent run cannot take its parameters."""
    out = []
    for d in sorted(cfg.get("datasets") or {}):
        for r in sorted(cfg.get("runs") or {}):
            s = dataset_config(cfg, d, r)
            if s.get("train", {}).get("use_hpo") and s.get("env", {}).get("perturbation_model") == "persistent":
                out.append(f"  dataset {d!r}, run {r!r}: train.use_hpo: true with env.perturbation_model: "
                           "persistent; the HPO study (cellrl.hpo) tunes table-mode agents, whose parameters do not "
                           "carry over to sets simulated on the fly. Fix: set train.use_hpo: false in that run's "
                           "overrides (runs.<run>.overrides.train) or use the table model for it")
    return out


def config_layers(base: str | Path, overlays: Sequence[str | Path] = (),
                  overrides: Mapping[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The raw layers Snakemake merges, base first: ``base``, each --configfile overlay (shown relative to the
    working directory when inside it), then --config overrides; for :func:`validate_config`'s attribution."""
    def label(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(p)

    layers = []
    for p in [Path(base), *map(Path, overlays)]:
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError):  # unreadable here: Snakemake reports it; attribute nothing to it
            data = {}
        layers.append((label(p), data if isinstance(data, Mapping) else {}))
    if overrides:
        layers.append(("--config overrides", dict(overrides)))
    return layers


def load_config(path: str | Path = DEFAULT_CONFIG, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load a YAML config (optionally deep-merged with ``extra``) and validate it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    cfg = yaml.safe_load(path.read_text()) or {}
    cfg = deep_merge(cfg, extra)
    validate_config(cfg, path)
    return cfg


def dataset_config(cfg: Mapping[str, Any], dataset: str, run: str | None = None) -> dict[str, Any]:
    """Stage settings for one dataset (and optionally one run): globals <- dataset overrides <- run overrides."""
    if dataset not in cfg["datasets"]:
        raise ConfigError(f"unknown dataset {dataset!r}; configured: {sorted(cfg['datasets'])}")
    merged = {k: copy.deepcopy(cfg[k]) for k in STAGES if k in cfg}
    merged = deep_merge(merged, cfg["datasets"][dataset].get("overrides"))
    if run is not None:
        if run not in cfg["runs"]:
            raise ConfigError(f"unknown run {run!r}; configured: {sorted(cfg['runs'])}")
        merged = deep_merge(merged, cfg["runs"][run].get("overrides"))
    return merged
