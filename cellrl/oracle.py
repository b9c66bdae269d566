"""Fit a real CellOracle oracle and convert it into the portable ``model.npz`` (:mod:`cellrl.model`).

The steps are CellOracle's tutorial (celloracle 0.20.0), with the settings of the ``oracle:`` config section:

1. import: the oracle gets the filtered matrix ``X`` (log1p of per-cell normalised counts) through
   ``import_anndata_as_normalized_count``. CellOracle still reads ``layers["raw_count"]`` there, for its
   CV-vs-mean QC only; it gets count-scale values (``layers["normalized"]`` for ``expression: counts``,
   ``expm1(X)`` for ``expression: lognorm``), multiplied by one constant when needed so that the largest gene
   mean is at most 30 (CellOracle drops genes with mean > 35 from that fit and then fails when too few are
   left; the CV is scale-free, so the constant changes nothing else). Both declarations therefore give
   CellOracle the same log-normalised matrix that ``import_anndata_as_raw_count`` would build from
   normalised counts, without its failure on small or log-normalised gene sets (design.md section 6).
2. ``perform_PCA``; number of PCs from the explained-variance elbow (tutorial rule, at most 50) unless
   ``n_pcs`` is set.
3. ``knn_imputation``: k = ``knn_k_fraction`` x cells, balanced, ``b_sight = 8k``, ``b_maxl = 4k``.
4. ``get_links`` per cell type (bagging ridge, ``alpha``, ``bagging_number``), ``filter_links(p, top N)``.
5. ``get_cluster_specific_TFdict_from_Links`` + ``fit_GRN_for_simulation(alpha, cluster-specific TF dict)``.

The phases and each cluster of ``get_links`` are reported on the console (:mod:`cellrl.progress`). Steps 4-5
run under :func:`reproducible_celloracle`, which makes CellOracle's gene-list intersections keep a fixed order,
so the same input gives the same links and coefficients in every process (stock CellOracle's result depends on
Python's per-process string hash seed).

:func:`model_from_oracle` turns the fitted oracle into an :class:`~cellrl.model.OracleModel`;
:func:`fit_oracle_files` is the ``fit_oracle`` rule (writes the CellOracle objects, ``model.npz`` and
``stats.json``, each atomically; ``stats.json`` records ``model_sha256``, which every stage that loads
``model.npz`` checks).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ConfigError, InputError
from .grn import load_tf_targets, read_tf_list, restrict_regulators, to_celloracle_tfdict
from .io import sha256_file, write_atomic, write_json, write_table
from .model import SPLITS, OracleModel
from .progress import Progress, note

log = logging.getLogger(__name__)

CLUSTER_COLUMN = "cell_type"
MAX_PSEUDO_MEAN = 30.0


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _dense(a: Any) -> np.ndarray:
    return np.asarray(a.toarray() if sp.issparse(a) else a, dtype=np.float64)


#: ``oracle.oe_value`` choices: the gene's maximum imputed expression (default), or the reference system's rule.
OE_VALUES = ("max", "reference")


def oe_values(X: np.ndarray, sd: float = 1.5, iqr: float = 3.0, method: str = "reference") -> np.ndarray:
    """Overexpression value per column of ``X``. ``reference``: mean + ``sd`` x SD (ddof 1) of the values inside
    [Q1 - ``iqr`` x IQR, Q3 + ``iqr`` x IQR], floored at 0; ``max``: the column's maximum (floored at 0), so
    overexpressing a TF never sets it below the level of the cells that express it most (the reference rule
    can: a TF on in one cell type out of six falls outside the IQR cut, README "Overexpression value")."""
    X = np.asarray(X, dtype=np.float64)
    if method == "max":
        return np.maximum(X.max(axis=0), 0.0) if X.shape[0] else np.zeros(X.shape[1])
    if method != "reference":
        raise ConfigError(f"oracle.oe_value must be one of {OE_VALUES}, got {method!r}")
    out = np.empty(X.shape[1])
    q1, q3 = np.percentile(X, [25, 75], axis=0)
    width = q3 - q1
    for j in range(X.shape[1]):
        v = X[:, j]
        v = v[(v >= q1[j] - iqr * width[j]) & (v <= q3[j] + iqr * width[j])]
        out[j] = v.mean() + sd * (v.std(ddof=1) if v.size > 1 else 0.0)
    return np.maximum(out, 0.0)


def _split_array(split: Any, cell_names: Sequence[str], source: object = "split") -> np.ndarray:
    """Split labels aligned to ``cell_names`` from an array, a Series (index = cell) or a (cell, split) frame."""
    names = pd.Index(np.asarray(cell_names, dtype=str))
    if isinstance(split, pd.DataFrame):
        if not {"cell", "split"} <= set(split.columns):
            raise InputError(f"split table needs columns cell, split (has {list(split.columns)})", path=source)
        split = pd.Series(split["split"].to_numpy(), index=split["cell"].astype(str).to_numpy())
    if isinstance(split, pd.Series):
        missing = names.difference(split.index)
        if len(missing):
            raise InputError(f"{len(missing)} cells of the expression matrix have no split, e.g. "
                             f"{list(missing[:3])}", path=source, fix="re-run the split rule")
        arr = split.reindex(names).astype(str).to_numpy()
    else:
        arr = np.asarray(split).astype(str)
        if arr.shape != (len(names),):
            raise InputError(f"split has shape {arr.shape}, expected ({len(names)},)", path=source)
    bad = ~np.isin(arr, SPLITS)
    if bad.any():
        raise InputError(f"split labels must be in {SPLITS}; found {sorted(set(arr[bad]))[:3]}", path=source)
    return arr


def read_split(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``split.tsv`` (columns cell, split)."""
    p = Path(path)
    if not p.exists():
        raise InputError("split table not found", path=p, fix="run the split rule first")
    return pd.read_csv(p, sep="\t", dtype=str)


