"""Shared fixtures. Real-data tests read ../shared/data in place and skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CELLRL_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skip the calling test when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (tests read ../shared/data in place)")
    return p


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def small_model():
    """A small random, well-formed OracleModel (not biology) for downstream unit tests."""
    from cellrl.model import random_model

    return random_model(n_cells=300, n_genes=40, n_types=4, n_regulators=6, seed=0)


@pytest.fixture
def standin_backend(monkeypatch):
    """A CPU stand-in for CuPy: a module of numpy's functions that is not numpy (so every ``xp is not np`` branch
    runs: no numba, whole-chunk blocks, index arrays moved to the backend), scipy.sparse as cupyx.scipy.sparse
    and stub GPU memory queries; ``transitions.backend: cupy`` then selects it in the table runner and the
    persistent engine. It checks the GPU path's logic where no GPU is lent, not CuPy's API (the gpu tests do)."""
    import sys
    import types

    import numpy as np
    import scipy.sparse

    import cellrl.persistent.engine as engine
    import cellrl.transitions.runner as runner

    xp = types.ModuleType("xp_standin")
    xp.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    xp.get_default_memory_pool = lambda: types.SimpleNamespace(total_bytes=lambda: 0)
    xp.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(memGetInfo=lambda: (8 << 30, 16 << 30)))
    cupyx, cupyx_scipy = types.ModuleType("cupyx"), types.ModuleType("cupyx.scipy")
    cupyx.scipy, cupyx_scipy.sparse = cupyx_scipy, scipy.sparse
    for name, mod in (("cupyx", cupyx), ("cupyx.scipy", cupyx_scipy), ("cupyx.scipy.sparse", scipy.sparse)):
        monkeypatch.setitem(sys.modules, name, mod)
    select = runner.select_backend
    standin = (lambda backend: (xp, "cupy: CPU stand-in") if backend == "cupy" else select(backend))
    monkeypatch.setattr(runner, "select_backend", standin)
    monkeypatch.setattr(engine, "select_backend", standin)
    return xp


# ---------------------------------------------------------------------------------------------------------------
# Fitted CellOracle oracles (helper B): real Paul15 data and the synthetic demo atlas, each through the
# pipeline's own functions: ingest -> base GRN -> filter -> split -> fit_oracle. Session-scoped: one fit each.
# ---------------------------------------------------------------------------------------------------------------
from typing import Any, NamedTuple  # noqa: E402

MM10_PROMOTER_GRN = ("celloracle_mouse_base_grn", "mm10_promoter_base_GRN.parquet")
DEMO_FIXTURE_SIZE = dict(n_cells=1000, n_genes=200, seed=7)


class Fitted(NamedTuple):
    """A fitted oracle: CellOracle objects, the portable model and what went in."""

    oracle: Any           # celloracle.Oracle after fit_GRN_for_simulation
    links: Any            # celloracle.Links after filter_links
    model: Any            # cellrl.model.OracleModel (what model.npz holds)
    stats: dict           # fit_oracle's stats.json content
    adata: Any            # the filtered AnnData that went into the fit
    tf_targets: dict      # base GRN, TF -> targets
    truth: dict | None    # planted network (demo only)


def fit_chain(rna: dict, base_grn: dict, *, gene_symbols: str = "capitalize", filter_settings: dict | None = None,
              oracle_settings: dict | None = None, truth: dict | None = None) -> Fitted:
    """Run ingest -> base GRN -> filter -> split -> fit_oracle in memory with the configured defaults."""
    from cellrl.config import load_config
    from cellrl.grn import build_base_grn, tf_targets_dict
    from cellrl.ingest import read_rna
    from cellrl.oracle import fit_oracle
    from cellrl.preprocess import filter_adata
    from cellrl.split import split_cells

    cfg = load_config()
    raw = read_rna(rna, gene_symbols=gene_symbols)
    grn = build_base_grn(base_grn, **cfg["base_grn"])
    adata = filter_adata(raw, regulators=set(grn.tf), expression=rna["expression"],
                         **{**cfg["filter"], **(filter_settings or {})})
    import pandas as pd

    split = split_cells(pd.Series(adata.obs["cell_type"].astype(str).to_numpy(), index=adata.obs_names),
                        **cfg["split"])
    tf_targets = tf_targets_dict(grn)
    settings = {**cfg["oracle"], **(oracle_settings or {})}
    settings.pop("regulators", None)  # a TF-list file, applied by fit_oracle_files (the rule), not by fit_oracle
    # threads=1: CellOracle parallelises inside each tiny bagging fit, where process overhead exceeds the gain
    oracle, links, model, stats = fit_oracle(adata, tf_targets, split, expression=rna["expression"], threads=1,
                                             **settings)
    return Fitted(oracle, links, model, stats, adata, tf_targets, truth)


@pytest.fixture(scope="session")
def paul15_fitted() -> Fitted:
    """Real Paul15 subset (2,660 cells x 240 genes, raw counts) + CellOracle's mm10 promoter base GRN (~35 s)."""
    h5ad = shared_path("paul15_subset", "paul15_subset.h5ad")
    grn = shared_path(*MM10_PROMOTER_GRN)
    return fit_chain({"path": str(h5ad), "format": "h5ad", "expression": "counts",
                      "cell_type": {"obs_column": "cell_type"}},
                     {"source": "tfinfo", "path": str(grn)})


@pytest.fixture(scope="session")
def demo_fitted(tmp_path_factory) -> Fitted:
    """Synthetic atlas (1,000 cells x 200 genes, planted network) written to files as the demo_data rule does,
    then the same chain; ``truth`` holds the planted and decoy edges."""
    from cellrl.synthetic import load_truth, write_demo_dataset

    from cellrl.config import dataset_config, load_config

    d = tmp_path_factory.mktemp("demo_fixture")
    write_demo_dataset(d / "counts.h5ad", d / "base_grn_tfinfo.parquet", d / "truth.json", **DEMO_FIXTURE_SIZE)
    # the demo dataset's link density (config: datasets.demo.overrides.oracle.top_n_links per demo gene)
    cfg = load_config()
    per_gene = dataset_config(cfg, "demo")["oracle"]["top_n_links"] / cfg["demo_data"]["n_genes"]
    top_n = int(round(per_gene * DEMO_FIXTURE_SIZE["n_genes"]))
    return fit_chain({"path": str(d / "counts.h5ad"), "format": "h5ad", "expression": "counts",
                      "cell_type": {"obs_column": "cell_type"}},
                     {"source": "tfinfo", "path": str(d / "base_grn_tfinfo.parquet")},
                     oracle_settings={"top_n_links": top_n}, truth=load_truth(d / "truth.json"))
