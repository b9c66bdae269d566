"""Transition table: for every cell and every action (knock out / overexpress one active regulator), the next cell.

This is CellOracle's ``simulate_shift`` -> ``estimate_transition_prob(knn_random=True)`` ->
``calculate_embedding_shift`` -> nearest cell, computed for all actions at once, chunked over cells, on numpy
or CuPy (one code path over an ``xp`` module). The maths is CellOracle 0.20.0's; only the evaluation order
changes (see ``tests/test_transitions.py`` for the equality checks against CellOracle itself).

Notation: ``X`` imputed expression (cells x genes, CellOracle layer ``imputed_count``), ``W_c`` coefficient
matrix of cluster ``c`` (row = regulator, column = target), ``E`` the 2-D embedding, ``G`` the number of genes,
``k`` the number of sampled embedding neighbours per cell, ``A`` the number of actions.

Per cell ``i`` (cluster ``c``) and action ``a`` = (gene ``g``, value ``v``):

1. Propagation (``oracle_GRN._do_simulation``): ``d_in = e_g (v - X_ig)``; ``d = d_in``; ``n_propagation`` times:
   ``d = d @ W_c``; ``d[g] = d_in[g]`` where ``d_in[g] != 0``; ``d = max(X_i + d, 0) - X_i``. Finally
   ``delta = (X_i + d) - X_i`` (CellOracle's ``simulated_count - imputed_count``).
   *Structure used*: ``d`` is non-zero only on ``S_a``, the genes reachable from ``g`` in ``n_propagation`` hops
   of ``W_c`` (as ``X >= 0``). Actions are packed: action ``a`` owns ``|S_a|`` rows, and one sparse
   block-diagonal product per hop propagates every action of a chunk at once (:class:`ClusterPlan`).
2. Neighbours (``estimate_transition_prob``): sklearn ``NearestNeighbors(n_neighbors + 1)`` on ``E`` (self
   excluded, distance order); with ``knn_random`` a ``RandomState(seed)`` draws, cell after cell, ``int(
   sampled_fraction * (n_neighbors + 1))`` of them without replacement with probabilities
   ``linspace(0.5, 0.1)`` (identical draws to CellOracle's ``np.random.seed(random_seed)``; ``seed`` here is its
   ``random_seed``).
3. Correlation (velocyto ``colDeltaCorpartial``): Pearson over all ``G`` genes between ``delta`` and
   ``D_j = X_j - X_i``, centred algebraically since ``delta`` is zero off ``S_a``:
   ``num = sum_S delta D_j - sum(delta) mean(D_j)``, ``ss_delta = sum_S delta^2 - sum(delta)^2 / G``;
   ``ss_D = sum_g (D_j - mean D_j)^2`` is action-independent, from ``|X_j|^2 + |X_i|^2 - 2 X_i.X_j`` (one Gram
   product per block of cells against the union of their neighbours).
   *Structure used*: propagation is linear until ``max(X + d, 0)`` clips, so ``delta = c r_a + e`` with
   ``c = value - X_ig`` and ``r_a`` the cluster's unit response (:func:`unit_response`); ``e`` is rounding
   noise except where clipping acted. Hence ``sum_S delta D_j = c (Q[j, a] - Q[i, a]) + sum e D_j`` with
   ``Q = X_U R^T`` computed once per cluster for every cell (:class:`ClusterLinear`): no (cells x neighbours x
   genes) work remains, only the sparse clipping corrections (``|e| > ROUNDING_TOL (|X| + |delta|)``; pairs
   with a tiny input ``c`` are taken whole). Where the expanded forms would cancel (``|D|^2 < EXACT_BELOW
   (|X_i|^2 + |X_j|^2)``, near-duplicate cells) ``D`` is formed explicitly. NaN (a zero norm) -> 1, as
   CellOracle does.
4. ``P_ij = exp(corr_ij / sigma_corr) / sum_j exp(...)``; ``shift_i = sum_j P_ij u_ij - mean_j u_ij`` with
   ``u_ij`` the unit vector from ``E_i`` to ``E_j`` (in float32 when ``model.meta["embedding_dtype"]`` says
   CellOracle had a float32 ``obsm`` embedding, as it then computes them in float32).
5. Next cell: the cell nearest to ``E_i + shift_i`` (scipy cKDTree; the cell itself included; a stagnation when
   it is ``i``).

Memory: O(chunk x (sum_a |S_a| + A x k)) per chunk plus bounded Gram blocks and correction batches, O(cells x k)
for the neighbour lists, one copy of ``X`` and one (cells x A) ``Q`` per worker thread; never cells x cells.

CPU: chunks run on ``threads`` worker threads (numpy, BLAS, scipy's sparse products and the KD-tree release the
GIL; BLAS is held to one thread each); the neighbour search uses scipy's cKDTree on all cores with sklearn's
tree answering tied rows (:func:`knn_like_sklearn`), and the per-cluster plans are built meanwhile.
CellOracle's ``calculate_embedding_shift`` allocates several dense cells x cells float64 arrays (see
``celloracle_dense_bytes``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import resource
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ConfigError, InputError
from .io import atomic_path, sha256_file, save_npy, write_json, write_table
from .model import OracleModel, load_model
from .progress import Progress, note
from .xp import blas_threads, cupy_available, get_xp, to_numpy

log = logging.getLogger("cellrl.transitions")

ACTION_KINDS = ("ko", "oe", "both")


# --------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TransitionSettings:
    """The ``transitions:`` config section (see config/README.md)."""

    n_propagation: int = 3
    n_neighbors: int = 200
    sampled_fraction: float = 0.3
    sigma_corr: float = 0.05
    knn_random: bool = True
    seed: int = 0
    backend: str = "auto"
    chunk_cells: int | None = None
    actions: str = "both"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "TransitionSettings":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"transitions: unknown setting(s) {unknown}; known: {sorted(names)}")
        s = cls(**d)
        s.check()
        return s

    def check(self) -> None:
        if not 1 <= int(self.n_propagation) <= 5:
            raise ConfigError("transitions.n_propagation must be 1..5 (CellOracle's N_PROP_MIN..N_PROP_MAX)")
        if self.n_neighbors < 1:
            raise ConfigError("transitions.n_neighbors must be >= 1")
        if not 0 < self.sampled_fraction <= 1:
            raise ConfigError("transitions.sampled_fraction must be in (0, 1]")
        if self.sigma_corr <= 0:
            raise ConfigError("transitions.sigma_corr must be > 0")
        if self.actions not in ACTION_KINDS:
            raise ConfigError(f"transitions.actions must be one of {ACTION_KINDS}, got {self.actions!r}")
        if self.backend not in ("auto", "numpy", "cupy"):
            raise ConfigError(f"transitions.backend must be auto, numpy or cupy, got {self.backend!r}")
        if self.chunk_cells is not None and self.chunk_cells < 1:
            raise ConfigError("transitions.chunk_cells must be >= 1 or null")

    def result_keys(self) -> dict[str, Any]:
        """Settings that change the table (backend and chunking do not change the maths)."""
        return {k: getattr(self, k) for k in ("n_propagation", "n_neighbors", "sampled_fraction", "sigma_corr",
                                               "knn_random", "seed", "actions")}


# ---------------------------------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class Actions:
    """Action list: ``gene_idx[a]`` is set to ``values[a]`` in every cell. KO actions first, then OE."""

    gene_idx: np.ndarray  # (A,) int64
    values: np.ndarray  # (A,) float64
    kinds: np.ndarray  # (A,) "KO" | "OE"
    genes: np.ndarray  # (A,) str

    def __len__(self) -> int:
        return int(len(self.gene_idx))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"index": np.arange(len(self)), "gene": self.genes, "kind": self.kinds,
                             "value": self.values})


def build_actions(model: OracleModel, which: str = "both") -> Actions:
    """Actions of a model: 0..R-1 knock out regulator r, R..2R-1 overexpress it (``which`` = ko | oe | both)."""
    if which not in ACTION_KINDS:
        raise ConfigError(f"transitions.actions must be one of {ACTION_KINDS}, got {which!r}")
    R = model.n_regulators
    parts = []
    if which in ("ko", "both"):
        parts.append((model.regulator_idx, model.ko_values, np.full(R, "KO")))
    if which in ("oe", "both"):
        parts.append((model.regulator_idx, model.oe_values, np.full(R, "OE")))
    gi = np.concatenate([p[0] for p in parts]).astype(np.int64)
    vals = np.concatenate([p[1] for p in parts]).astype(np.float64)
    if (vals < 0).any() or not np.isfinite(vals).all():
        raise InputError("perturbation values must be finite and >= 0 (CellOracle refuses negative values)",
                         field="ko_values/oe_values", fix="rebuild model.npz with the fit_oracle rule")
    return Actions(gene_idx=gi, values=vals, kinds=np.concatenate([p[2] for p in parts]),
                   genes=model.gene_names[gi].astype(str))


# ----------------------------------------------------------------------------------------------- neighbours
def sample_neighbors(embedding: np.ndarray, n_neighbors: int = 200, sampled_fraction: float = 0.3,
                     knn_random: bool = True, seed: int = 0,
                     sampling_probs: tuple[float, float] = (0.5, 0.1)) -> np.ndarray:
    """Embedding neighbours used for the correlation, exactly as CellOracle's ``estimate_transition_prob``.

    Returns ``(cells, k)`` int64: with ``knn_random`` the sampled subset (k = int(sampled_fraction *
    (n_neighbors + 1))), in CellOracle's order; else all ``n_neighbors + 1`` neighbours. Cell order matters
    for the random stream, so this runs once over all cells (O(cells x n_neighbors) memory).
    """
    n = embedding.shape[0]
    if n_neighbors + 1 > n - 1:
        raise InputError(f"n_neighbors + 1 = {n_neighbors + 1} neighbours requested but only {n} cells",
                         field="transitions.n_neighbors", fix=f"set transitions.n_neighbors <= {n - 2}")
    neigh = knn_like_sklearn(embedding, n_neighbors + 1)  # (n, n_neighbors + 1), distance order, self excluded
    if not knn_random:
        return neigh.astype(np.int64)
    m = neigh.shape[1]
    p = np.linspace(sampling_probs[0], sampling_probs[1], m)
    p = p / p.sum()
    size = int(sampled_fraction * (n_neighbors + 1))
    pick = weighted_choice_rows(np.random.RandomState(seed), n, m, size, p)
    return neigh[np.arange(n)[:, None], pick].astype(np.int64)


def knn_like_sklearn(embedding: np.ndarray, n_neighbors: int, tie_rtol: float = 1e-12) -> np.ndarray:
    """``NearestNeighbors(n_neighbors).fit(E).kneighbors(return_distance=False)``, identical indices, faster.

    sklearn answers a low-dimensional query with its KD-tree, one thread. Here scipy's cKDTree (all cores)
    answers every row whose distances are all distinct, where the distance order is unique and both trees
    agree; rows with a tie (or a near-tie within ``tie_rtol``, duplicates included) anywhere up to one past the
    last neighbour are answered by sklearn's own tree, whose tie order is not ours to reproduce. The query
    point itself is removed as sklearn removes it. Falls back to sklearn entirely when it would not use a
    KD-tree.
    """
    from scipy.spatial import cKDTree
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=n_neighbors).fit(embedding)
    tree, X = getattr(nn, "_tree", None), getattr(nn, "_fit_X", None)
    if getattr(nn, "_fit_method", None) != "kd_tree" or tree is None or X is None:
        return nn.kneighbors(return_distance=False)
    q = n_neighbors + 1  # sklearn asks for one more on its own points, then drops the point itself
    dist, ind = cKDTree(X).query(X, k=q + 1, workers=-1)
    gap = np.diff(dist, axis=1)
    tie = (gap <= tie_rtol * np.maximum(dist[:, 1:], np.finfo(np.float64).tiny)).any(axis=1)
    ind = np.ascontiguousarray(ind[:, :q])
    rows = np.flatnonzero(tie)
    if rows.size:
        ind[rows] = tree.query(X[rows], k=q, return_distance=False)
    keep = ind != np.arange(ind.shape[0])[:, None]
    keep[keep.all(axis=1), 0] = False  # more duplicates than neighbours: sklearn drops the first column
    return ind[keep].reshape(ind.shape[0], q - 1)


def weighted_choice_rows(rs: np.random.RandomState, n_rows: int, m: int, size: int, p: np.ndarray) -> np.ndarray:
    """``np.stack([rs.choice(m, size, replace=False, p=p) for _ in range(n_rows)])``, bit for bit, fast.

    numpy's legacy ``choice`` (``replace=False`` with ``p``) draws ``size - found`` uniforms per round, maps them
    through ``cdf = cumsum(p_without_found) / total`` with ``searchsorted(side="right")`` and keeps first
    occurrences, until ``size`` distinct indices are found. The uniforms of consecutive calls are consecutive
    doubles of the same MT19937 stream, so one pre-drawn stream replays every call; a numba kernel replays the
    rounds (numpy loop as fallback).
    """
    p = np.ascontiguousarray(p, dtype=np.float64)
    if np.count_nonzero(p > 0) < size:
        raise ValueError("fewer non-zero probabilities than samples")
    kern = _choice_kernel()
    if kern is None:
        return np.stack([rs.choice(m, size=(size,), replace=False, p=p) for _ in range(n_rows)], 0)
    out = np.empty((n_rows, size), dtype=np.int64)
    buf = rs.random_sample(int(n_rows * size * 1.25) + 1024)
    row, pos = 0, 0
    while row < n_rows:
        row, pos = kern(buf, pos, p, size, out, row)
        if row < n_rows:  # stream exhausted: keep the unused tail, draw more (same stream)
            buf = np.concatenate([buf[pos:], rs.random_sample(int((n_rows - row) * size * 1.25) + 1024)])
            pos = 0
    return out


def _choice_rows(buf, pos, p0, size, out, row):  # pragma: no cover - compiled by numba
    """Replay ``RandomState.choice(m, size, replace=False, p=p0)`` for rows ``row..`` from the uniform stream
    ``buf[pos:]``; returns (next row, next position), stopping early (at a row start) if ``buf`` runs out."""
    m = p0.shape[0]
    cdf = np.empty(m)
    while row < out.shape[0]:
        # rounds of this row need at most size * (rounds) draws; stop if the buffer may run out
        p = p0.copy()
        n_uniq = 0
        start = pos
        ok = True
        while n_uniq < size:
            need = size - n_uniq
            if pos + need > buf.shape[0]:
                ok = False
                break
            for t in range(n_uniq):
                p[out[row, t]] = 0.0
            acc = 0.0
            for t in range(m):
                acc += p[t]
                cdf[t] = acc
            last = cdf[m - 1]
            for t in range(m):
                cdf[t] = cdf[t] / last
            base = n_uniq
            for t in range(need):
                x = buf[pos + t]
                lo, hi = 0, m  # first index with cdf > x
                while lo < hi:
                    mid = (lo + hi) // 2
                    if cdf[mid] > x:
                        hi = mid
                    else:
                        lo = mid + 1
                dup = False
                for q in range(base, n_uniq):
                    if out[row, q] == lo:
                        dup = True
                        break
                if not dup:
                    out[row, n_uniq] = lo
                    n_uniq += 1
            pos += need
        if not ok:
            return row, start
        row += 1
    return row, pos


try:  # numba comes with celloracle; the kernel is compiled once and cached next to this file
    import numba as _numba

    _choice_rows_numba: Callable | None = _numba.njit(cache=True, nogil=True)(_choice_rows)
except Exception:  # pragma: no cover
    _choice_rows_numba = None


def _choice_kernel() -> Callable | None:
    return _choice_rows_numba


def embedding_float32(model: OracleModel) -> bool:
    """Whether CellOracle saw a float32 embedding (it then computes the unit vectors in float32).

    Read from ``model.meta["embedding_dtype"]`` (or ``meta["oracle"]["embedding_dtype"]``); float64 when absent,
    which is what cellrl.oracle.fit_oracle hands CellOracle. A wrong guess moves the shift by ~1e-7 only.
    """
    meta = model.meta or {}
    dt = meta.get("embedding_dtype") or (meta.get("oracle") or {}).get("embedding_dtype")
    return bool(dt) and np.dtype(dt) == np.float32


def unit_vectors(xp: ModuleType, embedding: Any, nbr: Any, float32: bool) -> tuple[Any, Any]:
    """``u[i, m]`` = unit vector from E_i to E_nbr[i, m] (0 where they coincide) and ``ubar[i]`` = mean_m u.

    ``float32``: do the arithmetic in float32 like CellOracle does when ``obsm`` holds float32.
    Shapes: (n, k, 2) float64 and (n, 2) float64.
    """
    dt = xp.float32 if float32 else xp.float64
    E = embedding.astype(dt)
    dE = E[nbr] - E[:, None, :]
    norm = xp.sqrt(dE[..., 0] * dE[..., 0] + dE[..., 1] * dE[..., 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        u = dE / norm[..., None]
    u = xp.where(norm[..., None] > 0, u, xp.zeros_like(u)).astype(xp.float64)
    ubar = u.sum(axis=1) / u.shape[1]
    return u, ubar


# ------------------------------------------------------------------------------------------------ propagation
def reachable(W: sp.csr_matrix, start: int, hops: int) -> np.ndarray:
    """Genes whose simulated delta can be non-zero: ``start`` and all targets within ``hops`` steps of ``W``."""
    seen = np.zeros(W.shape[0], dtype=bool)
    seen[start] = True
    frontier = np.array([start])
    for _ in range(hops):
        if frontier.size == 0:
            break
        tg = np.unique(np.concatenate([W.indices[W.indptr[r]:W.indptr[r + 1]] for r in frontier]))
        new = tg[~seen[tg]]
        seen[new] = True
        frontier = new
    return np.flatnonzero(seen)


@dataclass
class ClusterPlan:
    """Propagation data of one cluster in a *packed* layout: action ``a`` owns rows ``offsets[a]:offsets[a+1]``,
    one per gene its delta can reach (``S_a``); ``T = sum_a |S_a|`` rows in all (vs ``|U| x A`` dense).

    ``genes`` is ``U`` (union of the ``S_a``, ascending); ``gene_pos[t]`` the position in ``U`` of row ``t``;
    ``B`` the block-diagonal ``T x T`` matrix with blocks ``W[S_a, S_a].T`` (so ``B @ d`` is ``d @ W`` for every
    action at once, gene-major); ``seg`` the ``A x T`` 0/1 matrix that sums each action's rows.
    """

    genes: np.ndarray  # (|U|,) gene indices
    gene_pos: Any  # (T,) position in U of each packed row (backend)
    act_of: Any  # (T,) action of each packed row (backend)
    pin: Any  # (A,) packed row of each action's perturbed gene (backend)
    row_start: Any  # (A,) first packed row of each action (backend)
    B: Any  # CSR (T, T), backend
    seg: Any  # CSR (A, T), backend
    n_rows: int  # T
    nnz: int


def reachable_sets(W: sp.csr_matrix, starts: np.ndarray, hops: int) -> sp.csc_matrix:
    """Boolean (genes x len(starts)) sparse matrix: column j = :func:`reachable` from ``starts[j]``."""
    G = W.shape[0]
    A = (sp.csr_matrix(W) != 0).astype(np.int8).T.tocsr()  # target x regulator
    F = sp.csc_matrix((np.ones(len(starts), dtype=np.int8), (starts, np.arange(len(starts)))),
                      shape=(G, len(starts)))
    R = F.copy()
    for _ in range(hops):
        F = (A @ F).astype(bool).astype(np.int8)
        R = ((R + F) > 0).astype(np.int8)
    R.sort_indices()
    return R.tocsc()


def plan_cluster(xp: ModuleType, W: sp.csr_matrix, actions: Actions, hops: int, all_genes: bool) -> ClusterPlan:
    """Reachable sets of the actions' genes in cluster matrix ``W`` (every gene when ``all_genes``)."""
    W = sp.csr_matrix(W)
    G = W.shape[0]
    A = len(actions)
    if all_genes:
        sets = [np.arange(G)] * A
    else:
        R = reachable_sets(W, np.asarray(actions.gene_idx, dtype=np.int64), hops)
        sets = [R.indices[R.indptr[a]:R.indptr[a + 1]].astype(np.int64) for a in range(A)]
    U = np.unique(np.concatenate(sets)) if A else np.zeros(0, dtype=np.int64)
    sizes_a = np.array([S.size for S in sets], dtype=np.int64)
    row_start = np.concatenate([[0], np.cumsum(sizes_a)[:-1]]).astype(np.int64)
    T = int(sizes_a.sum())
    pos = np.concatenate([np.searchsorted(U, S) for S in sets]) if A else np.zeros(0, dtype=np.int64)
    pins = row_start + np.array([np.searchsorted(S, g) for S, g in zip(sets, actions.gene_idx)], dtype=np.int64)
    # B: block a = W[S_a, S_a].T in packed rows; from the edge list (regulator r -> target t, weight w)
    coo = W.tocoo()
    er, et, ew = coo.row, coo.col, coo.data
    rows, cols, vals = [], [], []
    local = np.full(G, -1, dtype=np.int64)
    for a, S in enumerate(sets):
        local[S] = np.arange(S.size)
        keep = (local[er] >= 0) & (local[et] >= 0)
        rows.append(row_start[a] + local[et[keep]])
        cols.append(row_start[a] + local[er[keep]])
        vals.append(ew[keep])
        local[S] = -1
    B = sp.csr_matrix((np.concatenate(vals) if vals else np.zeros(0),
                       (np.concatenate(rows) if rows else np.zeros(0, int),
                        np.concatenate(cols) if cols else np.zeros(0, int))), shape=(T, T))
    act_of = np.repeat(np.arange(A), sizes_a)
    seg = sp.csr_matrix((np.ones(T), (act_of, np.arange(T))), shape=(A, T))
    return ClusterPlan(genes=U, gene_pos=xp.asarray(pos), act_of=xp.asarray(act_of), pin=xp.asarray(pins),
                       row_start=xp.asarray(row_start), B=_sparse_to(xp, B), seg=_sparse_to(xp, seg), n_rows=T,
                       nnz=int(B.nnz))


