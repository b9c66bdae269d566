"""CellOracle-compatible neighbour sampling: the embedding neighbours of ``estimate_transition_prob(knn_random=True)``,
identical indices and random draws, computed faster (scipy's KD-tree on all cores, a numba replay of numpy's
``RandomState.choice``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from ..errors import InputError


def sample_neighbors(embedding: np.ndarray, n_neighbors: int = 200, sampled_fraction: float = 0.3,
                     knn_random: bool = True, seed: int = 0,
                     sampling_probs: tuple[float, float] = (0.5, 0.1)) -> np.ndarray:
    """Embedding neighbours used for the correlation, exactly as CellOracle's ``estimate_transition_prob``.

    Returns ``(cells, k)`` int64: with ``knn_random`` the sampled subset (k = int(sampled_fraction *
    (n_neighbors + 1))), in CellOracle's order; else all ``n_neighbors + 1`` neighbours. Cell order matters
    for the random stream, so this runs once over all cells (O(cells x n_neighbors) memory). The draw (which
    ranks each cell keeps) does not depend on the neighbours, so it runs in a thread beside their search.
    """
    n = embedding.shape[0]
    check_n_neighbors(n, n_neighbors)
    if not knn_random:
        return knn_like_sklearn(embedding, n_neighbors + 1).astype(np.int64)
    m = n_neighbors + 1  # neighbours per cell (distance order, self excluded)
    p = np.linspace(sampling_probs[0], sampling_probs[1], m)
    p = p / p.sum()
    size = int(sampled_fraction * (n_neighbors + 1))
    with ThreadPoolExecutor(1, thread_name_prefix="cellrl-draw") as pool:
        pick_f = pool.submit(weighted_choice_rows, np.random.RandomState(seed), n, m, size, p)
        neigh = knn_like_sklearn(embedding, m)  # (n, m)
        pick = pick_f.result()
    return np.take_along_axis(neigh, pick, axis=1).astype(np.int64)


def check_n_neighbors(n_cells: int, n_neighbors: int) -> None:
    """InputError unless ``n_cells`` hold the ``n_neighbors + 1`` neighbours CellOracle searches per cell (checked
    for every next-cell model, also those that sample no embedding neighbours)."""
    if n_neighbors + 1 > n_cells - 1:
        raise InputError(f"n_neighbors + 1 = {n_neighbors + 1} neighbours requested but only {n_cells} cells",
                         field="transitions.n_neighbors", fix=f"set transitions.n_neighbors <= {n_cells - 2}")


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
