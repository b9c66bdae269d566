"""`cellrl plan --expression FILE --cell ID`: a user's cell placed at its nearest table cells, then planned from.

Two tiny results folders built from tests/results_fixture.py, whose model's expression is log1p of counts
normalised to one per-cell total T (as the filter stage does):

* ``z``: no rna/filtered.h5ad, the model's X is that log matrix: the cell is placed in the environment's z space;
* ``pca``: the model's X is a kNN-smoothed copy (like CellOracle's imputation) and rna/filtered.h5ad holds the
  unsmoothed log matrix, its PCA loadings and T: the cell is placed in that PCA space.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from results_fixture import UNREACHABLE_TYPE, build_results

from cellrl.cli import EXIT_INPUT, EXIT_UNREACHABLE, main
from cellrl.model import load_model
from cellrl.placement import _gene_index, detect_expression


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import anndata as ad

    root = tmp_path_factory.mktemp("plan_expression")
    paths = build_results(root / "z")
    m = load_model(paths["model"])
    rng = np.random.default_rng(5)
    counts = rng.poisson(np.expm1(m.X) * 3).astype(np.float64)
    counts[:, 0] += 1
    T = float(np.median(counts.sum(1)))
    logx = np.log1p(counts * (T / counts.sum(1, keepdims=True)))
    m.X = logx
    m.meta = {**m.meta, "oracle": {"expression": "counts", "n_pcs": 8}}
    m.save(paths["model"])

    pca = root / "pca" / "results" / "tiny"
    shutil.copytree(paths["results"], pca)
    d2 = ((logx[:, None, :] - logx[None, :, :]) ** 2).sum(-1)
    nn = np.argsort(d2, axis=1)[:, :10]
    m.X = logx[nn].mean(1)  # smoothed, as the oracle's kNN imputation
    m.save(pca / "oracle" / "model.npz")
    mu = logx.mean(0)
    _, _, vt = np.linalg.svd(logx - mu, full_matrices=False)
    a = ad.AnnData(X=sp.csr_matrix(logx.astype(np.float32)), obs=pd.DataFrame(index=m.cell_names.astype(str)),
                   var=pd.DataFrame(index=m.gene_names.astype(str)))
    a.varm["PCs"] = vt[:20].T
    a.uns["cellrl"] = {"expression": "counts", "normalize_target_sum": T, "gene_symbols": "as_is"}
    (pca / "rna").mkdir()
    a.write_h5ad(pca / "rna" / "filtered.h5ad")
    return {"z": {"results": paths["results"], "log": logx},
            "pca": {"results": pca, "log": a.X.toarray().astype(np.float64)}, "counts": counts, "T": T,
            "genes": [str(g) for g in m.gene_names], "cells": [str(c) for c in m.cell_names]}


def run(capsys, *argv):
    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _start_cell(capsys, results) -> str:
    """The T0 representative (reachable to T1 in the fixture's table)."""
    code, out, err = run(capsys, "--results", str(results), "--start", "T0", "--target", "T1", "--json")
    return json.loads(out)["start"]["cell"]


def _write(folders, kind, form, cell, tmp_path, space):
    """A file holding ``cell``'s expression (and two other cells) as ``form``; returns (path, --cell args)."""
    i = folders["cells"].index(cell)
    others = [j for j in range(len(folders["cells"])) if j != i][:2]
    rows = [i] + others
    names = ["mine", "other1", "other2"]
    if kind == "counts":
        vals = folders["counts"][rows]
    else:
        vals = folders[space]["log"][rows]
    if form == "csv_cells_as_rows":
        p = tmp_path / "cells.csv"
        pd.DataFrame(vals, index=names, columns=folders["genes"]).to_csv(p)
        return p, ["--cell", "mine"]
    if form == "tsv_genes_as_rows_upper":  # BEELINE-style orientation, symbols in another case
        p = tmp_path / "cells.tsv"
        pd.DataFrame(vals.T, index=[g.upper() for g in folders["genes"]], columns=names).to_csv(p, sep="\t")
        return p, ["--cell", "mine"]
    import anndata as ad

    p = tmp_path / "one_cell.h5ad"  # a single cell: --cell may be left out
    ad.AnnData(X=vals[:1], obs=pd.DataFrame(index=["mine"]), var=pd.DataFrame(index=folders["genes"])).write_h5ad(p)
    return p, []


@pytest.mark.parametrize("space", ["z", "pca"])
@pytest.mark.parametrize("kind, form", [("counts", "csv_cells_as_rows"), ("lognorm", "tsv_genes_as_rows_upper"),
                                        ("counts", "h5ad"), ("lognorm", "h5ad")])
def test_a_table_cells_expression_plans_like_start(folders, capsys, tmp_path, space, kind, form):
    res = folders[space]["results"]
    cell = _start_cell(capsys, res)
    path, cell_args = _write(folders, kind, form, cell, tmp_path, space)
    code0, out0, _ = run(capsys, "--results", str(res), "--start", cell, "--target", "T1", "--json")
    code, out, err = run(capsys, "--results", str(res), "--expression", str(path), *cell_args, "--target", "T1",
                         "--json")
    assert code == code0, err
    p0, p = json.loads(out0), json.loads(out)
    pl = p["placement"]
    assert pl["space"] == space and pl["cell"] == "mine"
    assert pl["nearest"][0]["cell"] == cell and pl["distance"] < 1e-4, pl
    assert pl["nearest"][0]["cell_type"] == p0["start"]["cell_type"]
    assert [r["distance"] for r in pl["nearest"]] == sorted(r["distance"] for r in pl["nearest"])
    assert pl["genes"]["found"] == pl["genes"]["model"] == len(folders["genes"])
    assert pl["genes"]["matched_case_insensitively"] == (len(folders["genes"]) if "upper" in form else 0)
    assert pl["genes_as_rows"] == ("genes_as_rows" in form)
    assert pl["expression"]["input"] == kind and pl["expression"]["detected"]
    assert pl["far"] is (False if space == "pca" else None) and not pl["warnings"]
    assert p["start"]["cell"] == cell and "nearest table cell to mine" in p["start"]["chosen_as"]
    assert p["agent"] == p0["agent"] and p["bfs"] == p0["bfs"] and p["target"] == p0["target"]
    if space == "pca":
        assert pl["expression"]["target_sum"] == pytest.approx(folders["T"]) or kind == "lognorm"
        assert "filtered.h5ad" in pl["space_description"] and pl["n_dims"] == 8  # the oracle's n_pcs
    else:
        assert any("filtered.h5ad not used" in n for n in pl["notes"])


def test_text_output_shows_the_placement_before_the_plans(folders, capsys, tmp_path):
    res = folders["pca"]["results"]
    cell = _start_cell(capsys, res)
    path, cell_args = _write(folders, "counts", "csv_cells_as_rows", cell, tmp_path, "pca")
    code, out, err = run(capsys, "--results", str(res), "--expression", str(path), *cell_args, "--target", "T1")
    assert code in (0, 1), err
    assert out.index("your cell: mine") < out.index("nearest table cell") < out.index("agent plan") \
        < out.index("BFS optimal sequence")
    assert f"planning from the nearest table cell, {cell}" in out and "WARNING" not in out + err


def test_a_far_away_cell_is_warned_about(folders, capsys, tmp_path):
    res = folders["pca"]["results"]
    genes = folders["genes"]
    far = np.zeros(len(genes))
    far[[3, 17, 29]] = 1000  # all of the cell's counts in three genes: unlike every table cell
    p = tmp_path / "far.csv"
    pd.DataFrame([far], index=["odd"], columns=genes).to_csv(p)
    code, out, err = run(capsys, "--results", str(res), "--expression", str(p), "--target", "T1", "--json")
    pl = json.loads(out)["placement"]
    assert pl["far"] is True and pl["warnings"] and "warning:" in err
    assert pl["distance"] > pl["table_nn_distance"]["p95"] or pl["residual"]["value"] > pl["residual"]["table_p95"]
    code, out, err = run(capsys, "--results", str(res), "--expression", str(p), "--target", "T1")
    assert "WARNING" in out and "may not apply" in out


def test_few_matching_genes_exit_2_with_json(folders, capsys, tmp_path):
    genes = folders["genes"]
    names = genes[:10] + [f"Xyz{k}" for k in range(len(genes) - 10)]
    p = tmp_path / "other_species.csv"
    pd.DataFrame([folders["counts"][0]], index=["s"], columns=names).to_csv(p)
    code, out, err = run(capsys, "--results", str(folders["z"]["results"]), "--expression", str(p), "--cell", "s",
                         "--target", "T1", "--json")
    assert code == EXIT_INPUT
    e = json.loads(out)
    assert e["error"] == "input" and e["exit_code"] == 2 and e["path"] == str(p) and e["field"] == "--expression"
    assert f"only 10 of the model's {len(genes)} genes (25%)" in e["message"] and "gene symbols" in e["fix"]
    assert str(p) in err


@pytest.mark.parametrize("what, argv_tail, field", [
    ("unknown cell", ["--cell", "nobody"], "--cell"),
    ("several cells, no --cell", [], "--cell"),
    ("negative values", ["--cell", "neg"], "--expression"),
    ("missing file", ["--cell", "s"], "--expression"),
    ("non-numeric table", ["--cell", "s"], "--expression"),
    ("--cell without --expression", None, "--cell"),
])
def test_bad_user_input_exits_2_with_json(folders, capsys, tmp_path, what, argv_tail, field):
    genes = folders["genes"]
    p = tmp_path / "cells.csv"
    vals = folders["counts"][:2].copy()
    vals[1, 0] = -1.0
    pd.DataFrame(vals, index=["s", "neg"], columns=genes).to_csv(p)
    res = str(folders["z"]["results"])
    if argv_tail is None:
        argv = ["--results", res, "--start", "T0", "--cell", "s", "--target", "T1", "--json"]
    else:
        f = tmp_path / "missing.csv" if what == "missing file" else p
        if what == "non-numeric table":
            f = tmp_path / "text.csv"
            f.write_text("cell," + ",".join(genes) + "\ns," + ",".join(["high"] * len(genes)) + "\n")
        argv = ["--results", res, "--expression", str(f), *argv_tail, "--target", "T1", "--json"]
    code, out, err = run(capsys, *argv)
    assert code == EXIT_INPUT, err
    e = json.loads(out)
    assert e["error"] == "input" and e["field"] == field and e["fix"]


def test_start_and_expression_are_exclusive(folders, capsys, tmp_path):
    code, out, _ = run(capsys, "--results", str(folders["z"]["results"]), "--start", "T0", "--expression", "x.csv",
                       "--target", "T1", "--json")
    assert code == EXIT_INPUT and "not allowed with" in json.loads(out)["message"]


def test_unreachable_target_error_carries_the_placement(folders, capsys, tmp_path):
    res = folders["z"]["results"]
    cell = _start_cell(capsys, res)
    path, cell_args = _write(folders, "counts", "csv_cells_as_rows", cell, tmp_path, "z")
    code, out, err = run(capsys, "--results", str(res), "--expression", str(path), *cell_args, "--target",
                         UNREACHABLE_TYPE, "--json")
    assert code == EXIT_UNREACHABLE
    e = json.loads(out)
    assert e["error"] == "unreachable" and e["placement"]["nearest"][0]["cell"] == cell and "mine" in e["message"]


def test_help_documents_the_option(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = capsys.readouterr().out
    assert "--expression FILE" in text and "--cell ID" in text and "--expression-type" in text


def test_gene_matching_and_expression_detection():
    model = ["Pou5f1", "Sox2", "Nanog", "ENSMUSG00000000001"]
    idx, n_exact, n_ci = _gene_index(["POU5F1", "sox2", "NANOG", "ENSMUSG00000000001", "Other", "SOX2"], model,
                                     "capitalize")
    assert idx.tolist() == [0, 1, 2, 3, -1, -1] and (n_exact, n_ci) == (4, 0)  # a gene is taken once
    idx, n_exact, n_ci = _gene_index(["POU5F1", "sox2"], model, None)
    assert idx.tolist() == [0, 1] and (n_exact, n_ci) == (0, 2)
    assert detect_expression(np.array([0, 3, 7.0])) == "counts"
    assert detect_expression(np.array([0, 0.69, 2.3])) == "lognorm"
    assert detect_expression(np.zeros(3)) == "lognorm"