def _pseudo_counts(adata: Any, expression: str) -> tuple[np.ndarray, float]:
    """Count-scale values for CellOracle's ``raw_count`` layer (QC only) and the scale factor applied."""
    if expression == "counts" and "normalized" in adata.layers:
        pc = _dense(adata.layers["normalized"])
    else:
        pc = np.expm1(_dense(adata.X))
    top = float(pc.mean(0).max()) if pc.size else 0.0
    scale = MAX_PSEUDO_MEAN / top if top > MAX_PSEUDO_MEAN else 1.0
    return pc * scale, scale


def check_overlap(genes: Sequence[str], tf_targets: Mapping[str, Sequence[str]], adata_src: object = "expression",
                  grn_src: object = "base GRN") -> tuple[list[str], int]:
    """Base-GRN TFs and targets present among ``genes``; InputError naming both sources when none."""
    g = set(map(str, genes))
    tfs = sorted(t for t in tf_targets if t in g)
    n_targets = sum(1 for t in {x for v in tf_targets.values() for x in v} if t in g)
    if not tfs or not n_targets:
        ex_genes = sorted(g)[:3]
        ex_tfs = sorted(tf_targets)[:3]
        what = "TFs" if not tfs else "targets"
        raise InputError(
            f"no overlap between the base GRN's {what} ({grn_src}; e.g. {ex_tfs}) and the genes of the "
            f"expression matrix ({adata_src}; e.g. {ex_genes}); CellOracle would have nothing to fit",
            fix="make the gene symbols match: set ingest.gene_symbols (as_is | capitalize | upper; mouse "
                "symbols look like 'Gata1') or use a base GRN of the same species")
    return tfs, n_targets


def check_active_regulators(oracle: Any, links: Any, grn_src: object = "base GRN", p_cutoff: float | None = None,
                            top_n_links: int | None = None, dataset: str | None = None) -> None:
    """InputError (before anything is written) when the fit kept no active regulator: the model would have no
    action, and every later stage would fail on an empty table."""
    regs = list(getattr(oracle, "active_regulatory_genes", None) or [])
    if regs:
        return
    raw = {str(c): int(len(v)) for c, v in getattr(links, "links_dict", {}).items()}
    kept = {str(c): int(len(v)) for c, v in getattr(links, "filtered_links", {}).items()}
    where = f"datasets.{dataset}" if dataset else "datasets.<name>"
    raise InputError(
        f"0 active regulators: after filter_links (p < {p_cutoff}, top {top_n_links} links per cell type) no "
        f"base-GRN TF keeps a link with a non-zero coefficient (links per cell type before the filter: {raw}; "
        f"kept: {kept}), so the model would have no perturbation to plan with", path=grn_src,
        field="oracle.p_cutoff / oracle.top_n_links",
        fix=f"loosen oracle.p_cutoff (e.g. 0.01) or raise oracle.top_n_links (globally or in {where}.overrides."
            f"oracle); with no link before the filter, use a base GRN ({where}.base_grn) whose TFs are expressed "
            "and regulate the kept genes (filter.keep_regulators: true, more filter.n_top_genes)")


_INTERSECT_USERS = ("celloracle.trajectory.oracle_utility", "celloracle.trajectory.oracle_GRN",
                    "celloracle.network.regression_models", "celloracle.network.net_core")


def _ordered_intersect(list1: Any, list2: Any) -> list:
    """Items of ``list1`` (in its order, without repeats) that are also in ``list2``."""
    other = set(list2)
    seen: set = set()
    out = []
    for x in list1:
        if x in other and x not in seen:
            seen.add(x)
            out.append(x)
    return out


