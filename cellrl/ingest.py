"""Ingest: read a raw scRNA matrix in any supported format into one AnnData (``rna/raw.h5ad``).

The dataset's ``rna:`` entry of the config declares everything (see config/README.md):

* ``path`` and ``format``: ``h5ad`` | ``10x_h5`` (Cell Ranger v3 HDF5, ``matrix/`` group) | ``10x_mtx`` (a
  directory with ``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or ``genes.tsv[.gz]``, ``barcodes.tsv[.gz]``) |
  ``csv`` | ``tsv`` (first column = row names, first row = column names);
* ``genes_as_rows``: required for csv/tsv (``true`` when rows are genes, e.g. BEELINE's ExpressionData.csv);
  for h5ad ``true`` transposes; ignored for 10x (always genes x cells on disk, read as cells x genes). A matrix
  whose "genes" look like cell names (barcodes, one shared name pattern) while its "cells" look like gene
  symbols or Ensembl IDs is refused as transposed;
* ``layer`` (h5ad): the matrix to read, ``X`` (default), ``raw`` (``.raw.X`` and its genes) or a name in
  ``.layers``; scaled (negative) values are refused with the unscaled alternatives the file holds;
* ``expression``: ``counts`` (non-negative integers, checked) or ``lognorm`` (log-normalised, non-negative);
* ``cell_type``: one of ``obs_column`` (a column of the h5ad's obs), ``table`` (CSV/TSV with columns ``cell``
  and ``cell_type``; cells absent from the table are dropped with a warning) or ``from_name_regex`` (a regex
  with one capture group searched in each cell name, e.g. ``_(\\d+h)_`` for ``RamDA_mESC_00h_A04``). With none
  set, no labels are attached and the filter stage clusters cells with Leiden.

Output: X = the matrix as given (CSR float32), ``obs["cell_type"]`` (str, when labelled; at least two types),
gene symbols normalised (``capitalize``: ``POU5F1`` -> ``Pou5f1``; ``upper``; ``as_is``; Ensembl IDs are kept
as they are) and made unique (with a warning naming the repeats), ``uns["cellrl"]`` with ``expression`` and
provenance. Every problem raises ``InputError`` naming the file, the field (``datasets.<name>.rna...`` when the
dataset is known) and the fix; nothing is written then.
"""

from __future__ import annotations

import gzip
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ConfigError, InputError
from .io import write_h5ad

log = logging.getLogger(__name__)

FORMATS = ("h5ad", "10x_h5", "10x_mtx", "csv", "tsv")
GENE_SYMBOLS = ("as_is", "capitalize", "upper")
ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d+(\.\d+)?$")  # ENSG00000141510, ENSMUSG00000000001.3: never re-cased
_BARCODE = re.compile(r"[ACGT]{10,}")  # a 10x / Drop-seq cell barcode somewhere in the name
_SYMBOL = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------------------------------------
# readers: each returns (X cells x genes, cell names, gene names, obs DataFrame or None)
# ---------------------------------------------------------------------------------------------------------
def _read_h5ad(path: Path, transpose: bool, layer: str | None = None):
    """The h5ad's matrix ``layer`` (X, raw or a name in .layers) and the other matrices it holds."""
    import anndata as ad

    a = ad.read_h5ad(path)
    others = (["raw"] if a.raw is not None else []) + [str(k) for k in a.layers]
    layer = layer or "X"
    if layer == "X":
        X, var = a.X, a.var
    elif layer == "raw":
        if a.raw is None:
            raise InputError("rna.layer is 'raw' but the h5ad has no .raw", path=path, field="rna.layer",
                             fix=f"set rna.layer to X or one of its layers {list(a.layers)}")
        X, var = a.raw.X, a.raw.var
    elif layer in a.layers:
        X, var = a.layers[layer], a.var
    else:
        raise InputError(f"no layer {layer!r} in the h5ad (layers: {list(a.layers)}, .raw: "
                         f"{'yes' if a.raw is not None else 'no'})", path=path, field="rna.layer",
                         fix="set rna.layer to X, raw (when .raw exists) or one of the layers listed")
    if X is None:
        raise InputError("the h5ad has no X matrix", path=path, field="rna.layer",
                         fix=f"set rna.layer to one of {others}" if others else "write the matrix into X")
    others = [o for o in ["X"] + others if o != layer]
    cells, genes, obs = list(map(str, a.obs_names)), list(map(str, var.index)), a.obs.copy()
    if transpose:
        X, cells, genes, obs = X.T, genes, cells, var.copy()
    return X, cells, genes, obs, others


