"""Fault probes: each degenerate input stops at the first stage that can see it, with the file, the field and the
fix, and leaves no output behind. One section per probe; small synthetic inputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from cellrl.config import DEFAULT_CONFIG, ROOT, config_layers, deep_merge, error_origin, validate_config
from cellrl.errors import ConfigError, InputError
from cellrl.ingest import ingest_file, normalise_symbols, read_rna

GENES = ["Pou5f1", "Nanog", "Sox2", "Gata4", "Actb", "Klf4"]


def _counts(n_cells: int = 8, n_genes: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(3, (n_cells, n_genes)).astype(float) + 1


def _no_output(out) -> None:
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir())), "no output left"


def _ingest_fails(tmp_path, rna, match, dataset=None):
    out = tmp_path / "out" / "raw.h5ad"
    with pytest.raises(InputError, match=match) as ei:
        ingest_file(rna, out, dataset=dataset)
    _no_output(out)
    return ei.value


# ---------------------------------------------------------------------------------------------------------------
# 1. zero active regulators: fit_oracle stops before writing; transitions / bfs refuse such a model
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fit_oracle_with_zero_active_regulators_stops_without_output(tmp_path):
    from test_fit_oracle import _outputs, _write_inputs

    from cellrl.oracle import fit_oracle_files

    adata, tft, split = _write_inputs(tmp_path)
    outs = _outputs(tmp_path)
    with pytest.raises(InputError, match="0 active regulators") as ei:  # no link survives p < 1e-300
        fit_oracle_files(adata, tft, split, expression="counts", threads=1, bagging_number=5, knn_k_fraction=0.05,
                         p_cutoff=1e-300, progress=False, dataset="tiny", **outs)
    e = ei.value
    assert e.path == tft and e.field == "oracle.p_cutoff / oracle.top_n_links"
    assert "datasets.tiny.base_grn" in e.fix and "oracle.top_n_links" in e.fix
    assert not outs["model_path"].parent.exists()


def test_check_active_regulators_names_links_settings_and_base_grn():
    from types import SimpleNamespace

    from cellrl.oracle import check_active_regulators

    links = SimpleNamespace(links_dict={"A": [1, 2], "B": [1]}, filtered_links={"A": [], "B": []})
    with pytest.raises(InputError) as ei:
        check_active_regulators(SimpleNamespace(active_regulatory_genes=[]), links, "grn/tf_targets.json",
                                0.001, 300, "demo")
    msg = str(ei.value)
    assert "grn/tf_targets.json" in msg and "{'A': 2, 'B': 1}" in msg and "kept: {'A': 0, 'B': 0}" in msg
    assert "oracle.p_cutoff" in msg and "datasets.demo.base_grn" in msg
    check_active_regulators(SimpleNamespace(active_regulatory_genes=["Gata1"]), links)  # fine


@pytest.fixture()
def zero_regulator_model(tmp_path):
    from cellrl.model import random_model

    m = random_model(n_cells=60, n_genes=10, n_types=3, n_regulators=2, seed=0)
    m = dataclasses.replace(m, regulators=np.array([], dtype=str), regulator_idx=np.zeros(0, np.int64),
                            ko_values=np.zeros(0), oe_values=np.zeros(0))
    return m.save(tmp_path / "oracle" / "model.npz")


def test_transitions_and_bfs_refuse_a_model_without_regulators(zero_regulator_model, tmp_path):
    from cellrl.bfs import bfs_file, check_table
    from cellrl.transitions import transitions_files

    t = tmp_path / "transitions"
    with pytest.raises(InputError, match="0 active regulators") as ei:
        transitions_files(zero_regulator_model, t / "table.npy", t / "actions.tsv", t / "stats.json")
    assert str(zero_regulator_model) in str(ei.value) and "fit_oracle" in str(ei.value)
    assert not t.exists()
    np.save(tmp_path / "table.npy", np.zeros((60, 0), np.int32))
    with pytest.raises(InputError, match="0 active regulators"):
        bfs_file(zero_regulator_model, tmp_path / "table.npy", tmp_path / "benchmark" / "bfs.parquet")
    assert not (tmp_path / "benchmark").exists()
    with pytest.raises(InputError, match="0 actions"):
        check_table(np.zeros((60, 0), np.int32))


# ---------------------------------------------------------------------------------------------------------------
# 2. a single cell type: ingest (given labels), filter (Leiden), split (hand-made input)
# ---------------------------------------------------------------------------------------------------------------
def test_single_cell_type_stops_at_ingest(tmp_path):
    import anndata as ad

    cells = [f"cell{i:03d}" for i in range(8)]
    ad.AnnData(X=sp.csr_matrix(_counts()), obs=pd.DataFrame({"ct": ["Stem"] * 8}, index=cells),
               var=pd.DataFrame(index=GENES)).write_h5ad(tmp_path / "in.h5ad")
    e = _ingest_fails(tmp_path, {"path": str(tmp_path / "in.h5ad"), "format": "h5ad", "expression": "counts",
                                 "cell_type": {"obs_column": "ct"}}, "same cell type", dataset="mini")
    assert e.field == "datasets.mini.rna.cell_type.obs_column" and "'Stem'" in str(e)
    assert "Leiden" in e.fix and str(tmp_path / "in.h5ad") in str(e)


def test_single_leiden_cluster_stops_at_filter(tmp_path):
    from cellrl.preprocess import filter_adata
    from cellrl.synthetic import generate_atlas

    adata, _, _ = generate_atlas(n_cells=120, n_genes=60, n_master_tfs=3, n_other_tfs=3, n_cell_types=3,
                                 decoy_edges_per_tf=2, seed=3)
    del adata.obs["cell_type"]
    with pytest.raises(InputError, match="single cluster") as ei:
        filter_adata(adata, n_pcs=5, n_neighbors=10, leiden_resolution=1e-6, source="raw.h5ad")
    assert ei.value.field == "filter.leiden_resolution" and "rna.cell_type" in ei.value.fix


def test_single_cell_type_after_qc_stops_at_filter():
    import anndata as ad

    from cellrl.preprocess import filter_adata

    X = _counts(10)
    X[5:, :] = 0
    X[5:, 0] = 1  # the B cells have 1 detected gene: min_genes=2 removes them all
    a = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame({"cell_type": ["A"] * 5 + ["B"] * 5},
                                                          index=[f"c{i}" for i in range(10)]),
                   var=pd.DataFrame(index=GENES))
    with pytest.raises(InputError, match="after QC every cell has the same cell type") as ei:
        filter_adata(a, min_genes=2, source="raw.h5ad")
    assert "rna.cell_type" in ei.value.field


def test_single_cell_type_stops_at_split(tmp_path):
    import anndata as ad

    from cellrl.split import split_file

    ad.AnnData(X=np.ones((4, 2)), obs=pd.DataFrame({"cell_type": ["A"] * 4},
                                                   index=list("abcd"))).write_h5ad(tmp_path / "f.h5ad")
    out = tmp_path / "o" / "split.tsv"
    with pytest.raises(InputError, match="same cell type"):
        split_file(tmp_path / "f.h5ad", out)
    _no_output(out)


# ---------------------------------------------------------------------------------------------------------------
# 3. a CSV read the wrong way round (rna.genes_as_rows)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cells", [[f"c{i}" for i in range(8)],                            # running numbers
                                   [f"RamDA_mESC_{h:02d}h_A{i:02d}" for i, h in enumerate([0, 12] * 4)],
                                   ["AAACCTGAGCATCATC-1", "AAACCTGCAGGTCCAC-1", "AAACGGGAGACTTGAA-1",
                                    "AAAGATGAGTCGATAA-1", "AAAGCAAGTACCGTTA-1", "AACACGTCAGTCAAGC-1",
                                    "AACCGCGTCCACGTTC-1", "AACTCAGAGTGCCATT-1"]])           # 10x barcodes
def test_transposed_csv_is_caught_at_ingest(tmp_path, cells):
    p = tmp_path / "m.csv"
    pd.DataFrame(_counts(), index=cells, columns=GENES).to_csv(p)  # rows are cells
    rna = {"path": str(p), "format": "csv", "expression": "counts"}
    e = _ingest_fails(tmp_path, dict(rna, genes_as_rows=True), "looks transposed", dataset="mesc")
    assert e.field == "datasets.mesc.rna.genes_as_rows" and "genes_as_rows: false" in e.fix
    assert str(p) in str(e)
    assert read_rna(dict(rna, genes_as_rows=False)).shape == (8, 6)  # the right orientation passes
    # the other way round: a genes x cells file read as cells x genes
    q = tmp_path / "t.csv"
    pd.DataFrame(_counts().T, index=GENES, columns=cells).to_csv(q)
    e = _ingest_fails(tmp_path, {"path": str(q), "format": "csv", "expression": "counts", "genes_as_rows": False},
                      "looks transposed")
    assert "genes_as_rows: true" in e.fix
    assert read_rna({"path": str(q), "format": "csv", "expression": "counts", "genes_as_rows": True}).shape == (8, 6)


def test_ensembl_ids_as_cells_look_transposed(tmp_path):
    p = tmp_path / "m.tsv"
    genes = [f"ENSMUSG{i:011d}" for i in range(6)]
    pd.DataFrame(_counts().T, index=genes, columns=[f"b{i}" for i in range(8)]).to_csv(p, sep="\t")
    _ingest_fails(tmp_path, {"path": str(p), "format": "tsv", "expression": "counts", "genes_as_rows": False},
                  "Ensembl gene IDs")


def test_transposed_matrix_is_caught_at_filter_by_the_base_grn(tmp_path):
    """What ingest's name heuristics cannot see, filter sees: the base GRN's TFs name the cells."""
    import anndata as ad

    from cellrl.preprocess import filter_adata

    a = ad.AnnData(X=sp.csr_matrix(_counts(6, 8)), obs=pd.DataFrame(index=GENES),
                   var=pd.DataFrame(index=[f"x{i}" for i in range(8)]))
    a.uns["cellrl"] = {"dataset": "mini"}
    with pytest.raises(InputError, match="transposed") as ei:
        filter_adata(a, {"Pou5f1", "Sox2", "Tbx3"}, source="results/mini/rna/raw.h5ad")
    assert ei.value.field == "datasets.mini.rna.genes_as_rows"


def test_real_and_demo_orientations_pass():
    from cellrl.ingest import transposed_reason
    from cellrl.synthetic import generate_atlas

    adata, _, _ = generate_atlas(n_cells=60, n_genes=40, n_master_tfs=2, n_other_tfs=2, n_cell_types=2, seed=0)
    assert transposed_reason(list(adata.obs_names), list(adata.var_names)) is None  # cell0001 x Tf01/Gene0001
    ens = [f"ENSG{i:011d}" for i in range(50)]
    rng = np.random.default_rng(0)
    barcodes = ["".join(rng.choice(list("ACGT"), 16)) + "-1" for _ in range(50)]
    assert transposed_reason(barcodes, ens) is None                 # 10x: barcodes x Ensembl IDs
    assert transposed_reason(barcodes, GENES * 3) is None


# ---------------------------------------------------------------------------------------------------------------
# 4. duplicated gene names (CSV columns are renamed by pandas; restored, warned, made unique)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("genes_as_rows", [False, True])
def test_duplicated_gene_names_are_warned_and_kept_apart(tmp_path, caplog, genes_as_rows):
    genes = ["Sox2", "Nanog", "Sox2", "Gata4", "ACTB", "Actb"]
    X = _counts()
    df = pd.DataFrame(X, index=[f"cell{i}" for i in range(8)], columns=genes)
    p = tmp_path / "m.csv"
    (df.T if genes_as_rows else df).to_csv(p)
    with caplog.at_level(logging.WARNING, logger="cellrl.ingest"):
        a = read_rna({"path": str(p), "format": "csv", "expression": "counts", "genes_as_rows": genes_as_rows})
    assert list(a.var_names) == ["Sox2", "Nanog", "Sox2-1", "Gata4", "Actb", "Actb-1"]
    assert list(a.var["original_symbol"]) == genes
    np.testing.assert_array_equal(a.X.toarray(), X)
    assert "more than once in the file: ['Sox2']" in caplog.text
    assert "collide after ingest.gene_symbols: capitalize: ['Actb']" in caplog.text
    assert "<name>-1" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# 5. Ensembl IDs are never re-cased
# ---------------------------------------------------------------------------------------------------------------
def test_ensembl_ids_survive_symbol_normalisation():
    names = ["ENSMUSG00000000001", "ENSG00000141510.16", "POU5F1", "ensembl_like", "ENSMUSG0000x"]
    assert normalise_symbols(names, "capitalize") == ["ENSMUSG00000000001", "ENSG00000141510.16", "Pou5f1",
                                                      "Ensembl_like", "Ensmusg0000x"]
    assert normalise_symbols(names, "upper")[:2] == names[:2]


# ---------------------------------------------------------------------------------------------------------------
# 6. cellrl plan: every bad input exits 2 with a JSON error; a garbage bfs.parquet names the file and the rule
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from results_fixture import build_results

    return build_results(tmp_path_factory.mktemp("faults"))


def _plan(capsys, *argv):
    from cellrl.cli import main

    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _corrupt(tiny, tmp_path, key, data: bytes):
    """A copy of the tiny results folder with ``key``'s file replaced by ``data``."""
    res = tmp_path / "results" / "tiny"
    shutil.copytree(tiny["results"], res)
    (res / tiny[key].relative_to(tiny["results"])).write_bytes(data)
    return res