@contextlib.contextmanager
def reproducible_celloracle() -> Iterator[None]:
    """Make CellOracle's GRN fits independent of Python's per-process string hash seed.

    celloracle 0.20.0's ``utility.intersect`` returns ``list(set(a) & set(b))``; its order decides the column
    order of each target's regulators and so which regulators each bagging model samples
    (``max_features=0.8``), which makes ``get_links`` differ between two processes with the same input and
    seed. Inside this block ``intersect`` keeps the order of its first argument (same set of genes), so a fit
    is reproducible across runs. The original function is restored on exit.
    """
    mods = [importlib.import_module(m) for m in _INTERSECT_USERS]
    saved = [(m, m.intersect) for m in mods if hasattr(m, "intersect")]
    try:
        for m, _ in saved:
            m.intersect = _ordered_intersect
        yield
    finally:
        for m, f in saved:
            m.intersect = f


@contextlib.contextmanager
def cluster_progress(bar: Progress) -> Iterator[int]:
    """Count each cluster of CellOracle's ``get_links`` loop on ``bar``; yields the ``verbose_level`` to pass.

    celloracle 0.20.0's ``_fit_GRN_for_network_analysis`` wraps ``np.unique(clusters)`` in its module's ``tqdm``
    when ``verbose_level >= 1`` (1 changes nothing else; that is its only ``tqdm``). Inside this block that name
    is a generator that counts the clusters, so the loop and its maths stay CellOracle's own.
    """
    mod = importlib.import_module("celloracle.network_analysis.network_construction")
    if not bar.enabled or not hasattr(mod, "tqdm"):
        yield 0
        return

    def loop(items: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for c in items:
            yield c
            bar.update(1, done=c)

    saved = mod.tqdm
    mod.tqdm = loop
    try:
        yield 1
    finally:
        mod.tqdm = saved


# ---------------------------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------------------------
def model_from_oracle(oracle: Any, split: Any, oe_sd: float = 1.5, oe_iqr: float = 3.0,
                      meta: Mapping[str, Any] | None = None, oe_value: str = "max") -> OracleModel:
    """Portable :class:`OracleModel` from a fitted CellOracle ``Oracle`` (after ``fit_GRN_for_simulation``).

    ``split`` is an array aligned to ``oracle.adata.obs_names``, a Series indexed by cell, or the
    ``split.tsv`` frame. Coefficient matrices are re-indexed to the gene order of ``oracle.adata`` and kept
    exactly (row = regulator, column = target), stored sparse. Overexpression values: :func:`oe_values` with
    ``oe_value`` (``oe_sd``/``oe_iqr`` for the reference rule).
    """
    ad = oracle.adata
    genes = ad.var_names.astype(str).to_numpy()
    cells = ad.obs_names.astype(str).to_numpy()
    X = _dense(ad.layers["imputed_count"])
    types = ad.obs[oracle.cluster_column_name].astype(str).to_numpy()
    cluster_names = np.array(sorted(set(types)))
    cluster_ids = np.searchsorted(cluster_names, types).astype(np.int32)
    coefs = []
    for c in cluster_names:
        key = c if c in oracle.coef_matrix_per_cluster else next(
            k for k in oracle.coef_matrix_per_cluster if str(k) == c)
        m = oracle.coef_matrix_per_cluster[key].reindex(index=genes, columns=genes).fillna(0.0)
        coefs.append(sp.csr_matrix(m.to_numpy(dtype=np.float64)))
    regs = np.array(sorted(map(str, oracle.active_regulatory_genes)), dtype=str)
    gpos = {g: i for i, g in enumerate(genes)}
    reg_idx = np.array([gpos[r] for r in regs], dtype=np.int64)
    model = OracleModel(
        X=X, embedding=np.asarray(oracle.embedding, dtype=np.float64), cell_names=cells, gene_names=genes,
        cell_types=types, cluster_names=cluster_names, cluster_ids=cluster_ids, coefs=coefs, regulators=regs,
        regulator_idx=reg_idx, ko_values=np.zeros(len(regs)),
        oe_values=oe_values(X[:, reg_idx], oe_sd, oe_iqr, oe_value) if len(regs) else np.zeros(0),
        split=_split_array(split, cells),
        meta=dict(meta or {}) | {"oe_value": oe_value, "oe_sd": oe_sd, "oe_iqr": oe_iqr,
                                 "embedding_dtype": str(np.asarray(oracle.embedding).dtype)},
    )
    model.validate("model_from_oracle")
    return model


# ---------------------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------------------
def choose_n_pcs(explained_variance_ratio: np.ndarray, cap: int = 50) -> int:
    """CellOracle tutorial rule: first PC where the cumulative explained variance stops rising by > 0.002
    per component, at most ``cap``, at least 2."""
    d = np.diff(np.diff(np.cumsum(explained_variance_ratio)) > 0.002)
    idx = np.where(d)[0]
    n = int(idx[0]) if len(idx) else len(explained_variance_ratio)
    return int(max(2, min(n, cap, len(explained_variance_ratio))))


def prepare_oracle(adata: Any, tf_targets: Mapping[str, Sequence[str]], *, expression: str = "counts",
                   n_pcs: int | None = None, knn_k_fraction: float = 0.025, embedding: str = "X_umap",
                   seed: int = 123, threads: int = 1, sources: tuple[object, object] = ("expression", "base GRN"),
                   meta: Mapping[str, Any] | None = None, progress: bool = True, **_: Any) -> tuple[Any, dict]:
    """Steps 1-3 (import, PCA, kNN imputation) of :func:`fit_oracle`: the oracle every cluster's GRN fit starts
    from, and ``info`` (TFs/targets in the data, n_pcs, k, scale, timings). Other settings are ignored."""
    import celloracle as co

    t_all = time.time()
    timings: dict[str, float] = {}
    adata_src, grn_src = sources
    tag = f"fit_oracle {meta['dataset']}" if meta and meta.get("dataset") else "fit_oracle"
    if CLUSTER_COLUMN not in adata.obs:
        raise InputError(f"obs[{CLUSTER_COLUMN!r}] missing", path=adata_src, fix="re-run the filter rule")
    if embedding not in adata.obsm:
        raise InputError(f"obsm[{embedding!r}] missing (has {list(adata.obsm)})", path=adata_src,
                         field="oracle.embedding", fix="set oracle.embedding to one of the obsm keys")
    if expression not in ("counts", "lognorm"):
        raise InputError(f"expression must be counts or lognorm, not {expression!r}", field="rna.expression")
    tfs, n_targets = check_overlap(adata.var_names, tf_targets, adata_src, grn_src)
    log.info("base GRN: %d TFs and %d targets among the %d genes", len(tfs), n_targets, adata.n_vars)

    np.random.seed(seed)
    random.seed(seed)
    t = time.time()
    import anndata as ad

    X = _dense(adata.X)
    if not np.isfinite(X).all() or X.min() < 0:
        raise InputError("expression matrix X must be finite and non-negative (log1p of normalised counts)",
                         path=adata_src, fix="re-run the filter rule")
    obs = pd.DataFrame({CLUSTER_COLUMN: pd.Categorical(adata.obs[CLUSTER_COLUMN].astype(str))},
                       index=adata.obs_names.astype(str))
    oad = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=adata.var_names.astype(str)))
    oad.obsm[embedding] = np.asarray(adata.obsm[embedding], dtype=np.float64)[:, :2]
    raw, scale = _pseudo_counts(adata, expression)
    oad.layers["raw_count"] = raw
    if f"{CLUSTER_COLUMN}_colors" in adata.uns:
        oad.uns[f"{CLUSTER_COLUMN}_colors"] = adata.uns[f"{CLUSTER_COLUMN}_colors"]
    oracle = co.Oracle()
    oracle.import_anndata_as_normalized_count(adata=oad, cluster_column_name=CLUSTER_COLUMN,
                                              embedding_name=embedding)
    gene_set = set(oad.var_names)
    tfdict = to_celloracle_tfdict({tf: [g for g in tg if g in gene_set] for tf, tg in tf_targets.items()
                                   if tf in gene_set})
    oracle.import_TF_data(TFdict=tfdict)
    timings["import"] = time.time() - t

    t = time.time()
    note(f"[{tag}] PCA on {oad.n_obs:,} cells x {oad.n_vars:,} genes", enabled=progress)
    oracle.perform_PCA()
    n_comps = int(n_pcs) if n_pcs else choose_n_pcs(oracle.pca.explained_variance_ratio_)
    n_comps = min(n_comps, oracle.pcs.shape[1])
    k = max(2, int(knn_k_fraction * oad.n_obs))
    note(f"[{tag}] kNN imputation: k = {k}, {n_comps} PCs", enabled=progress)
    oracle.knn_imputation(n_pca_dims=n_comps, k=k, balanced=True, b_sight=k * 8, b_maxl=k * 4,
                          n_jobs=max(1, int(threads)))
    timings["pca_knn_imputation"] = time.time() - t
    timings["prepare_total"] = time.time() - t_all
    log.info("PCA: %d components; kNN imputation with k = %d", n_comps, k)
    info = dict(tfs=tfs, n_targets=int(n_targets), n_pcs=n_comps, knn_k=k, scale=scale, tag=tag,
                clusters=sorted(map(str, oad.obs[CLUSTER_COLUMN].unique())), timings=timings)
    return oracle, info


