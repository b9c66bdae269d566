"""fit_oracle with real CellOracle: real data (Paul15, mESC), planted-edge recovery on the demo atlas,
the portable model.npz, the rule's file wrapper and its errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import MM10_PROMOTER_GRN, fit_chain, shared_path

from cellrl.errors import ConfigError, InputError
from cellrl.io import sha256_file
from cellrl.model import load_model
from cellrl.oracle import (MAX_PSEUDO_MEAN, _pseudo_counts, check_overlap, choose_n_pcs, fit_oracle_files,
                           model_from_oracle, oe_values)


# ---------------------------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------------------------
def _check_model_matches_oracle(fitted) -> None:
    """model.npz content == the CellOracle objects it was made from."""
    o, m = fitted.oracle, fitted.model
    assert list(m.cell_names) == list(o.adata.obs_names) and list(m.gene_names) == list(o.adata.var_names)
    np.testing.assert_array_equal(m.X, o.adata.layers["imputed_count"])
    np.testing.assert_array_equal(m.embedding, o.embedding)
    assert list(m.regulators) == sorted(o.active_regulatory_genes)
    assert set(m.cluster_names) == set(o.coef_matrix_per_cluster)
    for k, c in enumerate(m.cluster_names):
        ref = o.coef_matrix_per_cluster[c].loc[m.gene_names, m.gene_names].to_numpy()
        np.testing.assert_array_equal(m.coefs[k].toarray(), ref)
        assert (m.cell_types[m.cluster_ids == k] == c).all()
    # active regulators are exactly the genes with a non-zero outgoing coefficient in some cluster
    out = sum(abs(c) for c in m.coefs).toarray()
    np.fill_diagonal(out, 0)
    assert set(m.gene_names[out.sum(1) > 0]) == set(m.regulators)
    assert (m.ko_values == 0).all() and (m.oe_values >= 0).all()
    # the configured overexpression value (default max: each regulator's highest imputed expression)
    assert m.meta["oe_value"] == "max"
    np.testing.assert_array_equal(m.oe_values, np.maximum(m.X[:, m.regulator_idx].max(axis=0), 0))
    assert set(np.unique(m.split)) <= {"train", "val", "test"}
    m.validate()


@pytest.mark.slow
def test_paul15_real_counts_mm10(paul15_fitted):
    f = paul15_fitted
    regs = list(f.model.regulators)
    print(f"\nPaul15: {f.model.n_cells} cells x {f.model.n_genes} genes, {len(regs)} active regulators: {regs}; "
          f"timings {f.stats['timings_s']}")
    assert len(regs) >= 5
    assert {"Klf1", "Irf8", "Myb"} <= set(regs)        # erythroid / myeloid regulators of this data
    assert f.model.n_cells == 2660 and len(f.model.cluster_names) == 7
    assert f.stats["active_regulators"] == regs
    _check_model_matches_oracle(f)


@pytest.mark.slow
def test_mesc_real_lognorm_mm10():
    csv = shared_path("mesc_hayashi2018", "ExpressionData.csv")
    grn = shared_path(*MM10_PROMOTER_GRN)
    f = fit_chain({"path": str(csv), "format": "csv", "expression": "lognorm", "genes_as_rows": True,
                   "cell_type": {"from_name_regex": r"_(\d+h)_"}},
                  {"source": "tfinfo", "path": str(grn)}, gene_symbols="capitalize")
    regs = list(f.model.regulators)
    print(f"\nmESC: {f.model.n_cells} cells x {f.model.n_genes} genes, types {list(f.model.cluster_names)}, "
          f"{len(regs)} active regulators: {regs}; raw_count scale {f.stats['params']['raw_count_scale']:.3g}; "
          f"timings {f.stats['timings_s']}")
    assert list(f.model.cluster_names) == ["00h", "12h", "24h", "48h", "72h"]
    assert len(regs) >= 15
    assert {"Pou5f1", "Nanog", "Sox2", "Gata4"} & set(regs)
    _check_model_matches_oracle(f)


# ---------------------------------------------------------------------------------------------------------------
# demo atlas: planted edges vs decoys
# ---------------------------------------------------------------------------------------------------------------
def edge_recovery(links, truth: dict, genes) -> dict:
    """Per cell type, the fraction of planted (tf, target) edges kept by filter_links and the same fraction
    for the decoy edges of the base GRN; means over cell types, and the union over cell types."""
    g = set(genes)
    planted = {(e["tf"], e["target"]) for e in truth["planted_edges"] if e["tf"] in g and e["target"] in g}
    decoy = {(e["tf"], e["target"]) for e in truth["decoy_edges"] if e["tf"] in g and e["target"] in g}
    per, union = {}, set()
    for c, df in links.filtered_links.items():
        kept = set(zip(df.source, df.target))
        union |= kept
        per[str(c)] = (len(planted & kept) / len(planted), len(decoy & kept) / len(decoy))
    return dict(n_planted=len(planted), n_decoy=len(decoy), per_type=per,
                recall=float(np.mean([v[0] for v in per.values()])),
                decoy_rate=float(np.mean([v[1] for v in per.values()])),
                union_recall=len(planted & union) / len(planted), union_decoy_rate=len(decoy & union) / len(decoy))


@pytest.mark.slow
def test_demo_recovers_planted_edges_better_than_decoys(demo_fitted):
    f = demo_fitted
    r = edge_recovery(f.links, f.truth, f.model.gene_names)
    print(f"\ndemo planted-edge recovery (filtered links, top {f.stats['params']['top_n_links']} per type): "
          f"{json.dumps(r, indent=1)}")
    assert set(f.model.regulators) >= set(f.truth["master_tfs"])
    assert f.stats["params"]["top_n_links"] == 150
    assert r["recall"] >= 0.45
    assert r["recall"] >= 4 * r["decoy_rate"]


@pytest.mark.slow
def test_demo_model_npz_roundtrip(demo_fitted, tmp_path):
    _check_model_matches_oracle(demo_fitted)
    p = demo_fitted.model.save(tmp_path / "model.npz")
    m = load_model(p)
    a = demo_fitted.model
    for k in ("X", "embedding", "cell_names", "gene_names", "cell_types", "cluster_names", "cluster_ids",
              "regulators", "regulator_idx", "ko_values", "oe_values", "split"):
        np.testing.assert_array_equal(getattr(m, k), getattr(a, k))
    for x, y in zip(m.coefs, a.coefs):
        assert (x != y).nnz == 0
    assert m.meta["oracle"]["alpha"] == 10 and m.meta["oe_sd"] == 1.5
    assert m.meta["oracle"]["oe_value"] == "max" and "oe_sd" not in m.meta["oracle"]  # stats.json params, the report


@pytest.mark.slow
def test_model_from_oracle_split_forms(demo_fitted):
    o, m = demo_fitted.oracle, demo_fitted.model
    df = pd.DataFrame({"cell": m.cell_names[::-1], "split": m.split[::-1]})   # order does not matter
    m2 = model_from_oracle(o, df, oe_sd=2.0, oe_iqr=1.5, oe_value="reference")
    np.testing.assert_array_equal(m2.split, m.split)
    np.testing.assert_allclose(m2.oe_values, oe_values(m.X[:, m.regulator_idx], 2.0, 1.5))
    assert m2.meta["oe_value"] == "reference" and m2.meta["oe_sd"] == 2.0
    with pytest.raises(InputError, match="have no split"):
        model_from_oracle(o, df.iloc[1:])


# ---------------------------------------------------------------------------------------------------------------
# units
# ---------------------------------------------------------------------------------------------------------------
def test_oe_values_rule():
    x = np.array([0, 1, 1, 2, 2, 2, 3, 3, 4, 100.0])      # 100 is outside Q3 + 3 IQR
    kept = x[:-1]
    assert oe_values(x[:, None], 1.5, 3.0)[0] == pytest.approx(kept.mean() + 1.5 * kept.std(ddof=1))
    assert oe_values(np.zeros((5, 1)))[0] == 0.0
    assert oe_values(-np.ones((5, 1)))[0] == 0.0         # floored at 0
    assert oe_values(x[:, None], method="max")[0] == 100.0 and oe_values(-np.ones((5, 1)), method="max")[0] == 0.0
    with pytest.raises(ConfigError, match="oracle.oe_value"):
        oe_values(x[:, None], method="mean")


def test_reference_oe_value_sets_a_type_restricted_tf_below_its_own_type():
    """A TF on (~2.0) in one cell type of six and off (~0.3) elsewhere: the reference rule's IQR cut drops the
    whole 'on' type as outliers, so its 'overexpression' lies below that type's own level (a knock-down there);
    max does not."""
    rng = np.random.default_rng(0)
    on = np.r_[rng.normal(2.0, 0.2, 100), rng.normal(0.3, 0.05, 500)].clip(0)[:, None]
    ref, top = oe_values(on, 1.5, 3.0, "reference")[0], oe_values(on, method="max")[0]
    assert ref < 0.6 < on[:100].mean() < top


def test_choose_n_pcs_is_the_tutorial_elbow():
    r = np.array([0.3, 0.2, 0.1, 0.05, 0.01, 0.004, 0.003, 0.001, 0.001, 0.001])
    assert choose_n_pcs(r) == int(np.where(np.diff(np.diff(np.cumsum(r)) > 0.002))[0][0]) == 5
    assert choose_n_pcs(np.full(80, 1 / 80)) == 50


def test_pseudo_counts_are_scaled_to_a_max_gene_mean_of_30():
    import anndata as ad

    X = np.log1p(np.array([[1000.0, 1], [3000, 3]]))
    a = ad.AnnData(X=X)
    pc, scale = _pseudo_counts(a, "lognorm")
    assert pc.mean(0).max() == pytest.approx(MAX_PSEUDO_MEAN) and scale == pytest.approx(30 / 2000)
    a.layers["normalized"] = np.array([[1.0, 2], [3, 4]])
    pc, scale = _pseudo_counts(a, "counts")
    assert scale == 1.0 and (pc == a.layers["normalized"]).all()


def test_overlap_error_names_both_sources_and_the_fix():
    with pytest.raises(InputError) as e:
        check_overlap(["GATA1", "SPI1"], {"Gata1": ["Klf1"]}, "rna/filtered.h5ad", "grn/tf_targets.json")
    msg = str(e.value)
    assert "rna/filtered.h5ad" in msg and "grn/tf_targets.json" in msg and "ingest.gene_symbols" in msg


# ---------------------------------------------------------------------------------------------------------------
# the rule's file wrapper
# ---------------------------------------------------------------------------------------------------------------
def _write_inputs(d, n_cells=300, n_genes=40, tf_case=str):
    """A tiny demo atlas through ingest -> filter -> split, written as the rule's inputs."""
    from cellrl.grn import build_base_grn, tf_targets_dict
    from cellrl.ingest import read_rna
    from cellrl.io import write_h5ad, write_json
    from cellrl.preprocess import filter_adata
    from cellrl.split import split_cells
    from cellrl.synthetic import write_demo_dataset

    write_demo_dataset(d / "counts.h5ad", d / "tfinfo.parquet", d / "truth.json", n_cells=n_cells,
                       n_genes=n_genes, n_master_tfs=3, n_other_tfs=3, n_cell_types=3, seed=1)
    raw = read_rna({"path": str(d / "counts.h5ad"), "format": "h5ad", "expression": "counts",
                    "cell_type": {"obs_column": "cell_type"}})
    grn = build_base_grn({"source": "tfinfo", "path": str(d / "tfinfo.parquet")})
    ad_ = filter_adata(raw, regulators=set(grn.tf), n_pcs=10, n_neighbors=10)
    write_h5ad(d / "filtered.h5ad", ad_)
    split_cells(pd.Series(ad_.obs["cell_type"].astype(str).to_numpy(), index=ad_.obs_names)).to_csv(
        d / "split.tsv", sep="\t", index=False)
    write_json(d / "tf_targets.json", {tf_case(k): v for k, v in tf_targets_dict(grn).items()})
    return d / "filtered.h5ad", d / "tf_targets.json", d / "split.tsv"


