"""Next-cell models: from a cell's simulated change to the table cell it becomes (``transitions.next_cell``).

Per cell ``i`` and action ``a``, with ``delta`` the simulated expression change, ``P_ij`` CellOracle's transition
probabilities over the sampled embedding neighbours ``j`` and ``shift_i`` the embedding shift
(:mod:`cellrl.transitions.maths`); ``p_i`` the cell in the PCA space of the imputed expression (``L`` the
loadings, so ``s = delta L`` is the simulated displacement there), ``N_K(i)`` its ``K = n_neighbors`` nearest
cells in that space and ``r_i`` the distance to the nearest one:

* ``celloracle`` (the reference): ``argmin_j |E_j - (E_i + shift_i)|`` over all cells, ``i`` included.
* ``pca``: the cell nearest to the simulated expression, ``argmin_j |p_j - (p_i + s)|`` over all cells, ``i``
  included. It stays at ``i`` while the simulated point is still nearer to the cell itself than to any other
  cell (its Voronoi cell): a change too small to make the cell more like another cell than like itself is no
  move. Searched among ``{i} + N_K(i)`` first; an answer is certain when ``|p_i + s - p_best| <= R_i - |s|``
  (``R_i`` the distance to the K-th nearest cell: every other cell is farther), else over all cells
  (:class:`NearestCell`; ``i`` on ties, so a duplicate of the cell never counts as a move, else the first index).
* ``pca_step``: ``pca`` with the displacement taken ``g = transitions.step_gain`` times
  (default 4), ``argmin_j |p_j - (p_i + g s)|`` over all cells, ``i`` included (the same exact search; ``g = 1``
  is ``pca``). The step is sized by the simulated change: a strong perturbation jumps several cells along its
  direction (across sparse regions), a weak one stays in the cell's Voronoi cell (``|g s|`` under half the gap to
  the nearest other cell always stays), and ``delta = 0`` stays. Why a gain: CellOracle's delta is a truncated
  (``n_propagation`` steps) response through shrunken (regularised) coefficients, so its downstream part is
  expected to underestimate the change and ``pca`` stagnates on 74% of the demo's (cell, action) pairs; CellOracle itself
  uses only its direction. ``g`` was chosen on the demo's planted truth (planted rank 0.835 / 0.846 / 0.848 /
  0.841 / 0.828 for g = 3 / 4 / 5 / 6 / 8; README: next-cell models).
* ``pca_direction``: the PCA neighbour the simulated change points at, ``argmax_{j in N_K(i)} s.(p_j - p_i) /
  |p_j - p_i|`` (CellOracle's idea, direction only, without the embedding), taken when ``|s| > r_i / 2``, else
  ``i``: below half the distance to the nearest other cell the simulated point is nearer to ``i`` than to any
  other cell (triangle inequality), the resolution of ``pca``.
* ``pca_step_direction``: ``pca_step``'s cell; where that is ``i`` itself (the gained step lands in no other
  cell's Voronoi region: too short, or into a void where no cell lies along ``s``), ``pca_direction``'s. A strong
  change jumps as under ``pca_step``; an isolated cell whose step points into empty space still moves to the
  neighbour ``s`` points at, as under ``pca_direction``; below ``|s| = r_i / 2`` it stays.
* ``prob_max``: the sampled embedding neighbour with the highest transition probability, ``argmax_j P_ij``, taken
  when ``|s| > r_i / 2``, else ``i``.

All alternatives skip the 2-D embedding, where the shift averages unit vectors and loses the direction of
``delta``. ``delta = 0`` gives ``s = 0``: a stagnation under every model. ``pca``, ``pca_step``,
``pca_direction`` and ``pca_step_direction`` use only ``s`` and the PCA space, so the table runner computes neither the embedding
neighbours, the correlation, ``P`` nor the shift for them (:func:`needs_embedding`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import InputError
from ..xp import to_numpy

DEFAULT_N_PCS = 50  # when neither transitions.n_pcs nor the model's meta (oracle n_pcs) gives one
CPU_BLOCK = 32  # cells scored at once by pca_direction on CPU (cache-sized candidate offsets)
SMALL_PRODUCT = 2e9  # multiply-adds under which pca_space's covariance product runs on one BLAS thread
KD_TREE_MAX_DIMS = 20  # NearestCell: a KD-tree up to this many PCs, a brute-force search above (see there)
EMBEDDING_MODELS = ("celloracle", "prob_max")  # the models that read P_ij or the embedding shift


def needs_embedding(model: str) -> bool:
    """Whether next-cell model ``model`` needs CellOracle's embedding path (sampled neighbours, correlation,
    transition probabilities, shift); the others need only the PCA displacement ``s``."""
    return model in EMBEDDING_MODELS


@dataclass(frozen=True)
class PcaSpace:
    """Cells in the PCA space of the imputed expression and their nearest cells there (numpy arrays)."""

    scores: np.ndarray  # (N, d) f64, p_i = (X_i - mean) L
    loadings: np.ndarray  # (G, d) f64, L (orthonormal columns)
    candidates: np.ndarray  # (N, K) int64, N_K(i): K nearest other cells, nearest first
    half_gap: np.ndarray  # (N,) f64, r_i / 2: half the distance to the nearest other cell
    radius: np.ndarray  # (N,) f64, R_i: distance to the K-th nearest other cell
    nearest: NearestCell  # the exact nearest cell of any point (pca's fallback)


class NearestCell:
    """Exact nearest cell (among all ``N`` rows of ``scores``) of query points anywhere in the PCA space.

    Up to :data:`KD_TREE_MAX_DIMS` PCs a scipy cKDTree. Above, a KD-tree visits most cells anyway (far steps land
    in voids, where distances concentrate), so a blocked brute-force search: ``|p_j|^2 - 2 q.p_j`` by one
    float32 product per cache-sized block of queries finds the nearest cell up to that product's rounding bound,
    and the few queries where another cell lies within the bound are settled by float64 differences
    ``|q - p_j|^2`` (first index on ties). Paul15's far steps (50 PCs, 2,660 cells): ~6x faster than the KD-tree,
    same answers. The brute-force search runs in the queries' array module (CuPy: on the GPU). ``prefer``: per
    query a cell that wins exact ties (the moving cell itself: a point as near to it as to its duplicate stays)."""

    def __init__(self, scores: np.ndarray, tree: Any = None) -> None:
        self.scores = np.ascontiguousarray(scores, dtype=np.float64)
        N, d = self.scores.shape
        self.brute = d > KD_TREE_MAX_DIMS
        if self.brute:
            s32 = self.scores.astype(np.float32)
            # (d + 1, N): -2 p_j over |p_j|^2, so one product with [q, 1] gives |p_j|^2 - 2 q.p_j (times 2 exact)
            self._aug_t = np.ascontiguousarray(np.vstack([-2.0 * s32.T, np.einsum("nd,nd->n", s32, s32)[None]]))
            self._sq_max = float(np.einsum("nd,nd->n", self.scores, self.scores).max()) if N else 0.0
            # bound on |f32 result - exact| of |p|^2 - 2 q.p: ~(d + 6) roundings of |p|^2 + 2 |q| |p| <= 2 |p|^2
            # + |q|^2; x4 for safety (a wider bound only settles more queries exactly)
            self._slack = 4.0 * (d + 6) * float(np.finfo(np.float32).eps)
            self._backends: dict[str, tuple[Any, Any]] = {}  # the same arrays on other array modules (the GPU)
            self.tree = None
        else:
            from scipy.spatial import cKDTree

            self.tree = tree if tree is not None else cKDTree(self.scores)

    def __call__(self, q: Any, xp: ModuleType = np, prefer: Any = None) -> np.ndarray:
        """(m,) int64 nearest cell (numpy) of each row of ``q`` (m, d); ``prefer`` (m,) cells that win ties (first
        index otherwise). ``xp``: the array module ``q`` and ``prefer`` live in; the brute-force search runs there
        (on the GPU for CuPy, in larger blocks), the KD-tree on the CPU."""
        if not self.brute:
            q = np.ascontiguousarray(to_numpy(q), dtype=np.float64)
            out = self.tree.query(q, k=1, workers=-1 if len(q) > 50_000 else 1)[1].astype(np.int64)
            if prefer is not None:  # the same float64 sums for both: a duplicate's tie compares equal
                pref = to_numpy(prefer).astype(np.int64)
                d_pref = ((q - self.scores[pref]) ** 2).sum(axis=1)
                out = np.where(d_pref <= ((q - self.scores[out]) ** 2).sum(axis=1), pref, out)
            return out
        aug_t, scores = self._on(xp)
        q = xp.ascontiguousarray(xp.asarray(q, dtype=xp.float64))
        N, d = self.scores.shape
        out = xp.empty(len(q), dtype=xp.int64)
        # CPU: ~1 MiB of float32 scores per block, which stays in cache; GPU: ~256 MiB
        block = max(64, (1 << (18 if xp is np else 26)) // max(N, 1))
        qa = xp.empty((min(block, len(q)), d + 1), dtype=xp.float32)
        qa[:, d] = 1.0
        g_buf = xp.empty((len(qa), N), dtype=xp.float32)  # reused by every block (no page faults per block)
        rows, cols = [], []
        for b in range(0, len(q), block):
            qb = q[b:b + block]
            n, ar = len(qb), xp.arange(len(qb))
            qa[:n, :d] = qb
            g = xp.matmul(qa[:n], aug_t, out=g_buf[:n])  # (n, N) |p_j|^2 - 2 q.p_j
            j = g.argmin(axis=1)
            thr = g[ar, j] + self._slack * (2.0 * self._sq_max + xp.einsum("nd,nd->n", qb, qb))
            out[b:b + n] = j
            g[ar, j] = xp.inf  # the runner-up decides: within the bound of the best, check exactly
            unsure = xp.flatnonzero(g.min(axis=1) <= thr)
            if unsure.size:
                g[unsure, j[unsure]] = -xp.inf
                r, c = xp.nonzero(g[unsure] <= thr[unsure, None])
                rows.append(b + unsure[r])
                cols.append(c)
        if rows:  # float64 distances for every cell within the bound; first (lowest) index on ties
            r, c = xp.concatenate(rows), xp.concatenate(cols)
            dist = ((q[r] - scores[c]) ** 2).sum(axis=1)
            key = c.astype(xp.float64)
            if prefer is not None:  # a query's own cell is within the bound whenever it could tie: it sorts first
                key = xp.where(c == xp.asarray(prefer)[r], -1.0, key)
            o = xp.lexsort(xp.stack([key, dist, r.astype(xp.float64)]))  # by row, distance, index
            r, c = r[o], c[o]
            first = xp.concatenate([xp.ones(1, dtype=bool), r[1:] != r[:-1]])
            out[r[first]] = c[first]
        return to_numpy(out)

    def _on(self, xp: ModuleType) -> tuple[Any, Any]:
        """The search's arrays (augmented float32 scores, float64 scores) in array module ``xp`` (copied once)."""
        if xp is np:
            return self._aug_t, self.scores
        hit = self._backends.get(xp.__name__)
        if hit is None:
            hit = self._backends[xp.__name__] = (xp.asarray(self._aug_t), xp.asarray(self.scores))
        return hit