def cluster_link_inputs(oracle: Any) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per cluster, what CellOracle's ``get_links`` loop hands ``Net`` (``_fit_GRN_for_network_analysis``): the
    cluster's rows of the imputed counts and of the imputed counts standardised over ALL cells."""
    from celloracle.trajectory.oracle_utility import _adata_to_df
    from celloracle.utility import standard

    gem = _adata_to_df(oracle.adata, "imputed_count")
    gem_std = standard(gem)
    labels = oracle.adata.obs[CLUSTER_COLUMN].astype(str).to_numpy()
    return {c: (gem[labels == c], gem_std[labels == c]) for c in sorted(set(labels))}


def cluster_links(gem: pd.DataFrame, gem_std: pd.DataFrame, tfdict: Mapping[str, Sequence[str]], *,
                  alpha: float = 10, bagging_number: int = 20, threads: int = 1) -> pd.DataFrame:
    """One cluster's link list from its :func:`cluster_link_inputs`, as CellOracle's ``get_links`` computes it
    inside its loop over clusters (``Net.fit_All_genes`` with bagging ridge, ``updateLinkList``)."""
    from celloracle.network.net_core import Net

    with reproducible_celloracle():
        net = Net(gene_expression_matrix=gem, gem_standerdized=gem_std, TFinfo_dic=dict(tfdict), verbose=False)
        net.fit_All_genes(bagging_number=bagging_number, model_method="bagging_ridge", alpha=alpha, verbose=False,
                          n_jobs=max(1, int(threads)))
        net.updateLinkList(verbose=False)
    return net.linkList.copy()


