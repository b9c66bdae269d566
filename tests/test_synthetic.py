"""The synthetic demo atlas: shapes, formats, ground truth, determinism, planted biology, scale."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellrl.errors import ConfigError
from cellrl.synthetic import generate_atlas, write_demo_dataset

SMALL = dict(n_cells=600, n_genes=150, n_master_tfs=6, n_other_tfs=8, n_cell_types=6, frac_transit=0.3,
             decoy_edges_per_tf=10, seed=3)


@pytest.fixture(scope="module")
def atlas():
    return generate_atlas(**SMALL)


def test_counts_shape_names_and_labels(atlas):
    adata, _, truth = atlas
    assert adata.shape == (600, 150)
    assert sp.isspmatrix_csr(adata.X)
    d = adata.X.data
    assert (d >= 0).all() and np.array_equal(d, np.round(d)), "UMI counts must be non-negative integers"
    assert all(re.fullmatch(r"Tf\d{2}", g) for g in adata.var_names[:14])
    assert all(re.fullmatch(r"Gene\d{4}", g) for g in adata.var_names[14:])
    assert adata.var["is_master"].sum() == 6 and adata.var["is_tf"].sum() == 14
    types = truth["cell_types"]
    assert 5 <= len(types) <= 8 and set(adata.obs["cell_type"].astype(str)) == set(types)
    # cells lie along the differentiation paths too, labelled by the nearer end
    transit = adata.obs["trajectory"].str.contains("->")
    assert abs(transit.mean() - 0.3) < 0.02
    for traj, t, lab in adata.obs.loc[transit, ["trajectory", "t", "cell_type"]].itertuples(index=False):
        parent, child = traj.split("->")
        assert lab == (parent if t < 0.5 else child)
    assert len(truth["lineage_tree"]) == len(types) - 1


def test_tfinfo_holds_planted_and_decoy_edges(atlas):
    _, tfinfo, truth = atlas
    assert list(tfinfo.columns[:2]) == ["peak_id", "gene_short_name"]
    tf_cols = list(tfinfo.columns[2:])
    assert tf_cols == truth["master_tfs"] + truth["other_tfs"]
    assert set(np.unique(tfinfo[tf_cols].to_numpy())) <= {0, 1}
    long = tfinfo.melt(id_vars=["peak_id", "gene_short_name"], var_name="tf")
    edges = set(map(tuple, long.loc[long.value == 1, ["tf", "gene_short_name"]].to_numpy()))
    planted = {(e["tf"], e["target"]) for e in truth["planted_edges"]}
    decoys = {(e["tf"], e["target"]) for e in truth["decoy_edges"]}
    assert planted <= edges and decoys <= edges and edges == planted | decoys
    assert not planted & decoys
    per_tf = pd.Series([t for t, _ in decoys]).value_counts()
    assert (per_tf == SMALL["decoy_edges_per_tf"]).all() and len(per_tf) == len(tf_cols)
    assert all(t != g for t, g in edges), "no self-loops"


def test_truth_reprogramming_structure(atlas):
    _, _, truth = atlas
    types, state = truth["cell_types"], truth["master_state"]
    assert len({tuple(v.values()) for v in state.values()}) == len(types), "codes are unique"
    pairs = {(r["start"], r["target"]): r for r in truth["reprogramming"]}
    assert len(pairs) == len(types) * (len(types) - 1)
    for (a, b), r in pairs.items():
        assert set(r["knockout"]) == {m for m, on in state[a].items() if on and not state[b][m]}
        assert set(r["overexpress"]) == {m for m, on in state[b].items() if on and not state[a][m]}
        assert r["n_changes"] >= 1
    kinds = {e["kind"] for e in truth["planted_edges"]}
    assert {"master_cross_repression", "master_to_target", "master_to_tf", "tf_to_target"} <= kinds
    json.dumps(truth)  # serialisable


def test_masters_define_types_and_drive_markers(atlas):
    adata, _, truth = atlas
    X = adata.X.toarray()
    lib = X.sum(1, keepdims=True)
    L = np.log1p(X / lib * np.median(lib))
    g = {n: i for i, n in enumerate(adata.var_names)}
    types = adata.obs["cell_type"].astype(str).to_numpy()
    for t, masters in truth["type_masters"].items():
        for m in masters:
            inside, outside = L[types == t, g[m]].mean(), L[types != t, g[m]].mean()
            assert inside > outside + 0.5, f"{m} should be high in {t}"
    # a master's activated markers follow it across cells
    cors = []
    for e in truth["planted_edges"]:
        if e["kind"] == "master_to_target" and e["sign"] > 0:
            cors.append(np.corrcoef(L[:, g[e["tf"]]], L[:, g[e["target"]]])[0, 1])
    assert np.median(cors) > 0.5


def test_ridge_recovers_planted_edges_better_than_decoys(atlas):
    """Within each type, a ridge fit of each target on its base-GRN regulators (what CellOracle does) gives
    planted edges much larger coefficients than decoys."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import roc_auc_score

    adata, tfinfo, truth = atlas
    X = adata.X.toarray()
    lib = X.sum(1, keepdims=True)
    L = np.log1p(X / lib * np.median(lib))
    g = {n: i for i, n in enumerate(adata.var_names)}
    planted = {(e["tf"], e["target"]) for e in truth["planted_edges"]}
    tf_cols = list(tfinfo.columns[2:])
    types = adata.obs["cell_type"].astype(str).to_numpy()
    scores, labels = [], []
    for t in np.unique(types):
        Lt = L[types == t]
        Z = (Lt - Lt.mean(0)) / (Lt.std(0) + 1e-9)
        for _, row in tfinfo.iterrows():
            regs = [r for r in tf_cols if row[r] and r != row.gene_short_name]
            if not regs:
                continue
            coef = Ridge(alpha=10).fit(Z[:, [g[r] for r in regs]], Lt[:, g[row.gene_short_name]]).coef_
            scores += list(np.abs(coef))
            labels += [(r, row.gene_short_name) in planted for r in regs]
    assert roc_auc_score(labels, scores) > 0.75