@pytest.mark.parametrize("key, data, needle", [
    ("model", b"PK\x03\x04 not a zip at all", "model.npz"),
    ("model", b"garbage", "model.npz"),
    ("table", b"\x93NUMPY garbage", "table.npy"),
    ("agent", b"not a zip", "model.zip"),
    ("actions", b"\x00\x01\x02", "actions.tsv"),
    ("train_summary", b"{not json", "train_summary.json"),
])
def test_plan_corrupt_file_exits_2_with_json(tiny, tmp_path, capsys, key, data, needle):
    from cellrl.cli import EXIT_INPUT

    res = _corrupt(tiny, tmp_path, key, data)
    code, out, err = _plan(capsys, "--results", str(res), "--start", "T0", "--target", "T1", "--json")
    assert code == EXIT_INPUT, err
    e = json.loads(out)
    assert e["error"] == "input" and e["exit_code"] == 2 and needle in e["path"] and e["fix"]
    assert needle in err


@pytest.mark.parametrize("argv, field", [
    (["--max-steps", "-3"], "--max-steps"), (["--max-steps", "0"], "--max-steps"),
    (["--max-steps", "many"], "--max-steps"), (["--no-such-option"], "--no-such-option"),
])
def test_plan_bad_options_exit_2_with_json(tiny, capsys, argv, field):
    from cellrl.cli import EXIT_INPUT

    code, out, err = _plan(capsys, "--results", str(tiny["results"]), "--start", "T0", "--target", "T1",
                           "--json", *argv)
    assert code == EXIT_INPUT
    e = json.loads(out)
    assert e["error"] == "input" and field in e["message"] and field in err
    code, out, _ = _plan(capsys, "--results", str(tiny["results"]), "--json")  # --start/--target missing
    assert code == EXIT_INPUT and "--start" in json.loads(out)["message"]


