"""Filter: the filtered.h5ad contract, HVG + regulators, stratified cap, Leiden fallback, real data, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellrl.errors import InputError
from cellrl.preprocess import filter_adata, filter_file, stratified_cap
from cellrl.synthetic import generate_atlas
from conftest import shared_path

FAST = dict(min_counts=1, min_genes=1, min_cells_per_gene=3, max_cells=30000, keep_regulators=True, n_pcs=20,
            n_neighbors=15, leiden_resolution=1.0, seed=0)


@pytest.fixture(scope="module")
def atlas():
    adata, tfinfo, truth = generate_atlas(n_cells=600, n_genes=150, n_master_tfs=6, n_other_tfs=8,
                                          n_cell_types=6, decoy_edges_per_tf=5, seed=11)
    return adata, list(tfinfo.columns[2:]), truth


@pytest.fixture(scope="module")
def filtered(atlas):
    adata, tfs, _ = atlas
    return filter_adata(adata, set(tfs) | {"NotInData"}, expression="counts", n_top_genes=60, **FAST)


def test_output_contract(atlas, filtered):
    import scipy.sparse as sp

    raw = atlas[0]
    f = filtered
    assert f.n_obs == raw.n_obs
    counts = f.layers["counts"].toarray()
    np.testing.assert_array_equal(counts, raw[f.obs_names, f.var_names].X.toarray())
    norm = f.layers["normalized"].toarray()
    np.testing.assert_allclose(norm.sum(1), np.median(counts.sum(1)), rtol=1e-4)
    np.testing.assert_allclose(f.X.toarray(), np.log1p(norm), rtol=1e-5, atol=1e-6)
    assert sp.issparse(f.X)
    assert isinstance(f.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert f.obs["cell_type"].astype(str).equals(raw.obs.loc[f.obs_names, "cell_type"].astype(str))
    assert f.obsm["X_pca"].shape == (f.n_obs, 20) and f.obsm["X_umap"].shape == (f.n_obs, 2)
    u = f.uns["cellrl"]
    assert u["expression"] == "counts" and u["filter"]["n_top_genes"] == 60 and u["filter"]["seed"] == 0
    assert "pearson_residuals" in u["hvg_method"]


def test_genes_are_hvgs_plus_expressed_regulators(atlas, filtered):
    _, tfs, _ = atlas
    f = filtered
    assert f.var["highly_variable"].sum() == 60
    assert f.n_vars == 60 + f.var["kept_regulator"].sum()
    assert set(tfs) <= set(f.var_names), "every expressed base-GRN regulator is kept"
    assert f.var.loc[tfs, "regulator"].all() and "NotInData" not in f.var_names


def test_without_keep_regulators(atlas):
    adata, tfs, _ = atlas
    f = filter_adata(adata, set(tfs), n_top_genes=30, **{**FAST, "keep_regulators": False, "n_pcs": 5})
    assert f.n_vars == 30 and f.var["highly_variable"].all()


def test_stratified_cap_keeps_proportions_and_is_seeded():
    labels = np.array(["a"] * 700 + ["b"] * 250 + ["c"] * 48 + ["d"] * 2)
    idx = stratified_cap(labels, len(labels), 100, seed=1)
    assert len(idx) == 100 and np.all(np.diff(idx) > 0)
    got = pd.Series(labels[idx]).value_counts().to_dict()
    assert got["a"] in (69, 70, 71) and got["b"] in (24, 25, 26) and got["c"] in (4, 5, 6) and got["d"] >= 1
    assert np.array_equal(idx, stratified_cap(labels, len(labels), 100, seed=1))
    assert not np.array_equal(idx, stratified_cap(labels, len(labels), 100, seed=2))
    assert np.array_equal(stratified_cap(labels, len(labels), 5000, seed=1), np.arange(len(labels)))


def test_cap_and_leiden_when_no_cell_types(atlas):
    adata, tfs, _ = atlas
    a = adata.copy()
    del a.obs["cell_type"]
    f = filter_adata(a, set(tfs), n_top_genes=80, **{**FAST, "max_cells": 300, "n_pcs": 10})
    assert f.n_obs == 300
    assert f.obs["cell_type"].str.match(r"^C\d+$").all() and f.obs["cell_type"].nunique() >= 3
    assert f.uns["cellrl"]["cell_type_source"].startswith("leiden")


def test_seeded_embedding_is_reproducible(atlas):
    adata, tfs, _ = atlas
    small = adata[:200].copy()
    kw = dict(n_top_genes=50, **{**FAST, "n_pcs": 10})
    f1, f2 = filter_adata(small, set(tfs), **kw), filter_adata(small, set(tfs), **kw)
    np.testing.assert_array_equal(f1.obsm["X_umap"], f2.obsm["X_umap"])


def _paul15_raw():
    from cellrl.ingest import read_rna

    p = shared_path("paul15_subset", "paul15_subset.h5ad")
    return read_rna({"path": str(p), "format": "h5ad", "expression": "counts",
                     "cell_type": {"obs_column": "cell_type"}})


def test_filter_file_on_real_paul15(tmp_path):
    """Real counts through filter_file with a hand-made long base-GRN table (tf, target, source)."""
    import anndata as ad

    raw = _paul15_raw()
    raw.write_h5ad(tmp_path / "raw.h5ad")
    tfs = ["Klf1", "Irf8", "Myb", "Myc", "Atf4", "Csda", "Trim28", "Ybx1", "Gata1", "Spi1"]
    pd.DataFrame({"tf": tfs, "target": ["Actb"] * len(tfs), "source": "test"}).to_parquet(tmp_path / "grn.parquet")
    out = tmp_path / "rna" / "filtered.h5ad"
    filter_file(tmp_path / "raw.h5ad", tmp_path / "grn.parquet", out, "counts", n_top_genes=150, **FAST)
    f = ad.read_h5ad(out)
    present = [t for t in tfs if t in raw.var_names]
    assert set(present) <= set(f.var_names) and len(present) >= 8
    assert f.var["highly_variable"].sum() == 150 and f.n_vars <= 150 + len(present)
    assert f.obs["cell_type"].nunique() == 7 and f.obsm["X_umap"].shape == (2660, 2)
    assert {"counts", "normalized"} <= set(f.layers)


def test_filter_real_mesc_lognorm():
    from cellrl.ingest import read_rna

    p = shared_path("mesc_hayashi2018", "ExpressionData.csv")
    raw = read_rna({"path": str(p), "format": "csv", "expression": "lognorm", "genes_as_rows": True,
                    "cell_type": {"from_name_regex": r"_(\d+h)_"}})
    regs = {"Pou5f1", "Nanog", "Sox2", "Esrrb", "Gata4", "Sox17", "Klf2"}
    f = filter_adata(raw, regs, expression="lognorm", n_top_genes=200, **FAST)
    assert "seurat" in f.uns["cellrl"]["hvg_method"]
    assert regs <= set(f.var_names) and f.var["highly_variable"].sum() == 200
    X = f.X.toarray()
    np.testing.assert_allclose(X, raw[f.obs_names, f.var_names].X.toarray(), rtol=1e-6)  # log values as given
    np.testing.assert_allclose(f.layers["counts"].toarray(), np.expm1(X), rtol=1e-5)
    assert f.obs["cell_type"].nunique() == 5


# ------------------------------------------------------------------------------------------------------------
# bad input: clear error, no output file
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def small_files(tmp_path, atlas):
    adata, tfs, _ = atlas
    adata[:100].copy().write_h5ad(tmp_path / "raw.h5ad")
    pd.DataFrame({"tf": tfs, "target": "Gene0001", "source": "t"}).to_parquet(tmp_path / "grn.parquet")
    return tmp_path


def _no_output(out):
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))


def test_missing_raw_or_grn(small_files):
    out = small_files / "o" / "filtered.h5ad"
    with pytest.raises(InputError, match="raw.h5ad not found") as ei:
        filter_file(small_files / "none.h5ad", small_files / "grn.parquet", out, "counts", **FAST)
    assert "fix:" in str(ei.value)
    with pytest.raises(InputError, match="base GRN table not found"):
        filter_file(small_files / "raw.h5ad", small_files / "none.parquet", out, "counts", **FAST)
    pd.DataFrame({"regulator": ["Tf01"]}).to_parquet(small_files / "bad.parquet")
    with pytest.raises(InputError, match="column 'tf'"):
        filter_file(small_files / "raw.h5ad", small_files / "bad.parquet", out, "counts", **FAST)
    _no_output(out)


def test_expression_mismatch_with_ingest(small_files):
    import anndata as ad

    a = ad.read_h5ad(small_files / "raw.h5ad")
    a.uns["cellrl"] = {"expression": "counts"}
    a.write_h5ad(small_files / "raw.h5ad")
    out = small_files / "o" / "filtered.h5ad"
    with pytest.raises(InputError, match="ingested as 'counts' but the config now says 'lognorm'"):
        filter_file(small_files / "raw.h5ad", small_files / "grn.parquet", out, "lognorm", **FAST)
    _no_output(out)


def test_qc_removing_everything(small_files):
    out = small_files / "o" / "filtered.h5ad"
    with pytest.raises(InputError, match="QC removed every cell") as ei:
        filter_file(small_files / "raw.h5ad", small_files / "grn.parquet", out, "counts",
                    **{**FAST, "min_counts": 1e9})
    assert "filter.min_genes / filter.min_counts" in str(ei.value)
    _no_output(out)
