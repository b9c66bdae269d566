"""Place a cell that is not in the transition table (a user's own sample) at its nearest table cells.

``cellrl plan --expression FILE --cell ID`` plans from the table cell nearest to the user's cell. Steps:

1. **Read** the cell: an h5ad (``X``) or a CSV/TSV (first column = row names, first row = column names), in
   either orientation: the axis whose names match more of the model's genes is taken as the genes.
2. **Match genes** to the model's: the dataset's symbol normalisation (``ingest.gene_symbols``, recorded by
   ingest in ``rna/filtered.h5ad``) first, then case-insensitively. Fewer than ``MIN_GENE_FRACTION`` of the
   model's genes found is an error; missing genes are filled with the table's mean, so that they do not move
   the cell in the comparison space.
3. **Normalise** as the filter stage did: counts -> scaled to the dataset's per-cell total over the model's
   genes (``normalize_target_sum``, times the share of the dataset's total that the found genes carry) ->
   log1p. Log-normalised input is passed through for a ``lognorm`` dataset (the filter stage passes such
   values through) and re-normalised to the dataset's total for a ``counts`` dataset. Counts vs log values are
   detected (all integers = counts) unless given.
4. **Compare** in one of two spaces:

   * ``pca`` (when ``rna/filtered.h5ad`` lies next to the model, i.e. ``results/{dataset}/rna/``, with the
     model's cells and genes): the first ``n_pcs`` principal components (the number CellOracle's kNN
     imputation used) of the log-normalised matrix the oracle was fit on. CellOracle's own PCA is a PCA of
     that same matrix, so this is the space in which the oracle chose each cell's neighbours; table cells and
     the user's cell are both unimputed there, so their distances are comparable.
   * ``z`` (otherwise): the space the environment uses, the oracle's kNN-imputed expression z-scored with the
     training cells' mean and SD (:class:`cellrl.tasks.TaskGeometry`). The table cells are smoothed there and
     a single cell is not, so its distances run far larger than the table's own neighbour distances (the
     dataset's own unimputed cells: median 48 vs a 95th percentile of 9 on the demo atlas, 20 vs 8 on mESC),
     and no far test is made there.

5. **Report** the nearest ``N_NEAREST`` table cells. In the ``pca`` space, warn when the nearest lies farther
   than the ``FAR_PERCENTILE`` th percentile of the table cells' own nearest-neighbour distances (``REF_SAMPLE``
   cells sampled, seeded), or when the cell lies farther from the PCA subspace (its residual) than that
   percentile of the table cells' residuals (a profile unlike any of the dataset's: another tissue, protocol
   or gene naming, shuffled genes), which the distance in the first PCs alone can miss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError
from .ingest import GENE_SYMBOLS, normalise_symbols, read_numeric_table

MIN_GENE_FRACTION = 0.5
N_NEAREST = 5
FAR_PERCENTILE = 95.0
REF_SAMPLE = 1000
EXPRESSION_TYPES = ("auto", "counts", "lognorm")
_FIELD = "--expression"


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class UserCell:
    """One cell of the user's file, over the model's genes."""

    values: np.ndarray          # (G,) f64, the file's values for the model's genes; NaN where not found
    cell: str
    path: Path
    n_file_genes: int
    n_exact: int                # model genes matched by name (after the dataset's symbol normalisation)
    n_case_insensitive: int     # model genes matched only case-insensitively
    genes_as_rows: bool
    all_values: np.ndarray      # every finite value of the cell (for the counts / lognorm detection)
    notes: list[str] = field(default_factory=list)

    @property
    def found(self) -> np.ndarray:
        return ~np.isnan(self.values)


def _read_table(path: Path) -> tuple[Any, list[str], list[str]]:
    """(matrix, row names, column names) of an h5ad (obs x var) or a CSV/TSV as stored."""
    name = path.name.lower()
    if name.endswith(".h5ad"):
        import anndata as ad

        try:
            a = ad.read_h5ad(path)
        except Exception as e:
            raise InputError(f"cannot read as h5ad ({type(e).__name__}: {e})", path=path, field=_FIELD,
                             fix="give a valid .h5ad, or a .csv/.tsv table") from e
        if a.X is None:
            raise InputError("the h5ad has no X matrix", path=path, field=_FIELD,
                             fix=f"write the counts or log-normalised values into X (layers: {list(a.layers)})")
        return a.X, list(map(str, a.obs_names)), list(map(str, a.var_names))
    stem = name[:-3] if name.endswith(".gz") else name
    if stem.endswith(".csv"):
        sep = ","
    elif stem.endswith((".tsv", ".txt")):
        sep = "\t"
    else:
        raise InputError(f"unknown file type {path.suffix!r}", path=path, field=_FIELD,
                         fix="give an .h5ad, .csv or .tsv/.txt file (optionally .gz)")
    df = read_numeric_table(path, sep, _FIELD, "csv: commas, tsv/txt: tabs")
    return df.to_numpy(dtype=np.float64), list(map(str, df.index)), list(map(str, df.columns))


def _gene_index(names: Sequence[str], model_genes: Sequence[str], symbols: str | None) -> tuple[np.ndarray, int, int]:
    """Model gene index of each name (-1 when none; a model gene taken by its first name only), and the numbers
    matched by name (after the ``symbols`` normalisation) and only case-insensitively."""
    model_genes = [str(g) for g in model_genes]
    exact = {g: i for i, g in reversed(list(enumerate(model_genes)))}
    lower: dict[str, int] = {}
    for i, g in enumerate(model_genes):
        lower.setdefault(g.lower(), i)
    norm = normalise_symbols(list(names), symbols) if symbols in GENE_SYMBOLS else list(names)
    idx = np.full(len(names), -1, dtype=np.int64)
    taken = np.zeros(len(model_genes), bool)
    n_exact = n_ci = 0
    for j, (raw, n) in enumerate(zip(names, norm)):
        i = exact.get(n, exact.get(raw, -1))
        if i >= 0 and not taken[i]:
            idx[j], taken[i] = i, True
            n_exact += 1
    for j, n in enumerate(norm):
        if idx[j] < 0:
            i = lower.get(n.lower(), -1)
            if i >= 0 and not taken[i]:
                idx[j], taken[i] = i, True
                n_ci += 1
    return idx, n_exact, n_ci


def read_user_cell(path: str | Path, cell: str | None, model_genes: Sequence[str], symbols: str | None = None,
                   min_fraction: float = MIN_GENE_FRACTION) -> UserCell:
    """Cell ``cell`` of ``path`` over the model's genes; InputError (file, field, fix) for a missing or unreadable
    file, an unknown cell, too few of the model's genes, or values that are negative or infinite."""
    path = Path(path)
    if not path.exists():
        raise InputError("expression file not found", path=path, field=_FIELD,
                         fix="give an .h5ad or .csv/.tsv file with the cell's expression")
    M, rows, cols = _read_table(path)
    G = len(model_genes)
    r_idx, r_ex, r_ci = _gene_index(rows, model_genes, symbols)
    c_idx, c_ex, c_ci = _gene_index(cols, model_genes, symbols)
    genes_as_rows = (r_ex + r_ci) > (c_ex + c_ci)
    g_idx, n_ex, n_ci = (r_idx, r_ex, r_ci) if genes_as_rows else (c_idx, c_ex, c_ci)
    genes, cells = (rows, cols) if genes_as_rows else (cols, rows)
    n_found = n_ex + n_ci
    if n_found < min_fraction * G:
        raise InputError(
            f"only {n_found} of the model's {G} genes ({n_found / max(G, 1):.0%}) are among the file's gene "
            f"names ({len(genes)}; e.g. {genes[:3]}); at least {min_fraction:.0%} are needed to place the cell "
            f"(the model's genes look like {[str(g) for g in model_genes[:3]]}; neither the rows nor the "
            "columns matched better)", path=path, field=_FIELD,
            fix="give the expression of the dataset's genes under the same gene symbols (same species, symbols "
                "rather than Ensembl IDs or the other way round, as the dataset used; the list is gene_names "
                "in model.npz), one row or column per gene, the first column or row holding the names")
    if cell is None:
        if len(cells) != 1:
            raise InputError(f"the file holds {len(cells)} cells; say which with --cell (e.g. {cells[:3]})",
                             path=path, field="--cell", fix="pass --cell <one of the file's cell names>")
        j = 0
    else:
        hits = [k for k, c in enumerate(cells) if c == cell]
        if not hits:
            raise InputError(f"no cell {cell!r} in the file ({len(cells)} cells, e.g. {cells[:5]})", path=path,
                             field="--cell", fix="pass one of the file's cell names (the "
                                                 f"{'column' if genes_as_rows else 'row'} names)")
        j = hits[0]
    vec = M[:, j] if genes_as_rows else M[j]
    vec = np.asarray(vec.toarray() if sp.issparse(vec) else vec, dtype=np.float64).ravel()
    notes: list[str] = []
    if np.isinf(vec).any():
        raise InputError(f"{int(np.isinf(vec).sum())} infinite value(s) for cell {cells[j]!r}", path=path,
                         field=_FIELD, fix="give counts or log-normalised values (finite, >= 0)")
    if (vec < 0).any():
        raise InputError(f"{int((vec < 0).sum())} negative value(s) (min {np.nanmin(vec):.3g}) for cell "
                         f"{cells[j]!r}: scaled or centred data", path=path, field=_FIELD,
                         fix="give raw counts or log-normalised values (>= 0), not scaled/centred data")
    values = np.full(G, np.nan)
    keep = g_idx >= 0
    values[g_idx[keep]] = vec[keep]
    n_nan = int(np.isnan(vec[keep]).sum())
    if n_nan:
        notes.append(f"{n_nan} matched gene(s) have no value (NaN) and count as not found")
    return UserCell(values=values, cell=cells[j], path=path, n_file_genes=len(genes), n_exact=n_ex,
                    n_case_insensitive=n_ci, genes_as_rows=genes_as_rows, all_values=vec[np.isfinite(vec)],
                    notes=notes)


