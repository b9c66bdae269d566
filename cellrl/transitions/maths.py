"""CellOracle's maths, vectorised over actions: perturbation input, GRN propagation (packed per cluster), unit
responses and the linear part of the correlation (:class:`ClusterLinear`), unit vectors of the embedding shift.
See the package docstring for the derivation."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..model import OracleModel
from .settings import Actions


def embedding_float32(model: OracleModel) -> bool:
    """Whether CellOracle saw a float32 embedding (it then computes the unit vectors in float32).

    Read from ``model.meta["embedding_dtype"]`` (or ``meta["oracle"]["embedding_dtype"]``); float64 when absent,
    which is what cellrl.oracle.fit_oracle hands CellOracle. A wrong guess moves the shift by ~1e-7 only.
    """
    meta = model.meta or {}
    dt = meta.get("embedding_dtype") or (meta.get("oracle") or {}).get("embedding_dtype")
    return bool(dt) and np.dtype(dt) == np.float32


def unit_vectors(xp: ModuleType, embedding: Any, nbr: Any, float32: bool, cells: Any = None) -> tuple[Any, Any]:
    """``u[i, m]`` = unit vector from E_i to E_nbr[i, m] (0 where they coincide) and ``ubar[i]`` = mean_m u, for
    the rows ``cells`` of ``nbr`` (default: every cell, ``nbr`` then (N, k)).

    ``float32``: do the arithmetic in float32 like CellOracle does when ``obsm`` holds float32.
    Shapes: (n, k, 2) float64 and (n, 2) float64.
    """
    dt = xp.float32 if float32 else xp.float64
    E = embedding.astype(dt)
    dE = E[nbr] - (E if cells is None else E[cells])[:, None, :]
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
    """Boolean (genes x len(starts)) sparse matrix: column j = :func:`reachable` from ``starts[j]`` (a numba
    breadth-first search per start; sparse products without numba)."""
    G = W.shape[0]
    W = sp.csr_matrix(W)
    if _reach_numba is not None:
        mark = _reach_numba(W.indptr.astype(np.int64), W.indices.astype(np.int64), W.data,
                            np.asarray(starts, dtype=np.int64), int(hops), np.zeros((len(starts), G), dtype=bool))
        _, genes = np.nonzero(mark)  # start by start, genes ascending
        indptr = np.concatenate([[0], np.cumsum(mark.sum(axis=1))]).astype(np.int64)
        return sp.csc_matrix((np.ones(genes.size, dtype=np.int8), genes, indptr), shape=(G, len(starts)))
    A = (W != 0).astype(np.int8).T.tocsr()  # target x regulator
    F = sp.csc_matrix((np.ones(len(starts), dtype=np.int8), (starts, np.arange(len(starts)))),
                      shape=(G, len(starts)))
    R = F.copy()
    for _ in range(hops):
        F = (A @ F).astype(bool).astype(np.int8)
        R = ((R + F) > 0).astype(np.int8)
    R.sort_indices()
    return R.tocsc()


def _reach_marks(indptr, indices, data, starts, hops, mark):  # pragma: no cover - compiled by numba
    """``mark[a, t]``: gene ``t`` is within ``hops`` edges (``W[r, t] != 0``: r -> t) of ``starts[a]``."""
    G = mark.shape[1]
    frontier = np.empty(G, dtype=np.int64)
    found = np.empty(G, dtype=np.int64)
    for a in range(starts.shape[0]):
        mark[a, starts[a]] = True
        frontier[0] = starts[a]
        n_front = 1
        for _ in range(hops):
            n_found = 0
            for f in range(n_front):
                r = frontier[f]
                for q in range(indptr[r], indptr[r + 1]):
                    t = indices[q]
                    if data[q] != 0 and not mark[a, t]:
                        mark[a, t] = True
                        found[n_found] = t
                        n_found += 1
            if n_found == 0:
                break
            frontier[:n_found] = found[:n_found]
            n_front = n_found
    return mark


try:  # numba comes with celloracle; compiled once and cached next to this file
    import numba as _numba

    _reach_numba: Any = _numba.njit(cache=True, nogil=True)(_reach_marks)
except Exception:  # pragma: no cover
    _reach_numba = None


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
    cluster with any neighbour is ``c_ia (Q[j, a] - Q[i, a])`` plus clipping corrections. ``RL`` (A, d): the unit
    responses projected on PCA loadings ``L`` (G, d), so a delta's PCA displacement is ``c_ia RL[a]`` plus the
    projected clipping corrections (None unless a next-cell model needs it)."""

    r: Any
    r_norm: Any
    Q: Any
    RL: Any = None


