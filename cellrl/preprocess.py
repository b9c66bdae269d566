"""Filter: QC, stratified cell cap, HVG selection (+ expressed regulators), normalise + log, PCA, kNN, UMAP.

``filter_adata`` takes the ingested AnnData (``rna/raw.h5ad``) and returns the analysis-ready one that
``fit_oracle`` reads (``rna/filtered.h5ad``). Output contract:

==========================  ===============================================================================
X                           log1p(normalised), CSR float32, cells x selected genes
layers["counts"]            raw UMI counts (``expression: counts``) or expm1(X) pseudo-counts (``lognorm``)
layers["normalized"]        normalised, not logged (counts: per-cell total scaled to the median total over
                            the selected genes; lognorm: expm1 of the given values)
obs["cell_type"]            str categorical: the given labels, or ``C<k>`` Leiden clusters when none given
obsm["X_pca"], ["X_umap"]   PCA (``n_pcs``, capped by the data) and 2-D UMAP, both seeded
obsp / uns["neighbors"]     kNN graph (``n_neighbors``) on the PCA
var["highly_variable"]      HVG flag; var["regulator"]: base-GRN TF; var["kept_regulator"]: kept only as TF
uns["cellrl"]               expression, every parameter used, cell/gene counts at each step
==========================  ===============================================================================

Steps, in order:

1. **QC**: drop cells with fewer than ``min_genes`` detected genes or (counts input only) fewer than
   ``min_counts`` total counts, then genes detected in fewer than ``min_cells_per_gene`` cells.
2. **Cap** at ``max_cells``, sampling every cell type in proportion to its size (largest-remainder rounding,
   at least one cell per type), seeded. Without labels the sample is uniform.
3. **Genes**: the ``n_top_genes`` most variable by analytic Pearson residuals (Lause et al. 2021;
   ``scanpy.experimental.pp.highly_variable_genes``) on the counts. Pearson residuals need counts, so for
   ``lognorm`` input the fallback is scanpy's dispersion-based ``seurat`` flavour on the log values. With
   ``keep_regulators`` every base-GRN regulator that passed QC is kept too (CellOracle's recommendation), so
   the result can exceed ``n_top_genes`` by the number of such regulators. When the data have no more genes
   than ``n_top_genes`` all are kept.
4. **Normalise** over the selected genes (total per cell -> median total) and **log1p**.
5. **PCA** (arpack, seeded), exact **kNN** graph, **UMAP** (seeded), and **Leiden** (igraph, seeded) when there are
   no cell types.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError
from .io import write_h5ad

log = logging.getLogger(__name__)


def stratified_cap(labels: pd.Series | np.ndarray | None, n_cells: int, max_cells: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_cells`` cells, each label sampled in proportion (>= 1 per label)."""
    if n_cells <= max_cells:
        return np.arange(n_cells)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n_cells, max_cells, replace=False))
    lab = np.asarray(labels).astype(str)
    types, inv, sizes = np.unique(lab, return_inverse=True, return_counts=True)
    quota = sizes * max_cells / n_cells
    take = np.floor(quota).astype(int)
    take = np.maximum(take, np.minimum(1, sizes))
    rest = max_cells - take.sum()
    if rest > 0:
        order = np.argsort(-(quota - take), kind="stable")
        for k in order[:rest]:
            take[k] = min(take[k] + 1, sizes[k])
    while take.sum() > max_cells:  # only when the >= 1 floor overshoots: trim the largest groups
        take[np.argmax(take)] -= 1
    keep = [rng.choice(np.flatnonzero(inv == k), take[k], replace=False) for k in range(len(types))]
    return np.sort(np.concatenate(keep))


def _nnz_per_row(X: sp.csr_matrix) -> np.ndarray:
    return np.diff(X.indptr)