def test_plan_help_documents_exit_codes(capsys):
    from cellrl.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["plan", "--help"])
    assert ei.value.code == 0
    text = capsys.readouterr().out
    assert all(f"  {c}  " in text for c in range(5)) and "bad input" in text and "--json" in text


def test_garbage_bfs_parquet_names_the_file_and_the_rule(tiny, tmp_path):
    from cellrl.bfs import read_bfs_table
    from cellrl.evaluate import evaluate_files

    bad = tmp_path / "benchmark" / "bfs.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(InputError, match="cannot read the BFS table") as ei:
        read_bfs_table(bad)
    assert str(bad) in str(ei.value) and "bfs rule" in ei.value.fix
    pd.DataFrame({"cell": [0]}).to_parquet(bad)
    with pytest.raises(InputError, match="not a BFS table"):
        read_bfs_table(bad)
    out = tmp_path / "bench" / "default"
    with pytest.raises(InputError, match="BFS table") as ei:
        evaluate_files(tiny["model"], tiny["table"], tiny["actions"], tiny["agent"], None, bad, None,
                       out / "episodes.parquet", out / "summary.json", out / "plots")
    assert str(bad) in str(ei.value) and not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 7. dataset and run names that cannot be a results/ folder or a Snakemake wildcard
# ---------------------------------------------------------------------------------------------------------------
def _base() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