def cluster_linear(xp: ModuleType, X: Any, plan: ClusterPlan, n_actions: int, hops: int,
                   block: int = 8192, loadings: Any = None, with_q: bool = True) -> ClusterLinear:
    """:class:`ClusterLinear` of one cluster; ``Q`` in row blocks of ``block`` cells (dense BLAS product, or a
    sparse one when each action reaches few of the genes in ``U``; None unless ``with_q``: only the correlation
    needs it); ``RL`` when ``loadings`` (G, d) are given."""
    r = unit_response(xp, plan, hops)
    nU = int(plan.genes.size)
    r_norm = xp.sqrt(plan.seg @ (r * r))
    U = xp.asarray(plan.genes)
    N = X.shape[0]
    sparse = plan.n_rows < SPARSE_Q_BELOW * n_actions * nU
    if sparse:
        R = _sparse_module(xp).csr_matrix((r, (plan.act_of, plan.gene_pos)), shape=(n_actions, nU))
    else:
        R = xp.zeros((n_actions, nU))
        R[plan.act_of, plan.gene_pos] = r
    Q = xp.empty((N, n_actions)) if with_q else None
    for s in range(0, N if with_q else 0, block):
        XU = xp.take(X[s:s + block], U, axis=1)
        Q[s:s + block] = (R @ XU.T).T if sparse else XU @ R.T
    RL = None if loadings is None else xp.asarray(R @ xp.take(loadings, U, axis=0))
    return ClusterLinear(r=r, r_norm=r_norm, Q=Q, RL=RL)


@dataclass
class ChunkCorrelation:
    """:func:`correlation` of a chunk: ``corr`` (n, A, k) Pearson correlation over all genes of each action's delta
    with each sampled neighbour's displacement ``X_j - X_i``; ``disp`` (n, A, d) the delta projected on the PCA
    loadings (None without them); ``n_clipped`` (cell, action) pairs that took exact corrections."""

    corr: Any
    disp: Any
    n_clipped: int


@dataclass
class LinearSplit:
    """A chunk's packed delta split as ``d = c r + e`` (:func:`linear_split`): ``c`` (A, n) the inputs (0 for tiny
    pairs), ``e`` (T, n) the exact remainder, kept only at the entries ``(kt, ki)`` (packed row, chunk cell)."""

    c: Any
    e: Any
    kt: Any
    ki: Any

    def n_clipped(self, xp: ModuleType, plan: ClusterPlan, n_actions: int) -> int:
        """(cell, action) pairs with at least one kept entry (clipping or a tiny input: exact corrections)."""
        return int(xp.unique(self.ki * n_actions + plan.act_of[self.kt]).shape[0])


def linear_split(xp: ModuleType, sqsum: Any, cells: Any, plan: ClusterPlan, lin: ClusterLinear, d: Any, XT: Any,
                 values: Any) -> LinearSplit:
    """Step 2: ``d = c r + e``, the linear part (``c = value - X_ig`` per cell and action) and the exact remainder
    ``e``, which is rounding noise unless clipping acted; pairs with a tiny input are kept whole in ``e``
    (``c := 0``). ``sqsum`` (N,) squared norms of the cells, ``d`` (T, n) packed delta, ``XT`` its packed
    expression."""
    c = perturbation_input(XT, plan, values)  # (A, n)
    xnorm = xp.sqrt(sqsum[cells])  # (n,)
    tiny = xp.abs(c) * lin.r_norm[:, None] < TINY_INPUT * xnorm[None, :]
    c = xp.where(tiny, 0.0, c)
    e = d - lin.r[:, None] * c[plan.act_of]  # (T, n)
    keep = xp.abs(e) > ROUNDING_TOL * (xp.abs(XT) + xp.abs(d))
    keep |= tiny[plan.act_of] & (d != 0)
    kt, ki = xp.nonzero(keep)
    return LinearSplit(c=c, e=e, kt=kt, ki=ki)


def _corrections(xp: ModuleType, split: LinearSplit, plan: ClusterPlan, n: int, n_actions: int):
    """Batches (``CORRECTION_BATCH`` kept entries each, bounding the (entries, k) gathers) of the kept remainder:
    ``(bi, g, row, e)`` with ``bi`` the chunk cell, ``g`` the gene, ``row`` the (cell, action) row ``bi A + a``
    and ``e`` the remainder of each entry (an action's entries come in ascending gene order)."""
    genes_x = xp.asarray(plan.genes)
    kt, ki = split.kt, split.ki
    for b0 in range(0, int(kt.shape[0]), CORRECTION_BATCH):
        bt, bi = kt[b0:b0 + CORRECTION_BATCH], ki[b0:b0 + CORRECTION_BATCH]
        yield bi, genes_x[plan.gene_pos[bt]], bi * n_actions + plan.act_of[bt], split.e[bt, bi]