def _read_10x_h5(path: Path):
    import h5py

    with h5py.File(path, "r") as f:
        if "matrix" not in f:
            raise InputError("not a Cell Ranger v3 HDF5 file (no 'matrix' group; v2 files keyed by genome are "
                             "not supported)", path=path, field="rna.format",
                             fix="convert it to h5ad or a 10x mtx directory, or check rna.format")
        g = f["matrix"]
        shape = tuple(int(x) for x in g["shape"][:])          # (genes, cells)
        m = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=shape)
        cells = [b.decode() if isinstance(b, bytes) else str(b) for b in g["barcodes"][:]]
        feats = g["features"]
        names = feats["name"][:] if "name" in feats else feats["id"][:]
        genes = [b.decode() if isinstance(b, bytes) else str(b) for b in names]
        if "feature_type" in feats:
            ftype = np.array([b.decode() if isinstance(b, bytes) else str(b) for b in feats["feature_type"][:]])
            keep = ftype == "Gene Expression"
            if not keep.all():
                log.info("10x h5: keeping %d 'Gene Expression' features of %d", keep.sum(), len(keep))
                m = m[np.flatnonzero(keep)]
                genes = [x for x, k in zip(genes, keep) if k]
    return m.T.tocsr(), cells, genes, None


def _open_text(p: Path):
    return gzip.open(p, "rt") if p.suffix == ".gz" else open(p)


def _find(d: Path, stems: tuple[str, ...]) -> Path | None:
    for s in stems:
        for suf in ("", ".gz"):
            if (d / f"{s}{suf}").exists():
                return d / f"{s}{suf}"
    return None


def _read_10x_mtx(path: Path):
    import scipy.io

    if not path.is_dir():
        raise InputError("rna.format is 10x_mtx but the path is not a directory", path=path, field="rna.path",
                         fix="point rna.path at the folder holding matrix.mtx(.gz), features.tsv(.gz), "
                             "barcodes.tsv(.gz)")
    mtx = _find(path, ("matrix.mtx",))
    feats = _find(path, ("features.tsv", "genes.tsv"))
    bcs = _find(path, ("barcodes.tsv",))
    missing = [n for n, p in (("matrix.mtx", mtx), ("features.tsv/genes.tsv", feats), ("barcodes.tsv", bcs))
               if p is None]
    if missing:
        raise InputError(f"10x mtx directory lacks {missing}", path=path, field="rna.path",
                         fix="a 10x mtx folder needs matrix.mtx, features.tsv (or genes.tsv) and barcodes.tsv, "
                             "each optionally .gz")
    with (gzip.open(mtx, "rb") if mtx.suffix == ".gz" else open(mtx, "rb")) as fh:
        m = scipy.io.mmread(fh)
    with _open_text(feats) as fh:
        f = pd.read_csv(fh, sep="\t", header=None, dtype=str)
    with _open_text(bcs) as fh:
        cells = pd.read_csv(fh, sep="\t", header=None, dtype=str)[0].tolist()
    genes = (f[1] if f.shape[1] > 1 else f[0]).tolist()
    m = sp.csr_matrix(m)
    if m.shape != (len(genes), len(cells)):
        raise InputError(f"matrix.mtx is {m.shape[0]} x {m.shape[1]} but there are {len(genes)} features and "
                         f"{len(cells)} barcodes", path=path, fix="the three files must come from the same run")
    if f.shape[1] > 2:
        keep = (f[2] == "Gene Expression").to_numpy()
        if not keep.all():
            m = m[np.flatnonzero(keep)]
            genes = [x for x, k in zip(genes, keep) if k]
    return m.T.tocsr(), cells, genes, None