def save_link_inputs(path: str | os.PathLike, oracle: Any, slugs: Mapping[str, str]) -> None:
    """``links_input.npz``: per cluster slug its cells, imputed and standardised rows (:func:`cluster_link_inputs`),
    plus genes and the TF dict, so that each ``oracle_links`` job reads its cluster only (not the whole oracle)."""
    from .io import save_npz

    parts = cluster_link_inputs(oracle)
    arrays: dict[str, np.ndarray] = {"genes": np.asarray(oracle.adata.var_names, dtype=str),
                                     "tfdict": np.asarray(json.dumps(oracle.TFdict))}
    for slug, c in slugs.items():
        gem, std = parts[c]
        arrays |= {f"{slug}/cells": np.asarray(gem.index, dtype=str), f"{slug}/gem": gem.to_numpy(),
                   f"{slug}/std": std.to_numpy()}
    save_npz(path, compress=False, **arrays)


def load_link_inputs(path: str | os.PathLike, slug: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """One cluster's (imputed, standardised, TF dict) from :func:`save_link_inputs`'s file."""
    with np.load(path, allow_pickle=False) as z:
        if f"{slug}/gem" not in z.files:
            raise InputError(f"no cluster {slug!r} in the link inputs", path=path, fix="rerun the oracle_prepare rule")
        genes, cells = z["genes"], z[f"{slug}/cells"]
        frames = tuple(pd.DataFrame(z[f"{slug}/{k}"], index=pd.Index(cells.astype(object)),
                                    columns=pd.Index(genes.astype(object)))
                       for k in ("gem", "std"))
        return frames[0], frames[1], json.loads(str(z["tfdict"]))


def links_from_lists(oracle: Any, link_lists: Mapping[str, pd.DataFrame], alpha: float) -> Any:
    """A CellOracle ``Links`` object from per-cluster link lists, built as ``get_links`` builds it."""
    from celloracle.network_analysis.links_object import Links
    from celloracle.trajectory.oracle_utility import (_check_color_information_and_create_if_not_found,
                                                      _get_clustercolor_from_anndata)

    links = Links(name=CLUSTER_COLUMN, links_dict=dict(link_lists))
    _check_color_information_and_create_if_not_found(adata=oracle.adata, cluster_column_name=CLUSTER_COLUMN,
                                                     embedding_name=oracle.embedding_name)
    links.palette = _get_clustercolor_from_anndata(adata=oracle.adata, cluster_name=CLUSTER_COLUMN,
                                                   return_as="palette")
    links.ALPHA_used = alpha
    links.model_method = "bagging_ridge"
    return links


def finish_oracle(oracle: Any, links: Any, info: Mapping[str, Any], split: Any, *, expression: str = "counts",
                  knn_k_fraction: float = 0.025, alpha: float = 10, bagging_number: int = 20,
                  p_cutoff: float = 0.001, top_n_links: int = 2000, embedding: str = "X_umap", oe_sd: float = 1.5,
                  oe_iqr: float = 3.0, seed: int = 123, sources: tuple[object, object] = ("expression", "base GRN"),
                  meta: Mapping[str, Any] | None = None, progress: bool = True, oe_value: str = "max",
                  **_: Any) -> tuple[Any, Any, OracleModel, dict[str, Any]]:
    """Steps 4b-5 of :func:`fit_oracle` on a prepared oracle and its unfiltered ``links``: ``filter_links``,
    the simulation GRN fit, the active-regulator check, conversion to :class:`OracleModel` and ``stats``."""
    import celloracle as co

    t_all = time.time()
    timings = dict(info.get("timings", {}))
    tag = info.get("tag", "fit_oracle")
    n_clusters = len(info["clusters"])
    with reproducible_celloracle():
        t = time.time()
        links.filter_links(p=p_cutoff, weight="coef_abs", threshold_number=top_n_links)
        timings["filter_links"] = time.time() - t
        t = time.time()
        note(f"[{tag}] fitting the simulation GRN of {n_clusters} clusters", enabled=progress)
        oracle.get_cluster_specific_TFdict_from_Links(links_object=links)
        oracle.fit_GRN_for_simulation(alpha=alpha, use_cluster_specific_TFdict=True, verbose_level=0)
        timings["fit_grn"] = time.time() - t

    check_active_regulators(oracle, links, sources[1], p_cutoff, top_n_links, (meta or {}).get("dataset"))
    params = dict(expression=expression, n_pcs=info["n_pcs"], knn_k=info["knn_k"], knn_k_fraction=knn_k_fraction,
                  alpha=alpha, bagging_number=bagging_number, p_cutoff=p_cutoff, top_n_links=top_n_links,
                  embedding=embedding, seed=seed, raw_count_scale=info["scale"], celloracle=co.__version__,
                  oe_value=oe_value, **({"oe_sd": oe_sd, "oe_iqr": oe_iqr} if oe_value == "reference" else {}))
    t = time.time()
    model = model_from_oracle(oracle, split, oe_sd=oe_sd, oe_iqr=oe_iqr, oe_value=oe_value,
                              meta=dict(meta or {}) | {"oracle": params})
    timings["convert"] = time.time() - t
    timings["total"] = timings.get("total", 0.0) + time.time() - t_all
    stats = dict(
        n_cells=int(model.n_cells), n_genes=int(model.n_genes), n_clusters=int(len(model.cluster_names)),
        cells_per_cluster={str(c): int((model.cluster_ids == i).sum()) for i, c in enumerate(model.cluster_names)},
        n_base_grn_tfs_in_data=len(info["tfs"]), base_grn_tfs_in_data=info["tfs"],
        n_base_grn_targets_in_data=int(info["n_targets"]),
        n_active_regulators=int(model.n_regulators), active_regulators=model.regulators.tolist(),
        links_per_cluster={str(c): int(len(links.filtered_links[c])) for c in links.filtered_links},
        links_raw_per_cluster={str(c): int(len(links.links_dict[c])) for c in links.links_dict},
        params=params, timings_s={k_: round(v, 3) for k_, v in timings.items()},
    )
    log.info("active regulators (%d): %s", model.n_regulators, ", ".join(model.regulators))
    log.info("timings: %s", stats["timings_s"])
    note(f"[{tag}] {model.n_regulators} active regulators, {model.n_cells:,} cells, {model.n_genes:,} genes; "
         f"{timings['total']:.0f} s", enabled=progress)
    return oracle, links, model, stats


def fit_oracle(adata: Any, tf_targets: Mapping[str, Sequence[str]], split: Any, *, expression: str = "counts",
               n_pcs: int | None = None, knn_k_fraction: float = 0.025, alpha: float = 10,
               bagging_number: int = 20, p_cutoff: float = 0.001, top_n_links: int = 2000,
               embedding: str = "X_umap", oe_sd: float = 1.5, oe_iqr: float = 3.0, oe_value: str = "max",
               seed: int = 123, threads: int = 1, sources: tuple[object, object] = ("expression", "base GRN"),
               meta: Mapping[str, Any] | None = None,
               progress: bool = True) -> tuple[Any, Any, OracleModel, dict[str, Any]]:
    """Fit CellOracle on a filtered AnnData (contract of ``rna/filtered.h5ad``) and a TF -> targets dict, in one
    process: :func:`prepare_oracle`, CellOracle's own ``get_links`` over all clusters, :func:`finish_oracle`.
    (The workflow runs the same steps as separate jobs, one per cluster for the links.)

    Returns ``(oracle, links, model, stats)``: the CellOracle ``Oracle`` and ``Links`` objects, the portable
    :class:`OracleModel` and a JSON-able dict of sizes, active regulators, links per cluster and timings.
    ``sources`` names the expression and base-GRN files in error messages. ``progress``: phase lines and
    one line per cluster of ``get_links`` on the console (:mod:`cellrl.progress`).
    """
    t_all = time.time()
    common = dict(expression=expression, knn_k_fraction=knn_k_fraction, embedding=embedding, seed=seed,
                  sources=sources, meta=meta, progress=progress)
    oracle, info = prepare_oracle(adata, tf_targets, n_pcs=n_pcs, threads=threads, **common)
    n_clusters = len(info["clusters"])
    with reproducible_celloracle():
        t = time.time()
        with Progress(n_clusters, f"{info['tag']}: get_links", unit="cluster", log=log, enabled=progress) as bar, \
                cluster_progress(bar) as verbose:
            links = oracle.get_links(cluster_name_for_GRN_unit=CLUSTER_COLUMN, alpha=alpha,
                                     bagging_number=bagging_number, verbose_level=verbose,
                                     n_jobs=max(1, int(threads)))
        info["timings"]["get_links"] = time.time() - t
    info["timings"]["total"] = time.time() - t_all
    return finish_oracle(oracle, links, info, split, alpha=alpha, bagging_number=bagging_number,
                         p_cutoff=p_cutoff, top_n_links=top_n_links, oe_sd=oe_sd, oe_iqr=oe_iqr,
                         oe_value=oe_value, **common)


def load_regulated_tf_targets(tf_targets_path: str | os.PathLike,
                               regulators: str | os.PathLike | None = None) -> tuple[dict[str, list[str]], dict]:
    """tf_targets.json, restricted to the TF list ``regulators`` (config ``oracle.regulators``) when one is set;
    also the record of that restriction for stats.json."""
    tf_targets = load_tf_targets(tf_targets_path)
    reg_stats: dict[str, Any] = {"path": None}
    if regulators:
        listed = read_tf_list(regulators)
        tf_targets, dropped = restrict_regulators(tf_targets, listed)
        reg_stats = {"path": str(regulators), "n_listed": len(listed), "sha256": sha256_file(regulators),
                     "n_base_grn_tfs_kept": len(tf_targets), "n_base_grn_tfs_dropped": len(dropped),
                     "dropped": dropped}
        log.info("TF list %s: %d symbols; %d base-GRN regulators kept, %d dropped (%s)", regulators, len(listed),
                 len(tf_targets), len(dropped), ", ".join(dropped[:20]) + (" ..." if len(dropped) > 20 else ""))
        if not tf_targets:
            raise InputError(f"no base-GRN regulator of {tf_targets_path} is on the TF list", path=regulators,
                             field="oracle.regulators", fix="check the list's symbols (case is ignored) or unset it")
    return tf_targets, reg_stats


def fit_oracle_files(adata_path: str | os.PathLike, tf_targets_path: str | os.PathLike,
                     split_path: str | os.PathLike, *, oracle_path: str | os.PathLike,
                     links_path: str | os.PathLike, model_path: str | os.PathLike,
                     stats_path: str | os.PathLike, dataset: str | None = None,
                     regulators: str | os.PathLike | None = None, **settings: Any) -> dict[str, Any]:
    """Rule ``fit_oracle``: read filtered.h5ad, tf_targets.json and split.tsv; write the oracle, links,
    ``model.npz`` and ``stats.json``. ``regulators`` (config ``oracle.regulators``): a TF list
    (:func:`cellrl.grn.read_tf_list`); base-GRN regulators not on it are dropped before the fit, so they can
    regulate nothing and are never actions. ``settings`` go to :func:`fit_oracle` (``progress`` included). Each output
    is written under a temporary name and renamed, and on any error the outputs already written are removed, so
    a failure leaves none of them behind."""
    import anndata as ad

    adata_path, tf_targets_path = Path(adata_path), Path(tf_targets_path)
    if not adata_path.exists():
        raise InputError("filtered expression file not found", path=adata_path, fix="run the filter rule first")
    tf_targets, reg_stats = load_regulated_tf_targets(tf_targets_path, regulators)
    split = read_split(split_path)
    adata = ad.read_h5ad(adata_path)
    meta = {"dataset": dataset or adata_path.parent.parent.name}
    oracle, links, model, stats = fit_oracle(adata, tf_targets, split, sources=(adata_path, tf_targets_path),
                                             meta=meta, **settings)
    stats["regulator_list"] = reg_stats
    _save_fit(oracle, links, model, stats, oracle_path, links_path, model_path, stats_path)
    return stats


def _save_fit(oracle: Any, links: Any, model: OracleModel, stats: dict[str, Any], oracle_path: str | os.PathLike,
              links_path: str | os.PathLike, model_path: str | os.PathLike, stats_path: str | os.PathLike) -> None:
    """Write the fit's four outputs atomically (stats.json last, with ``model_sha256``); none left on error."""
    t = time.time()

    def stats_writer(p: Path) -> None:
        stats["model_sha256"] = sha256_file(model_path)  # checked by every stage that loads model.npz
        stats["timings_s"]["save"] = round(time.time() - t, 3)
        write_json(p, stats)

    _write_outputs([(Path(oracle_path), lambda p: write_atomic(p, lambda q: oracle.to_hdf5(str(q)))),
                    (Path(links_path), lambda p: write_atomic(p, lambda q: links.to_hdf5(str(q)))),
                    (Path(model_path), model.save), (Path(stats_path), stats_writer)])


# ---------------------------------------------------------------------------------------------------------------
# the workflow's three jobs: prepare (checkpoint) -> links per cluster (parallel) -> gather
# ---------------------------------------------------------------------------------------------------------------
def cluster_slug(index: int, name: str) -> str:
    """File-system and wildcard-safe name of cluster ``index`` (sorted order) called ``name``."""
    return f"{index:03d}_" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "cluster")


