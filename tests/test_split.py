"""Split: per-type fractions, >= 1 val/test per type, small types reported, seeding, bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from cellrl.errors import ConfigError, InputError
from cellrl.split import split_cells, split_file


def _types(sizes: dict[str, int]) -> pd.Series:
    lab = [t for t, n in sizes.items() for _ in range(n)]
    rng = np.random.default_rng(0)
    lab = list(rng.permutation(lab))
    return pd.Series(lab, index=[f"cell{i}" for i in range(len(lab))])


def test_fractions_per_type_and_minimums():
    ct = _types({"big": 1000, "mid": 60, "three": 3})
    df = split_cells(ct, 0.9, 0.05, 0.05, seed=0)
    assert list(df["cell"]) == list(ct.index)
    tab = pd.crosstab(ct.to_numpy(), df["split"].to_numpy())
    assert tab.loc["big"].to_dict() == {"test": 50, "train": 900, "val": 50}
    assert tab.loc["mid"].to_dict() == {"test": 3, "train": 54, "val": 3}
    assert tab.loc["three"].to_dict() == {"test": 1, "train": 1, "val": 1}
    assert df.attrs["too_small"] == []


def test_tiny_types_are_reported_not_dropped(caplog):
    ct = _types({"big": 100, "two": 2, "one": 1})
    with caplog.at_level(logging.WARNING, logger="cellrl.split"):
        df = split_cells(ct, 0.9, 0.05, 0.05, seed=0)
    assert len(df) == 103
    by = df.assign(t=ct.to_numpy()).groupby("t")["split"].apply(sorted).to_dict()
    assert by["two"] == ["test", "train"] and by["one"] == ["train"]
    small = {d["cell_type"]: d["missing"] for d in df.attrs["too_small"]}
    assert small == {"two": ["val"], "one": ["val", "test"]}
    assert "'one' has only 1 cell" in caplog.text and "'two' has only 2 cell" in caplog.text


def test_seeded_and_stable_per_type():
    ct = _types({"a": 200, "b": 150})
    d1, d2 = split_cells(ct, seed=3), split_cells(ct, seed=3)
    assert d1.equals(d2)
    assert not d1.equals(split_cells(ct, seed=4))
    # adding a cell type does not change the other types' assignments
    more = pd.concat([ct, pd.Series(["c"] * 50, index=[f"x{i}" for i in range(50)])])
    d3 = split_cells(more, seed=3)
    assert d3["split"].iloc[: len(ct)].tolist() == d1["split"].tolist()


def test_zero_val_fraction():
    df = split_cells(_types({"a": 40}), train=0.9, val=0.0, test=0.1, seed=0)
    assert set(df["split"]) == {"train", "test"} and (df["split"] == "test").sum() == 4


@pytest.mark.parametrize("fr, match", [((0.8, 0.1, 0.05), "must be 1"), ((1.2, -0.1, -0.1), r"\[0, 1\]"),
                                       ((0.0, 0.5, 0.5), "train must be > 0")])
def test_bad_fractions(fr, match):
    with pytest.raises(ConfigError, match=match):
        split_cells(_types({"a": 10}), *fr, seed=0)


def test_split_file_writes_tsv_and_report(tmp_path):
    import anndata as ad

    ct = _types({"a": 50, "b": 1})
    a = ad.AnnData(X=np.zeros((51, 2), dtype=np.float32), obs=pd.DataFrame({"cell_type": ct.to_numpy()},
                                                                             index=ct.index))
    a.write_h5ad(tmp_path / "filtered.h5ad")
    out = tmp_path / "split.tsv"
    split_file(tmp_path / "filtered.h5ad", out, 0.9, 0.05, 0.05, 0)
    df = pd.read_csv(out, sep="\t")
    assert list(df.columns) == ["cell", "split"] and len(df) == 51
    rep = json.loads((tmp_path / "split_report.json").read_text())
    assert rep["too_small"] == [{"cell_type": "b", "n_cells": 1, "missing": ["val", "test"]}]
    assert rep["per_cell_type"]["a"] == {"train": 46, "val": 2, "test": 2}


def test_split_file_bad_input_leaves_nothing(tmp_path):
    import anndata as ad

    out = tmp_path / "o" / "split.tsv"
    with pytest.raises(InputError, match="filtered.h5ad not found"):
        split_file(tmp_path / "filtered.h5ad", out)
    ad.AnnData(X=np.zeros((3, 2), dtype=np.float32)).write_h5ad(tmp_path / "filtered.h5ad")
    with pytest.raises(InputError, match="no 'cell_type' column"):
        split_file(tmp_path / "filtered.h5ad", out)
    assert not out.parent.exists() or not list(out.parent.iterdir())