def pca_space(X: np.ndarray, n_pcs: int, n_candidates: int) -> PcaSpace:
    """PCA of ``X`` (cells x genes) by an eigendecomposition of the covariance (deterministic; each component's
    sign fixed so its largest-magnitude loading is positive), then each cell's ``n_candidates`` nearest cells
    (scipy cKDTree, exact; the cell itself removed, duplicates kept; the same tree serves :class:`NearestCell`
    in few dimensions)."""
    from scipy.spatial import cKDTree

    from ..xp import blas_threads

    X = np.asarray(X, dtype=np.float64)
    N, G = X.shape
    d = int(max(1, min(n_pcs, G, N - 1)))
    Xc = X - X.mean(axis=0)
    # a small covariance on one BLAS thread: waking the pool costs more than it saves, and its threads then spin
    # beside the neighbour search and the chunks that follow (Paul15: prepare 0.12 -> 0.08 s on 2 cores)
    with blas_threads(1 if N * G * min(N, G) < SMALL_PRODUCT else None):
        if G <= N:
            L = top_eigenvectors(Xc.T @ Xc, d)[1]
        else:  # fewer cells than genes: eigenvectors of the Gram matrix, mapped back to genes
            w, U = top_eigenvectors(Xc @ Xc.T, d)
            L = (Xc.T @ U) / np.sqrt(np.maximum(w, np.finfo(np.float64).tiny))
        L = L * np.where(L[np.abs(L).argmax(axis=0), np.arange(L.shape[1])] < 0, -1.0, 1.0)
        scores = Xc @ L
    K = int(min(n_candidates, N - 1))
    tree = cKDTree(scores)
    dist, ind = tree.query(scores, k=K + 1, workers=-1)
    dist, ind = dist.reshape(N, K + 1), ind.reshape(N, K + 1)
    if (ind[:, 0] == np.arange(N)).all():  # every cell its own nearest (no duplicates): drop the first column
        cand, gaps = ind[:, 1:].astype(np.int64), np.ascontiguousarray(dist[:, 1:])
    else:
        own = ind == np.arange(N)[:, None]
        own[~own.any(axis=1), K] = True  # the cell itself not listed (duplicates): drop the farthest instead
        keep = ~own
        cand = ind[keep].reshape(N, K).astype(np.int64)
        gaps = dist[keep].reshape(N, K)
    return PcaSpace(scores=scores, loadings=np.ascontiguousarray(L), candidates=cand, half_gap=gaps[:, 0] / 2.0,
                    radius=gaps[:, -1], nearest=NearestCell(scores, tree))