def _sparse_module(xp: ModuleType) -> ModuleType:
    if xp is np:
        return sp
    import cupyx.scipy.sparse as csp  # type: ignore

    return csp


def _sparse_to(xp: ModuleType, m: sp.csr_matrix) -> Any:
    return m if xp is np else _sparse_module(xp).csr_matrix(m)


def packed_expression(xp: ModuleType, XU: Any, plan: ClusterPlan) -> Any:
    """(T, n): the chunk's expression of each packed row's gene (``XU`` is (n, |U|))."""
    return xp.take(xp.ascontiguousarray(XU.T), plan.gene_pos, axis=0)


def perturbation_input(XT: Any, plan: ClusterPlan, values: Any) -> Any:
    """(A, n): CellOracle's ``delta_input`` on each action's gene, ``value - X_ig`` (``XT`` packed expression)."""
    return values[:, None] - XT[plan.pin]


def propagate(xp: ModuleType, XU: Any, plan: ClusterPlan, values: Any, hops: int, XT: Any = None) -> Any:
    """Simulated delta of a chunk for all actions, packed gene-major: (T, n) (see :class:`ClusterPlan`).

    ``XU`` is (n, |U|) (the chunk's imputed expression on U), ``values`` (A,) the perturbation values; ``XT``
    its :func:`packed_expression` if already at hand. Follows ``_do_simulation`` step by step (same float
    operations except the order inside ``d @ W``).
    """
    if XT is None:
        XT = packed_expression(xp, XU, plan)
    d_in = perturbation_input(XT, plan, values)  # (A, n): simulation_input - gem on the perturbed gene
    pinned = d_in != 0
    d = xp.zeros_like(XT)
    d[plan.pin] = d_in
    for _ in range(hops):
        d = plan.B @ d  # delta_simulated.dot(coef_matrix), every action at once
        d[plan.pin] = xp.where(pinned, d_in, d[plan.pin])  # delta_simulated[delta_input != 0] = delta_input
        d += XT  # gem_tmp = gem + delta
        xp.maximum(d, 0.0, out=d)  # gem_tmp[gem_tmp < 0] = 0 (same result, -0.0 and NaN included)
        d -= XT  # delta = gem_tmp - gem
    d += XT  # simulated_count = gem + delta
    d -= XT  # delta_X = simulated_count - imputed_count
    return d