def _write_outputs(writers: Sequence[tuple[Path, Any]]) -> None:
    """Write each (path, writer) atomically; on any error remove the outputs already written."""
    try:
        for path, writer in writers:
            writer(path)
    except BaseException:
        for path, _ in writers:
            Path(path).unlink(missing_ok=True)
        raise


def prepare_oracle_files(adata_path: str | os.PathLike, tf_targets_path: str | os.PathLike, *,
                         oracle_out: str | os.PathLike, info_out: str | os.PathLike,
                         links_input_out: str | os.PathLike, dataset: str | None = None,
                         regulators: str | os.PathLike | None = None, **settings: Any) -> dict[str, Any]:
    """Rule ``oracle_prepare``: the imputed oracle (``prepared.celloracle.oracle``), ``clusters.json`` (the
    clusters whose links run as separate jobs, their file names, and what the gather step needs) and
    ``links_input.npz`` (each cluster's rows for its links job, :func:`save_link_inputs`)."""
    import anndata as ad

    adata_path = Path(adata_path)
    if not adata_path.exists():
        raise InputError("filtered expression file not found", path=adata_path, fix="run the filter rule first")
    tf_targets, reg_stats = load_regulated_tf_targets(tf_targets_path, regulators)
    adata = ad.read_h5ad(adata_path)
    meta = {"dataset": dataset or adata_path.parent.parent.name}
    oracle, info = prepare_oracle(adata, tf_targets, sources=(adata_path, tf_targets_path), meta=meta, **settings)
    counts = oracle.adata.obs[CLUSTER_COLUMN].astype(str).value_counts()
    info |= {"meta": meta, "regulator_list": reg_stats, "sources": [str(adata_path), str(tf_targets_path)],
             "slugs": {cluster_slug(i, c): c for i, c in enumerate(info["clusters"])},
             "cells_per_cluster": {c: int(counts[c]) for c in info["clusters"]}}
    _write_outputs([(Path(oracle_out), lambda p: write_atomic(p, lambda t: oracle.to_hdf5(str(t)))),
                    (Path(links_input_out), lambda p: save_link_inputs(p, oracle, info["slugs"])),
                    (Path(info_out), lambda p: write_json(p, info))])
    return info


