"""Ingest: read a raw scRNA matrix in any supported format into one AnnData (``rna/raw.h5ad``).

The dataset's ``rna:`` entry of the config declares everything (see config/README.md):

* ``path`` and ``format``: ``h5ad`` | ``10x_h5`` (Cell Ranger v3 HDF5, ``matrix/`` group) | ``10x_mtx`` (a
  directory with ``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or ``genes.tsv[.gz]``, ``barcodes.tsv[.gz]``) |
  ``csv`` | ``tsv`` (first column = row names, first row = column names);
* ``genes_as_rows``: required for csv/tsv (``true`` when rows are genes, e.g. BEELINE's ExpressionData.csv);
  for h5ad ``true`` transposes; ignored for 10x (always genes x cells on disk, read as cells x genes);
* ``expression``: ``counts`` (non-negative integers, checked) or ``lognorm`` (log-normalised, non-negative);
* ``cell_type``: one of ``obs_column`` (a column of the h5ad's obs), ``table`` (CSV/TSV with columns ``cell``
  and ``cell_type``; cells absent from the table are dropped with a warning) or ``from_name_regex`` (a regex
  with one capture group searched in each cell name, e.g. ``_(\\d+h)_`` for ``RamDA_mESC_00h_A04``). With none
  set, no labels are attached and the filter stage clusters cells with Leiden.

Output: X = the matrix as given (CSR float32), ``obs["cell_type"]`` (str, when labelled), gene symbols
normalised (``capitalize``: ``POU5F1`` -> ``Pou5f1``; ``upper``; ``as_is``) and made unique,
``uns["cellrl"]`` with ``expression`` and provenance. Every problem raises ``InputError`` naming the file, the
field and the fix; nothing is written then.
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


# ---------------------------------------------------------------------------------------------------------
# readers: each returns (X cells x genes, cell names, gene names, obs DataFrame or None)
# ---------------------------------------------------------------------------------------------------------
def _read_h5ad(path: Path, transpose: bool):
    import anndata as ad

    a = ad.read_h5ad(path)
    if transpose:
        a = a.T
    return a.X, list(map(str, a.obs_names)), list(map(str, a.var_names)), a.obs.copy()


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


def _read_delimited(path: Path, sep: str, genes_as_rows: bool | None):
    if genes_as_rows is None:
        raise InputError("genes_as_rows is not set", path=path, field="rna.genes_as_rows",
                         fix="declare the orientation: genes_as_rows: true (rows are genes) or false "
                             "(rows are cells)")
    df = pd.read_csv(path, sep=sep, index_col=0)
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise InputError(f"empty table ({df.shape[0]} rows x {df.shape[1]} columns)", path=path, field="rna.path",
                         fix="check the file and rna.format (csv = comma, tsv = tab)")
    nonnum = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if nonnum:
        raise InputError(f"{len(nonnum)} non-numeric column(s), e.g. {nonnum[:3]}", path=path, field="rna.path",
                         fix="the first column must hold the row names and every other column numbers; "
                             "check rna.format (csv vs tsv)")
    if genes_as_rows:
        df = df.T
    X = sp.csr_matrix(df.to_numpy(dtype=np.float64))
    return X, list(map(str, df.index)), list(map(str, df.columns)), None


# ---------------------------------------------------------------------------------------------------------
def normalise_symbols(names: list[str], mode: str) -> list[str]:
    """Gene symbols as configured: ``capitalize`` (Pou5f1), ``upper`` (POU5F1) or ``as_is``."""
    if mode == "as_is":
        return list(names)
    if mode == "capitalize":
        return [n[:1].upper() + n[1:].lower() for n in names]
    if mode == "upper":
        return [n.upper() for n in names]
    raise ConfigError(f"ingest.gene_symbols must be one of {GENE_SYMBOLS}, got {mode!r}")


def check_values(X: Any, expression: str, path: object) -> None:
    """Raise InputError when values are NaN/inf, negative, or non-integer for ``expression: counts``."""
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    if data.size and not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise InputError(f"{n} NaN or infinite value(s) in the expression matrix", path=path, field="rna.path",
                         fix="remove or impute them before ingest (missing UMI counts are 0)")
    if data.size and (data < 0).any():
        n = int((data < 0).sum())
        raise InputError(f"{n} negative value(s) (min {data.min():.3g}) in the expression matrix", path=path,
                         field="rna.expression",
                         fix="give raw counts (expression: counts) or log-normalised values >= 0 "
                             "(expression: lognorm), not scaled/centred data")
    if expression == "counts":
        frac = data[np.abs(data - np.round(data)) > 1e-6]
        if frac.size:
            raise InputError(f"expression is declared 'counts' but {frac.size} value(s) are not integers "
                             f"(e.g. {frac[0]:.4g})", path=path, field="rna.expression",
                             fix="set expression: lognorm for log-normalised input, or point rna.path at raw "
                                 "UMI counts")
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


def read_rna(rna: Mapping[str, Any], gene_symbols: str = "capitalize"):
    """Read the dataset declared by ``rna`` (a dataset's ``rna:`` config entry) into a checked AnnData.

    Returns an AnnData (cells x genes, X CSR float32 as given), ``obs["cell_type"]`` (str) when a cell-type
    source is configured, ``uns["cellrl"]`` = {expression, format, path, gene_symbols, cell_type_source}.
    Raises InputError (file, field, fix) for a missing/unreadable/empty input, NaN/inf or negative values,
    non-integer values declared as counts, a missing cell-type column, or no labelled cell.
    """
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
    try:
        if fmt == "h5ad":
            X, cells, genes, obs = _read_h5ad(path, bool(genes_as_rows))
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
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.tocsr().astype(np.float32)
    X.eliminate_zeros()
    if X.nnz == 0:
        raise InputError(f"expression matrix ({n_cells} x {n_genes}) holds only zeros", path=path,
                         field="rna.path", fix="point rna.path at the real matrix")
    check_values(X, expression, path)

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
        obs_out["cell_type"] = pd.Categorical(labels.astype(str).to_numpy())

    var = pd.DataFrame(index=pd.Index(normalise_symbols(genes, gene_symbols)))
    var["original_symbol"] = genes
    adata = ad.AnnData(X=X, obs=obs_out, var=var)
    if adata.var_names.has_duplicates:
        n = int(adata.var_names.duplicated().sum())
        log.warning("%s: %d duplicated gene symbol(s) after '%s' normalisation (e.g. %s); made unique with "
                    "suffixes -1, -2, ...", path, n, gene_symbols,
                    list(adata.var_names[adata.var_names.duplicated()][:3]))
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


def ingest_file(rna: Mapping[str, Any], out_path: str | Path, gene_symbols: str = "capitalize") -> Path:
    """Read the dataset (see ``read_rna``) and write it to ``out_path`` (``rna/raw.h5ad``) atomically."""
    adata = read_rna(rna, gene_symbols=gene_symbols)
    return write_h5ad(out_path, adata)
