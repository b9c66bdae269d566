"""Next-cell models: from a cell's simulated change to the table cell it becomes (``transitions.next_cell``).

Per cell ``i`` and action ``a``, with ``delta`` the simulated expression change, ``P_ij`` CellOracle's transition
probabilities over the sampled embedding neighbours ``j`` and ``shift_i`` the embedding shift
(:mod:`cellrl.transitions.maths`); ``p_i`` the cell in the PCA space of the imputed expression (``L`` the
loadings, so ``s = delta L`` is the simulated displacement there), ``N_K(i)`` its ``K = n_neighbors`` nearest
cells in that space and ``r_i`` the distance to the nearest one:

* ``celloracle`` (the reference): ``argmin_j |E_j - (E_i + shift_i)|`` over all cells, ``i`` included.
* ``pca``: the cell nearest to the simulated expression, ``argmin_{j in {i} + N_K(i)} |p_j - (p_i + s)|``.
  It stays at ``i`` while the simulated point is still nearer to the cell itself than to any other cell (its
  Voronoi cell): a change too small to make the cell more like another cell than like itself is no move.
* ``prob_max``: the sampled neighbour with the highest transition probability, ``argmax_j P_ij``, taken when
  ``|s| > r_i / 2`` and else ``i``: below half the distance to the nearest other cell the simulated point is
  nearer to ``i`` than to any other cell (triangle inequality), the same resolution as ``pca``.

Both alternatives skip the 2-D embedding, where the shift averages unit vectors and loses the direction of
``delta``. ``delta = 0`` gives ``s = 0``: a stagnation under both.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

DEFAULT_N_PCS = 50  # when neither transitions.n_pcs nor the model's meta (oracle n_pcs) gives one


@dataclass(frozen=True)
class PcaSpace:
    """Cells in the PCA space of the imputed expression and their nearest cells there (numpy arrays)."""

    scores: np.ndarray  # (N, d) f64, p_i = (X_i - mean) L
    loadings: np.ndarray  # (G, d) f64, L (orthonormal columns)
    candidates: np.ndarray  # (N, K) int64, N_K(i): K nearest other cells, nearest first
    half_gap: np.ndarray  # (N,) f64, r_i / 2: half the distance to the nearest other cell


def pca_space(X: np.ndarray, n_pcs: int, n_candidates: int) -> PcaSpace:
    """PCA of ``X`` (cells x genes) by an eigendecomposition of the covariance (deterministic; each component's
    sign fixed so its largest-magnitude loading is positive), then each cell's ``n_candidates`` nearest cells
    (scipy cKDTree, exact; the cell itself removed, duplicates kept)."""
    from scipy.spatial import cKDTree

    X = np.asarray(X, dtype=np.float64)
    N, G = X.shape
    d = int(max(1, min(n_pcs, G, N - 1)))
    Xc = X - X.mean(axis=0)
    if G <= N:
        w, V = np.linalg.eigh(Xc.T @ Xc)
        L = V[:, ::-1][:, :d]
    else:  # fewer cells than genes: eigenvectors of the Gram matrix, mapped back to genes
        w, U = np.linalg.eigh(Xc @ Xc.T)
        w, U = w[::-1][:d], U[:, ::-1][:, :d]
        L = (Xc.T @ U) / np.sqrt(np.maximum(w, np.finfo(np.float64).tiny))
    L = L * np.where(L[np.abs(L).argmax(axis=0), np.arange(L.shape[1])] < 0, -1.0, 1.0)
    scores = Xc @ L
    K = int(min(n_candidates, N - 1))
    dist, ind = cKDTree(scores).query(scores, k=K + 1, workers=-1)
    dist, ind = dist.reshape(N, K + 1), ind.reshape(N, K + 1)
    own = ind == np.arange(N)[:, None]
    own[~own.any(axis=1), K] = True  # the cell itself not listed (duplicates): drop the farthest instead
    keep = ~own
    cand = ind[keep].reshape(N, K).astype(np.int64)
    gap = dist[keep].reshape(N, K)[:, 0]
    return PcaSpace(scores=scores, loadings=np.ascontiguousarray(L), candidates=cand, half_gap=gap / 2.0)


def n_pcs_of(setting: int | None, meta: dict[str, Any] | None) -> int:
    """Components of the PCA space: ``transitions.n_pcs``, else the oracle's ``n_pcs`` (model meta), else 50."""
    if setting:
        return int(setting)
    n = ((meta or {}).get("oracle") or {}).get("n_pcs")
    return int(n) if n else DEFAULT_N_PCS


def pca_nearest(xp: ModuleType, s: Any, scores: Any, cells: Any, candidates: Any) -> Any:
    """``pca`` model: (n, A) next cells. ``s`` (n, A, d) simulated displacements of ``cells`` (n,), ``scores``
    (N, d), ``candidates`` (n, K) their nearest cells. ``|p_i + s - p_j|^2 - |s|^2 = |D_j|^2 - 2 s.D_j`` with
    ``D_j = p_j - p_i``: the cell moves to the smallest of these when it is negative (strictly nearer than
    itself), else stays."""
    D = scores[candidates] - scores[cells][:, None, :]  # (n, K, d)
    score = (D * D).sum(axis=2)[:, None, :] - 2.0 * xp.matmul(s, D.transpose(0, 2, 1))  # (n, A, K)
    best = xp.argmin(score, axis=2)  # (n, A), first on ties
    move = xp.take_along_axis(score, best[:, :, None], axis=2)[:, :, 0] < 0
    return xp.where(move, xp.take_along_axis(candidates, best, axis=1), cells[:, None])


def prob_max(xp: ModuleType, P: Any, s: Any, cells: Any, nbr: Any, half_gap: Any) -> Any:
    """``prob_max`` model: (n, A) next cells. ``P`` (n, A, k) transition probabilities over ``nbr`` (n, k);
    the most probable neighbour (first on ties) when ``|s| > r_i / 2`` (``half_gap`` (n,)), else the cell."""
    best = xp.take_along_axis(nbr, xp.argmax(P, axis=2), axis=1)  # (n, A)
    move = xp.sqrt((s * s).sum(axis=2)) > half_gap[:, None]
    return xp.where(move, best, cells[:, None])


def bytes_per_cell(model: str, n_actions: int, n_candidates: int, n_pcs: int) -> int:
    """Extra working memory of one chunk cell (8-byte words): displacements (A x d), candidate differences
    (K x d) and ``pca``'s (A x K) distance scores (x3 for temporaries)."""
    if model == "celloracle":
        return 0
    return 8 * (2 * n_actions * n_pcs + n_candidates * n_pcs + (3 * n_actions * n_candidates if model == "pca" else 0))