def filter_adata(adata, regulators: Iterable[str] = (), expression: str = "counts", min_counts: float = 1,
                 min_genes: int = 1, min_cells_per_gene: int = 3, max_cells: int = 30000, n_top_genes: int = 3000,
                 keep_regulators: bool = True, n_pcs: int = 50, n_neighbors: int = 30,
                 leiden_resolution: float = 1.0, seed: int = 0, source: object = "raw.h5ad"):
    """Return the filtered AnnData (see the module docstring for the contract). ``adata`` is not modified."""
    import anndata as ad
    import scanpy as sc

    t0 = time.time()
    params = dict(expression=expression, min_counts=min_counts, min_genes=min_genes,
                  min_cells_per_gene=min_cells_per_gene, max_cells=max_cells, n_top_genes=n_top_genes,
                  keep_regulators=keep_regulators, n_pcs=n_pcs, n_neighbors=n_neighbors,
                  leiden_resolution=leiden_resolution, seed=seed)
    if expression not in ("counts", "lognorm"):
        raise InputError(f"expression must be counts or lognorm, got {expression!r}", field="rna.expression")
    steps: dict[str, Any] = {"input": [int(adata.n_obs), int(adata.n_vars)]}
    X = adata.X
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.tocsr().astype(np.float32)
    has_types = "cell_type" in adata.obs.columns
    obs = adata.obs.copy()
    var = pd.DataFrame(index=adata.var_names.copy())
    dataset = adata.uns.get("cellrl", {}).get("dataset")
    ds = f"datasets.{dataset}." if dataset else ""
    regs = set(regulators)
    if regs and not regs & set(var.index):
        # the base GRN's TFs name the cells, not the genes: the matrix was read the wrong way round
        as_cells = sorted(regs & set(map(str, adata.obs_names)))
        if as_cells:
            raise InputError(f"no base-GRN TF is among the genes, but {len(as_cells)} are cell names (e.g. "
                             f"{as_cells[:3]}): the matrix is transposed", path=source, field=f"{ds}rna.genes_as_rows",
                             fix="flip rna.genes_as_rows in the dataset's rna entry; ingest then reruns")

    # 1. QC ---------------------------------------------------------------------------------------------
    ok = _nnz_per_row(X) >= min_genes
    if expression == "counts":
        ok &= np.asarray(X.sum(1)).ravel() >= min_counts
    elif min_counts > 0:
        log.info("lognorm input: min_counts is not applied (totals of log values mean nothing); "
                 "min_genes and min_cells_per_gene are")
    n_drop = int((~ok).sum())
    if ok.sum() == 0:
        raise InputError(f"QC removed every cell (min_genes={min_genes}, min_counts={min_counts})", path=source,
                         field="filter.min_genes / filter.min_counts", fix="lower the QC thresholds")
    X, obs = X[np.flatnonzero(ok)], obs.iloc[np.flatnonzero(ok)]
    if has_types and obs["cell_type"].nunique() < 2:
        raise InputError(f"after QC every cell has the same cell type ({obs['cell_type'].iloc[0]!r}); a plan needs "
                         "a start type and a different target type", path=source,
                         field=f"{ds}rna.cell_type / filter.min_genes / filter.min_counts",
                         fix="give at least two cell types (rna.cell_type) or lower the QC thresholds that "
                             "removed the other types' cells")
    gene_ok = np.bincount(X.indices, minlength=X.shape[1]) >= min_cells_per_gene
    if gene_ok.sum() < 2:
        raise InputError(f"QC left {int(gene_ok.sum())} gene(s) detected in >= {min_cells_per_gene} cells",
                         path=source, field="filter.min_cells_per_gene", fix="lower filter.min_cells_per_gene")
    X, var = X[:, np.flatnonzero(gene_ok)], var.iloc[np.flatnonzero(gene_ok)]
    steps["after_qc"] = [int(X.shape[0]), int(X.shape[1])]
    timings = {"qc": time.time() - t0}
    log.info("QC: dropped %d cells and %d genes -> %d x %d", n_drop, int((~gene_ok).sum()), *X.shape)

    # 2. cap cells ---------------------------------------------------------------------------------------
    keep = stratified_cap(obs["cell_type"] if has_types else None, X.shape[0], max_cells, seed)
    if len(keep) < X.shape[0]:
        log.info("cap: sampled %d of %d cells%s", len(keep), X.shape[0], " stratified by cell type" if has_types
                 else " uniformly (no cell types)")
        X, obs = X[keep], obs.iloc[keep]
    steps["after_cap"] = [int(X.shape[0]), int(X.shape[1])]

    t = time.time()
    # 3. genes ------------------------------------------------------------------------------------------
    counts = X if expression == "counts" else X.copy()
    if expression == "lognorm":
        counts.data = np.expm1(counts.data)
    var["regulator"] = var.index.isin(regs)
    n_reg = int(var["regulator"].sum())
    if X.shape[1] <= n_top_genes:
        hv = np.ones(X.shape[1], bool)
        hvg_method = f"all genes (<= n_top_genes={n_top_genes})"
    else:
        tmp = ad.AnnData(X=counts if expression == "counts" else X.copy())
        if expression == "counts":
            sc.experimental.pp.highly_variable_genes(tmp, flavor="pearson_residuals", n_top_genes=n_top_genes,
                                                     check_values=False)
            hvg_method = "pearson_residuals (theta=100) on counts"
        else:
            sc.pp.highly_variable_genes(tmp, flavor="seurat", n_top_genes=n_top_genes)
            hvg_method = "seurat dispersion on log values (lognorm input: Pearson residuals need counts)"
        hv = tmp.var["highly_variable"].to_numpy(bool)
    var["highly_variable"] = hv
    sel = hv | (var["regulator"].to_numpy() if keep_regulators else False)
    var["kept_regulator"] = sel & ~hv
    log.info("genes: %d highly variable (%s) + %d regulators kept although not HVG; %d of %d base-GRN TFs "
             "passed QC", int(hv.sum()), hvg_method, int(var["kept_regulator"].sum()), n_reg, len(regs))
    idx = np.flatnonzero(sel)
    X, counts, var = X[:, idx], counts[:, idx], var.iloc[idx]
    empty = np.asarray(counts.sum(1)).ravel() <= 0
    if empty.any():
        log.warning("%d cells have no counts in the selected genes; dropping them", int(empty.sum()))
        k = np.flatnonzero(~empty)
        X, counts, obs = X[k], counts[k], obs.iloc[k]
    steps["after_genes"] = [int(X.shape[0]), int(X.shape[1])]
    timings["hvg"] = time.time() - t

    # 4. normalise + log -----------------------------------------------------------------------------------
    if expression == "counts":
        tot = np.asarray(counts.sum(1)).ravel()
        target = float(np.median(tot))
        normalized = sp.diags((target / tot).astype(np.float32)) @ counts
        normalized = sp.csr_matrix(normalized, dtype=np.float32)
        logx = normalized.copy()
        logx.data = np.log1p(logx.data)
    else:
        target = None
        normalized = counts.copy()
        logx = X.copy()
    out = ad.AnnData(X=sp.csr_matrix(logx, dtype=np.float32), obs=obs, var=var)
    out.layers["counts"] = sp.csr_matrix(counts, dtype=np.float32)
    out.layers["normalized"] = sp.csr_matrix(normalized, dtype=np.float32)

    # 5. embedding -----------------------------------------------------------------------------------------
    n_comps = int(min(n_pcs, out.n_obs - 1, out.n_vars - 1))
    t = time.time()
    sc.pp.pca(out, n_comps=n_comps, svd_solver="arpack", random_state=seed)
    timings["pca"] = time.time() - t
    t = time.time()
    k = int(min(n_neighbors, out.n_obs - 1))
    # exact kNN (sklearn, brute force): deterministic, and scanpy's pynndescent path (>= 8,192 cells) breaks
    # with pynndescent 0.7 + scipy >= 1.14 (csr_array has no getnnz); at the 30,000-cell cap this takes seconds
    sc.pp.neighbors(out, n_neighbors=k, n_pcs=n_comps, random_state=seed, transformer="sklearn")
    timings["knn"] = time.time() - t
    t = time.time()
    sc.tl.umap(out, random_state=seed)
    timings["umap"] = time.time() - t
    if has_types:
        lab = out.obs["cell_type"].astype(str)
        ct_source = f"given: {adata.uns.get('cellrl', {}).get('cell_type_source', 'obs cell_type')}"
    else:
        sc.tl.leiden(out, resolution=leiden_resolution, random_state=seed, flavor="igraph", n_iterations=2,
                     directed=False, key_added="leiden")
        lab = "C" + out.obs["leiden"].astype(str)
        ct_source = f"leiden (igraph, resolution {leiden_resolution})"
    out.obs["cell_type"] = pd.Categorical(lab.to_numpy(), categories=sorted(lab.unique()))
    sizes = out.obs["cell_type"].value_counts()
    if len(sizes) < 2 and has_types:  # rare: checked after QC, but dropping empty cells can remove a type
        raise InputError(f"every remaining cell has the same cell type ({sizes.index[0]!r})", path=source,
                         field=f"{ds}rna.cell_type", fix="give at least two cell types with enough cells")
    if len(sizes) < 2:
        raise InputError(f"Leiden found a single cluster in {out.n_obs} cells at resolution {leiden_resolution}; "
                         "a plan needs a start type and a different target type", path=source,
                         field="filter.leiden_resolution",
                         fix=f"raise filter.leiden_resolution (e.g. {2 * leiden_resolution:g}) or give cell types "
                             f"with {ds or 'datasets.<name>.'}rna.cell_type")
    small = sizes[sizes < 10]
    if len(small):
        log.warning("cell types with fewer than 10 cells (CellOracle fits these poorly): %s", dict(small))

    out.uns["cellrl"] = {**dict(adata.uns.get("cellrl", {})), "expression": expression, "filter": params,
                         "hvg_method": hvg_method, "normalize_target_sum": target, "n_pcs_used": n_comps,
                         "n_neighbors_used": k, "cell_type_source": ct_source, "steps": steps,
                         "n_regulators_kept": int(out.var["regulator"].sum()),
                         "timings_s": {k_: round(v, 2) for k_, v in timings.items()}}
    log.info("filtered: %d cells x %d genes (%d regulators), %d cell types, %.1f s (%s)", out.n_obs, out.n_vars,
             int(out.var["regulator"].sum()), len(sizes), time.time() - t0,
             ", ".join(f"{k_} {v:.1f} s" for k_, v in timings.items()))
    return out


