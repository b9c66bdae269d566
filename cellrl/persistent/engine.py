"""Persistent-perturbation engine: CellOracle's multi-gene simulation from (cell, applied set), batched, on the fly.

State of one episode: the current cell ``i`` (cluster ``c``) and the applied set ``applied[r]`` in {0 none,
1 KO, 2 OE} per active regulator ``r``. One step simulates the WHOLE set from cell ``i`` exactly as CellOracle
0.20.0 does for ``simulate_shift(perturb_condition={g1: v1, g2: v2, ...})`` followed by
``estimate_transition_prob(knn_random=True)``, ``calculate_embedding_shift`` and the nearest cell (the table's
``celloracle`` next-cell model, :mod:`cellrl.transitions`; same neighbours, unit vectors and settings).

Notation: ``X`` imputed expression (cells x genes), ``W_c`` the coefficient matrix of cluster ``c`` (row =
regulator, column = target), ``R`` the active regulators (the only rows of any ``W_c`` with entries), ``H`` =
``n_propagation``, ``k`` sampled neighbours per cell, ``P`` the pinned genes of a step: genes of the set whose
input ``d_in = v - X_ig`` is non-zero (CellOracle re-pins only ``delta_input != 0``; a knockout of a gene already
at 0 is not pinned and propagates freely).

1. Propagation (``_do_simulation`` with several pinned genes): ``d = d_in``; ``H`` times: ``d = d @ W_c``;
   ``d[P] = d_in[P]``; ``d = max(X_i + d, 0) - X_i``.
   *Structure used*: only regulators have outgoing edges, so hops 1..H-1 matter only on the ``R`` regulator
   coordinates (a sparse ``R x R`` product per hop, pins and clipping exact there); the last hop
   ``y = d_R @ W_c[R, :]`` is the only one over genes: one sparse product for the whole batch (``W_c[R, :]``
   stacked over clusters), kept sparse (only genes it reaches). The final delta is ``max(X_i + y', 0) - X_i``
   with ``y'`` = ``y`` re-pinned, i.e. ``delta = y + e`` with ``e`` non-zero only on the pins and on genes
   clipped at the last hop (which needs ``y < -X_ig <= -min_{cells of c} X_g``: only those entries are tested;
   every gene when ``X`` has negative values, as those clip untouched).
2. Correlation with each sampled neighbour ``j`` (Pearson over all ``G`` genes, centred algebraically as in
   :mod:`cellrl.transitions`): ``sum_g delta_g (X_jg - X_ig) = d_R . (Z_c[j] - Z_c[i]) + sum_g e_g (X_jg - X_ig)``
   with ``Z_c[j] = W_c[R, :] X_j`` computed once per cluster for its cells and their neighbours; the
   differences over the k neighbours of ``Z_c`` and of ``X`` on the regulators are stored per (cell, column)
   (``ZD``: cells x 2R x k float64, 311 MB at 3,000 cells, 108 regulators, k = 60; gathered at each step instead
   above ``ZD_MAX_BYTES``), so the linear part and the pins cost one contiguous k-row per non-zero ``d_R``
   entry. ``sum_g (D - mean D)^2`` and ``sum_g D`` per (cell, neighbour) are precomputed (O(cells x k)); pairs
   of near-duplicate cells (where the expanded forms would cancel) are formed from ``D`` exactly. NaN -> 1 as
   CellOracle does with ``knn_random``.
3. ``P_ij = softmax_j(corr_ij / sigma_corr)``, ``shift_i = sum_j P_ij u_ij - mean_j u_ij``, next cell = nearest to
   ``E_i + shift_i`` (a stagnation when it is ``i``).
4. Next-cell model (``transitions.next_cell``, as the table mode): ``celloracle`` is step 3; ``pca``,
   ``pca_step``, ``pca_direction``, ``pca_step_direction`` and ``prob_max`` call :mod:`cellrl.transitions.next_cell`'s functions on the
   set's PCA displacement ``s = delta L``, formed from the same parts as the numerator: ``Y L`` (one sparse x
   dense product) plus the pins' and clipped genes' corrections times their loadings rows (``L`` and the PCA
   space built by :func:`cellrl.transitions.next_cell.pca_space` exactly as the table runner builds it).

A single-gene set is the table's action (``table[i, a]``); equality with CellOracle's own multi-gene
``simulate_shift`` is tested in tests/test_persistent_engine.py. Arrays live on ``xp`` (numpy or CuPy,
:mod:`cellrl.xp`); the embedding's KD-tree (celloracle) and NearestCell's KD-tree (up to 20 PCs) run on the CPU,
NearestCell's brute-force search (more PCs, the default 50) on ``xp``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import scipy.sparse as sp

from cellrl.errors import InputError
from cellrl.model import OracleModel
from cellrl.transitions import (TransitionSettings, build_actions, embedding_float32, neighbor_stats,
                                sample_neighbors, select_backend, unit_vectors)
from cellrl.transitions import next_cell as nc
from cellrl.xp import to_numpy

NONE, KO, OE = 0, 1, 2
MAX_BATCH = 2048  # envs simulated at once
MIN_THREAD_BATCH = 128  # smallest share of a batch given to one thread
ZD_MAX_BYTES = 2 << 30  # precomputed neighbour differences (cells x 2R x k float64) up to this size


def _sparse(xp: ModuleType) -> ModuleType:
    if xp is np:
        return sp
    import cupyx.scipy.sparse as csp  # type: ignore

    return csp


@dataclass
class _Entries:
    """Genes of a batch whose final delta differs from the last hop's linear part, flat: env ``row``, ``gene``
    (for pins: the regulator index), final delta ``value``, linear part ``y`` (= d_R @ W_c[R, gene]),
    expression ``x`` = X[cell, gene]."""

    row: Any
    gene: Any
    value: Any
    y: Any
    x: Any


def xp_idx(xp: ModuleType, a: np.ndarray) -> Any:
    """A numpy index array on the backend."""
    return a if xp is np else xp.asarray(a)


def _rows_of(xp: ModuleType, indptr: Any, per_row: Any) -> Any:
    """``per_row[r]`` repeated for each stored entry of CSR row ``r`` (CuPy's repeat takes no array counts)."""
    if xp is np:
        return np.repeat(per_row, np.diff(indptr))
    return per_row[xp.searchsorted(indptr[1:], xp.arange(int(indptr[-1])), side="right")]


class PersistentEngine:
    """state = (current cell, applied set). ``applied[n, r]`` in {0: none, 1: KO, 2: OE} per regulator ``r``.

    Actions as in the table: ``a < R`` knocks out regulator ``a``, ``a >= R`` overexpresses ``a - R`` (with
    ``transitions.actions`` ko or oe only, ``a`` is regulator ``a`` of that kind). Build with
    :meth:`from_model`.
    """

    def __init__(self, model: OracleModel, settings: TransitionSettings, xp: ModuleType,
                 nbr: np.ndarray | None = None):
        self.xp = xp
        self.settings = settings
        self.threads = 1
        self._pool: ThreadPoolExecutor | None = None
        self.actions = build_actions(model, settings.actions)
        R = model.n_regulators
        self.n_cells, self.n_genes, self.n_regulators = model.n_cells, model.n_genes, R
        self.n_actions = len(self.actions)
        self.regulators = [str(r) for r in model.regulators]
        self.regulator_idx = np.asarray(model.regulator_idx, dtype=np.int64)
        kinds = self.actions.kinds.astype(str)
        self.action_code = np.where(kinds == "KO", KO, OE).astype(np.int8)  # (A,)
        self.action_regulator = np.arange(self.n_actions) % R  # (A,) regulator of each action
        ko = np.asarray(model.ko_values, dtype=np.float64)
        oe = np.asarray(model.oe_values, dtype=np.float64)
        if (ko < 0).any() or (oe < 0).any() or not (np.isfinite(ko).all() and np.isfinite(oe).all()):
            raise InputError("perturbation values must be finite and >= 0", field="ko_values/oe_values",
                             fix="rebuild model.npz with the fit_oracle rule")
        self.values = xp.asarray(np.stack([np.zeros(R), ko, oe]))  # (3, R): value by code
        self.cluster_ids = np.asarray(model.cluster_ids, dtype=np.int64)
        X = np.ascontiguousarray(model.X, dtype=np.float64)
        G = X.shape[1]
        all_genes = bool(X.min() < 0)  # clipping then moves genes the network does not reach
        if nbr is None:
            nbr = sample_neighbors(model.embedding, settings.n_neighbors, settings.sampled_fraction,
                                   settings.knn_random, settings.seed)
        nbr = np.asarray(nbr, dtype=np.int64)
        self.nbr_np = nbr
        self.X = xp.asarray(X)
        self.XR = xp.asarray(np.ascontiguousarray(X[:, self.regulator_idx]))
        self.E = np.asarray(model.embedding, dtype=np.float64)
        self.nbr = xp.asarray(nbr)
        self.u, self.ubar = unit_vectors(xp, xp.asarray(self.E), self.nbr, embedding_float32(model))
        ssA, s1, near = neighbor_stats(xp, self.X, self.nbr)
        with np.errstate(divide="ignore"):
            self.inv_a = 1.0 / xp.sqrt(ssA)  # inf where D is constant: corr NaN -> 1 like CellOracle
        self.mean_D = s1 / G
        self.near = near
        self.any_near = bool(near.any())
        from scipy.spatial import cKDTree

        self.tree = cKDTree(self.E)
        # PCA space of the next-cell models other than celloracle (the table runner's, cellrl.transitions.prepare)
        self.next_cell_model = settings.next_cell
        self.pca: nc.PcaSpace | None = None
        if settings.next_cell != "celloracle":
            self.pca = nc.pca_space(X, nc.n_pcs_of(settings.n_pcs, model.meta), settings.n_neighbors)
            self.scores, self.loadings = xp.asarray(self.pca.scores), xp.asarray(self.pca.loadings)
            self.candidates, self.half_gap = xp.asarray(self.pca.candidates), xp.asarray(self.pca.half_gap)
            self.radius = xp.asarray(self.pca.radius)

        # per cluster: the regulator block W_c[R, R] for hops 1..H-1, and Z_c = W_c[R, :] X_j for the cells of the
        # cluster and their neighbours; the last hop uses W_c[R, :] stacked over clusters (one sparse product)
        self.WT_RR: list[Any] = []  # per cluster W_c[R, R].T, CSR (sparse: no BLAS threads on tiny products)
        wr_parts, z_parts, z_off = [], [], 0
        self.nbr_z = np.empty_like(nbr)  # (N, k) row in Z of each neighbour, within the cell's cluster block
        self.self_z = np.empty(self.n_cells, dtype=np.int64)
        for c, W in enumerate(model.coefs):
            WR = sp.csr_matrix(W, dtype=np.float64)[self.regulator_idx]  # (R, G)
            WT = sp.csr_matrix(WR[:, self.regulator_idx].T)
            self.WT_RR.append(_sparse(xp).csr_matrix(WT) if xp is not np else WT)
            wr_parts.append(WR)
            cells = np.flatnonzero(self.cluster_ids == c)
            need = np.unique(np.concatenate([cells, nbr[cells].ravel()]))
            z_parts.append(np.asarray((WR @ X[need].T).T))  # (|need|, R)
            self.nbr_z[cells] = z_off + np.searchsorted(need, nbr[cells])
            self.self_z[cells] = z_off + np.searchsorted(need, cells)
            z_off += need.size
        W_all = sp.vstack(wr_parts).tocsr() if wr_parts else sp.csr_matrix((0, G))
        W_all.sort_indices()
        self.W_all = _sparse(xp).csr_matrix(W_all) if xp is not np else W_all  # (C R, G)
        self.Z = xp.asarray(np.concatenate(z_parts) if z_parts else np.zeros((0, R)))
        self.nbr_z_x, self.self_z_x = xp.asarray(self.nbr_z), xp.asarray(self.self_z)
        self.cluster_x = xp.asarray(self.cluster_ids)
        self.X_flat, self.Z_flat = self.X.ravel(), self.Z.ravel()
        # (N 2R, k) neighbour differences per (cell, column) of [Z_c | X_R] (see _z_diff), contiguous per row,
        # when they fit ZD_MAX_BYTES (else gathered at each step)
        k = nbr.shape[1]
        self.ZD = None
        if 16 * self.n_cells * R * k <= ZD_MAX_BYTES:
            self.ZD = xp.empty((self.n_cells * 2 * R, k))
            for s0 in range(0, self.n_cells, 512):
                cs = xp.arange(s0, min(s0 + 512, self.n_cells))
                zx = xp.concatenate([self.Z[self.nbr_z_x[cs]] - self.Z[self.self_z_x[cs]][:, None, :],
                                     self.XR[self.nbr[cs]] - self.XR[cs][:, None, :]], axis=2)  # (b, k, 2R)
                self.ZD[2 * R * s0:2 * R * (s0 + int(cs.shape[0]))] = zx.transpose(0, 2, 1).reshape(-1, k)
        reg_of_gene = np.full(G, -1, dtype=np.int64)
        reg_of_gene[self.regulator_idx] = np.arange(R)
        self.reg_of_gene, self.is_reg = xp.asarray(reg_of_gene), xp.asarray(reg_of_gene >= 0)
        xmin = np.stack([X[self.cluster_ids == c].min(axis=0) if (self.cluster_ids == c).any() else np.zeros(G)
                         for c in range(len(model.coefs))])
        self.xmin_flat = xp.asarray(xmin.ravel())  # (C G) min expression of each gene within each cluster
        self.any_negative = all_genes  # genes with negative expression clip even when untouched

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: OracleModel, settings: dict | TransitionSettings | None = None,
                   xp: ModuleType | None = None, threads: int = 1) -> "PersistentEngine":
        """Engine of ``model`` with the ``transitions`` config section ``settings`` (n_propagation, n_neighbors,
        sampled_fraction, sigma_corr, knn_random, seed, actions, backend); ``xp`` overrides the backend.
        ``threads``: CPU threads splitting a batch (results do not depend on it)."""
        s = settings if isinstance(settings, TransitionSettings) else TransitionSettings.from_dict(settings)
        if xp is None:
            xp = select_backend(s.backend)[0]
        eng = cls(model, s, xp)
        eng.threads = max(1, int(threads))
        return eng

    # ------------------------------------------------------------------------------------------------- sets
    def apply(self, applied: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """New (N, R) int8 sets: ``applied`` with each row's action added. Raises ValueError when an action's
        gene is already in its set (masked by :meth:`action_mask`)."""
        applied = np.asarray(applied, dtype=np.int8)
        a = np.asarray(actions, dtype=np.int64).reshape(-1)
        rows = np.arange(a.size)
        r = self.action_regulator[a]
        if (applied[rows, r] != NONE).any():
            bad = int(np.flatnonzero(applied[rows, r] != NONE)[0])
            raise ValueError(f"action {int(a[bad])} of row {bad}: regulator {self.regulators[r[bad]]} is already "
                             "in the set (mask it with action_mask)")
        out = applied.copy()
        out[rows, r] = self.action_code[a]
        return out

    def action_mask(self, applied: np.ndarray) -> np.ndarray:
        """(N, A) bool: False for an action whose gene is already in the set (KO and OE of one gene exclude
        each other)."""
        free = np.asarray(applied) == NONE
        return free[:, self.action_regulator]

    # ---------------------------------------------------------------------------------------------- simulate
    def delta(self, cells: np.ndarray, applied: np.ndarray) -> np.ndarray:
        """(N, G) numpy: CellOracle's simulated expression change of each whole set from each cell."""
        cells = np.asarray(cells, dtype=np.int64).reshape(-1)
        applied = np.asarray(applied, dtype=np.int8).reshape(cells.size, self.n_regulators)
        out = np.zeros((cells.size, self.n_genes))
        for s0 in range(0, cells.size, MAX_BATCH):
            out[s0:s0 + MAX_BATCH] = self._simulate(cells[s0:s0 + MAX_BATCH], applied[s0:s0 + MAX_BATCH],
                                                    keep_delta=True)["delta"]
        return out

    def step(self, cells: np.ndarray, applied: np.ndarray) -> np.ndarray:
        """(N,) int64 next cell of each (cell, set) (== cells: a stagnation). Deterministic."""
        return self.simulate(cells, applied)["next_cell"]

    def simulate(self, cells: np.ndarray, applied: np.ndarray) -> dict[str, np.ndarray]:
        """``next_cell`` (N,) int64 and ``shift`` (N, 2) (CellOracle's ``delta_embedding`` row) per (cell, set)."""
        cells = np.asarray(cells, dtype=np.int64).reshape(-1)
        applied = np.asarray(applied, dtype=np.int8).reshape(cells.size, self.n_regulators)
        nxt = np.empty(cells.size, dtype=np.int64)
        shift = np.empty((cells.size, 2))
        size = MAX_BATCH
        if self.threads > 1 and self.xp is np:  # numpy, scipy's sparse products and the KD-tree release the GIL
            size = min(MAX_BATCH, max(MIN_THREAD_BATCH, -(-cells.size // self.threads)))
        starts = range(0, cells.size, size)
        run = lambda s0: self._simulate(cells[s0:s0 + size], applied[s0:s0 + size])  # noqa: E731
        if len(starts) > 1 and self.threads > 1 and self.xp is np:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cellrl-persistent")
            results = self._pool.map(run, starts)
        else:
            results = map(run, starts)
        for s0, r in zip(starts, results):
            nxt[s0:s0 + size] = r["next_cell"]
            shift[s0:s0 + size] = r["shift"]
        return {"next_cell": nxt, "shift": shift}

    def _propagate(self, cells: Any, code: Any) -> tuple[Any, Any, Any]:
        """Hops 1..H-1 on the regulator coordinates, then the last hop's linear part on them.

        Returns ``d`` (n, R) the state after hop H-1, ``d_in`` (n, R) CellOracle's ``delta_input`` (0 off the
        set) and ``y_R`` (n, R) = ``d @ W_c[R, R]`` (the last hop's linear part on the regulators)."""
        xp = self.xp
        XR = self.XR[cells]
        vals = self.values[code, xp.arange(self.n_regulators)[None, :]]  # (n, R) value of each set member
        d_in = xp.where(code > 0, vals - XR, 0.0)
        pinned = d_in != 0
        d = d_in
        cl = to_numpy(self.cluster_x[cells])
        groups = [(int(c), xp.asarray(np.flatnonzero(cl == c))) for c in np.unique(cl)]

        def hop(v: Any) -> Any:
            out = xp.empty_like(v)
            for c, idx in groups:
                out[idx] = (self.WT_RR[c] @ v[idx].T).T  # v @ W_c[R, R]
            return out

        for _ in range(int(self.settings.n_propagation) - 1):
            d = xp.where(pinned, d_in, hop(d))  # delta_simulated[delta_input != 0] = delta_input
            d = xp.maximum(XR + d, 0.0) - XR  # gem_tmp[gem_tmp < 0] = 0; delta = gem_tmp - gem
        return d, d_in, hop(d)

    def _last_hop(self, cells: Any, d: Any, d_in: Any, y_R: Any) -> tuple[Any, _Entries, _Entries]:
        """The last hop over all genes: ``y = d @ W_c[R, :]``, re-pinned, ``max(X + y, 0) - X``.

        Returns ``Y`` (n, G) sparse, the linear part where non-zero (0 on the pins), then the genes where the final
        delta differs from it: the clipped ones (``y < -X``) and the pins (delta = ``delta_input``)."""
        xp = self.xp
        n, R, G = int(cells.shape[0]), self.n_regulators, self.n_genes
        er, rr = xp.nonzero(d)
        Dsp = _sparse(xp).csr_matrix((d[er, rr], (er, self.cluster_x[cells][er] * R + rr)),
                                     shape=(n, self.W_all.shape[0]))
        Y = Dsp @ self.W_all  # (n, G) sparse: the linear last hop where non-zero
        if self.any_negative:  # X < 0 somewhere: untouched genes clip too, so every gene is an entry
            Y = _sparse(xp).csr_matrix((Y.toarray().ravel(), xp.tile(xp.arange(G), n),
                                        xp.arange(0, n * G + 1, G)), shape=(n, G))
        genes, y, ends = Y.indices, Y.data, Y.indptr[1:]
        pinned = d_in != 0
        reg = xp.flatnonzero(self.is_reg[genes])  # entries on regulator genes (few)
        reg_rows = xp.searchsorted(ends, reg, side="right")
        at_pin = reg[pinned[reg_rows, self.reg_of_gene[genes[reg]]]]
        y[at_pin] = 0.0  # pins come as separate entries
        # clipping needs y < -X_ig <= -min over the cell's cluster of X_g: only those entries are looked at
        # (every entry but the pins when X < 0 somewhere)
        if self.any_negative:
            free = xp.ones(y.shape[0], dtype=bool)
            free[at_pin] = False
            cand = xp.flatnonzero(free)
        else:
            base = _rows_of(xp, Y.indptr, self.cluster_x[cells] * G)
            cand = xp.flatnonzero(y < -xp.take(self.xmin_flat, base + genes))
        rows = xp.searchsorted(ends, cand, side="right")
        x = xp.take(self.X_flat, cells[rows] * G + genes[cand])
        gem = x + y[cand]
        hit = xp.flatnonzero(gem < 0)
        x, ci, rows = x[hit], cand[hit], rows[hit]
        clipped = _Entries(row=rows, gene=genes[ci].astype(xp.int64), value=xp.maximum(gem[hit], 0.0) - x,
                           y=y[ci], x=x)
        pe, pr = xp.nonzero(pinned)
        px = self.XR[cells[pe], pr]
        pins = _Entries(row=pe, gene=pr, value=(px + d_in[pe, pr]) - px, y=y_R[pe, pr], x=px)  # gene: regulator
        return Y, clipped, pins

    def _z_diff(self, cells: Any, cols: Any) -> Any:
        """(len, k) neighbour differences per pair (cell i, column): for ``col < R`` ``Z_c[nbr[i, m], col] -
        Z_c[i, col]``, for ``col = R + r`` ``X[nbr[i, m], g_r] - X[i, g_r]`` (regulator ``r``'s gene)."""
        xp = self.xp
        R, G = self.n_regulators, self.n_genes
        if self.ZD is not None:
            return self.ZD[cells * (2 * R) + cols]
        out = xp.empty((int(cells.shape[0]), int(self.nbr.shape[1])))
        z, g = cols < R, cols >= R
        cz, rz = cells[z], cols[z]
        out[z] = (xp.take(self.Z_flat, self.nbr_z_x[cz] * R + rz[:, None])
                  - xp.take(self.Z_flat, self.self_z_x[cz] * R + rz)[:, None])
        cg, gg = cells[g], xp.asarray(self.regulator_idx)[cols[g] - R]
        out[g] = xp.take(self.X_flat, self.nbr[cg] * G + gg[:, None]) - xp.take(self.X_flat, cg * G + gg)[:, None]
        return out

    def _dense_delta(self, Y: Any, clip: _Entries, pins: _Entries, rows: Any = None) -> Any:
        """Dense final delta of the batch's envs ``rows`` (all when None) from the last hop's parts."""
        xp = self.xp
        if rows is None:
            rows = xp.arange(Y.shape[0])
        full = Y[rows].toarray()
        pos = xp.full(Y.shape[0], -1, dtype=xp.int64)
        pos[rows] = xp.arange(rows.shape[0])
        c, p = pos[clip.row], pos[pins.row]
        full[c[c >= 0], clip.gene[c >= 0]] = clip.value[c >= 0]
        full[p[p >= 0], xp_idx(xp, self.regulator_idx)[pins.gene[p >= 0]]] = pins.value[p >= 0]
        return full

    def _weighted_rows(self, rows: Any, w: Any, T: Any, n: int) -> Any:
        """(n, k): ``sum_t w_t T[t]`` per env, ``rows`` (ascending) the env of each row of ``T``."""
        xp = self.xp
        indptr = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(xp.bincount(rows, minlength=n))])
        S = _sparse(xp).csr_matrix((w, xp.arange(rows.shape[0], dtype=xp.int32), indptr.astype(xp.int32)),
                                   shape=(n, int(rows.shape[0])))
        return xp.asarray(S @ T)

    def _row_sums(self, rows: Any, vals: Any, n: int) -> Any:
        """Per-row sums of ``vals`` (deterministic order on both backends)."""
        xp = self.xp
        if xp is np:
            return np.bincount(rows, weights=vals, minlength=n)
        S = _sparse(xp).csr_matrix((vals, (rows, xp.arange(rows.shape[0]))), shape=(n, int(rows.shape[0])))
        return S @ xp.ones(int(rows.shape[0]))

    def _simulate(self, cells_np: np.ndarray, applied: np.ndarray, keep_delta: bool = False) -> dict[str, Any]:
        xp = self.xp
        n, G, R = cells_np.size, self.n_genes, self.n_regulators
        cells = xp.asarray(cells_np)
        d, d_in, y_R = self._propagate(cells, xp.asarray(applied.astype(np.int64)))
        Y, clip, pins = self._last_hop(cells, d, d_in, y_R)
        ones = xp.ones(G)
        sq = _sparse(xp).csr_matrix((Y.data * Y.data, Y.indices, Y.indptr), shape=(n, G))
        sum_d = (Y @ ones + self._row_sums(clip.row, clip.value - clip.y, n)
                 + self._row_sums(pins.row, pins.value, n))
        ss_d = (sq @ ones + self._row_sums(clip.row, clip.value * clip.value - clip.y * clip.y, n)
                + self._row_sums(pins.row, pins.value * pins.value, n))
        # numerator sum_g delta_g (X_jg - X_ig) = d_R . (Z[j] - Z[i]) + sum over the pins and clipped genes of
        # (delta - y)_g (X_jg - X_ig): per part, rows of k neighbour differences weighted and summed per env
        zr, zc = xp.nonzero(d)
        num = self._weighted_rows(zr, d[zr, zc], self._z_diff(cells[zr], zc), n)
        num += self._weighted_rows(pins.row, pins.value - pins.y, self._z_diff(cells[pins.row], R + pins.gene), n)
        if int(clip.row.shape[0]):
            t_cl = xp.take(self.X_flat, self.nbr[cells[clip.row]] * G + clip.gene[:, None]) - clip.x[:, None]
            num += self._weighted_rows(clip.row, clip.value - clip.y, t_cl, n)
        if self.any_near:  # near-duplicate neighbours: the numerator from D itself (rare)
            fe, fm = xp.nonzero(self.near[cells])
            if int(fe.shape[0]):
                rows, inv = xp.unique(fe, return_inverse=True)
                full = self._dense_delta(Y, clip, pins, rows)  # (len(rows), G)
                D = self.X[self.nbr[cells[fe], fm]] - self.X[cells[fe]]
                num[fe, fm] = xp.einsum("fg,fg->f", full[inv], D)
        num -= sum_d[:, None] * self.mean_D[cells]
        ssb = xp.maximum(ss_d - sum_d * sum_d / G, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = num * self.inv_a[cells] * (1.0 / xp.sqrt(ssb))[:, None]
        if self.settings.knn_random:  # CellOracle fixes NaNs only in knn_random mode
            corr = xp.where(xp.isnan(corr), 1.0, corr)
        wgt = xp.exp(corr / self.settings.sigma_corr)
        P = wgt / wgt.sum(axis=1, keepdims=True)
        shift = xp.einsum("nk,nkd->nd", P, self.u[cells]) - self.ubar[cells]
        shift_np = to_numpy(shift)
        out: dict[str, Any] = {"shift": shift_np}
        if self.pca is None:  # celloracle: nearest cell to the shifted point
            target = self.E[cells_np] + shift_np
            ok = np.isfinite(target).all(axis=1)
            nxt = cells_np.copy()
            if ok.any():
                nxt[ok] = self.tree.query(target[ok], k=1)[1]
        else:
            nxt = self._next_cell_pca(cells, Y, clip, pins, P)
        out["next_cell"] = nxt
        if keep_delta:  # dense (n, G): CellOracle's simulated_count - imputed_count
            full = self._dense_delta(Y, clip, pins)
            Xc = self.X[cells]
            out["delta"] = to_numpy((Xc + full) - Xc)
        return out

    def _disp(self, Y: Any, clip: _Entries, pins: _Entries) -> Any:
        """(n, d) PCA displacement ``s = delta L`` of the batch: ``Y L`` plus the corrections of the clipped genes
        (``value - y``) and of the pins (``value``; ``Y`` is 0 there) times their loadings rows."""
        xp, n, L = self.xp, int(Y.shape[0]), self.loadings
        s = xp.asarray(Y @ L)
        if int(clip.row.shape[0]):
            s += self._weighted_rows(clip.row, clip.value - clip.y, L[clip.gene], n)
        if int(pins.row.shape[0]):
            s += self._weighted_rows(pins.row, pins.value, L[xp_idx(xp, self.regulator_idx)[pins.gene]], n)
        return s

    def _next_cell_pca(self, cells: Any, Y: Any, clip: _Entries, pins: _Entries, P: Any) -> np.ndarray:
        """(n,) next cells under ``transitions.next_cell`` pca / pca_step / pca_direction / pca_step_direction /
        prob_max: :func:`cellrl.transitions.next_cell.pca_next_cells` (the table runner's dispatch), whose arrays
        are (cells, actions per cell, ...). Rows of one cell are packed along the actions axis
        (:func:`pack_by_cell`), so each cell's candidate offsets are gathered once per block rather than once per
        row (a search expands ~40 sets per cell and batch)."""
        xp, model = self.xp, self.next_cell_model
        s = self._disp(Y, clip, pins)  # (n, d)
        cells_np = to_numpy(cells).astype(np.int64)
        out = np.empty(cells_np.size, dtype=np.int64)
        for rows, ucell, pos in pack_by_cell(cells_np):
            m, width = ucell.size, int(pos.max()) + 1
            ri, ci, pi = xp_idx(xp, rows), xp_idx(xp, ucell), xp_idx(xp, pos)
            cell_of_row = xp_idx(xp, np.searchsorted(ucell, cells_np[rows]))
            sp_ = xp.zeros((m, width, s.shape[1]))
            sp_[cell_of_row, pi] = s[ri]
            Pp = None
            if model == "prob_max":
                Pp = xp.zeros((m, width, P.shape[1]))
                Pp[cell_of_row, pi] = P[ri]
            nxt = nc.pca_next_cells(xp, model, sp_, self.settings.step_gain, self.scores, ci, self.candidates[ci],
                                    self.radius[ci], self.half_gap[ci], self.pca.nearest, P=Pp,
                                    nbr=self.nbr[ci] if model == "prob_max" else None)
            out[rows] = nxt[to_numpy(cell_of_row), pos]
        return out


def pack_by_cell(cells: np.ndarray, block: int = 64) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Rows of ``cells`` grouped so that each group is a (cells x slots) layout: per group ``rows`` (its row
    indices), ``ucell`` (its distinct cells, ascending) and ``pos`` (each row's slot among its cell's rows).
    A cell's rows are split into groups of ``block`` slots (the k-th group holds the rows k*block.. of every cell
    with that many), which bounds the padding."""
    cells = np.asarray(cells, np.int64)
    order = np.argsort(cells, kind="stable")
    sc = cells[order]
    first = np.r_[0, np.flatnonzero(sc[1:] != sc[:-1]) + 1] if sc.size else np.zeros(0, np.int64)
    counts = np.diff(np.r_[first, sc.size])
    rank = np.arange(sc.size) - np.repeat(first, counts)
    groups = []
    for b in range(-(-int(counts.max(initial=0)) // block)):
        sel = (rank >= b * block) & (rank < (b + 1) * block)
        rows = order[sel]
        groups.append((rows, np.unique(cells[rows]), rank[sel] - b * block))
    return groups