def detect_expression(values: np.ndarray) -> str:
    """``counts`` when every value is an integer (and some is positive), else ``lognorm``."""
    v = values[np.isfinite(values)]
    if v.size and v.max() > 0 and np.all(np.abs(v - np.round(v)) < 1e-6):
        return "counts"
    return "lognorm"


# ---------------------------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """The dataset side of the comparison: table-cell coordinates and what normalisation needs."""

    space: str                             # "pca" | "z"
    description: str
    coords: np.ndarray                     # (C, k) table cells
    project: Callable[[np.ndarray], np.ndarray]  # (G,) log values -> (k,)
    fill: np.ndarray                       # (G,) log value given to missing genes (the table mean)
    gene_count_mean: np.ndarray            # (G,) mean normalised (expm1) value per gene, for the found share
    expression: str | None                 # the dataset's declared expression (counts | lognorm), if recorded
    target_sum: float
    target_sum_source: str
    gene_symbols: str | None
    notes: list[str] = field(default_factory=list)
    residual: Callable[[np.ndarray], float] | None = None   # distance of a log-value vector from the PCA subspace
    table_residual: np.ndarray | None = None                # (C,) that of every table cell


def _read_elem(group: Any) -> Any:
    try:
        from anndata.io import read_elem  # anndata >= 0.11
    except ImportError:  # pragma: no cover - depends on the installed anndata
        from anndata.experimental import read_elem
    return read_elem(group)