def _projected(xp: ModuleType, row: Any, g: Any, e: Any, shape: tuple[int, int], loadings: Any) -> Any:
    """(rows, d) ``sum_{entries} e L_g`` per (cell, action) row: a (rows x genes) sparse matrix times ``L`` (the
    same sums, in the same ascending-gene order, as one matrix per entry times the gathered ``L[g]``)."""
    return _sparse_module(xp).csr_matrix((e, (row, g)), shape=shape) @ loadings


def pca_displacement(xp: ModuleType, split: LinearSplit, plan: ClusterPlan, lin: ClusterLinear,
                     loadings: Any) -> Any:
    """(n, A, d) ``s = d L = c RL + sum_{kept} e L_g``: the delta's PCA displacement alone, the same float
    operations as inside :func:`correlation` (for the next-cell models that need no correlation)."""
    n, A = int(split.c.shape[1]), int(split.c.shape[0])
    disp = split.c.T[:, :, None] * lin.RL[None]  # (n, A, d)
    for _, g, row, e in _corrections(xp, split, plan, n, A):
        disp += _projected(xp, row, g, e, (n * A, int(loadings.shape[0])), loadings).reshape(n, A, -1)
    return disp


def neighbor_stats(xp: ModuleType, X: Any, nbr: Any, cells: Any = None, Xc: Any = None, rowsum: Any = None,
                   sqsum: Any = None) -> tuple[Any, Any, Any]:
    """Per (cell i, sampled neighbour j) with ``D = X_j - X_i`` over all G genes: ``ssA`` = sum_g (D - mean D)^2,
    ``s1`` = sum_g D and ``near`` (|D|^2 < EXACT_BELOW (|X_i|^2 + |X_j|^2): near-duplicates, where the expanded
    forms lose digits and D is formed exactly), each (n, k). ``cells`` (n,) the rows of ``nbr`` (default all
    cells), ``Xc = X[cells]``, ``rowsum`` / ``sqsum`` (N,) the row sums and squared norms of ``X`` (computed when
    not given). sum_g D = rowsum_j - rowsum_i and sum_g D^2 = |X_j|^2 + |X_i|^2 - 2 X_i.X_j, the cross terms from
    one Gram product per block of ``GRAM_BLOCK`` cells against the union of their neighbours."""
    G = X.shape[1]
    if sqsum is None:
        sqsum = xp.einsum("ng,ng->n", X, X)
    if rowsum is None:
        rowsum = X.sum(axis=1)
    if cells is None:
        Xc, sq_c, rs_c = X, sqsum, rowsum
    else:
        Xc = X[cells] if Xc is None else Xc
        sq_c, rs_c = sqsum[cells], rowsum[cells]
    n, k = nbr.shape
    cross = xp.empty((n, k))
    for s0 in range(0, n, GRAM_BLOCK):
        nb = nbr[s0:s0 + GRAM_BLOCK]
        uni, inv = _union(xp, nb, X.shape[0])
        gram = Xc[s0:s0 + GRAM_BLOCK] @ X[uni].T  # (b, |union|)
        cross[s0:s0 + GRAM_BLOCK] = xp.take_along_axis(gram, inv, axis=1)
    sq_i, sq_j = sq_c[:, None], sqsum[nbr]
    ssD = sq_j + sq_i - 2.0 * cross
    s1 = rowsum[nbr] - rs_c[:, None]
    near = ssD < EXACT_BELOW * (sq_i + sq_j)
    if bool(near.any()):
        fi, fm = xp.nonzero(near)
        D = X[nbr[fi, fm]] - Xc[fi]  # (f, G)
        ssD[fi, fm] = xp.einsum("fg,fg->f", D, D)
        s1[fi, fm] = D.sum(axis=1)
    ssA = ssD - s1 * s1 / G
    xp.maximum(ssA, 0.0, out=ssA)
    return ssA, s1, near