@pytest.mark.parametrize("section, name", [("datasets", "my data"), ("datasets", "a;b"), ("datasets", "x/y"),
                                           ("runs", "seed 2")])
def test_dataset_and_run_names_are_validated(section, name):
    cfg = _base()
    cfg[section][name] = cfg[section].pop("demo" if section == "datasets" else "default")
    with pytest.raises(ConfigError) as ei:
        validate_config(cfg, "config/config.yaml")
    msg = str(ei.value)
    assert f"{section}: name {name!r} is not allowed" in msg and "letters, digits and _ . -" in msg
    cfg[section]["ok_name-1.2"] = cfg[section].pop(name)
    validate_config(cfg)


def test_name_pattern_matches_the_wildcard_constraints():
    from cellrl.config import load_schema

    smk = (ROOT / "rules" / "common.smk").read_text()
    props = load_schema()["properties"]
    for section, wildcard in (("datasets", "dataset"), ("runs", "run")):
        constraint = re.search(rf'^\s*{wildcard}="([^"]+)"', smk, re.M).group(1)
        assert props[section]["propertyNames"]["pattern"] == f"^{constraint}$"


# ---------------------------------------------------------------------------------------------------------------
# 8. a bad key from a --configfile overlay is reported against that overlay
# ---------------------------------------------------------------------------------------------------------------
def test_error_origin_attributes_keys_to_the_last_layer_that_sets_them():
    base = {"filter": {"n_top_genes": 3000}, "datasets": {"demo": {"rna": {"path": "a"}}}}
    over1 = {"filter": {"n_top_genes": 500, "n_top_gene": 5}, "datasets": {"mesc": {"rna": {}}}}
    over2 = {"filter": {"n_top_genes": "many"}}
    layers = [("config/config.yaml", base), ("o1.yaml", over1), ("o2.yaml", over2)]
    assert error_origin(["filter", "n_top_genes"], layers) == "o2.yaml"
    assert error_origin(["filter", "n_top_gene"], layers) == "o1.yaml"
    assert error_origin(["datasets", "mesc", "rna", "format"], layers) == "o1.yaml"   # longest prefix set
    assert error_origin(["datasets", "demo", "rna", "path"], layers) == "config/config.yaml"
    assert error_origin(["nothing"], layers) is None


def test_overlay_errors_name_the_overlay_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base_file = tmp_path / "config.yaml"
    base_file.write_text(DEFAULT_CONFIG.read_text())
    good = tmp_path / "examples" / "good.yaml"
    bad = tmp_path / "examples" / "bad.yaml"
    good.parent.mkdir()
    good.write_text("filter: {n_top_genes: 500}\n")
    bad.write_text("filter: {n_top_gene: 5}\ndatasets:\n  'my data': {rna: {path: x.h5ad, format: h5ad, "
                   "expression: counts}, base_grn: {source: tfinfo, path: g.parquet}}\n")
    layers = config_layers(base_file, [good, bad], {"split": {"seed": -1}})
    assert [label for label, _ in layers] == ["config.yaml", "examples/good.yaml", "examples/bad.yaml",
                                              "--config overrides"]
    cfg = _base()
    for _, data in layers[1:]:
        cfg = deep_merge(cfg, data)
    with pytest.raises(ConfigError) as ei:
        validate_config(cfg, "config/config.yaml (after --configfile/--config overrides)", layers=layers)
    msg = str(ei.value)
    assert msg.startswith("examples/bad.yaml, --config overrides: invalid configuration")
    assert "'n_top_gene' was unexpected) (set in examples/bad.yaml)" in msg
    assert "name 'my data' is not allowed" in msg and "split.seed" in msg and "(set in --config overrides)" in msg
    assert "good.yaml" not in msg


@pytest.mark.parametrize("overlays", [["mesc.yaml"], ["paul15_subset.yaml"], ["paul15_full.yaml"],
                                      ["seed_scale.yaml"], ["demo_persistent.yaml"],
                                      ["mesc.yaml", "demo_persistent.yaml", "persistent_exact_all.yaml"]])