def filtered_path(model_path: str | Path | None) -> Path | None:
    """``results/{dataset}/rna/filtered.h5ad`` for ``results/{dataset}/oracle/model.npz`` (None if absent)."""
    if model_path is None:
        return None
    p = Path(model_path).resolve().parent.parent / "rna" / "filtered.h5ad"
    return p if p.exists() else None


def _read_filtered(path: Path, model: Any) -> tuple[sp.csr_matrix, np.ndarray, dict[str, Any]] | str:
    """(X, PCs, uns["cellrl"]) of filtered.h5ad, or why it cannot serve as the reference."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "varm" not in f or "PCs" not in f["varm"]:
                return "it holds no PCA loadings (varm['PCs'])"
            obs = _read_elem(f["obs"]).index.astype(str)
            var = _read_elem(f["var"]).index.astype(str)
            if len(obs) != model.n_cells or not np.array_equal(obs.to_numpy(), model.cell_names.astype(str)):
                return "its cells differ from the model's"
            if len(var) != model.n_genes or not np.array_equal(var.to_numpy(), model.gene_names.astype(str)):
                return "its genes differ from the model's"
            X = sp.csr_matrix(_read_elem(f["X"]), dtype=np.float64)
            pcs = np.asarray(_read_elem(f["varm"]["PCs"]), dtype=np.float64)
            uns = dict(_read_elem(f["uns"]["cellrl"])) if "uns" in f and "cellrl" in f["uns"] else {}
    except Exception as e:  # unreadable: fall back to the z space, say why
        return f"it cannot be read ({type(e).__name__}: {e})"
    if pcs.shape[0] != model.n_genes or pcs.ndim != 2 or pcs.shape[1] < 1:
        return f"its PCA loadings have shape {pcs.shape}"
    return X, pcs, uns


def reference(model: Any, geometry: Any, filtered: Path | None = None) -> Reference:
    """The comparison space: PCA of ``filtered`` (rna/filtered.h5ad) when usable, else ``geometry``'s z space."""
    meta = getattr(model, "meta", {}) or {}
    expression = (meta.get("oracle") or {}).get("expression")
    n_pcs = (meta.get("oracle") or {}).get("n_pcs")
    notes: list[str] = []
    got = _read_filtered(filtered, model) if filtered is not None else "none found next to the model"
    if not isinstance(got, str):
        X, pcs, uns = got
        k = int(min(int(n_pcs) if n_pcs else pcs.shape[1], pcs.shape[1]))
        P = pcs[:, :k]
        mu = np.asarray(X.mean(0)).ravel()
        coords = np.asarray(X @ P) - mu @ P
        sq = np.asarray(X.multiply(X).sum(1)).ravel() - 2.0 * (X @ mu) + mu @ mu  # |x - mu|^2 per cell
        table_res = np.sqrt(np.maximum(sq - np.einsum("ij,ij->i", coords, coords), 0.0))

        def residual(x: np.ndarray) -> float:
            d = x - mu
            c = d @ P
            return float(np.sqrt(max(d @ d - c @ c, 0.0)))
        E = X.copy()
        E.data = np.expm1(E.data)
        totals = np.asarray(E.sum(1)).ravel()
        expression = expression or uns.get("expression")
        rec = uns.get("normalize_target_sum")
        if expression == "counts" and rec is not None:
            target, src = float(rec), f"normalize_target_sum recorded by the filter stage in {filtered.name}"
        else:
            target, src = float(np.median(totals)), ("median per-cell total of the dataset's normalised values "
                                                     f"over the model's genes ({filtered.name})")
        sym = uns.get("gene_symbols")
        return Reference(
            space="pca", description=f"first {k} PCs of the log-normalised expression the oracle was fit on "
                                     f"({filtered}; CellOracle's kNN space)",
            coords=coords, project=lambda x: (x - mu) @ P, fill=mu,
            gene_count_mean=np.asarray(E.mean(0)).ravel(), expression=expression, target_sum=target,
            target_sum_source=src, gene_symbols=str(sym) if sym is not None else None, notes=notes,
            residual=residual, table_residual=table_res)
    notes.append(f"rna/filtered.h5ad not used ({got}): placed in the environment's z-scored imputed expression, "
                 "where table cells are kNN-smoothed and a single cell is not, so its distances run far larger "
                 "than the table's own neighbour distances and whether it is unlike every table cell is not "
                 "judged; keep the results folder's rna/filtered.h5ad next to oracle/model.npz for that")
    X = np.asarray(model.X, dtype=np.float64)
    E = np.expm1(X)
    return Reference(
        space="z", description="z-scored kNN-imputed expression of every model gene (training-cell mean and SD; "
                               "the environment's space)",
        coords=np.asarray(geometry.z), project=lambda x: geometry.transform(x[None])[0].astype(np.float64),
        fill=np.asarray(geometry.mean, dtype=np.float64), gene_count_mean=E.mean(0), expression=expression,
        target_sum=float(np.median(E.sum(1))),
        target_sum_source="estimated: median per-cell total of expm1 of the oracle's imputed expression "
                          "(rna/filtered.h5ad, which records it, was not found; imputation lowers it)",
        gene_symbols=None, notes=notes)