def read_numeric_table(path: Path, sep: str, field: str, format_hint: str) -> pd.DataFrame:
    """A delimited table with row names in its first column and numbers elsewhere; InputError (file, ``field``,
    fix ending in ``format_hint``) when it is empty, unreadable or holds a non-numeric column."""
    kind = "CSV" if sep == "," else "TSV"
    try:
        df = pd.read_csv(path, sep=sep, index_col=0)
    except Exception as e:
        raise InputError(f"cannot read as {kind} ({type(e).__name__}: {e})", path=path, field=field,
                         fix=f"first column = row names, first row = column names, numbers elsewhere; {format_hint}"
                         ) from e
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise InputError(f"empty table ({df.shape[0]} rows x {df.shape[1]} columns)", path=path, field=field,
                         fix=f"first column = row names, first row = column names; {format_hint}")
    nonnum = [str(c) for c, t in df.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
    if nonnum:
        raise InputError(f"{len(nonnum)} non-numeric column(s), e.g. {nonnum[:3]}", path=path, field=field,
                         fix=f"the first column must hold the row names and every other column numbers; {format_hint}")
    return df


def _read_delimited(path: Path, sep: str, genes_as_rows: bool | None):
    if genes_as_rows is None:
        raise InputError("genes_as_rows is not set", path=path, field="rna.genes_as_rows",
                         fix="declare the orientation: genes_as_rows: true (rows are genes) or false "
                             "(rows are cells)")
    df = read_numeric_table(path, sep, "rna.path", "check rna.format (csv = comma, tsv = tab)")
    # pandas renames repeated column names (Sox2, Sox2.1) silently: restore them so that the repeats are
    # reported and made unique like repeated row names
    header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].tolist()
    if len(header) == df.shape[1] + 1:
        df.columns = pd.Index(header[1:])
    if genes_as_rows:
        df = df.T
    X = sp.csr_matrix(df.to_numpy(dtype=np.float64))
    return X, list(map(str, df.index)), list(map(str, df.columns)), None


# ---------------------------------------------------------------------------------------------------------
def normalise_symbols(names: list[str], mode: str) -> list[str]:
    """Gene symbols as configured: ``capitalize`` (Pou5f1), ``upper`` (POU5F1) or ``as_is``; Ensembl IDs
    (``ENSMUSG00000000001``, optionally ``.version``) are left unchanged in every mode."""
    if mode == "as_is":
        return list(names)
    if mode == "capitalize":
        return [n if ENSEMBL_ID.match(n) else n[:1].upper() + n[1:].lower() for n in names]
    if mode == "upper":
        return [n if ENSEMBL_ID.match(n) else n.upper() for n in names]
    raise ConfigError(f"ingest.gene_symbols must be one of {GENE_SYMBOLS}, got {mode!r}")


def _name_shape(name: str) -> str:
    """Character classes of a name with runs collapsed: ``RamDA_mESC_00h_A04`` -> ``AaA_aA_9a_A9``."""
    s = re.sub(r"[A-Z]+", "A", name)
    s = re.sub(r"[a-z]+", "a", s)
    return re.sub(r"[0-9]+", "9", s)