EXACT_BELOW = 1e-6  # |D|^2 / (|X_i|^2 + |X_j|^2) under which D is formed explicitly (cancellation guard)
TINY_INPUT = 1e-6  # |c_ia| |r_a| / |X_i| under which a (cell, action) pair is handled exactly (no linear part)
ROUNDING_TOL = 64 * float(np.finfo(np.float64).eps)  # |d - c r| beyond this x (|X| + |d|) is a clipping effect
SPARSE_Q_BELOW = 0.02  # packed rows / (A x |U|) under which Q = X_U R^T is a sparse product
GRAM_BLOCK = 64  # cells per Gram block (cells x union of their neighbours)
CORRECTION_BATCH = 1 << 16  # clipping-correction entries gathered at once (x k neighbours)


def unit_response(xp: ModuleType, plan: ClusterPlan, hops: int) -> Any:
    """(T,) packed propagation of a unit input on each action's gene, without clipping: ``r = e_g``; ``hops``
    times ``r = r @ W; r[g] = 1``. Propagation is linear until ``max(X + d, 0)`` clips, so for every (cell,
    action) that does not clip ``delta = c r`` with ``c = value - X_ig`` (CellOracle's ``delta_input``)."""
    r = xp.zeros(plan.n_rows)
    r[plan.pin] = 1.0
    for _ in range(hops):
        r = plan.B @ r
        r[plan.pin] = 1.0
    return r