def correlation(xp: ModuleType, X: Any, rowsum: Any, sqsum: Any, cells: Any, Xc: Any, nbr: Any, plan: ClusterPlan,
                lin: ClusterLinear, d: Any, XT: Any, values: Any, knn_random: bool,
                loadings: Any = None) -> ChunkCorrelation:
    """velocyto's ``colDeltaCorpartial`` for a chunk of ``cells`` (n,) of one cluster, every action at once (see the
    package docstring, step 3). ``X`` (N, G) with its row sums and squared norms, ``Xc = X[cells]``, ``nbr`` (n, k)
    sampled neighbours, ``d`` (T, n) the packed delta of :func:`propagate` and ``XT`` its packed expression,
    ``values`` (A,) the perturbation values; NaN -> 1 when ``knn_random`` (as CellOracle)."""
    G = X.shape[1]
    A = int(values.shape[0])
    n = int(cells.shape[0])
    k = int(nbr.shape[1])
    genes_x = xp.asarray(plan.genes)

    # 2. d = c r + e (linear_split)
    split = linear_split(xp, sqsum, cells, plan, lin, d, XT, values)
    c = split.c

    # 3. numerator sum_S d (X_j - X_i) = c (Q_j - Q_i) + sum_{kept} e (X_j,g - X_i,g); for the next-cell models
    #    that need it, the PCA displacement s = d L = c RL + sum_{kept} e L_g the same way (pca_displacement)
    num = c.T[:, :, None] * (xp.take(lin.Q, nbr, axis=0).transpose(0, 2, 1) - lin.Q[cells][:, :, None])  # (n, A, k)
    disp = None if lin.RL is None else c.T[:, :, None] * lin.RL[None]  # (n, A, d)
    Xf = X.reshape(-1)  # flat gathers: the same elements, ~2x faster than 2-D fancy indexing
    for bi, g, row, e in _corrections(xp, split, plan, n, A):
        Dg = xp.take(Xf, nbr[bi] * G + g[:, None])  # (entries, k) X_j,g - X_i,g
        Dg -= xp.take(Xf, cells[bi] * G + g)[:, None]
        S = _sparse_module(xp).csr_matrix((e, (row, xp.arange(g.shape[0]))), shape=(n * A, int(g.shape[0])))
        num += (S @ Dg).reshape(n, A, k)
        if disp is not None:
            disp += _projected(xp, row, g, e, (n * A, G), loadings).reshape(n, A, -1)

    # 4. neighbour displacement statistics over all G genes (action-independent, :func:`neighbor_stats`); where
    #    D is small against X (near-duplicate cells) the numerator is formed from D itself
    ssA, s1, near = neighbor_stats(xp, X, nbr, cells, Xc, rowsum, sqsum)
    if bool(near.any()):
        fi, fm = xp.nonzero(near)
        D = X[nbr[fi, fm]] - Xc[fi]  # (f, G)
        gt = genes_x[plan.gene_pos]  # gene of each packed row
        num[fi, :, fm] = (plan.seg @ (d[:, fi] * D[:, gt].T)).T

    # 5. Pearson correlation over all G genes with the centring done algebraically (delta is 0 off S_a):
    #    sum_g (d - mean d)(D - mean D) = sum_S d D - sum_d mean D;  sum_g (d - mean d)^2 = sum_S d^2 - sum_d^2 / G
    sum_d = (plan.seg @ d).T  # (n, A)
    ssb = (plan.seg @ (d * d)).T - sum_d * sum_d / G
    xp.maximum(ssb, 0.0, out=ssb)
    num -= sum_d[:, :, None] * (s1 / G)[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_a = 1.0 / xp.sqrt(ssA)
        inv_b = 1.0 / xp.sqrt(ssb)
        corr = num  # in place: num * inv_a * inv_b, the same products in the same order
        corr *= inv_a[:, None, :]
        corr *= inv_b[:, :, None]
    if knn_random:  # CellOracle fixes NaNs only in knn_random mode
        corr[xp.isnan(corr)] = 1.0
    return ChunkCorrelation(corr=corr, disp=disp, n_clipped=split.n_clipped(xp, plan, A))


def _union(xp: ModuleType, nb: Any, n_cells: int) -> tuple[Any, Any]:
    """``xp.unique(nb, return_inverse=True)`` for indices below ``n_cells``, by marking (no sort): the ascending
    union of ``nb`` and each entry's position in it, shaped like ``nb``."""
    mark = xp.zeros(n_cells, dtype=bool)
    mark[nb.ravel()] = True
    pos = xp.cumsum(mark) - 1
    return xp.flatnonzero(mark), pos[nb]


def transition_probabilities(xp: ModuleType, corr: Any, sigma_corr: float) -> Any:
    """``P_ij = exp(corr_ij / sigma_corr) / sum_j exp(corr_ij / sigma_corr)`` over the last axis (neighbours)."""
    w = corr / sigma_corr
    xp.exp(w, out=w)
    w /= w.sum(axis=2, keepdims=True)
    return w


def embedding_shift(xp: ModuleType, P: Any, u: Any, ubar: Any) -> Any:
    """``shift_i = sum_j P_ij u_ij - mean_j u_ij``: (n, A, 2) from ``P`` (n, A, k), ``u`` (n, k, 2), ``ubar`` (n, 2)."""
    return xp.matmul(P, u) - ubar[:, None, :]


def unpack(xp: ModuleType, d: Any, plan: ClusterPlan, n_actions: int) -> Any:
    """Packed (T, n) delta -> dense (n, A, |U|), zeros off each action's reachable set."""
    out = xp.zeros((d.shape[1], n_actions, plan.genes.size), dtype=d.dtype)
    out[:, plan.act_of, plan.gene_pos] = d.T
    return out