# ---------------------------------------------------------------------------------------------- placing
def normalise_cell(user: UserCell, ref: Reference, kind: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """The user's cell as the filter stage would have given it (log1p of normalised values) over the model's
    genes, missing genes filled with the table mean; and a description of what was done."""
    if kind not in EXPRESSION_TYPES:
        raise InputError(f"expression type must be one of {EXPRESSION_TYPES}, got {kind!r}",
                         field="--expression-type")
    detected = kind == "auto"
    kind = detect_expression(user.all_values) if detected else kind
    found = user.found
    v = user.values[found]
    info: dict[str, Any] = {"input": kind, "detected": detected, "dataset": ref.expression}
    warnings: list[str] = []
    if kind == "counts" and np.abs(user.all_values - np.round(user.all_values)).max(initial=0) > 1e-6:
        raise InputError("--expression-type counts but the cell's values are not integers", path=user.path,
                         field="--expression-type", fix="pass --expression-type lognorm (or auto)")
    if kind == "lognorm" and v.size and v.max() > 30:
        warnings.append(f"log-normalised values up to {v.max():.3g}: these look normalised but not log-"
                        "transformed (log1p); pass log1p values or raw counts")
    if kind == "lognorm" and ref.expression == "lognorm":
        x = v
        info["normalisation"] = ("passed through as given (the dataset is log-normalised, and the filter stage "
                                 "passes such values through)")
    else:
        counts = v if kind == "counts" else np.expm1(v)
        total = counts.sum()
        if total <= 0:
            raise InputError(f"cell {user.cell!r} has no expression in the {int(found.sum())} model genes found",
                             path=user.path, field=_FIELD, fix="check the cell and its gene names")
        share = float(ref.gene_count_mean[found].sum() / max(ref.gene_count_mean.sum(), 1e-300))
        target = ref.target_sum * share
        x = np.log1p(counts * (target / total))
        what = "counts" if kind == "counts" else "expm1 of the log-normalised values"
        how = ("as the filter stage normalised the dataset" if ref.expression != "lognorm" else
               "(the dataset was given log-normalised: its median per-cell total stands for its normalisation)")
        info["normalisation"] = (f"{what} scaled to a total of {target:.6g} over the {int(found.sum())} genes found "
                                 f"(the dataset's {ref.target_sum:.6g} x their share {share:.3f} of it), then "
                                 f"log1p, {how}")
        info["target_sum"] = ref.target_sum
        info["target_sum_source"] = ref.target_sum_source
        if ref.expression is None:
            warnings.append("the model does not record the dataset's expression type; the cell was normalised "
                            "like a counts dataset")
    full = ref.fill.copy()
    full[found] = x
    info["warnings"] = warnings
    return full, info


def nn_distances(coords: np.ndarray, n_sample: int = REF_SAMPLE, seed: int = 0, chunk: int = 256) -> np.ndarray:
    """Distance from each of ``n_sample`` table cells (seeded sample, all when fewer) to its nearest other cell."""
    c = np.asarray(coords, dtype=np.float64 if coords.shape[1] <= 256 else np.float32)
    n = len(c)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, min(n, n_sample), replace=False))
    sq = np.einsum("ij,ij->i", c, c)
    out = np.empty(len(idx))
    for s in range(0, len(idx), chunk):
        q = idx[s:s + chunk]
        d2 = sq[q, None] + sq[None, :] - 2.0 * (c[q] @ c.T)
        d2[np.arange(len(q)), q] = np.inf
        out[s:s + chunk] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return out