def _name_stats(names: list[str]) -> dict[str, float]:
    """Fractions of names that look like barcodes, Ensembl IDs or gene symbols, and the share of the most
    common name shape (cell names share one; gene symbols at most ~0.7 in real data)."""
    step = max(1, len(names) // 2000)  # an even sample is enough and keeps this O(2000)
    sample = names[::step]
    n = len(sample)
    shapes = pd.Series([_name_shape(x) for x in sample]).value_counts()
    return {"barcode": sum(bool(_BARCODE.search(x)) for x in sample) / n,
            "ensembl": sum(bool(ENSEMBL_ID.match(x)) for x in sample) / n,
            "symbol": sum(bool(_SYMBOL.match(x)) for x in sample) / n,
            "shape": float(shapes.iloc[0]) / n}


def transposed_reason(cells: list[str], genes: list[str]) -> str | None:
    """Why a cells x genes matrix looks transposed (its genes named like cells, its cells like genes), or None.

    Signals: most "genes" carry a cell barcode while no "cell" does; most "cells" are Ensembl gene IDs while no
    "gene" is; or every "gene" shares one name shape with a running number (``c0``, ``cell00042``,
    ``RamDA_mESC_00h_A04``) while the "cells" look like varied gene symbols. Needs >= 5 names on each axis.
    """
    if len(cells) < 5 or len(genes) < 5:
        return None
    c, g = _name_stats(cells), _name_stats(genes)
    if g["barcode"] >= 0.5 and c["barcode"] < 0.1:
        return f"{g['barcode']:.0%} of the gene names look like cell barcodes (e.g. {genes[:2]})"
    if c["ensembl"] >= 0.5 and g["ensembl"] < 0.1:
        return f"{c['ensembl']:.0%} of the cell names are Ensembl gene IDs (e.g. {cells[:2]})"
    if (g["shape"] >= 0.95 and c["shape"] <= 0.8 and c["symbol"] >= 0.9 and c["barcode"] < 0.1
            and g["ensembl"] < 0.1 and any(ch.isdigit() for ch in genes[0])):
        return (f"the {len(genes)} gene names all follow one pattern, as cell names do (e.g. {genes[:3]}), while "
                f"the {len(cells)} cell names look like gene symbols (e.g. {cells[:3]})")
    return None


def check_values(X: Any, expression: str, path: object, others: list[str] | None = None) -> None:
    """Raise InputError when values are NaN/inf, negative, or non-integer for ``expression: counts``.

    ``others``: the other matrices of an h5ad (``X``, ``raw``, layer names), suggested as ``rna.layer``.
    """
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    alt = (f"; this h5ad also holds {others}: read one of them with rna.layer (e.g. rna.layer: "
           f"{'raw' if 'raw' in others else others[0]})") if others else ""
    if data.size and not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise InputError(f"{n} NaN or infinite value(s) in the expression matrix", path=path, field="rna.path",
                         fix="remove or impute them before ingest (missing UMI counts are 0)")
    if data.size and (data < 0).any():
        n = int((data < 0).sum())
        raise InputError(f"{n} negative value(s) (min {data.min():.3g}) in the expression matrix", path=path,
                         field="rna.expression",
                         fix="give raw counts (expression: counts) or log-normalised values >= 0 "
                             f"(expression: lognorm), not scaled/centred data{alt}")
    if expression == "counts":
        frac = data[np.abs(data - np.round(data)) > 1e-6]
        if frac.size:
            raise InputError(f"expression is declared 'counts' but {frac.size} value(s) are not integers "
                             f"(e.g. {frac[0]:.4g})", path=path, field="rna.expression",
                             fix="set expression: lognorm for log-normalised input, or point rna.path at raw "
                                 f"UMI counts{alt}")
    elif expression == "lognorm":
        if data.size and np.all(np.abs(data - np.round(data)) < 1e-9) and data.max() > 20:
            log.warning("%s: expression is declared 'lognorm' but every value is an integer up to %g; are these "
                        "raw counts? (set expression: counts)", path, data.max())
    else:
        raise ConfigError(f"rna.expression must be counts or lognorm, got {expression!r}")


def _cell_types(rna: Mapping[str, Any], cells: list[str], obs: pd.DataFrame | None, path: Path):
    """Labels per cell (pd.Series indexed like ``cells``, NaN where unknown) and a description of the source."""
    ct = rna.get("cell_type") or {}
    given = {k: v for k, v in ct.items() if v not in (None, "")}
    if len(given) > 1:
        raise InputError(f"rna.cell_type sets {sorted(given)}; choose one", path=path, field="rna.cell_type",
                         fix="set only one of obs_column, table, from_name_regex")
    if not given:
        return None, "none (Leiden clusters at filter)"
    key, val = next(iter(given.items()))
    idx = pd.Index(cells)
    if key == "obs_column":
        if obs is None:
            raise InputError(f"cell_type.obs_column={val!r} needs an h5ad input; {rna['format']} has no obs",
                             path=path, field="rna.cell_type.obs_column",
                             fix="use cell_type.table (a cell -> cell_type file) or cell_type.from_name_regex")
        if val not in obs.columns:
            raise InputError(f"cell-type column {val!r} not in obs (columns: {list(obs.columns)})", path=path,
                             field="rna.cell_type.obs_column", fix="set obs_column to one of those columns")
        lab = pd.Series(obs[val].to_numpy(), index=idx, dtype=object)
        return lab, f"obs column {val!r}"
    if key == "table":
        tp = Path(val)
        if not tp.exists():
            raise InputError("cell-type table not found", path=tp, field="rna.cell_type.table",
                             fix="give an existing CSV/TSV with columns cell, cell_type")
        sep = "," if tp.suffix.lower() in (".csv",) or tp.name.lower().endswith(".csv.gz") else "\t"
        tab = pd.read_csv(tp, sep=sep, dtype=str)
        if not {"cell", "cell_type"} <= set(tab.columns):
            raise InputError(f"cell-type table needs columns 'cell' and 'cell_type', has {list(tab.columns)}",
                             path=tp, field="rna.cell_type.table", fix="rename its header to: cell<sep>cell_type")
        if tab["cell"].duplicated().any():
            raise InputError(f"{int(tab['cell'].duplicated().sum())} duplicated cell name(s) in the table",
                             path=tp, field="rna.cell_type.table", fix="give each cell one row")
        lab = tab.set_index("cell")["cell_type"].reindex(idx)
        return lab.astype(object), f"table {str(tp)!r}"
    if key == "from_name_regex":
        try:
            rx = re.compile(val)
        except re.error as e:
            raise InputError(f"invalid regex {val!r}: {e}", field="rna.cell_type.from_name_regex",
                             fix="write a Python regex with one capture group, e.g. '_(\\d+h)_'") from e
        if rx.groups != 1:
            raise InputError(f"regex {val!r} has {rx.groups} capture groups; it needs exactly one",
                             field="rna.cell_type.from_name_regex", fix="wrap the cell-type part in ( )")
        vals = []
        for c in cells:
            mt = rx.search(c)
            vals.append(mt.group(1) if mt else np.nan)
        return pd.Series(vals, index=idx, dtype=object), f"cell names via regex {val!r}"
    raise ConfigError(f"unknown rna.cell_type key {key!r}")


def read_rna(rna: Mapping[str, Any], gene_symbols: str = "capitalize", dataset: str | None = None):
    """Read the dataset declared by ``rna`` (a dataset's ``rna:`` config entry) into a checked AnnData.

    Returns an AnnData (cells x genes, X CSR float32 as given), ``obs["cell_type"]`` (str) when a cell-type
    source is configured, ``uns["cellrl"]`` = {expression, format, path, gene_symbols, cell_type_source,
    dataset}. Raises InputError (file, field, fix) for a missing/unreadable/empty input, a matrix that looks
    transposed, NaN/inf or negative values, non-integer values declared as counts, a missing cell-type column,
    no labelled cell, or a single cell type. With ``dataset``, fields read ``datasets.<dataset>.rna...``.
    """
    try:
        adata = _read_rna(rna, gene_symbols)
    except InputError as e:
        if dataset and e.field and e.field.startswith("rna."):
            raise InputError(e.what, path=e.path, field=f"datasets.{dataset}.{e.field}", fix=e.fix) from e
        raise
    if dataset:
        adata.uns["cellrl"]["dataset"] = dataset
    return adata


def _read_rna(rna: Mapping[str, Any], gene_symbols: str):
    import anndata as ad

    for k in ("path", "format", "expression"):
        if k not in rna:
            raise ConfigError(f"rna entry lacks required key {k!r} (see config/README.md)")
    path, fmt, expression = Path(rna["path"]), rna["format"], rna["expression"]
    if fmt not in FORMATS:
        raise ConfigError(f"rna.format must be one of {FORMATS}, got {fmt!r}")
    if expression not in ("counts", "lognorm"):
        raise ConfigError(f"rna.expression must be counts or lognorm, got {expression!r}")
    if not path.exists():
        raise InputError("input file not found", path=path, field="rna.path",
                         fix="fix rna.path in config/config.yaml (relative paths start at the project root)")
    genes_as_rows = rna.get("genes_as_rows")
    layer = rna.get("layer")
    if fmt != "h5ad" and layer not in (None, "X"):
        raise InputError(f"rna.layer: {layer} applies to h5ad input only, this is {fmt}", path=path,
                         field="rna.layer", fix="remove rna.layer (or point rna.path at the h5ad)")
    others: list[str] = []
    try:
        if fmt == "h5ad":
            X, cells, genes, obs, others = _read_h5ad(path, bool(genes_as_rows), layer)
        elif fmt == "10x_h5":
            X, cells, genes, obs = _read_10x_h5(path)
        elif fmt == "10x_mtx":
            X, cells, genes, obs = _read_10x_mtx(path)
        else:
            X, cells, genes, obs = _read_delimited(path, "," if fmt == "csv" else "\t", genes_as_rows)
    except InputError:
        raise
    except Exception as e:  # any parser failure: say which file and what format was expected
        raise InputError(f"cannot read as {fmt} ({type(e).__name__}: {e})", path=path, field="rna.format",
                         fix=f"check that the file is a valid {fmt} file or set rna.format to its real format") \
            from e
    if fmt in ("10x_h5", "10x_mtx") and genes_as_rows:
        log.warning("%s: genes_as_rows is ignored for %s (10x files are always genes x cells)", path, fmt)
    n_cells, n_genes = X.shape
    if n_cells == 0 or n_genes == 0:
        raise InputError(f"empty expression matrix ({n_cells} cells x {n_genes} genes)", path=path,
                         field="rna.path", fix="point rna.path at a non-empty matrix")
    if fmt in ("csv", "tsv", "h5ad"):  # the formats whose orientation the config declares
        why = transposed_reason(cells, genes)
        if why:
            flip = not bool(genes_as_rows)
            raise InputError(f"the matrix looks transposed (read as {n_cells} cells x {n_genes} genes): {why}",
                             path=path, field="rna.genes_as_rows",
                             fix=f"set rna.genes_as_rows: {str(flip).lower()} (it is "
                                 f"{'unset' if genes_as_rows is None else str(bool(genes_as_rows)).lower()}): "
                                 f"{'rows' if flip else 'columns'} of the file are the genes")
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.tocsr().astype(np.float32)
    X.eliminate_zeros()
    if X.nnz == 0:
        raise InputError(f"expression matrix ({n_cells} x {n_genes}) holds only zeros", path=path,
                         field="rna.path", fix="point rna.path at the real matrix")
    check_values(X, expression, path, others)

    labels, ct_source = _cell_types(rna, cells, obs, path)
    obs_out = obs.copy() if obs is not None else pd.DataFrame(index=pd.Index(cells))
    obs_out.index = pd.Index(cells)
    if labels is not None:
        missing = labels.isna().to_numpy() | (labels.astype(str).str.strip() == "").to_numpy()
        if missing.all():
            raise InputError(f"no cell got a cell type from {ct_source} (e.g. cell {cells[0]!r})", path=path,
                             field="rna.cell_type",
                             fix="check the cell names/column/regex; for a regex, one capture group must match "
                                 "each cell name")
        if missing.any():
            log.warning("%s: %d of %d cells have no cell type from %s (e.g. %s); dropping them", path,
                        int(missing.sum()), n_cells, ct_source, [cells[i] for i in np.flatnonzero(missing)[:3]])
            keep = np.flatnonzero(~missing)
            X, obs_out, labels = X[keep], obs_out.iloc[keep], labels.iloc[keep]
        kinds = sorted(set(labels.astype(str)))
        if len(kinds) < 2:
            key = next(k for k, v in (rna.get("cell_type") or {}).items() if v not in (None, ""))
            raise InputError(f"every cell has the same cell type ({kinds[0]!r}, from {ct_source}); a plan needs "
                             "a start type and a different target type", path=path, field=f"rna.cell_type.{key}",
                             fix="point rna.cell_type at a source with at least two types (another obs column, "
                                 "a table, a regex), or remove rna.cell_type so that the filter stage clusters "
                                 "the cells (Leiden)")
        obs_out["cell_type"] = pd.Categorical(labels.astype(str).to_numpy())

    symbols = normalise_symbols(genes, gene_symbols)
    var = pd.DataFrame(index=pd.Index(symbols))
    var["original_symbol"] = genes
    adata = ad.AnnData(X=X, obs=obs_out, var=var)
    if adata.var_names.has_duplicates:
        _warn_duplicate_genes(path, genes, symbols, gene_symbols)
        adata.var_names_make_unique()
    if adata.obs_names.has_duplicates:
        log.warning("%s: %d duplicated cell name(s); made unique", path, int(adata.obs_names.duplicated().sum()))
        adata.obs_names_make_unique()
    # obs columns of arbitrary object types do not always serialise; keep them as strings
    for c in adata.obs.columns:
        if adata.obs[c].dtype == object:
            adata.obs[c] = adata.obs[c].astype(str)
    adata.uns["cellrl"] = {"expression": expression, "format": fmt, "path": str(path),
                           "gene_symbols": gene_symbols, "cell_type_source": ct_source}
    log.info("ingest %s (%s, %s): %d cells x %d genes, cell types: %s", path, fmt, expression, adata.n_obs,
             adata.n_vars, dict(adata.obs["cell_type"].value_counts()) if "cell_type" in adata.obs else ct_source)
    return adata


def _warn_duplicate_genes(path: object, genes: list[str], symbols: list[str], mode: str) -> None:
    """Log which gene names repeat (in the file, or only after symbol normalisation) and how they are kept."""
    in_file = pd.Index(genes)
    rep_file = sorted(set(in_file[in_file.duplicated()]))
    sym = pd.Index(symbols)
    from_file = set(rep_file)
    rep_sym = sorted(set(sym[sym.duplicated()]) - {s for g, s in zip(genes, symbols) if g in from_file})
    parts = []
    if rep_file:
        parts.append(f"{len(rep_file)} gene name(s) occur more than once in the file: {rep_file[:10]}"
                     f"{' ...' if len(rep_file) > 10 else ''}")
    if rep_sym:
        parts.append(f"{len(rep_sym)} symbol(s) collide after ingest.gene_symbols: {mode}: {rep_sym[:10]}"
                     f"{' ...' if len(rep_sym) > 10 else ''}")
    log.warning("%s: %s. Every copy is kept as its own gene: the first under its name, the next ones renamed "
                "<name>-1, <name>-2, ... (only the first matches the base GRN); merge or drop them in the input "
                "if they are the same gene", path, "; ".join(parts))


def ingest_file(rna: Mapping[str, Any], out_path: str | Path, gene_symbols: str = "capitalize",
                dataset: str | None = None) -> Path:
    """Read the dataset (see ``read_rna``) and write it to ``out_path`` (``rna/raw.h5ad``) atomically."""
    adata = read_rna(rna, gene_symbols=gene_symbols, dataset=dataset)
    return write_h5ad(out_path, adata)