def test_example_overlays_validate(overlays):
    """Every overlay shipped in config/examples validates on top of config/config.yaml, in the documented order."""
    from cellrl.config import dataset_config

    cfg = _base()
    for name in overlays:
        cfg = deep_merge(cfg, yaml.safe_load((ROOT / "config" / "examples" / name).read_text()))
    validate_config(cfg, " + ".join(overlays))
    if "persistent_exact_all.yaml" in overlays:  # exact search then covers every test cell of every type
        assert dataset_config(cfg, "mesc", "persistent")["evaluate"]["persistent_exact_starts"] == 1000


# ---------------------------------------------------------------------------------------------------------------
# 9. h5ad as scanpy users keep it: rna.layer (X | raw | <layer>); scaled X points at the alternatives
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def scanpy_h5ad(tmp_path):
    """X scaled (negative values), .raw = log-normalised values, layers["counts"] = raw counts."""
    import anndata as ad

    counts = _counts(8, 6)
    a = ad.AnnData(X=counts.copy(), obs=pd.DataFrame({"ct": ["A"] * 4 + ["B"] * 4},
                                                     index=[f"cell{i}" for i in range(8)]),
                   var=pd.DataFrame(index=GENES))
    a.layers["counts"] = sp.csr_matrix(counts)
    a.X = np.log1p(counts)
    a.raw = a
    a = a[:, :5].copy()  # .raw keeps all 6 genes, X and layers 5
    a.X = (a.X - a.X.mean(0)) / a.X.std(0)
    p = tmp_path / "scaled.h5ad"
    a.write_h5ad(p)
    return p, counts


def test_scaled_x_suggests_raw_and_layers(tmp_path, scanpy_h5ad):
    p, counts = scanpy_h5ad
    rna = {"path": str(p), "format": "h5ad", "expression": "lognorm", "cell_type": {"obs_column": "ct"}}
    e = _ingest_fails(tmp_path, rna, "negative value", dataset="pbmc")
    assert e.field == "datasets.pbmc.rna.expression" and "rna.layer: raw" in e.fix and "'counts'" in e.fix
    a = read_rna(dict(rna, layer="raw"))
    assert a.shape == (8, 6) and list(a.var_names) == GENES
    np.testing.assert_allclose(a.X.toarray(), np.log1p(counts), rtol=1e-6)
    b = read_rna(dict(rna, layer="counts", expression="counts"))
    np.testing.assert_array_equal(b.X.toarray(), counts[:, :5])
    assert list(b.obs["cell_type"]) == ["A"] * 4 + ["B"] * 4


def test_bad_layer_names_are_refused(tmp_path, scanpy_h5ad):
    p, _ = scanpy_h5ad
    rna = {"path": str(p), "format": "h5ad", "expression": "counts"}
    e = _ingest_fails(tmp_path, dict(rna, layer="spliced"), "no layer 'spliced'")
    assert "['counts']" in str(e) and e.field == "rna.layer"
    csv = tmp_path / "m.csv"
    pd.DataFrame(_counts(), index=[f"c{i}" for i in range(8)], columns=GENES).to_csv(csv)
    _ingest_fails(tmp_path, {"path": str(csv), "format": "csv", "expression": "counts", "genes_as_rows": False,
                             "layer": "raw"}, "applies to h5ad input only")


def test_scanpy_pbmc68k_reduced_needs_layer_raw(tmp_path):
    sc = pytest.importorskip("scanpy")
    try:
        pbmc = sc.datasets.pbmc68k_reduced()  # ships with scanpy: no download
    except Exception as e:  # pragma: no cover
        pytest.skip(f"scanpy's bundled pbmc68k_reduced is not readable here: {e}")
    p = tmp_path / "pbmc.h5ad"
    pbmc.write_h5ad(p)
    rna = {"path": str(p), "format": "h5ad", "expression": "lognorm", "cell_type": {"obs_column": "bulk_labels"}}
    e = _ingest_fails(tmp_path, rna, "negative value")
    assert "rna.layer: raw" in e.fix
    a = read_rna(dict(rna, layer="raw"), gene_symbols="upper")
    assert a.n_obs == pbmc.n_obs and a.n_vars == pbmc.raw.n_vars and a.obs["cell_type"].nunique() > 1


def test_every_new_config_key_is_in_the_schema_docs():
    text = (ROOT / "config" / "README.md").read_text()
    assert "| `layer` |" in text and "letters, digits" in text


# ---------------------------------------------------------------------------------------------------------------
# 10. verified artifacts: every file a later stage reads is checked against the sha256 its stage recorded
#     (model.npz: oracle/stats.json, table.npy: transitions/stats.json, model.zip: train_summary.json, transition
#     chunks: a .sha256 next to each); agents load without unpickling
# ---------------------------------------------------------------------------------------------------------------
def _recorded(tiny, tmp_path) -> dict:
    """A copy of the tiny results folder whose model and table have their checksums recorded, as the
    fit_oracle and transitions rules record them."""
    from cellrl.io import sha256_array, sha256_file

    res = tmp_path / "results" / "tiny"
    shutil.copytree(tiny["results"], res)
    paths = {k: res / v.relative_to(tiny["results"]) for k, v in tiny.items() if k not in ("results", "truth")}
    (res / "oracle" / "stats.json").write_text(json.dumps({"model_sha256": sha256_file(paths["model"])}))
    (res / "transitions" / "stats.json").write_text(
        json.dumps({"table_sha256": sha256_array(np.load(paths["table"]))}))
    return {"results": res, **paths}