def _load_prepared(oracle_path: str | os.PathLike, info_path: str | os.PathLike) -> tuple[Any, dict]:
    import celloracle as co

    for p in (oracle_path, info_path):
        if not Path(p).exists():
            raise InputError("prepared oracle not found", path=p, fix="run the oracle_prepare rule")
    info = json.loads(Path(info_path).read_text())
    return co.load_hdf5(str(oracle_path)), info


def cluster_links_file(links_input_path: str | os.PathLike, info_path: str | os.PathLike, slug: str,
                       out: str | os.PathLike, *, alpha: float = 10, bagging_number: int = 20, threads: int = 1,
                       **_: Any) -> pd.DataFrame:
    """Rule ``oracle_links``: one cluster's unfiltered CellOracle link list -> ``links/{slug}.parquet`` (reads only
    that cluster's rows of ``links_input.npz``)."""
    for p in (links_input_path, info_path):
        if not Path(p).exists():
            raise InputError("prepared link inputs not found", path=p, fix="run the oracle_prepare rule")
    info = json.loads(Path(info_path).read_text())
    if slug not in info["slugs"]:
        raise InputError(f"no cluster {slug!r} in {info_path} (has {sorted(info['slugs'])})", path=info_path,
                         fix="rerun the oracle_prepare rule")
    gem, gem_std, tfdict = load_link_inputs(links_input_path, slug)
    t = time.time()
    df = cluster_links(gem, gem_std, tfdict, alpha=alpha, bagging_number=bagging_number, threads=threads)
    log.info("cluster %s: %d links from %d cells in %.1f s", info["slugs"][slug], len(df), len(gem),
             time.time() - t)
    write_table(out, df.reset_index(drop=True))
    return df