def top_eigenvectors(M: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``d`` largest eigenvalues (descending) and eigenvectors of the symmetric ``M``: ARPACK (Lanczos from a
    fixed start vector: deterministic) when ``d`` is under half the size, else the full LAPACK decomposition
    (measured on 3,000 genes: 7 s against 17 s, same vectors to 1e-12). ARPACK runs on one BLAS thread: its
    many small products lose most time to thread hand-offs otherwise (240 genes, 50 PCs on 2 cores: 0.008 s
    against 0.1-0.6 s)."""
    n = M.shape[0]
    if 2 * d < n:
        from scipy.sparse.linalg import eigsh

        from ..xp import blas_threads

        with blas_threads(1):
            w, V = eigsh(M, k=d, which="LA", v0=np.ones(n))
    else:
        w, V = np.linalg.eigh(M)
    order = np.argsort(w, kind="stable")[::-1][:d]
    return w[order], V[:, order]


def n_pcs_of(setting: int | None, meta: dict[str, Any] | None) -> int:
    """Components of the PCA space: ``transitions.n_pcs``, else the oracle's ``n_pcs`` (model meta), else 50."""
    if setting:
        return int(setting)
    n = ((meta or {}).get("oracle") or {}).get("n_pcs")
    return int(n) if n else DEFAULT_N_PCS


def candidate_offsets(xp: ModuleType, scores: Any, cells: Any, candidates: Any, out: Any = None) -> Any:
    """(n, K, d) ``p_j - p_i`` for the candidates ``j`` of each of ``cells``: one pass of a numba kernel on CPU
    (the same subtractions, ~2x faster; into ``out`` when given), else one gather subtracted in place."""
    if xp is np and _offsets_numba is not None and scores.dtype == np.float64:
        n, K = candidates.shape
        return _offsets_numba(np.ascontiguousarray(scores), np.ascontiguousarray(cells, dtype=np.int64),
                              np.ascontiguousarray(candidates, dtype=np.int64),
                              np.empty((n, K, scores.shape[1])) if out is None else out)
    D = xp.take(scores, candidates, axis=0, out=out)
    D -= scores[cells][:, None, :]
    return D


def _offsets(scores, cells, candidates, out):  # pragma: no cover - compiled by numba
    """``out[i, k] = scores[candidates[i, k]] - scores[cells[i]]``."""
    for i in range(candidates.shape[0]):
        c = cells[i]
        for k in range(candidates.shape[1]):
            j = candidates[i, k]
            for t in range(scores.shape[1]):
                out[i, k, t] = scores[j, t] - scores[c, t]
    return out


try:  # numba comes with celloracle; compiled once and cached next to this file (as cellrl.transitions.neighbors)
    import numba as _numba

    _offsets_numba: Any = _numba.njit(cache=True, nogil=True)(_offsets)
except Exception:  # pragma: no cover
    _offsets_numba = None


def _blocks(n: int, block: int | None) -> list[slice]:
    """Row slices of ``block`` cells (all ``n`` at once when None)."""
    step = max(1, n if block is None else int(block))
    return [slice(b, b + step) for b in range(0, n, step)]


def _candidate_scores(xp: ModuleType, s: Any, scores: Any, cells: Any, candidates: Any, block: int | None,
                      near_gain: float | None = None, direction: bool = False) -> tuple[Any, Any, Any]:
    """One pass over the candidates of ``cells`` (``D_j = p_j - p_i``, ``|D_j|^2`` and ``s.D_j`` once per block of
    ``block`` cells) for both candidate scores. ``near_gain`` g: :func:`pca_nearest`'s best candidate of ``g s``,
    the position in ``candidates`` and its score ``|D_j|^2 - 2 g s.D_j`` ((n, A) each; None, None when not asked).
    ``direction``: :func:`pca_direction`'s best candidate, a cell index (n, A) (else None). ``g s.D_j`` is
    ``(g s).D_j`` exactly for g a power of two (the default 4: each product and partial sum scaled exactly)."""
    n, A = int(cells.shape[0]), int(s.shape[1])
    K, d = int(candidates.shape[1]), int(scores.shape[1])
    near_pos = near_score = dir_best = None
    if near_gain is not None:
        near_pos = xp.empty((n, A), dtype=candidates.dtype)
        near_score = xp.empty((n, A), dtype=s.dtype)
    if direction:
        dir_best = xp.empty((n, A), dtype=candidates.dtype)
    step = n if block is None else min(n, int(block))  # the rows of _blocks' slices
    # work arrays allocated once and reused by every block (fresh large temporaries cost page faults)
    D_buf, sD_buf, score_buf = (xp.empty((step, K, d)), xp.empty((step, A, K)),
                                xp.empty((step, A, K)) if near_gain is not None else None)
    for b in _blocks(n, block):
        m = min(b.stop, n) - b.start
        D = candidate_offsets(xp, scores, cells[b], candidates[b], out=D_buf[:m])  # (b, K, d)
        Dsq = xp.einsum("nkd,nkd->nk", D, D)  # (b, K)
        sD = xp.matmul(s[b], D.transpose(0, 2, 1), out=sD_buf[:m])  # (b, A, K)
        if near_pos is not None:
            score = xp.multiply(sD, -2.0 * float(near_gain), out=score_buf[:m])
            score += Dsq[:, None, :]
            near_pos[b] = xp.argmin(score, axis=2)  # first on ties
            near_score[b] = xp.take_along_axis(score, near_pos[b][:, :, None], axis=2)[:, :, 0]
        if dir_best is not None:
            Dn = xp.sqrt(Dsq)
            with np.errstate(divide="ignore", invalid="ignore"):
                sD /= Dn[:, None, :]  # s.D_j / |D_j|
            real = Dn > 0
            if not bool(real.all()):
                sD = xp.where(real[:, None, :], sD, -xp.inf)
            dir_best[b] = xp.take_along_axis(candidates[b], xp.argmax(sD, axis=2), axis=1)
    return near_pos, near_score, dir_best


def _certified_nearest(xp: ModuleType, pos: Any, best_score: Any, s: Any, s2: Any, gain: float, scores: Any,
                       cells: Any, candidates: Any, radius: Any, nearest: NearestCell) -> np.ndarray:
    """(n, A) next cells (numpy) of :func:`pca_nearest` from the candidate scores of ``gain * s`` (``s2`` the
    (n, A) ``|s|^2``): the best candidate when it is strictly nearer than the cell itself, else the cell; an
    answer the candidates cannot certify (a cell outside the K may be nearer) comes from ``nearest`` (all
    cells; the cell itself on ties, as among the candidates)."""
    move = best_score < 0
    out = to_numpy(xp.where(move, xp.take_along_axis(candidates, pos, axis=1), cells[:, None]))
    gs2 = s2 * float(gain * gain)  # |g s|^2 (exact scaling for g a power of two)
    dist = xp.sqrt(xp.maximum(gs2 + xp.minimum(best_score, 0.0), 0.0))  # |p_i + g s - p_next|
    unsure = to_numpy(dist > radius[:, None] - xp.sqrt(gs2))
    if unsure.any():
        r, a = np.nonzero(unsure)
        r_x, a_x = xp.asarray(r), xp.asarray(a)  # no copy on numpy
        ci = cells[r_x]
        out[r, a] = nearest(scores[ci] + s[r_x, a_x] * float(gain), xp, prefer=ci)
    return out


def pca_nearest(xp: ModuleType, s: Any, scores: Any, cells: Any, candidates: Any, radius: Any,
                nearest: NearestCell, block: int | None = None) -> np.ndarray:
    """``pca`` model: (n, A) next cells (numpy). ``s`` (n, A, d) simulated displacements of ``cells`` (n,),
    ``scores`` (N, d), ``candidates`` (n, K) their nearest cells, ``radius`` (n,) the distance to the K-th.
    ``|p_i + s - p_j|^2 - |s|^2 = |D_j|^2 - 2 s.D_j`` with ``D_j = p_j - p_i``: the cell moves to the smallest of
    these when it is negative (strictly nearer than itself), else stays; answers the candidates cannot certify
    come from ``nearest`` (all cells). ``block``: cells scored at once, as in :func:`pca_direction`."""
    pos, best_score, _ = _candidate_scores(xp, s, scores, cells, candidates, block, near_gain=1.0)
    return _certified_nearest(xp, pos, best_score, s, (s * s).sum(axis=2), 1.0, scores, cells, candidates, radius,
                              nearest)


def pca_direction(xp: ModuleType, s: Any, scores: Any, cells: Any, candidates: Any, half_gap: Any,
                  block: int | None = None) -> Any:
    """``pca_direction`` model: (n, A) next cells. The candidate with the largest ``s.D_j / |D_j|`` (first on
    ties; duplicates of the cell, ``D_j = 0``, excluded) when ``|s| > r_i / 2``, else the cell. ``block``: cells
    scored at once (default all; on CPU a few dozen keep the (block, K, d) offsets in cache: ~20% faster, and
    every cell's numbers are the same for any block)."""
    best = _candidate_scores(xp, s, scores, cells, candidates, block, direction=True)[2]
    move = xp.sqrt((s * s).sum(axis=2)) > half_gap[:, None]
    return xp.where(move, best, cells[:, None])


def pca_step_direction(xp: ModuleType, s: Any, gain: float, scores: Any, cells: Any, candidates: Any, radius: Any,
                       half_gap: Any, nearest: NearestCell, block: int | None = None) -> np.ndarray:
    """``pca_step_direction`` model: (n, A) next cells (numpy). :func:`pca_nearest` of ``gain * s``, and for the
    (cell, action) pairs where that stays at the cell, :func:`pca_direction` of ``s``; both candidate scores
    from one pass over the candidates (:func:`_candidate_scores`)."""
    pos, best_score, best_dir = _candidate_scores(xp, s, scores, cells, candidates, block, near_gain=float(gain),
                                                  direction=True)
    s2 = (s * s).sum(axis=2)
    out = _certified_nearest(xp, pos, best_score, s, s2, float(gain), scores, cells, candidates, radius, nearest)
    move = to_numpy(xp.sqrt(s2) > half_gap[:, None])
    stay = out == to_numpy(cells)[:, None]
    return np.where(stay, np.where(move, to_numpy(best_dir), out), out)


def prob_max(xp: ModuleType, P: Any, s: Any, cells: Any, nbr: Any, half_gap: Any) -> Any:
    """``prob_max`` model: (n, A) next cells. ``P`` (n, A, k) transition probabilities over ``nbr`` (n, k);
    the most probable neighbour (first on ties) when ``|s| > r_i / 2`` (``half_gap`` (n,)), else the cell."""
    best = xp.take_along_axis(nbr, xp.argmax(P, axis=2), axis=1)  # (n, A)
    move = xp.sqrt((s * s).sum(axis=2)) > half_gap[:, None]
    return xp.where(move, best, cells[:, None])


def pca_next_cells(xp: ModuleType, model: str, s: Any, gain: float, scores: Any, cells: Any, candidates: Any,
                   radius: Any, half_gap: Any, nearest: NearestCell, P: Any = None, nbr: Any = None) -> np.ndarray:
    """(n, A) next cells (numpy) under ``transitions.next_cell`` ``model`` (pca, pca_step, pca_direction,
    pca_step_direction or prob_max) from the displacements ``s`` (n, A, d) of ``cells`` (n,); the per-cell arrays
    are those of ``cells``. ``gain``: ``transitions.step_gain``; ``P``, ``nbr``: prob_max's transition
    probabilities (n, A, k) and neighbours (n, k). On CPU the candidates are scored :data:`CPU_BLOCK` cells at a
    time. The one dispatch of the table runner and the persistent engine."""
    block = CPU_BLOCK if xp is np else None
    if model in ("pca", "pca_step"):
        return pca_nearest(xp, s if model == "pca" else s * float(gain), scores, cells, candidates, radius, nearest,
                           block=block)
    if model == "pca_direction":
        return to_numpy(pca_direction(xp, s, scores, cells, candidates, half_gap, block=block))
    if model == "pca_step_direction":
        return pca_step_direction(xp, s, gain, scores, cells, candidates, radius, half_gap, nearest, block=block)
    if model == "prob_max":
        return to_numpy(prob_max(xp, P, s, cells, nbr, half_gap))
    raise InputError(f"unknown transitions.next_cell {model!r}", field="transitions.next_cell")


def bytes_per_cell(model: str, n_actions: int, n_candidates: int, n_pcs: int) -> int:
    """Extra working memory of one chunk cell (8-byte words): displacements (A x d), candidate differences
    (K x d) and the (A x K) candidate scores (x3 for temporaries)."""
    if model == "celloracle":
        return 0
    return 8 * (2 * n_actions * n_pcs + n_candidates * n_pcs + 3 * n_actions * n_candidates)