def distances_to(coords: np.ndarray, point: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Euclidean distance of every table cell to ``point`` (differences, not the expansion: exact near 0)."""
    out = np.empty(len(coords))
    p = np.asarray(point, dtype=np.float64)
    for s in range(0, len(coords), chunk):
        d = np.asarray(coords[s:s + chunk], dtype=np.float64) - p
        out[s:s + chunk] = np.sqrt(np.einsum("ij,ij->i", d, d))
    return out


def place(model: Any, geometry: Any, path: str | Path, cell: str | None = None, expression_type: str = "auto",
          filtered: Path | None = None, n_nearest: int = N_NEAREST) -> dict[str, Any]:
    """Placement of cell ``cell`` of ``path`` among the model's cells (JSON-ready; see the module docstring).

    ``result["nearest"][0]["cell"]`` is the table cell to plan from. ``filtered``: rna/filtered.h5ad (the PCA
    space), None for the z space of ``geometry``.
    """
    ref = reference(model, geometry, filtered)
    user = read_user_cell(path, cell, model.gene_names, ref.gene_symbols)
    x, expr = normalise_cell(user, ref, expression_type)
    point = ref.project(x)
    d = distances_to(ref.coords, point)
    order = np.argsort(d, kind="stable")[:n_nearest]
    ref_nn = nn_distances(ref.coords)
    p95 = float(np.percentile(ref_nn, FAR_PERCENTILE))
    res = ref.residual(x) if ref.residual is not None else None
    res95 = float(np.percentile(ref.table_residual, FAR_PERCENTILE)) if ref.table_residual is not None else None
    names = np.asarray(model.cell_names).astype(str)
    types = np.asarray(geometry.type_names).astype(str)[np.asarray(geometry.type_ids)]
    split = np.asarray(model.split).astype(str)
    G = int(model.n_genes)
    n_found = int(user.found.sum())
    warnings = list(expr.pop("warnings"))
    dist = float(d[order[0]])
    far: bool | None = None
    if ref.space == "pca":
        far_nn = dist > p95
        far_res = res is not None and res95 is not None and res > res95
        far = bool(far_nn or far_res)
        why = []
        if far_nn:
            why.append(f"the nearest table cell is {dist:.3g} away, farther than {FAR_PERCENTILE:g}% of the table "
                       f"cells are from their own nearest neighbour ({p95:.3g})")
        if far_res:
            why.append(f"it lies {res:.3g} from the dataset's PCA subspace, farther than {FAR_PERCENTILE:g}% of the "
                       f"table cells ({res95:.3g})")
        if why:
            warnings.append(f"{'; '.join(why)}: the cell may be of a type or state the dataset does not hold (or "
                            "from another protocol, batch or gene naming), so plans from its nearest cell may not "
                            "apply to it")
    if n_found < G:
        user.notes.append(f"{G - n_found} model gene(s) not in the file were set to the table mean")
    return {
        "file": str(user.path), "cell": user.cell, "genes_as_rows": bool(user.genes_as_rows),
        "space": ref.space, "space_description": ref.description, "n_dims": int(ref.coords.shape[1]),
        "genes": {"model": G, "found": n_found, "fraction": round(n_found / max(G, 1), 4),
                  "matched_case_insensitively": int(user.n_case_insensitive), "file_genes": int(user.n_file_genes),
                  "symbol_normalisation": ref.gene_symbols},
        "expression": expr,
        "nearest": [{"rank": r + 1, "cell": names[i], "cell_index": int(i), "cell_type": str(types[i]),
                     "split": str(split[i]), "distance": round(float(d[i]), 6)} for r, i in enumerate(order)],
        "distance": round(dist, 6),
        "table_nn_distance": {"median": round(float(np.median(ref_nn)), 6), f"p{FAR_PERCENTILE:g}": round(p95, 6),
                              "n_cells_sampled": int(len(ref_nn))},
        "residual": None if res is None else {
            "value": round(res, 6), "table_median": round(float(np.median(ref.table_residual)), 6),
            f"table_p{FAR_PERCENTILE:g}": round(res95, 6)},
        "far": far, "warnings": warnings, "notes": ref.notes + user.notes,
    }


def format_placement(p: dict[str, Any]) -> str:
    """Human-readable placement: genes found, normalisation, space, the nearest table cells, warnings."""
    g, e = p["genes"], p["expression"]
    ci = f", {g['matched_case_insensitively']} of them matched case-insensitively" \
        if g["matched_case_insensitively"] else ""
    lines = [f"your cell: {p['cell']} ({p['file']})",
             f"  genes : {g['found']} of the model's {g['model']} found ({g['fraction']:.0%}{ci})",
             f"  values: {e['input']}{' (detected)' if e['detected'] else ''}; {e['normalisation']}",
             f"  space : {p['space']}: {p['space_description']}",
             f"  {'rank':>4}  {'nearest table cell':<18} {'cell type':<16} {'split':<6} {'distance':>9}"]
    for r in p["nearest"]:
        lines.append(f"  {r['rank']:>4}  {r['cell']:<18} {r['cell_type']:<16} {r['split']:<6} {r['distance']:>9.3f}")
    t = p["table_nn_distance"]
    p95 = t[f"p{FAR_PERCENTILE:g}"]
    lines.append(f"  distance to the nearest cell {p['distance']:.3f}; table cells' nearest-neighbour distance: "
                 f"median {t['median']:.3f}, {FAR_PERCENTILE:g}th percentile {p95:.3f}")
    r = p.get("residual")
    if r:
        lines.append(f"  distance from the PCA subspace {r['value']:.3f}; table cells': median "
                     f"{r['table_median']:.3f}, {FAR_PERCENTILE:g}th percentile {r[f'table_p{FAR_PERCENTILE:g}']:.3f}")
    lines += [f"  note: {n}" for n in p["notes"]]
    lines += [f"  WARNING: {w}" for w in p["warnings"]]
    lines.append(f"  planning from the nearest table cell, {p['nearest'][0]['cell']}")
    return "\n".join(lines)