def gather_oracle_files(oracle_path: str | os.PathLike, info_path: str | os.PathLike,
                        link_paths: Sequence[str | os.PathLike], split_path: str | os.PathLike, *,
                        final_oracle_path: str | os.PathLike, links_path: str | os.PathLike,
                        model_path: str | os.PathLike, stats_path: str | os.PathLike, **settings: Any) -> dict:
    """Rule ``fit_oracle``: the per-cluster link lists -> CellOracle ``Links``, filter, simulation GRN, then the
    same outputs as :func:`fit_oracle_files` (oracle, links, ``model.npz``, ``stats.json``)."""
    oracle, info = _load_prepared(oracle_path, info_path)
    by_slug = {Path(p).stem: p for p in link_paths}
    missing = sorted(set(info["slugs"]) - set(by_slug))
    if missing:
        raise InputError(f"link lists missing for clusters {missing}", path=info_path,
                         fix="run the oracle_links jobs (snakemake schedules them from clusters.json)")
    lists = {info["slugs"][s]: pd.read_parquet(by_slug[s]) for s in sorted(info["slugs"])}
    links = links_from_lists(oracle, lists, float(settings.get("alpha", 10)))
    split = read_split(split_path)
    _, links, model, stats = finish_oracle(oracle, links, info, split, meta=info["meta"],
                                           sources=tuple(info["sources"]), **settings)
    stats["regulator_list"] = info["regulator_list"]
    _save_fit(oracle, links, model, stats, final_oracle_path, links_path, model_path, stats_path)
    return stats