@dataclass
class ClusterLinear:
    """A cluster's unit responses ``r`` (T,), their norms per action (A,), and ``Q`` (N, A): ``Q[j, a] = sum_{t
    in rows of a} r_t X[j, gene_t]`` for *every* cell ``j`` -- so the correlation numerator of any cell of the
    cluster with any neighbour is ``c_ia (Q[j, a] - Q[i, a])`` plus clipping corrections."""

    r: Any
    r_norm: Any
    Q: Any


def cluster_linear(xp: ModuleType, X: Any, plan: ClusterPlan, n_actions: int, hops: int,
                   block: int = 8192) -> ClusterLinear:
    """:class:`ClusterLinear` of one cluster; ``Q`` in row blocks of ``block`` cells (dense BLAS product, or a
    sparse one when each action reaches few of the genes in ``U``)."""
    r = unit_response(xp, plan, hops)
    nU = int(plan.genes.size)
    r_norm = xp.sqrt(plan.seg @ (r * r))
    U = xp.asarray(plan.genes)
    N = X.shape[0]
    Q = xp.empty((N, n_actions))
    sparse = plan.n_rows < SPARSE_Q_BELOW * n_actions * nU
    if sparse:
        R = _sparse_module(xp).csr_matrix((r, (plan.act_of, plan.gene_pos)), shape=(n_actions, nU))
    else:
        R = xp.zeros((n_actions, nU))
        R[plan.act_of, plan.gene_pos] = r
    for s in range(0, N, block):
        XU = xp.take(X[s:s + block], U, axis=1)
        Q[s:s + block] = (R @ XU.T).T if sparse else XU @ R.T
    return ClusterLinear(r=r, r_norm=r_norm, Q=Q)


def unpack(xp: ModuleType, d: Any, plan: ClusterPlan, n_actions: int) -> Any:
    """Packed (T, n) delta -> dense (n, A, |U|), zeros off each action's reachable set."""
    out = xp.zeros((d.shape[1], n_actions, plan.genes.size), dtype=d.dtype)
    out[:, plan.act_of, plan.gene_pos] = d.T
    return out