def read_regulators(base_grn_path: str | Path) -> set[str]:
    """The set of TFs (column ``tf``) of the long base-GRN table ``grn/base_grn.parquet``."""
    p = Path(base_grn_path)
    if not p.exists():
        raise InputError("base GRN table not found", path=p, fix="run the base_grn rule first")
    try:
        df = pd.read_parquet(p, columns=["tf"])
    except Exception as e:
        raise InputError(f"cannot read column 'tf' ({type(e).__name__}: {e})", path=p, field="tf",
                         fix="base_grn.parquet must be the long table (tf, target, source) of the base_grn rule") \
            from e
    return set(df["tf"].astype(str))


def filter_file(raw_path: str | Path, base_grn_path: str | Path, out_path: str | Path, expression: str,
                **settings: Any) -> Path:
    """Filter ``raw.h5ad`` with the regulators of ``base_grn.parquet``; write ``filtered.h5ad`` atomically."""
    import anndata as ad

    raw_path = Path(raw_path)
    if not raw_path.exists():
        raise InputError("raw.h5ad not found", path=raw_path, fix="run the ingest rule first")
    adata = ad.read_h5ad(raw_path)
    declared = adata.uns.get("cellrl", {}).get("expression")
    if declared is not None and declared != expression:
        raise InputError(f"raw.h5ad was ingested as {declared!r} but the config now says {expression!r}",
                         path=raw_path, field="rna.expression", fix="re-run ingest (snakemake reruns it when "
                         "the rna entry changes) or fix rna.expression")
    regs = read_regulators(base_grn_path)
    out = filter_adata(adata, regs, expression=expression, source=raw_path, **settings)
    return write_h5ad(out_path, out)