def test_deterministic_given_seed():
    kw = dict(SMALL, n_cells=200, n_genes=60, n_other_tfs=4)
    a1, t1, r1 = generate_atlas(**kw)
    a2, t2, r2 = generate_atlas(**kw)
    assert (a1.X != a2.X).nnz == 0
    assert a1.obs.equals(a2.obs) and t1.equals(t2) and r1 == r2
    a3, _, _ = generate_atlas(**dict(kw, seed=kw["seed"] + 1))
    assert (a1.X != a3.X).nnz > 0


def test_write_demo_dataset(tmp_path):
    import anndata as ad

    kw = dict(SMALL, n_cells=200, n_genes=60, n_other_tfs=4)
    paths = [tmp_path / "d" / "counts.h5ad", tmp_path / "d" / "tfinfo.parquet", tmp_path / "d" / "truth.json"]
    write_demo_dataset(*paths, **kw)
    a = ad.read_h5ad(paths[0])
    assert a.shape == (200, 60) and "cell_type" in a.obs
    tf = pd.read_parquet(paths[1])
    assert list(tf.columns[:2]) == ["peak_id", "gene_short_name"]
    truth = json.loads(paths[2].read_text())
    assert truth["settings"]["seed"] == kw["seed"]
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(p.name for p in paths)  # no temp files


@pytest.mark.parametrize("bad, msg", [
    (dict(n_master_tfs=3, n_cell_types=5), "n_master_tfs"),
    (dict(n_genes=20), "n_genes"),
    (dict(n_cells=30), "n_cells"),
])
def test_bad_settings_raise_config_error(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        generate_atlas(**dict(SMALL, **bad))


def test_unknown_setting_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="unknown settings"):
        write_demo_dataset(tmp_path / "c.h5ad", tmp_path / "t.parquet", tmp_path / "g.json", n_cell=10)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_benchmark_scale_30k_cells_3k_genes():
    """Benchmark size: ~8 s and ~1 GiB peak on an idle 2-core machine (bounds leave room for a loaded CI)."""
    import tracemalloc

    tracemalloc.start()
    t0 = time.time()
    try:
        adata, tfinfo, truth = generate_atlas(n_cells=30000, n_genes=3000, n_master_tfs=8, n_other_tfs=92,
                                              n_cell_types=8, decoy_edges_per_tf=50, seed=1)
        elapsed = time.time() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert adata.shape == (30000, 3000) and tfinfo.shape[1] == 102 and len(truth["cell_types"]) == 8
    assert elapsed < 120, f"generation took {elapsed:.1f} s"
    assert peak < 4 * 2**30, f"peak memory {peak / 2**30:.2f} GiB"