# ------------------------------------------------------------------------------------------------ one chunk
@dataclass
class Context:
    """Everything a chunk needs, prepared once (on the backend)."""

    xp: ModuleType
    settings: TransitionSettings
    actions: Actions
    X: Any  # (N, G)
    rowsum: Any  # (N,) sum_g X
    sqsum: Any  # (N,) sum_g X^2
    E: Any  # (N, 2)
    nbr: Any  # (N, k)
    u: Any  # (N, k, 2)
    ubar: Any  # (N, 2)
    values: Any  # (A,)
    plans: list[ClusterPlan]
    tree: Any  # scipy cKDTree on E (CPU)
    n_genes: int
    _lin_cache: dict = dataclasses.field(default_factory=dict)
    _lin_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    lin_cache_size: int = 1

    def linear(self, cluster: int) -> ClusterLinear:
        """:func:`cluster_linear` of ``cluster``. Chunks come by cluster, so only the ``lin_cache_size`` most
        recently used clusters are kept (one per worker thread); thread-safe."""
        with self._lin_lock:
            hit = self._lin_cache.pop(cluster, None)
            if hit is None:
                hit = cluster_linear(self.xp, self.X, self.plans[cluster], len(self.actions),
                                     self.settings.n_propagation)
            while len(self._lin_cache) >= max(1, self.lin_cache_size):
                self._lin_cache.pop(next(iter(self._lin_cache)))
            self._lin_cache[cluster] = hit  # most recent last
            return hit


def prepare(model: OracleModel, settings: TransitionSettings, xp: ModuleType,
            nbr: np.ndarray | None = None) -> Context:
    """Neighbours, unit vectors, per-cluster propagation plans and the KD-tree: the action-independent part."""
    from scipy.spatial import cKDTree

    acts = build_actions(model, settings.actions)
    X = np.ascontiguousarray(model.X, dtype=np.float64)
    all_genes = bool(X.min() < 0)  # clipping can then move genes the network does not reach
    with ThreadPoolExecutor(1, thread_name_prefix="cellrl-plans") as pool:  # overlaps the neighbour search
        plans_f = pool.submit(lambda: [plan_cluster(xp, W, acts, settings.n_propagation, all_genes)
                                       for W in model.coefs])
        if nbr is None:
            nbr = sample_neighbors(model.embedding, settings.n_neighbors, settings.sampled_fraction,
                                   settings.knn_random, settings.seed)
        plans = plans_f.result()
    E = np.asarray(model.embedding, dtype=np.float64)
    Ex = xp.asarray(E)
    nbr_x = xp.asarray(nbr)
    u, ubar = unit_vectors(xp, Ex, nbr_x, embedding_float32(model))
    Xx = xp.asarray(X)
    return Context(xp=xp, settings=settings, actions=acts, X=Xx, rowsum=Xx.sum(axis=1),
                   sqsum=xp.einsum("ng,ng->n", Xx, Xx), E=Ex, nbr=nbr_x, u=u, ubar=ubar,
                   values=xp.asarray(acts.values), plans=plans, tree=cKDTree(E), n_genes=X.shape[1])


@dataclass
class ChunkResult:
    next_cell: np.ndarray  # (n, A) int32
    shift: Any  # (n, A, 2) on the backend
    delta: Any | None = None  # (n, A, |U|) when asked for
    n_clipped: int = 0  # (cell, action) pairs whose propagation clipped (or had a tiny input): exact corrections