def _outputs(d, name="oracle"):
    o = d / name
    return dict(oracle_path=o / "oracle.celloracle.oracle", links_path=o / "links.celloracle.links",
                model_path=o / "model.npz", stats_path=o / "stats.json")


FIT_SETTINGS = dict(dataset="tiny", expression="counts", threads=1, bagging_number=5, knn_k_fraction=0.05)
FIT_IN_SUBPROCESS = """
import sys
from cellrl.oracle import fit_oracle_files
a, t, s, out = sys.argv[1:5]
fit_oracle_files(a, t, s, oracle_path=f"{out}/oracle.celloracle.oracle", links_path=f"{out}/links.celloracle.links",
                 model_path=f"{out}/model.npz", stats_path=f"{out}/stats.json", **%r)
""" % FIT_SETTINGS


@pytest.mark.slow
def test_fit_oracle_files_outputs_load_and_are_reproducible_across_processes(tmp_path):
    """The rule's wrapper here and in a fresh process with another string-hash seed: loadable, identical
    outputs (stock CellOracle's get_links depends on the hash seed; see cellrl.oracle.reproducible_celloracle)."""
    import os
    import subprocess
    import sys

    import celloracle as co

    adata, tft, split = _write_inputs(tmp_path)
    outs = _outputs(tmp_path, "here")
    stats = fit_oracle_files(adata, tft, split, **FIT_SETTINGS, **outs)
    m = load_model(outs["model_path"])
    assert m.meta["dataset"] == "tiny" and m.n_regulators == stats["n_active_regulators"] > 0
    assert json.loads(outs["stats_path"].read_text())["active_regulators"] == list(m.regulators)
    assert json.loads(outs["stats_path"].read_text())["model_sha256"] == sha256_file(outs["model_path"])
    oracle = co.load_hdf5(str(outs["oracle_path"]))
    np.testing.assert_array_equal(oracle.adata.layers["imputed_count"], m.X)
    links = co.load_hdf5(str(outs["links_path"]))
    assert set(links.filtered_links) == set(m.cluster_names)
    assert not [p for p in outs["model_path"].parent.iterdir() if p.name.startswith(".")]   # no temp files

    seed = "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "54321"
    subprocess.run([sys.executable, "-c", FIT_IN_SUBPROCESS, str(adata), str(tft), str(split),
                    str(tmp_path / "there")], env=dict(os.environ, PYTHONHASHSEED=seed), check=True,
                   capture_output=True)
    m2 = load_model(_outputs(tmp_path, "there")["model_path"])
    for a, b in zip(m.coefs, m2.coefs):
        assert (a != b).nnz == 0
    np.testing.assert_array_equal(m.X, m2.X)
    np.testing.assert_array_equal(m.oe_values, m2.oe_values)


