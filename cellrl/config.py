"""Configuration: load ``config/config.yaml``, validate against ``config/schema.yaml``, merge overrides.

The Snakefile and the library use these same functions, so a config that loads in tests loads in the
pipeline and vice versa.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

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


def validate_config(cfg: Mapping[str, Any], source: str | Path = "config") -> None:
    """Raise ConfigError naming the file, the key path and the problem for the first schema violations."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors[:10]:
            key = ".".join(str(p) for p in e.absolute_path) or "<top level>"
            lines.append(f"  {key}: {e.message}")
        raise ConfigError(f"{source}: invalid configuration (see config/schema.yaml and config/README.md):\n"
                          + "\n".join(lines))


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