def run_chunk(ctx: Context, cells: np.ndarray, cluster: int, keep_delta: bool = False) -> ChunkResult:
    """Next cell of every (cell in ``cells``, action); all cells must belong to cluster ``cluster``."""
    xp = ctx.xp
    plan = ctx.plans[cluster]
    lin = ctx.linear(cluster)
    G = ctx.n_genes
    A = len(ctx.actions)
    ci = xp.asarray(cells)
    n = int(ci.shape[0])
    genes_x = xp.asarray(plan.genes)
    Xc = ctx.X[ci]  # (n, G)
    XcU = xp.take(Xc, genes_x, axis=1)  # (n, |U|)
    nbr = ctx.nbr[ci]  # (n, k)
    k = int(nbr.shape[1])

    # 1. exact propagation on each action's reachable genes, all actions at once (packed rows)
    XT = packed_expression(xp, XcU, plan)  # (T, n)
    d = propagate(xp, XcU, plan, ctx.values, ctx.settings.n_propagation, XT=XT)  # (T, n)

    # 2. d = c r + e: the linear part (c = value - X_ig per cell and action) and the exact remainder e, which is
    #    rounding noise unless clipping acted; pairs with a tiny input are kept whole in e (c := 0)
    c = perturbation_input(XT, plan, ctx.values)  # (A, n)
    xnorm = xp.sqrt(ctx.sqsum[ci])  # (n,)
    tiny = xp.abs(c) * lin.r_norm[:, None] < TINY_INPUT * xnorm[None, :]
    c = xp.where(tiny, 0.0, c)
    e = d - lin.r[:, None] * c[plan.act_of]  # (T, n)
    keep = xp.abs(e) > ROUNDING_TOL * (xp.abs(XT) + xp.abs(d))
    keep |= tiny[plan.act_of] & (d != 0)
    kt, ki = xp.nonzero(keep)

    # 3. numerator sum_S d (X_j - X_i) = c (Q_j - Q_i) + sum_{kept} e (X_j,g - X_i,g)
    num = c.T[:, :, None] * (xp.take(lin.Q, nbr, axis=0).transpose(0, 2, 1) - lin.Q[ci][:, :, None])  # (n, A, k)
    for b0 in range(0, int(kt.shape[0]), CORRECTION_BATCH):  # batches bound the (entries, k) gather
        bt, bi = kt[b0:b0 + CORRECTION_BATCH], ki[b0:b0 + CORRECTION_BATCH]
        g = genes_x[plan.gene_pos[bt]]  # gene of each kept entry
        Dg = ctx.X[nbr[bi], g[:, None]] - Xc[bi, g][:, None]  # (entries, k)
        S = _sparse_module(xp).csr_matrix((e[bt, bi], (bi * A + plan.act_of[bt], xp.arange(bt.shape[0]))),
                                          shape=(n * A, int(bt.shape[0])))
        num += (S @ Dg).reshape(n, A, k)

    # 4. neighbour displacement statistics over all G genes (action-independent): sum_g D = rowsum_j - rowsum_i,
    #    sum_g D^2 = |X_j|^2 + |X_i|^2 - 2 X_i.X_j with X_i.X_j from one Gram product per block of cells against
    #    the union of their neighbours
    cross = xp.empty((n, k))
    for s0 in range(0, n, GRAM_BLOCK):
        nb = nbr[s0:s0 + GRAM_BLOCK]
        uni, inv = xp.unique(nb.ravel(), return_inverse=True)
        gram = Xc[s0:s0 + GRAM_BLOCK] @ ctx.X[uni].T  # (b, |union|)
        cross[s0:s0 + GRAM_BLOCK] = xp.take_along_axis(gram, inv.reshape(nb.shape), axis=1)
    sq_i, sq_j = ctx.sqsum[ci][:, None], ctx.sqsum[nbr]
    ssD = sq_j + sq_i - 2.0 * cross
    s1 = ctx.rowsum[nbr] - ctx.rowsum[ci][:, None]  # (n, k)
    # where D is small against X (near-duplicate cells) the expanded forms lose digits: redo those exactly
    fix = ssD < EXACT_BELOW * (sq_i + sq_j)
    if bool(fix.any()):
        fi, fm = xp.nonzero(fix)
        D = ctx.X[nbr[fi, fm]] - Xc[fi]  # (f, G)
        ssD[fi, fm] = xp.einsum("fg,fg->f", D, D)
        s1[fi, fm] = D.sum(axis=1)
        gt = genes_x[plan.gene_pos]  # gene of each packed row
        num[fi, :, fm] = (plan.seg @ (d[:, fi] * D[:, gt].T)).T
    ssA = ssD - s1 * s1 / G  # sum_g (D - mean D)^2
    xp.maximum(ssA, 0.0, out=ssA)

    # 5. Pearson correlation over all G genes with the centring done algebraically (delta is 0 off S_a):
    #    sum_g (d - mean d)(D - mean D) = sum_S d D - sum_d mean D;  sum_g (d - mean d)^2 = sum_S d^2 - sum_d^2 / G
    sum_d = (plan.seg @ d).T  # (n, A)
    ssb = (plan.seg @ (d * d)).T - sum_d * sum_d / G
    xp.maximum(ssb, 0.0, out=ssb)
    delta = unpack(xp, d, plan, A) if keep_delta else None
    num -= sum_d[:, :, None] * (s1 / G)[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_a = 1.0 / xp.sqrt(ssA)
        inv_b = 1.0 / xp.sqrt(ssb)
        corr = num * inv_a[:, None, :] * inv_b[:, :, None]
    if ctx.settings.knn_random:  # CellOracle fixes NaNs only in knn_random mode
        corr = xp.where(xp.isnan(corr), 1.0, corr)

    # 6. transition probabilities and embedding shift
    w = xp.exp(corr / ctx.settings.sigma_corr)
    P = w / w.sum(axis=2, keepdims=True)
    shift = xp.matmul(P, ctx.u[ci]) - ctx.ubar[ci][:, None, :]  # (n, A, 2)

    # 7. nearest cell to the shifted point (CPU KD-tree; NaN shift = no move)
    target = to_numpy(ctx.E[ci][:, None, :] + shift).reshape(-1, 2)
    ok = np.isfinite(target).all(axis=1)
    nxt = np.repeat(np.asarray(cells), len(ctx.actions)).astype(np.int64)
    if ok.any():
        _, idx = ctx.tree.query(target[ok], k=1, workers=-1 if ok.sum() > 50_000 else 1)
        nxt[ok] = idx
    return ChunkResult(next_cell=nxt.reshape(len(cells), -1).astype(np.int32), shift=shift,
                       delta=delta if keep_delta else None,
                       n_clipped=int(xp.unique(ki * A + plan.act_of[kt]).shape[0]))


# --------------------------------------------------------------------------------------------- whole table
def spatial_order(embedding: np.ndarray, cells_per_tile: int = 64) -> np.ndarray:
    """Rank of every cell along a serpentine walk over square tiles of the embedding (~``cells_per_tile`` cells
    per tile on average): nearby cells get nearby ranks, so a chunk's neighbour lists overlap (smaller Gram
    blocks). Only the order in which cells are computed; it never changes a result."""
    E = np.asarray(embedding, dtype=np.float64)
    lo, span = E.min(axis=0), np.ptp(E, axis=0)
    span[span == 0] = 1.0
    tiles = max(1, int(np.sqrt(len(E) / cells_per_tile)))
    gx, gy = (np.minimum(((E - lo) / span * tiles).astype(np.int64), tiles - 1)).T
    gy = np.where(gx % 2 == 0, gy, tiles - 1 - gy)
    key = (gx * tiles + gy) * len(E) + np.arange(len(E))
    rank = np.empty(len(E), dtype=np.int64)
    rank[np.argsort(key, kind="stable")] = np.arange(len(E))
    return rank


def chunk_plan(cluster_ids: np.ndarray, chunk_cells: int,
               embedding: np.ndarray | None = None) -> list[tuple[int, np.ndarray]]:
    """Cells grouped by cluster (one coefficient matrix per chunk), in :func:`spatial_order` of ``embedding``
    within a cluster when given, then cut into chunks of <= chunk_cells."""
    rank = spatial_order(embedding) if embedding is not None else None
    out = []
    for c in np.unique(cluster_ids):
        cells = np.flatnonzero(cluster_ids == c)
        if rank is not None:
            cells = cells[np.argsort(rank[cells], kind="stable")]
        for s in range(0, cells.size, chunk_cells):
            out.append((int(c), cells[s:s + chunk_cells]))
    return out


def bytes_per_cell(n_genes: int, n_union: int, n_actions: int, k: int, n_rows: int | None = None) -> int:
    """Working memory of one cell in a chunk (8-byte words): ~7 packed rows (T) of propagation and correction
    temporaries, ~8 (A x k) numerator / correlation arrays, its expression row (G + 2 |U|) and neighbour
    statistics. Gram blocks and correction batches are bounded separately (GRAM_BLOCK, CORRECTION_BATCH)."""
    T = n_rows if n_rows is not None else n_union * n_actions
    return 8 * (7 * T + 8 * n_actions * k + n_genes + 2 * n_union + 4 * k)


def choose_chunk_cells(xp: ModuleType, per_cell: int, override: int | None = None, fraction: float = 0.25,
                       cpu_target_bytes: int = 32 << 20, cpu_min_cells: int = 16,
                       gpu_cap_bytes: int = 8 << 30) -> tuple[int, str]:
    """Cells per chunk (``override`` wins): never more than ``fraction`` of the free memory (RAM for numpy,
    GPU memory for CuPy) allows. On CPU, chunks are kept near ``cpu_target_bytes`` of working set (cache-sized:
    measured fastest; the big products are per cell, so small chunks lose no BLAS efficiency), but at least
    ``cpu_min_cells``; on GPU they are as large as memory allows up to ``gpu_cap_bytes``."""
    if override:
        return int(override), "transitions.chunk_cells"
    per_cell = max(int(per_cell), 1)
    if xp is np:
        import psutil

        free = int(psutil.virtual_memory().available)
        mem_cells = int(free * fraction) // per_cell
        want = max(cpu_min_cells, cpu_target_bytes // per_cell)
        why = (f"~{cpu_target_bytes >> 20} MiB working set ({per_cell / 2**20:.2f} MiB per cell, >= "
               f"{cpu_min_cells} cells), within {fraction:.0%} of free RAM ({free / 2**30:.1f} GiB)")
    else:
        free = int(xp.cuda.runtime.memGetInfo()[0])
        mem_cells = min(int(free * fraction), gpu_cap_bytes) // per_cell
        want = mem_cells
        why = (f"{fraction:.0%} of free GPU memory ({free / 2**30:.1f} GiB) capped at {gpu_cap_bytes >> 30} GiB, "
               f"{per_cell / 2**20:.2f} MiB per cell")
    return int(max(1, min(4096, want, mem_cells))), why


def select_backend(backend: str) -> tuple[ModuleType, str]:
    """(xp, reason) for the ``transitions.backend`` setting."""
    if backend == "numpy":
        return np, "numpy: transitions.backend = numpy"
    if backend == "cupy":
        return get_xp("cupy"), "cupy: transitions.backend = cupy"
    if cupy_available():
        return get_xp("cupy"), "cupy: backend auto and CuPy sees a CUDA GPU"
    try:
        import cupy  # noqa: F401  # type: ignore

        why = "CuPy is installed but sees no CUDA GPU"
    except Exception:
        why = "CuPy is not installed (pip install cupy-cuda12x for the GPU path)"
    return np, f"numpy: backend auto and {why}"


def model_fingerprint(model: OracleModel) -> str:
    """sha256 over every model array the table depends on."""
    h = hashlib.sha256()
    for a in (model.X, model.embedding, model.cluster_ids, model.regulator_idx, model.ko_values,
              model.oe_values):
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    for W in model.coefs:
        W = sp.csr_matrix(W)
        for a in (W.data, W.indices, W.indptr):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _code_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def chunk_workers(xp: ModuleType, threads: int | None, n_chunks: int) -> int:
    """Chunks computed at once: one on the GPU; on CPU ``threads`` (default: the cores this process may use).
    numpy, BLAS, scipy's sparse products and the KD-tree release the GIL, so threads run chunks in parallel."""
    if xp is not np:
        return 1
    n = int(threads) if threads else len(os.sched_getaffinity(0))
    return max(1, min(n, n_chunks))


def _store_chunk(f: Path, **arrays: Any) -> None:
    """Write a finished chunk and its sha256 (``chunk_<i>.sha256``, written first: a crash between the two
    leaves a checksum without its piece, which is simply recomputed)."""
    tmp = f.with_name(f".{f.name}.tmp.npz")
    np.savez(tmp, **arrays)
    with atomic_path(f.with_suffix(".sha256")) as t:
        t.write_text(sha256_file(tmp) + "\n")
    os.replace(tmp, f)


def _stored_chunk(f: Path, cells: np.ndarray, n_actions: int) -> dict[str, np.ndarray] | None:
    """A stored chunk of these ``cells`` that matches its recorded sha256, or None (recompute it). A piece that
    fails the check or cannot be read is removed with a warning naming the file."""
    if not f.exists():
        return None
    side = f.with_suffix(".sha256")
    try:
        expected = side.read_text().strip() if side.exists() else None
        if expected is None:
            why = "no recorded sha256 next to it"
        elif sha256_file(f) != expected:
            why = f"its sha256 differs from the one recorded in {side.name} (altered or damaged since it was stored)"
        else:
            with np.load(f, allow_pickle=False) as z:
                d = {k: z[k] for k in ("cells", "next_cell", "shift_norm_sum", "n_clipped")}
            if not np.array_equal(d["cells"], cells):
                return None  # another chunking (e.g. chunk_cells changed): recomputed and overwritten
            if d["next_cell"].shape != (len(cells), n_actions) or d["shift_norm_sum"].shape != (n_actions,):
                why = f"next_cell {d['next_cell'].shape} does not fit {len(cells)} cells x {n_actions} actions"
            else:
                return d
    except Exception as e:  # truncated, not an npz, missing arrays: the piece is only a cache
        why = f"unreadable ({type(e).__name__}: {e})"
    log.warning("discarding transition chunk %s: %s; recomputing it", f, why)
    f.unlink(missing_ok=True)
    side.unlink(missing_ok=True)
    return None


def compute_table(model: OracleModel, settings: TransitionSettings | dict | None = None,
                  chunk_dir: str | Path | None = None,
                  on_chunk: Callable[[int, int], None] | None = None,
                  threads: int | None = None, progress: bool = True) -> tuple[np.ndarray, Actions, dict]:
    """The whole table ``(cells, A)`` int32, the actions and diagnostics.

    ``threads``: CPU worker threads, each computing whole chunks (default: every core this process may use;
    the table does not depend on it). The GPU path runs one chunk at a time.

    ``chunk_dir``: finished chunks are stored under ``chunk_dir/<key>/`` with key = hash(model arrays, settings
    that change the result, engine source, backend) and reused by a later call with the same key (resume after
    an interruption; the interrupted run's chunk size is kept unless ``chunk_cells`` is set). Each piece has its
    sha256 next to it; one that fails it or cannot be read is discarded with a warning and recomputed.
    ``on_chunk(i, n_chunks)`` is called after each chunk is stored (tests raise from it). ``progress``: chunks
    done, cell-actions/s and ETA on the console (:mod:`cellrl.progress`) and in the log.
    """
    if not isinstance(settings, TransitionSettings):
        settings = TransitionSettings.from_dict(settings)
    t0 = time.time()
    xp, why = select_backend(settings.backend)
    log.info("backend %s", why)
    tag = f"transitions {model.meta['dataset']}" if model.meta.get("dataset") else "transitions"
    note(f"[{tag}] neighbours and reachable genes of {model.n_cells:,} cells ({why})", enabled=progress)
    ctx = prepare(model, settings, xp)
    t_prep = time.time() - t0
    A, N, G = len(ctx.actions), model.n_cells, model.n_genes
    k = int(ctx.nbr.shape[1])
    max_u = max(int(p.genes.size) for p in ctx.plans)
    per_cell = max(bytes_per_cell(G, int(p.genes.size), A, k, p.n_rows) for p in ctx.plans)
    backend_name = "cupy" if xp is not np else "numpy"
    key_src, key = "{}", ""
    cdir, stored = None, None
    if chunk_dir is not None:  # chunks are reusable only for the same model, settings, code and backend
        key_src = json.dumps({"model": model_fingerprint(model), "settings": settings.result_keys(),
                              "code": _code_hash(), "backend": backend_name}, sort_keys=True)
        key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
        root = Path(chunk_dir)
        cdir = root / key
        if root.exists():
            for stale in root.iterdir():  # chunks of other inputs/settings/code can never be reused
                if stale.is_dir() and stale.name != key:
                    shutil.rmtree(stale, ignore_errors=True)
        if (cdir / "meta.json").exists():
            try:
                stored = json.loads((cdir / "meta.json").read_text()).get("chunk_cells")
            except (OSError, ValueError, AttributeError) as e:  # the pieces' own checks still guard reuse
                log.warning("ignoring unreadable %s (%s: %s)", cdir / "meta.json", type(e).__name__, e)
    if stored and settings.chunk_cells is None:
        chunk, chunk_why = int(stored), "reused from the interrupted run in chunk_dir"
    else:
        chunk, chunk_why = choose_chunk_cells(xp, per_cell, settings.chunk_cells)
    if cdir is not None:
        if stored and stored != chunk:
            shutil.rmtree(cdir, ignore_errors=True)
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / "meta.json").write_text(json.dumps({"chunk_cells": chunk, "key_source": json.loads(key_src)}))
    chunks = chunk_plan(np.asarray(model.cluster_ids), chunk, model.embedding)
    log.info("%d cells x %d actions, %d genes, k=%d neighbours, |U| <= %d; %d chunks of <= %d cells (%s)",
             N, A, G, k, max_u, len(chunks), chunk, chunk_why)

    table = np.empty((N, A), dtype=np.int32)
    shift_norm_sum = np.zeros(A)
    clipped = 0
    reused = 0
    gpu_peak = 0
    t_chunks = time.time()
    todo = []
    reused_cells = 0
    for i, (c, cells) in enumerate(chunks):
        z = _stored_chunk(cdir / f"chunk_{i:05d}.npz", cells, A) if cdir is not None else None
        if z is not None:
            table[cells] = z["next_cell"]
            shift_norm_sum += z["shift_norm_sum"]
            clipped += int(z["n_clipped"])
            reused += 1
            reused_cells += len(cells)
            continue
        todo.append(i)
    workers = chunk_workers(xp, threads, len(todo))
    ctx.lin_cache_size = workers

    def work(i: int) -> tuple[int, np.ndarray, np.ndarray, int]:
        c, cells = chunks[i]
        r = run_chunk(ctx, cells, c)
        return i, r.next_cell, to_numpy(xp.sqrt((r.shift ** 2).sum(axis=2)).sum(axis=0)), r.n_clipped

    # counted in cell-actions (chunks differ in size); chunks reused from chunk_dir count as done before the start
    bar = Progress(N * A, tag, unit="cell-action", log=log, enabled=progress, initial=reused_cells * A)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="cellrl-chunk") if workers > 1 else None
    try:
        with bar, blas_threads(1 if workers > 1 else None):  # chunk threads must not oversubscribe
            results = pool.map(work, todo) if pool is not None else map(work, todo)
            for done, (i, next_cell, sn, n_clip) in enumerate(results):
                cells = chunks[i][1]
                table[cells] = next_cell
                shift_norm_sum += sn
                clipped += n_clip
                if xp is not np:
                    gpu_peak = max(gpu_peak, int(xp.get_default_memory_pool().total_bytes()))
                if cdir is not None:
                    _store_chunk(cdir / f"chunk_{i:05d}.npz", cells=cells, next_cell=next_cell, shift_norm_sum=sn,
                                 n_clipped=n_clip)
                if on_chunk is not None:
                    on_chunk(i, len(chunks))
                bar.update(len(cells) * A, chunks=f"{reused + done + 1}/{len(chunks)}")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    t_chunks_done = time.time()
    elapsed = t_chunks_done - t0
    self_frac = (table == np.arange(N, dtype=np.int32)[:, None]).mean(axis=0)
    stats = {
        "n_cells": N, "n_genes": G, "n_actions": A, "n_neighbors_sampled": k,
        "settings": dataclasses.asdict(settings),
        "backend": backend_name, "backend_reason": why,
        "chunk_cells": chunk, "chunk_cells_reason": chunk_why, "n_chunks": len(chunks), "chunks_reused": reused,
        "threads": workers,
        "clipped_pair_fraction": clipped / max(N * A, 1),
        "max_reachable_genes": max_u, "reachable_genes_per_cluster": [int(p.genes.size) for p in ctx.plans],
        "mean_reachable_genes_per_action": float(np.mean([p.n_rows / max(A, 1) for p in ctx.plans])),
        "self_transition_fraction": float(self_frac.mean()),
        "self_transition_fraction_per_action": {f"{kd}:{g}": float(v) for kd, g, v in
                                                zip(ctx.actions.kinds, ctx.actions.genes, self_frac)},
        "mean_shift": float(shift_norm_sum.sum() / (N * A)) if A else 0.0,
        "mean_shift_per_action": {f"{kd}:{g}": float(v / N) for kd, g, v in
                                  zip(ctx.actions.kinds, ctx.actions.genes, shift_norm_sum)},
        "time_s": round(elapsed, 3), "prepare_s": round(t_prep, 3), "chunks_s": round(t_chunks_done - t_chunks, 3),
        "cell_actions_per_s": (N * A) / elapsed if elapsed > 0 else None,
        "peak_rss_bytes": _peak_rss_bytes(), "peak_gpu_pool_bytes": gpu_peak,
        "table_sha256": hashlib.sha256(table.tobytes()).hexdigest(),
        "code": _code_hash(), "chunk_key": key,
    }
    return table, ctx.actions, stats