def test_reproducible_celloracle_patches_and_restores_intersect():
    import celloracle.network.regression_models as rm
    from cellrl.oracle import reproducible_celloracle

    orig = rm.intersect
    with reproducible_celloracle():
        assert rm.intersect(["b", "a", "c", "b"], ["c", "b", "x"]) == ["b", "c"]
    assert rm.intersect is orig


def test_fit_oracle_files_errors_leave_no_output(tmp_path):
    adata, tft, split = _write_inputs(tmp_path, tf_case=str.upper)      # TF names in the wrong case
    outs = _outputs(tmp_path)
    with pytest.raises(InputError) as e:
        fit_oracle_files(adata, tft, split, expression="counts", **outs)
    msg = str(e.value)
    assert str(adata) in msg and str(tft) in msg and "ingest.gene_symbols" in msg
    with pytest.raises(InputError, match="TF -> targets file not found"):
        fit_oracle_files(adata, tmp_path / "missing.json", split, expression="counts", **outs)
    with pytest.raises(InputError, match="filtered expression file not found"):
        fit_oracle_files(tmp_path / "missing.h5ad", tft, split, expression="counts", **outs)
    assert not outs["model_path"].parent.exists()


def test_fit_oracle_files_regulator_list_without_overlap_is_an_error(tmp_path):
    """oracle.regulators drops base-GRN regulators before the fit; a list that keeps none stops with the fix."""
    adata, tft, split = _write_inputs(tmp_path)
    tfs = tmp_path / "tfs.txt"
    tfs.write_text("NotATf\n")
    outs = _outputs(tmp_path)
    with pytest.raises(InputError, match="oracle.regulators") as e:
        fit_oracle_files(adata, tft, split, expression="counts", regulators=tfs, **outs)
    assert str(tfs) in str(e.value)
    assert not outs["model_path"].parent.exists()


