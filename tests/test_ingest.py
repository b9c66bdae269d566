"""Ingest: every format, cell-type source and symbol mode; real Paul15 and mESC inputs; bad inputs."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import yaml

from cellrl.config import DEFAULT_CONFIG, load_config
from cellrl.errors import ConfigError, InputError
from cellrl.ingest import ingest_file, normalise_symbols, read_rna
from conftest import shared_path

GENES = ["POU5F1", "Nanog", "sox2", "Gata4", "ACTB"]


@pytest.fixture()
def counts():
    """A small 6-cell x 5-gene count matrix (cells x genes), cell names and two cell types."""
    rng = np.random.default_rng(0)
    X = rng.poisson(3, (6, 5)).astype(float)
    X[0, 0] = 0
    cells = [f"AAAC{i}-1" for i in range(6)]
    types = ["A", "A", "A", "B", "B", "B"]
    return X, cells, types


def _write_10x_mtx(d, X, cells, genes, gz=True):
    d.mkdir()
    op = (lambda p: gzip.open(p, "wt")) if gz else (lambda p: open(p, "w"))
    suf = ".gz" if gz else ""
    with (gzip.open if gz else open)(d / f"matrix.mtx{suf}", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(X.T))
    with op(d / f"features.tsv{suf}") as fh:
        fh.writelines(f"ENSMUSG{i:05d}\t{g}\tGene Expression\n" for i, g in enumerate(genes))
    with op(d / f"barcodes.tsv{suf}") as fh:
        fh.writelines(f"{c}\n" for c in cells)


def _write_10x_h5(p, X, cells, genes):
    import h5py

    m = sp.csc_matrix(X.T)  # genes x cells, CSC over cells as Cell Ranger writes it
    with h5py.File(p, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data.astype(np.int32), m.indices, m.indptr
        g["shape"] = np.array(m.shape, dtype=np.int32)
        g["barcodes"] = np.array(cells, dtype="S")
        ft = g.create_group("features")
        ft["id"] = np.array([f"ENSMUSG{i:05d}" for i in range(len(genes))], dtype="S")
        ft["name"] = np.array(genes, dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        ft["genome"] = np.array(["mm10"] * len(genes), dtype="S")


def _table(tmp_path, cells, types, name="types.tsv"):
    p = tmp_path / name
    pd.DataFrame({"cell": cells, "cell_type": types}).to_csv(p, sep="\t" if name.endswith("tsv") else ",",
                                                             index=False)
    return str(p)


# ------------------------------------------------------------------------------------------------------------
def test_symbol_modes():
    assert normalise_symbols(GENES, "capitalize") == ["Pou5f1", "Nanog", "Sox2", "Gata4", "Actb"]
    assert normalise_symbols(GENES, "upper") == ["POU5F1", "NANOG", "SOX2", "GATA4", "ACTB"]
    assert normalise_symbols(GENES, "as_is") == GENES


def test_10x_mtx_with_table(tmp_path, counts):
    X, cells, types = counts
    _write_10x_mtx(tmp_path / "mtx", X, cells, GENES)
    a = read_rna({"path": str(tmp_path / "mtx"), "format": "10x_mtx", "expression": "counts",
                  "cell_type": {"table": _table(tmp_path, cells, types)}})
    assert a.shape == (6, 5) and list(a.obs_names) == cells
    assert list(a.var_names) == ["Pou5f1", "Nanog", "Sox2", "Gata4", "Actb"]
    np.testing.assert_array_equal(a.X.toarray(), X)
    assert list(a.obs["cell_type"]) == types and a.uns["cellrl"]["expression"] == "counts"


def test_10x_mtx_uncompressed_legacy_genes_tsv(tmp_path, counts):
    X, cells, _ = counts
    _write_10x_mtx(tmp_path / "mtx", X, cells, GENES, gz=False)
    (tmp_path / "mtx" / "features.tsv").rename(tmp_path / "mtx" / "genes.tsv")
    a = read_rna({"path": str(tmp_path / "mtx"), "format": "10x_mtx", "expression": "counts"}, "upper")
    np.testing.assert_array_equal(a.X.toarray(), X)
    assert "cell_type" not in a.obs and a.var_names[0] == "POU5F1"


def test_10x_h5_with_regex(tmp_path, counts):
    X, cells, _ = counts
    _write_10x_h5(tmp_path / "m.h5", X, cells, GENES)
    a = read_rna({"path": str(tmp_path / "m.h5"), "format": "10x_h5", "expression": "counts",
                  "cell_type": {"from_name_regex": r"^AAAC(\d)"}}, "as_is")
    np.testing.assert_array_equal(a.X.toarray(), X)
    assert list(a.var_names) == GENES and list(a.obs["cell_type"]) == [str(i) for i in range(6)]


def test_tsv_cells_as_rows_and_csv_table(tmp_path, counts):
    X, cells, types = counts
    p = tmp_path / "m.tsv"
    pd.DataFrame(X, index=cells, columns=GENES).to_csv(p, sep="\t")
    a = read_rna({"path": str(p), "format": "tsv", "expression": "counts", "genes_as_rows": False,
                  "cell_type": {"table": _table(tmp_path, cells[:5], types[:5], "t.csv")}})
    assert a.shape == (5, 5), "the cell missing from the table is dropped (with a warning)"
    np.testing.assert_array_equal(a.X.toarray(), X[:5])


def test_h5ad_obs_column_and_ingest_file(tmp_path, counts):
    import anndata as ad

    X, cells, types = counts
    src = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame({"celltype": types}, index=cells),
                     var=pd.DataFrame(index=GENES))
    src.write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "res" / "raw.h5ad"
    ingest_file({"path": str(tmp_path / "in.h5ad"), "format": "h5ad", "expression": "counts",
                 "cell_type": {"obs_column": "celltype"}}, out, "capitalize")
    a = ad.read_h5ad(out)
    assert list(a.obs["cell_type"]) == types and a.var_names[0] == "Pou5f1"
    assert a.uns["cellrl"]["format"] == "h5ad"
    assert [p.name for p in out.parent.iterdir()] == ["raw.h5ad"]


def test_real_paul15_counts():
    p = shared_path("paul15_subset", "paul15_subset.h5ad")
    a = read_rna({"path": str(p), "format": "h5ad", "expression": "counts", "cell_type": {"obs_column": "cell_type"}})
    assert a.shape == (2660, 240)
    vc = a.obs["cell_type"].value_counts()
    assert vc["Erythrocyte"] == 1095 and vc["Megakaryocytes"] == 68 and len(vc) == 7
    assert {"Klf1", "Irf8", "Myb"} <= set(a.var_names)


def test_real_mesc_lognorm_genes_as_rows_time_from_name():
    p = shared_path("mesc_hayashi2018", "ExpressionData.csv")
    a = read_rna({"path": str(p), "format": "csv", "expression": "lognorm", "genes_as_rows": True,
                  "cell_type": {"from_name_regex": r"_(\d+h)_"}}, "capitalize")
    assert a.shape == (421, 500)
    assert a.obs["cell_type"].value_counts().to_dict() == {"00h": 90, "12h": 68, "24h": 90, "48h": 82, "72h": 91}
    assert {"Pou5f1", "Nanog", "Sox2", "Gata4"} <= set(a.var_names)
    assert a.uns["cellrl"]["expression"] == "lognorm"


# ------------------------------------------------------------------------------------------------------------
# bad input: each a clear error naming the file / field / fix, and no output file
# ------------------------------------------------------------------------------------------------------------
def _csv(tmp_path, X, cells=None, genes=GENES, name="m.csv"):
    p = tmp_path / name
    cells = cells or [f"c{i}" for i in range(len(X))]
    pd.DataFrame(X, index=cells, columns=genes[: np.shape(X)[1]]).to_csv(p)
    return p


def _fails(tmp_path, rna, match, exc=InputError, **kw):
    out = tmp_path / "out" / "raw.h5ad"
    with pytest.raises(exc, match=match) as ei:
        ingest_file(rna, out, **kw)
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir())), "no output left"
    return str(ei.value)


def test_missing_input_path(tmp_path):
    msg = _fails(tmp_path, {"path": str(tmp_path / "nope.h5ad"), "format": "h5ad", "expression": "counts"},
                 "input file not found")
    assert "nope.h5ad" in msg and "rna.path" in msg and "fix:" in msg


def test_unreadable_file(tmp_path):
    p = tmp_path / "bad.h5ad"
    p.write_bytes(b"this is not an HDF5 file")
    msg = _fails(tmp_path, {"path": str(p), "format": "h5ad", "expression": "counts"}, "cannot read as h5ad")
    assert "bad.h5ad" in msg and "rna.format" in msg


def test_non_numeric_csv_names_the_file_field_and_format(tmp_path):
    p = tmp_path / "semi.csv"
    p.write_text("cell,Pou5f1,Nanog\nc1,1,high\n")
    msg = _fails(tmp_path, {"path": str(p), "format": "csv", "expression": "counts", "genes_as_rows": False},
                 "non-numeric column")
    assert "semi.csv" in msg and "rna.path" in msg and "rna.format" in msg


def test_empty_matrix(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text(",Pou5f1,Nanog\n")
    _fails(tmp_path, {"path": str(p), "format": "csv", "expression": "counts", "genes_as_rows": False},
           "empty")


def test_all_zero_matrix(tmp_path):
    p = _csv(tmp_path, np.zeros((3, 2)))
    _fails(tmp_path, {"path": str(p), "format": "csv", "expression": "counts", "genes_as_rows": False},
           "only zeros")


@pytest.mark.parametrize("value, match", [(-1.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite")])
def test_negative_nan_inf_counts(tmp_path, counts, value, match):
    X = counts[0].copy()
    X[1, 2] = value
    msg = _fails(tmp_path, {"path": str(_csv(tmp_path, X)), "format": "csv", "expression": "counts",
                            "genes_as_rows": False}, match)
    assert "m.csv" in msg and "fix:" in msg


def test_counts_declared_but_not_integer(tmp_path, counts):
    X = np.log1p(counts[0])
    msg = _fails(tmp_path, {"path": str(_csv(tmp_path, X)), "format": "csv", "expression": "counts",
                            "genes_as_rows": False}, "not integers")
    assert "rna.expression" in msg and "lognorm" in msg


def test_cell_type_column_missing(tmp_path, counts):
    import anndata as ad

    X, cells, _ = counts
    ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=GENES)).write_h5ad(
        tmp_path / "in.h5ad")
    msg = _fails(tmp_path, {"path": str(tmp_path / "in.h5ad"), "format": "h5ad", "expression": "counts",
                            "cell_type": {"obs_column": "celltype"}}, "'celltype' not in obs")
    assert "rna.cell_type.obs_column" in msg


def test_cell_type_regex_matching_nothing(tmp_path, counts):
    _fails(tmp_path, {"path": str(_csv(tmp_path, counts[0])), "format": "csv", "expression": "counts",
                      "genes_as_rows": False, "cell_type": {"from_name_regex": r"_(\d+h)_"}}, "no cell got")


def test_cell_type_table_missing_or_malformed(tmp_path, counts):
    rna = {"path": str(_csv(tmp_path, counts[0])), "format": "csv", "expression": "counts", "genes_as_rows": False}
    _fails(tmp_path, dict(rna, cell_type={"table": str(tmp_path / "none.tsv")}), "table not found")
    bad = tmp_path / "bad.tsv"
    bad.write_text("barcode\tlabel\nc0\tA\n")
    _fails(tmp_path, dict(rna, cell_type={"table": str(bad)}), "needs columns 'cell' and 'cell_type'")


def test_csv_orientation_must_be_declared(tmp_path, counts):
    _fails(tmp_path, {"path": str(_csv(tmp_path, counts[0])), "format": "csv", "expression": "counts"},
           "genes_as_rows is not set")


def test_10x_dir_incomplete(tmp_path, counts):
    X, cells, _ = counts
    _write_10x_mtx(tmp_path / "mtx", X, cells, GENES)
    (tmp_path / "mtx" / "barcodes.tsv.gz").unlink()
    _fails(tmp_path, {"path": str(tmp_path / "mtx"), "format": "10x_mtx", "expression": "counts"},
           r"lacks \['barcodes.tsv'\]")


def _bad_config(tmp_path, mutate):
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    mutate(cfg)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c["filter"].update(n_top_gene=100), r"filter: Additional properties.*n_top_gene"),
    (lambda c: c["filter"].update(n_top_genes="many"), r"filter.n_top_genes: 'many' is not of type"),
    (lambda c: c["datasets"]["demo"]["rna"].update(expression="raw"), r"datasets.demo.rna.expression"),
    (lambda c: c["datasets"]["demo"]["rna"].update(genes_as_rows="yes"), r"rna.genes_as_rows"),
    (lambda c: c["datasets"]["demo"]["rna"]["cell_type"].update(column="x"), r"cell_type: Additional"),
    (lambda c: c["datasets"]["demo"]["rna"].update(format="csv"), r"'genes_as_rows' is a required property"),
    (lambda c: c["split"].update(train=1.5), r"split.train"),
    (lambda c: c["demo_data"].update(n_cell_types=1), r"demo_data.n_cell_types"),
])
def test_config_unknown_key_or_wrong_type(tmp_path, mutate, match):
    p = _bad_config(tmp_path, mutate)
    with pytest.raises(ConfigError, match=match) as ei:
        load_config(p)
    assert str(p) in str(ei.value)


def test_config_readme_documents_every_key():
    """config/README.md names every key of config/config.yaml and of the schema's stage sections."""
    from cellrl.config import load_schema

    text = (DEFAULT_CONFIG.parent / "README.md").read_text()
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    schema = load_schema()["definitions"]
    keys: set[str] = set()

    def walk(d, skip=("datasets", "runs", "search_space")):
        for k, v in d.items():
            keys.add(k)
            if isinstance(v, dict) and k not in skip:
                walk(v)

    def walk_schema(props):
        for k, v in props.items():
            keys.add(k)
            if k != "search_space" and isinstance(v, dict) and "properties" in v:
                walk_schema(v["properties"])

    walk({k: v for k, v in cfg.items() if k not in ("datasets", "runs")})
    for stage in schema["stages"].values():
        walk_schema(stage["properties"])
    walk_schema(schema["rna"]["properties"])
    walk_schema(schema["grn_source"]["properties"])
    missing = sorted(k for k in keys if f"`{k}" not in text and f".{k}`" not in text)
    assert not missing, f"config/README.md does not document: {missing}"