def transitions_files(model_path: str | Path, table_out: str | Path, actions_out: str | Path,
                      stats_out: str | Path, chunk_dir: str | Path | None = None, threads: int | None = None,
                      progress: bool = True, **settings: Any) -> dict:
    """Rule ``transitions``: model.npz -> table.npy (int32 cells x actions), actions.tsv, stats.json.

    Resumable: chunks finished by an interrupted run are reused (``chunk_dir``); removed after success.
    ``threads``: CPU worker threads (the rule's ``threads``); the table does not depend on it. ``progress``:
    chunk progress on the console.
    """
    s = TransitionSettings.from_dict(settings)
    model = load_model(model_path)
    table, acts, stats = compute_table(model, s, chunk_dir=chunk_dir, threads=threads, progress=progress)
    stats["model"] = str(model_path)
    stats["dataset"] = model.meta.get("dataset")
    save_npy(table_out, table)
    write_table(actions_out, acts.frame())
    write_json(stats_out, stats)
    if chunk_dir is not None:
        shutil.rmtree(chunk_dir, ignore_errors=True)
    log.info("table %s: %d x %d, self-transitions %.3f, %.1f s, peak RSS %.2f GiB (%s)", table_out,
             *table.shape, stats["self_transition_fraction"], stats["time_s"], stats["peak_rss_bytes"] / 2**30,
             stats["backend_reason"])
    return stats