def test_per_cluster_jobs_give_the_single_job_fit(tmp_path):
    """The workflow's three steps (oracle_prepare -> one oracle_links job per cluster -> fit_oracle gather) give
    CellOracle get_links' own link lists for every cluster, and the same model.npz arrays and links as the
    one-process fit_oracle_files."""
    from cellrl.model import load_model
    from cellrl.oracle import cluster_links_file, fit_oracle_files, gather_oracle_files, prepare_oracle_files

    a, t, s = _write_inputs(tmp_path)
    settings = {k: v for k, v in FIT_SETTINGS.items() if k != "dataset"}
    single = _outputs(tmp_path, "single")
    fit_oracle_files(a, t, s, dataset="tiny", **single, **settings)
    d = tmp_path / "jobs"
    info = prepare_oracle_files(a, t, oracle_out=d / "prepared.celloracle.oracle", info_out=d / "clusters.json",
                                links_input_out=d / "links_input.npz", dataset="tiny", **settings)
    assert len(info["slugs"]) == 3 and all(re.fullmatch(r"\d{3}_[A-Za-z0-9_.-]+", k) for k in info["slugs"])
    files = [d / "links" / f"{slug}.parquet" for slug in sorted(info["slugs"], reverse=True)]  # any order
    for f in files:
        cluster_links_file(d / "links_input.npz", d / "clusters.json", f.stem, f, **settings)
    jobs = _outputs(tmp_path, "jobs_out")
    gather_oracle_files(d / "prepared.celloracle.oracle", d / "clusters.json", files, s,
                        final_oracle_path=jobs["oracle_path"], **{k: v for k, v in jobs.items() if k != "oracle_path"},
                        **settings)
    import celloracle as co

    l1, l2 = co.load_hdf5(str(single["links_path"])), co.load_hdf5(str(jobs["links_path"]))
    assert sorted(l1.links_dict) == sorted(l2.links_dict)
    for c in l1.links_dict:
        pd.testing.assert_frame_equal(l1.links_dict[c].reset_index(drop=True), l2.links_dict[c].reset_index(drop=True))
        pd.testing.assert_frame_equal(l1.filtered_links[c], l2.filtered_links[c])
    m1, m2 = load_model(single["model_path"]), load_model(jobs["model_path"])
    assert np.array_equal(m1.X, m2.X) and list(m1.regulators) == list(m2.regulators)
    assert np.array_equal(m1.oe_values, m2.oe_values)
    assert all((c1 != c2).nnz == 0 for c1, c2 in zip(m1.coefs, m2.coefs))
    s1, s2 = (json.loads(p["stats_path"].read_text()) for p in (single, jobs))
    assert s1["links_per_cluster"] == s2["links_per_cluster"] and s1["active_regulators"] == s2["active_regulators"]
    with pytest.raises(InputError, match="link lists missing"):
        gather_oracle_files(d / "prepared.celloracle.oracle", d / "clusters.json", files[:1], s,
                            final_oracle_path=tmp_path / "x" / "o.celloracle.oracle", links_path=tmp_path / "x" / "l",
                            model_path=tmp_path / "x" / "m.npz", stats_path=tmp_path / "x" / "s.json", **settings)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
