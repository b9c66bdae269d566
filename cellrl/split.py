"""Split: seeded train/val/test assignment of cells, per cell type.

Every cell type is split on its own (default 90/5/5), so each type appears in every split it can: a type with
>= 3 cells gets at least one val and one test cell (when those fractions are > 0); a type with 2 cells gets
one train and one test cell (no val); a type with 1 cell stays in train. Types that miss a split are
reported: a logged warning and the ``too_small`` list of the sidecar report (``split_report.json``).
Each type's permutation is seeded by (seed, type name), so adding or removing a type leaves the other types'
assignments unchanged.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError, InputError
from .io import write_json, write_table

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _counts(n: int, val: float, test: float) -> tuple[int, int, int]:
    """(n_train, n_val, n_test) for a type of n cells."""
    if n >= 3:
        n_test = max(1, int(round(n * test))) if test > 0 else 0
        n_val = max(1, int(round(n * val))) if val > 0 else 0
        while n - n_test - n_val < 1:  # keep >= 1 training cell
            if n_val >= n_test and n_val > 1:
                n_val -= 1
            elif n_test > 1:
                n_test -= 1
            else:
                break
        return n - n_val - n_test, n_val, n_test
    if n == 2 and test > 0:
        return 1, 0, 1
    return n, 0, 0


def split_cells(cell_types: pd.Series, train: float = 0.9, val: float = 0.05, test: float = 0.05,
                seed: int = 0) -> pd.DataFrame:
    """Assign every cell (the Series index; values = cell type) to train/val/test.

    Returns a DataFrame with columns ``cell`` and ``split`` in the order of ``cell_types``; its
    ``attrs["too_small"]`` lists the types that got no val or no test cell, ``attrs["counts"]`` the counts.
    Raises ConfigError when the fractions are outside [0, 1] or do not sum to 1.
    """
    fr = {"train": train, "val": val, "test": test}
    bad = {k: v for k, v in fr.items() if not (0 <= v <= 1)}
    if bad:
        raise ConfigError(f"split fractions must lie in [0, 1]: {bad}")
    if abs(train + val + test - 1.0) > 1e-6:
        raise ConfigError(f"split.train + split.val + split.test must be 1, got {train} + {val} + {test} = "
                          f"{train + val + test:.6g}; fix config/config.yaml section split:")
    if train <= 0:
        raise ConfigError("split.train must be > 0")
    if cell_types.index.has_duplicates:
        raise InputError("duplicated cell names", field="cell", fix="make cell names unique (ingest does this)")
    labels = cell_types.astype(str).to_numpy()
    out = np.empty(len(labels), dtype=object)
    too_small, counts = [], {}
    for t in sorted(set(labels)):
        idx = np.flatnonzero(labels == t)
        n_tr, n_va, n_te = _counts(len(idx), val, test)
        rng = np.random.default_rng([seed, zlib.crc32(t.encode())])
        perm = rng.permutation(idx)
        out[perm[:n_te]] = "test"
        out[perm[n_te:n_te + n_va]] = "val"
        out[perm[n_te + n_va:]] = "train"
        counts[t] = {"train": n_tr, "val": n_va, "test": n_te}
        missing = [s for s, f, k in (("val", val, n_va), ("test", test, n_te)) if f > 0 and k == 0]
        if missing:
            too_small.append({"cell_type": t, "n_cells": int(len(idx)), "missing": missing})
            log.warning("cell type %r has only %d cell(s): no %s cell (it is kept, in %s)", t, len(idx),
                        " and no ".join(missing), "train" if n_te == 0 else "train and test")
    df = pd.DataFrame({"cell": cell_types.index.astype(str), "split": out.astype(str)})
    df.attrs["too_small"] = too_small
    df.attrs["counts"] = counts
    return df


def split_file(filtered_path: str | Path, out_path: str | Path, train: float = 0.9, val: float = 0.05,
               test: float = 0.05, seed: int = 0, report_path: str | Path | None = None) -> Path:
    """Split the cells of ``filtered.h5ad``; write ``split.tsv`` (cell, split) and a JSON report.

    The report (``report_path``, default ``split_report.json`` next to ``out_path``) holds the fractions,
    per-type counts and the ``too_small`` list of types that miss a val or test cell.
    """
    import anndata as ad

    p = Path(filtered_path)
    if not p.exists():
        raise InputError("filtered.h5ad not found", path=p, fix="run the filter rule first")
    a = ad.read_h5ad(p, backed="r")
    if "cell_type" not in a.obs.columns:
        raise InputError("obs has no 'cell_type' column", path=p, field="cell_type",
                         fix="re-run the filter rule (it always writes obs['cell_type'])")
    ct = pd.Series(a.obs["cell_type"].astype(str).to_numpy(), index=a.obs_names.astype(str))
    a.file.close()
    if ct.nunique() < 2:  # ingest and filter refuse this; a hand-made filtered.h5ad may not
        raise InputError(f"every cell has the same cell type ({ct.iloc[0]!r}); a plan needs two types", path=p,
                         field="cell_type", fix="give at least two cell types (datasets.<name>.rna.cell_type) and "
                                                "re-run ingest and filter")
    df = split_cells(ct, train=train, val=val, test=test, seed=seed)
    report: dict[str, Any] = {"fractions": {"train": train, "val": val, "test": test}, "seed": seed,
                              "n_cells": int(len(df)), "totals": df["split"].value_counts().to_dict(),
                              "per_cell_type": df.attrs["counts"], "too_small": df.attrs["too_small"]}
    report_path = Path(report_path) if report_path else Path(out_path).with_name("split_report.json")
    write_json(report_path, report)
    write_table(out_path, df)
    log.info("split %d cells: %s; too small: %s", len(df), report["totals"],
             [d["cell_type"] for d in df.attrs["too_small"]] or "none")
    return Path(out_path)