# ------------------------------------------------------------------------------------- single-action helpers
def simulate_actions(model: OracleModel, settings: TransitionSettings | dict | None = None,
                     action_ids: Sequence[int] | None = None, xp: ModuleType | None = None,
                     chunk_cells: int = 512) -> dict[str, np.ndarray]:
    """Dense per-action outputs for checks against CellOracle (small data only): delta (A', N, G), shift
    (A', N, 2) and next cell (A', N), computed by the same chunk code as the table."""
    if not isinstance(settings, TransitionSettings):
        settings = TransitionSettings.from_dict(settings)
    xp = xp or select_backend(settings.backend)[0]
    ctx = prepare(model, settings, xp)
    ids = np.arange(len(ctx.actions)) if action_ids is None else np.asarray(action_ids)
    N, G = model.n_cells, model.n_genes
    delta = np.zeros((len(ids), N, G))
    shift = np.zeros((len(ids), N, 2))
    nxt = np.zeros((len(ids), N), dtype=np.int32)
    for c, cells in chunk_plan(np.asarray(model.cluster_ids), chunk_cells, model.embedding):
        r = run_chunk(ctx, cells, c, keep_delta=True)
        d = to_numpy(r.delta)[:, ids]  # (n, A', |U|)
        g = ctx.plans[c].genes
        delta[:, cells[:, None], g[None, :]] = d.transpose(1, 0, 2)
        shift[:, cells] = to_numpy(r.shift)[:, ids].transpose(1, 0, 2)
        nxt[:, cells] = r.next_cell[:, ids].T
    return {"delta": delta, "shift": shift, "next_cell": nxt, "neighbors": to_numpy(ctx.nbr)}


def nearest_cells(embedding: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Next cell for a given shift (N, 2): the cell nearest to E_i + shift_i (same KD-tree query as the table)."""
    from scipy.spatial import cKDTree

    E = np.asarray(embedding, dtype=np.float64)
    target = E + shift
    out = np.arange(len(E))
    ok = np.isfinite(target).all(axis=1)
    out[ok] = cKDTree(E).query(target[ok], k=1, workers=-1)[1]
    return out.astype(np.int32)


def celloracle_dense_bytes(n_cells: int) -> int:
    """Lower bound on CellOracle's peak for one perturbation (calculate_embedding_shift): corrcoef, the dense
    kNN mask (twice), transition_prob and the (2, N, N) unit vectors (+ a same-size norm temporary), float64."""
    return 8 * n_cells * n_cells * (1 + 2 + 1 + 2 + 1)