def _refused(e, path, rule):
    assert str(path) in str(e) and "sha256" in str(e) and f"--forcerun {rule}" in e.fix, str(e)


def test_untouched_recorded_artifacts_pass(tiny, tmp_path, capsys):
    from cellrl.train import load_inputs

    r = _recorded(tiny, tmp_path)
    load_inputs(r["model"], r["table"])
    code, _, err = _plan(capsys, "--results", str(r["results"]), "--start", "T0", "--target", "T1")
    assert code in (0, 1), err


def test_shuffled_table_is_refused_by_bfs_plan_and_train(tiny, tmp_path, capsys):
    from cellrl.bfs import bfs_file
    from cellrl.cli import EXIT_INPUT
    from cellrl.train import load_inputs

    r = _recorded(tiny, tmp_path)
    table = np.load(r["table"])
    np.save(r["table"], table[np.random.default_rng(0).permutation(len(table))])  # right shape, valid indices
    with pytest.raises(InputError) as ei:
        bfs_file(r["model"], r["table"], tmp_path / "bfs.parquet")
    _refused(ei.value, r["table"], "transitions")
    assert ei.value.field == "stats.json table_sha256" and not (tmp_path / "bfs.parquet").exists()
    with pytest.raises(InputError) as ei:
        load_inputs(r["model"], r["table"])
    _refused(ei.value, r["table"], "transitions")
    code, out, err = _plan(capsys, "--results", str(r["results"]), "--start", "T0", "--target", "T1", "--json")
    e = json.loads(out)
    assert code == EXIT_INPUT == e["exit_code"] and e["path"] == str(r["table"]) and "transitions rule" in e["fix"]


def test_altered_model_is_refused_by_its_consumers(tiny, tmp_path, capsys):
    from cellrl.bfs import bfs_file
    from cellrl.cli import EXIT_INPUT
    from cellrl.model import load_model
    from cellrl.train import load_inputs

    r = _recorded(tiny, tmp_path)
    m = load_model(r["model"])
    m.X = m.X * 1.01  # still a well-formed model
    m.save(r["model"])
    for consume in (lambda: load_model(r["model"]), lambda: load_inputs(r["model"], r["table"]),
                    lambda: bfs_file(r["model"], r["table"], tmp_path / "bfs.parquet")):
        with pytest.raises(InputError) as ei:
            consume()
        _refused(ei.value, r["model"], "fit_oracle")
    code, out, _ = _plan(capsys, "--results", str(r["results"]), "--start", "T0", "--target", "T1", "--json")
    e = json.loads(out)
    assert code == EXIT_INPUT and e["path"] == str(r["model"]) and "fit_oracle rule" in e["fix"]


def test_altered_bfs_table_is_refused_by_evaluate(tiny, tmp_path):
    """bfs.parquet is checked against bfs_stats.json's sha256: a well-formed table with one plan changed is
    refused with the file and the rule to rerun; the untouched table passes."""
    from cellrl.bfs import bfs_file, read_bfs_table
    from cellrl.evaluate import evaluate_files

    r = _recorded(tiny, tmp_path)
    bfs = r["results"] / "benchmark" / "bfs.parquet"
    df = bfs_file(r["model"], r["table"], bfs)
    stats = json.loads((bfs.parent / "bfs_stats.json").read_text())
    assert stats["n_pairs"] == len(df) and len(stats["bfs_sha256"]) == 64
    assert read_bfs_table(bfs).plan.tolist() == df.plan.tolist()
    i = int(np.flatnonzero(df.length.to_numpy() > 0)[0])
    df.at[i, "plan"] = "KO:X > OE:Y"  # still a BFS table, one plan changed
    df.to_parquet(bfs, index=False)
    with pytest.raises(InputError) as ei:
        read_bfs_table(bfs)
    _refused(ei.value, bfs, "bfs")
    assert ei.value.field == "bfs_stats.json bfs_sha256"
    out = tmp_path / "bench" / "default"
    with pytest.raises(InputError):
        evaluate_files(r["model"], r["table"], r["actions"], r["agent"], None, bfs, None,
                       out / "episodes.parquet", out / "summary.json", out / "plots")
    assert not out.exists()


def _rewrite_zip(src, dst, **members: bytes) -> None:
    """Copy an SB3 zip with some members replaced."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, members.get(item.filename, zin.read(item.filename)))


def test_altered_agent_is_refused_by_plan(tiny, tmp_path, capsys):
    import io
    import zipfile

    import torch as th

    from cellrl.cli import EXIT_INPUT

    r = _recorded(tiny, tmp_path)
    with zipfile.ZipFile(tiny["agent"]) as z:
        w = th.load(io.BytesIO(z.read("policy.pth")), weights_only=True)
    w["action_net.bias"] += 1.0
    buf = io.BytesIO()
    th.save(w, buf)
    _rewrite_zip(tiny["agent"], r["agent"], **{"policy.pth": buf.getvalue()})  # a valid zip, other weights
    code, out, err = _plan(capsys, "--results", str(r["results"]), "--start", "T0", "--target", "T1", "--json")
    e = json.loads(out)
    assert code == EXIT_INPUT == e["exit_code"] and e["error"] == "input" and e["path"] == str(r["agent"])
    assert "model_zip_sha256" in e["field"] and "--forcerun train" in e["fix"] and "model.zip" in err


class _Payload:
    """Unpickling this creates a file: what a crafted agent zip could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _crafted_agent(tiny, tmp_path, marker):
    """A results copy whose model.zip carries a pickle payload in ``data`` (its checksum recorded, as a zip and
    train_summary.json handed over together would have it)."""
    import base64
    import pickle
    import zipfile

    from cellrl.io import sha256_file

    r = _recorded(tiny, tmp_path)
    with zipfile.ZipFile(tiny["agent"]) as z:
        data = json.loads(z.read("data"))
    data["policy_class"][":serialized:"] = base64.b64encode(pickle.dumps(_Payload(marker))).decode()
    _rewrite_zip(tiny["agent"], r["agent"], data=json.dumps(data).encode())
    summary = json.loads(r["train_summary"].read_text())
    r["train_summary"].write_text(json.dumps({**summary, "model_zip_sha256": sha256_file(r["agent"])}))
    return r, data


def test_crafted_agent_pickle_never_runs_in_plan_or_evaluate(tiny, tmp_path, capsys):
    from stable_baselines3.common.save_util import json_to_data

    from cellrl.evaluate import evaluate_files
    from results_fixture import ENV

    marker = tmp_path / "pwned"
    r, data = _crafted_agent(tiny, tmp_path, marker)
    code, out, err = _plan(capsys, "--results", str(r["results"]), "--start", "T0", "--target", "T1", "--json")
    assert code in (0, 1), err
    assert json.loads(out)["agent"]["steps"] and not marker.exists()
    out_dir = tmp_path / "bench"
    s = evaluate_files(r["model"], r["table"], r["actions"], r["agent"], None, None, None,
                       out_dir / "episodes.parquet", out_dir / "summary.json", out_dir / "plots", env=ENV,
                       n_episodes=12)
    assert s["policies"]["agent"]["episodes"] == 12 and not marker.exists()
    json_to_data(json.dumps(data))  # what MaskablePPO.load does with `data`: the payload is live
    assert marker.exists()


def test_trust_pickled_agent_uses_maskableppo_load(tiny, capsys, monkeypatch):
    from sb3_contrib import MaskablePPO

    calls = []
    original = MaskablePPO.load

    def load(path, *a, **kw):
        calls.append(str(path))
        return original(path, *a, **kw)

    monkeypatch.setattr(MaskablePPO, "load", load)
    code, _, err = _plan(capsys, "--results", str(tiny["results"]), "--start", "T0", "--target", "T1")
    assert code in (0, 1) and calls == [], err          # the default path never unpickles
    code, _, err = _plan(capsys, "--results", str(tiny["results"]), "--start", "T0", "--target", "T1",
                         "--trust-pickled-agent")
    assert code in (0, 1) and calls == [str(tiny["agent"])], err


def test_safe_loaded_policy_acts_like_maskableppo_load(tmp_path):
    import torch as th
    from rl_fixtures import random_table
    from sb3_contrib import MaskablePPO
    from test_train import TINY

    from cellrl.agent_io import PolicyAgent, load_agent
    from cellrl.model import random_model
    from cellrl.tasks import TaskGeometry
    from cellrl.train import make_vec_env, train_files

    m = random_model(n_cells=200, n_genes=16, n_types=3, n_regulators=4, seed=1)
    m.save(tmp_path / "model.npz")
    np.save(tmp_path / "table.npy", random_table(m, seed=2))
    out = tmp_path / "run"
    env_cfg = {"max_steps": 6}
    s = train_files(tmp_path / "model.npz", tmp_path / "table.npy", out, env=env_cfg,
                    train={**TINY, "total_timesteps": 64}, progress=False, threads=1)
    assert s["model_zip_sha256"] == json.loads((out / "train_summary.json").read_text())["model_zip_sha256"]
    table = np.load(tmp_path / "table.npy")
    geo = TaskGeometry.from_model(m)
    safe = load_agent(out / "model.zip", geo, table.shape[1])
    ref = MaskablePPO.load(out / "model.zip", device="cpu")
    assert isinstance(safe, PolicyAgent) and safe.action_space == ref.action_space
    env = make_vec_env(geo, table, env_cfg, 64, split="test", seed=5, training=False)
    obs = env.reset()
    logits = [a.policy.get_distribution(a.policy.obs_to_tensor(obs)[0]).distribution.logits for a in (safe, ref)]
    assert th.equal(*logits)  # bit-identical network outputs
    for _ in range(4):
        masks = env.action_masks()
        a_safe, _ = safe.predict(obs, action_masks=masks, deterministic=True)
        a_ref, _ = ref.predict(obs, action_masks=masks, deterministic=True)
        assert np.array_equal(a_safe, a_ref)
        obs, *_ = env.step(a_ref)
    with pytest.raises(InputError, match="do not fit the network"):  # other train settings, other network
        from cellrl.agent_io import agent_spaces, load_policy

        load_policy(out / "model.zip", {**TINY, "actor_dims": [32]}, *agent_spaces(geo, table.shape[1]))


# ---------------------------------------------------------------------------------------------------------------
# 11. transition chunks: an altered or corrupt piece is discarded with a warning naming it and recomputed
# ---------------------------------------------------------------------------------------------------------------
def _alter_next_cell(f):
    with np.load(f) as z:
        d = dict(z)
    d["next_cell"] = (d["next_cell"] + 1) % 300  # a valid npz with other next cells
    np.savez(f, **d)


@pytest.mark.parametrize("damage", ["altered", "garbage", "no checksum"])
def test_bad_transition_chunk_is_recomputed(tmp_path, small_model, caplog, damage):
    from cellrl import transitions as T

    s = {"n_neighbors": 30, "backend": "numpy", "chunk_cells": 40, "seed": 0}
    ref, _, _ = T.compute_table(small_model, s, progress=False)

    def stop(i, n):
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.compute_table(small_model, s, chunk_dir=tmp_path / "chunks", on_chunk=stop, progress=False, threads=1)
    f = next((tmp_path / "chunks").glob("*/chunk_00001.npz"))
    if damage == "altered":
        _alter_next_cell(f)
    elif damage == "garbage":
        f.write_bytes(b"\x00garbage, not a zip")
    else:
        f.with_suffix(".sha256").unlink()
    with caplog.at_level(logging.WARNING, logger="cellrl.transitions"):
        table, _, st = T.compute_table(small_model, s, chunk_dir=tmp_path / "chunks", progress=False)
    assert st["chunks_reused"] == 2 and np.array_equal(table, ref)
    assert any("discarding transition chunk" in r.getMessage() and str(f) in r.getMessage() for r in caplog.records)
    # the recomputed piece is stored again with its checksum
    from cellrl.io import sha256_file

    assert f.with_suffix(".sha256").read_text().strip() == sha256_file(f)


def test_transitions_rule_records_what_consumers_check(tmp_path, small_model):
    from cellrl.bfs import load_table
    from cellrl.io import sha256_array, verify_artifact
    from cellrl.transitions import transitions_files

    small_model.save(tmp_path / "oracle" / "model.npz")
    t = tmp_path / "transitions"
    transitions_files(tmp_path / "oracle" / "model.npz", t / "table.npy", t / "actions.tsv", t / "stats.json",
                      n_neighbors=30, backend="numpy", progress=False)
    table = load_table(t / "table.npy", small_model.n_cells, small_model.n_actions)
    assert verify_artifact(t / "table.npy", "table", actual=sha256_array(table))
    assert not verify_artifact(tmp_path / "oracle" / "model.npz", "model")  # no stats.json there: skipped


# ---------------------------------------------------------------------------------------------------------------
# kill -9 mid-stage (training: tests/test_workflow.py::test_kill_9_mid_training_then_rerun; chunks: above)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_mid_fit_oracle_then_plain_rerun():
    """kill -9 of `--forcerun oracle_links` (CellOracle's get_links, one job per cell type) while a cluster's job
    runs: its output is absent (Snakemake deleted it first; outputs are renamed into place only when complete) and
    the oracle downstream is untouched; after `--unlock` the same command again, then a plain rerun, give the same
    model bytes, no temporary leftovers, and nothing left to do."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from workflow_copy import planned_jobs, snakemake, tiny_run

    run = tiny_run()  # the tiny demo run tests/test_workflow.py also uses (built once per session)
    oracle = run.workdir / "results/demo/oracle"
    before = json.loads((oracle / "stats.json").read_text())["model_sha256"]
    slugs = sorted(json.loads((oracle / "clusters.json").read_text())["slugs"])
    links = [oracle / "links" / f"{s}.parquet" for s in slugs]
    t_start = time.time()
    out = run.workdir / "killed_oracle_links.out"
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--forcerun", "oracle_links", "--cores", "1",
                             "results/demo/oracle/model.npz"], cwd=run.workdir, start_new_session=True,
                            stdout=out.open("w"), stderr=subprocess.STDOUT)

    def mid_job() -> bool:  # one cluster done, another one's output deleted: its job is running
        done = [f for f in links if f.exists() and f.stat().st_mtime > t_start]
        return bool(done) and any(not f.exists() for f in links)

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not mid_job():
        time.sleep(0.02)
    assert proc.poll() is None, f"snakemake ended before the kill:\n{out.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(not f.exists() for f in links), "the killed cluster's links look finished"
    assert json.loads((oracle / "stats.json").read_text())["model_sha256"] == before  # nothing downstream lost
    snakemake(run.workdir, "--unlock")
    snakemake(run.workdir, "--forcerun", "oracle_links", "--cores", "2", "results/demo/oracle/model.npz")  # again
    snakemake(run.workdir, "--cores", "2")
    assert all(f.exists() for f in links)
    assert json.loads((oracle / "stats.json").read_text())["model_sha256"] == before
    assert not [p.name for d in (oracle, oracle / "links") for p in d.iterdir() if ".tmp" in p.name]
    assert planned_jobs(run.workdir) == {}
