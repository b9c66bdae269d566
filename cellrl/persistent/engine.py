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
   coordinates (a dense ``R x R`` product per hop, pins and clipping exact there); the last hop
   ``y = d_R @ W_c[R, :]`` is the only one over genes, on ``cols_c`` (genes with an incoming edge in ``W_c``
   plus the regulators; every gene if ``X`` has negative values, as clipping then moves untouched genes).
   The final delta is ``delta = max(X_i + y', 0) - X_i`` with ``y'`` = ``y`` re-pinned: ``delta = y + e``,
   ``e`` non-zero only on the pins and on genes clipped at the last hop.
2. Correlation with each sampled neighbour ``j`` (Pearson over all ``G`` genes, centred algebraically as in
   :mod:`cellrl.transitions`): ``sum_g delta_g (X_jg - X_ig) = d_R . (Z_c[j] - Z_c[i]) + sum_{g in e} e_g
   (X_jg - X_ig)`` with ``Z_c[j] = W_c[R, :] X_j`` precomputed per cluster for its cells and their neighbours
   (O(cells x R) memory); ``sum_g (D - mean D)^2`` and ``sum_g D`` per (cell, neighbour) are precomputed once
   (O(cells x k)). Pairs of near-duplicate cells (where ``Z_c[j] - Z_c[i]`` would cancel) are formed exactly.
   NaN -> 1 as CellOracle does with ``knn_random``.
3. ``P_ij = softmax_j(corr_ij / sigma_corr)``, ``shift_i = sum_j P_ij u_ij - mean_j u_ij``, next cell = nearest to
   ``E_i + shift_i`` (a stagnation when it is ``i``).

A single-gene set is the table's action (``table[i, a]``); equality with CellOracle's own multi-gene
``simulate_shift`` is tested in tests/test_persistent_engine.py. Arrays live on ``xp`` (numpy or CuPy,
:mod:`cellrl.xp`); the KD-tree query runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import scipy.sparse as sp

from cellrl.errors import InputError
from cellrl.model import OracleModel
from cellrl.transitions import (TransitionSettings, build_actions, embedding_float32, sample_neighbors,
                                select_backend, unit_vectors)
from cellrl.xp import to_numpy

NONE, KO, OE = 0, 1, 2
EXACT_BELOW = 1e-6  # |D|^2 / (|X_i|^2 + |X_j|^2) under which a pair's numerator is formed from D explicitly
GRAM_BLOCK = 64  # cells per Gram block when precomputing neighbour statistics
MAX_BATCH = 2048  # envs simulated at once (bounds the (batch, k, R) gather)


def _sparse(xp: ModuleType) -> ModuleType:
    if xp is np:
        return sp
    import cupyx.scipy.sparse as csp  # type: ignore

    return csp


@dataclass
class _Cluster:
    """Per-cluster operators on the backend: ``W_RR`` (R, R) dense regulator block; ``WT_cols`` CSR (|cols|, R)
    = ``W_c[R, cols].T``; ``cols`` (|cols|,) genes of the last hop; ``reg_pos`` (R,) regulators' positions in
    ``cols``."""

    W_RR: Any
    WT_cols: Any
    cols: Any
    cols_np: np.ndarray
    reg_pos: Any


def neighbor_stats(xp: ModuleType, X: Any, nbr: Any, G: int) -> tuple[Any, Any, Any]:
    """Per (cell i, neighbour m): ``ssA`` = sum_g (D - mean D)^2, ``s1`` = sum_g D with ``D = X_j - X_i``, and
    ``near`` (|D|^2 < EXACT_BELOW (|X_i|^2 + |X_j|^2): near-duplicates whose linear numerator would cancel).
    Gram products per block of cells against the union of their neighbours; near pairs formed exactly."""
    n, k = nbr.shape
    sq = xp.einsum("ng,ng->n", X, X)
    rowsum = X.sum(axis=1)
    cross = xp.empty((n, k))
    for s0 in range(0, n, GRAM_BLOCK):
        nb = nbr[s0:s0 + GRAM_BLOCK]
        uni, inv = xp.unique(nb.ravel(), return_inverse=True)
        gram = X[s0:s0 + GRAM_BLOCK] @ X[uni].T
        cross[s0:s0 + GRAM_BLOCK] = xp.take_along_axis(gram, inv.reshape(nb.shape), axis=1)
    sq_i, sq_j = sq[:, None], sq[nbr]
    ssD = sq_j + sq_i - 2.0 * cross
    s1 = rowsum[nbr] - rowsum[:, None]
    near = ssD < EXACT_BELOW * (sq_i + sq_j)
    if bool(near.any()):
        fi, fm = xp.nonzero(near)
        D = X[nbr[fi, fm]] - X[fi]
        ssD[fi, fm] = xp.einsum("fg,fg->f", D, D)
        s1[fi, fm] = D.sum(axis=1)
    ssA = xp.maximum(ssD - s1 * s1 / G, 0.0)
    return ssA, s1, near


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
        ssA, s1, near = neighbor_stats(xp, self.X, self.nbr, G)
        with np.errstate(divide="ignore"):
            self.inv_a = 1.0 / xp.sqrt(ssA)  # inf where D is constant: corr NaN -> 1 like CellOracle
        self.mean_D = s1 / G
        self.near = near
        self.any_near = bool(near.any())
        from scipy.spatial import cKDTree

        self.tree = cKDTree(self.E)

        # per cluster: regulator block, last-hop operator, and Z_c = W_c[R, :] X_j for the cells that need it
        self.clusters: list[_Cluster] = []
        z_parts, z_off = [], 0
        self.nbr_z = np.empty_like(nbr)  # (N, k) row in Z of each neighbour, within the cell's cluster block
        self.self_z = np.empty(self.n_cells, dtype=np.int64)
        for c, W in enumerate(model.coefs):
            W = sp.csr_matrix(W, dtype=np.float64)
            WR = W[self.regulator_idx]  # (R, G)
            cols = np.arange(G) if all_genes else np.union1d(np.unique(WR.indices), self.regulator_idx)
            self.clusters.append(_Cluster(
                W_RR=xp.asarray(WR[:, self.regulator_idx].toarray()),
                WT_cols=_sparse(xp).csr_matrix(sp.csr_matrix(WR[:, cols].T)) if xp is not np
                else sp.csr_matrix(WR[:, cols].T),
                cols=xp.asarray(cols), cols_np=cols, reg_pos=xp.asarray(np.searchsorted(cols, self.regulator_idx))))
            cells = np.flatnonzero(self.cluster_ids == c)
            need = np.unique(np.concatenate([cells, nbr[cells].ravel()]))
            z_parts.append(np.asarray((WR @ X[need].T).T))  # (|need|, R)
            self.nbr_z[cells] = z_off + np.searchsorted(need, nbr[cells])
            self.self_z[cells] = z_off + np.searchsorted(need, cells)
            z_off += need.size
        self.Z = xp.asarray(np.concatenate(z_parts) if z_parts else np.zeros((0, R)))

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: OracleModel, settings: dict | TransitionSettings | None = None,
                   xp: ModuleType | None = None) -> "PersistentEngine":
        """Engine of ``model`` with the ``transitions`` config section ``settings`` (n_propagation, n_neighbors,
        sampled_fraction, sigma_corr, knn_random, seed, actions, backend); ``xp`` overrides the backend."""
        s = settings if isinstance(settings, TransitionSettings) else TransitionSettings.from_dict(settings)
        if xp is None:
            xp = select_backend(s.backend)[0]
        return cls(model, s, xp)

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
        out = np.zeros((cells.size, self.n_genes))
        for s0 in range(0, cells.size, MAX_BATCH):
            sl = slice(s0, s0 + MAX_BATCH)
            r = self._simulate(cells[sl], np.asarray(applied)[sl], keep_delta=True)
            for c, idx, d in r["delta"]:
                out[s0 + idx[:, None], self.clusters[c].cols_np[None, :]] = d
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
        for s0 in range(0, cells.size, MAX_BATCH):
            r = self._simulate(cells[s0:s0 + MAX_BATCH], applied[s0:s0 + MAX_BATCH])
            nxt[s0:s0 + MAX_BATCH] = r["next_cell"]
            shift[s0:s0 + MAX_BATCH] = r["shift"]
        return {"next_cell": nxt, "shift": shift}

    def _simulate(self, cells: np.ndarray, applied: np.ndarray, keep_delta: bool = False) -> dict[str, Any]:
        xp = self.xp
        n, G, H = cells.size, self.n_genes, int(self.settings.n_propagation)
        k = int(self.nbr.shape[1])
        ci = xp.asarray(cells)
        code = xp.asarray(applied.astype(np.int64))
        XR = self.XR[ci]  # (n, R)
        vals = self.values[code, xp.arange(self.n_regulators)[None, :]]  # (n, R) value of each set member
        d_in = xp.where(code > 0, vals - XR, 0.0)  # CellOracle's delta_input on the set's genes
        pinned = d_in != 0
        num = xp.empty((n, k))
        sum_d = xp.empty(n)
        ss_d = xp.empty(n)
        deltas = []
        clusters = self.cluster_ids[cells]
        for c in np.unique(clusters):
            idx_np = np.flatnonzero(clusters == c)
            idx = xp.asarray(idx_np)
            cl = self.clusters[int(c)]
            din, pin, xr = d_in[idx], pinned[idx], XR[idx]
            d = din
            for _ in range(H - 1):  # hops on the regulator coordinates (the only rows with edges)
                d = d @ cl.W_RR
                d = xp.where(pin, din, d)
                d = xp.maximum(xr + d, 0.0) - xr
            yT = cl.WT_cols @ d.T  # (|cols|, m): last hop, d_R @ W_c[R, cols]
            if xp is np:
                yT = np.ascontiguousarray(yT)
            zT = yT.copy()
            pr, pe = xp.nonzero(pin.T)  # pins: (regulator, env)
            zT[cl.reg_pos[pr], pe] = din[pe, pr]
            cg = ci[idx]
            XT = self.X[cg[None, :], cl.cols[:, None]]  # (|cols|, m)
            gem = XT + zT
            dT = xp.maximum(gem, 0.0) - XT  # final delta on cols (exactly CellOracle's last hop)
            if keep_delta:
                deltas.append((int(c), idx_np, to_numpy(((XT + dT) - XT).T)))
            sum_d[idx] = dT.sum(axis=0)
            ss_d[idx] = (dT * dT).sum(axis=0)
            # numerator: linear part through Z, then e = delta - y on pins and clipped genes
            zi = self.Z[xp.asarray(self.self_z[cells[idx_np]])]  # (m, R)
            zj = self.Z[xp.asarray(self.nbr_z[cells[idx_np]])]  # (m, k, R)
            nm = xp.einsum("mkr,mr->mk", zj, d) - (zi * d).sum(axis=1)[:, None]
            emask = gem < 0
            emask[cl.reg_pos[pr], pe] = True
            kt, ke = xp.nonzero(emask.T)  # (env, col) pairs, env-major
            if int(kt.shape[0]):
                ev = dT[ke, kt] - yT[ke, kt]
                g = cl.cols[ke]
                nb = self.nbr[cg[kt]]  # (entries, k)
                Dg = self.X[nb, g[:, None]] - self.X[cg[kt], g][:, None]
                S = _sparse(xp).csr_matrix((ev, (kt, xp.arange(kt.shape[0]))), shape=(idx_np.size, int(kt.shape[0])))
                nm += S @ Dg
            if self.any_near:  # near-duplicate neighbours: the numerator from D itself
                fe, fm = xp.nonzero(self.near[cg])
                if int(fe.shape[0]):
                    D = self.X[self.nbr[cg[fe], fm][:, None], cl.cols[None, :]] - XT.T[fe]
                    nm[fe, fm] = xp.einsum("fg,fg->f", D, dT.T[fe])
            num[idx] = nm
        num -= sum_d[:, None] * self.mean_D[ci]
        ssb = xp.maximum(ss_d - sum_d * sum_d / G, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = num * self.inv_a[ci] * (1.0 / xp.sqrt(ssb))[:, None]
        if self.settings.knn_random:  # CellOracle fixes NaNs only in knn_random mode
            corr = xp.where(xp.isnan(corr), 1.0, corr)
        w = xp.exp(corr / self.settings.sigma_corr)
        P = w / w.sum(axis=1, keepdims=True)
        shift = xp.einsum("nk,nkd->nd", P, self.u[ci]) - self.ubar[ci]
        shift_np = to_numpy(shift)
        target = self.E[cells] + shift_np
        ok = np.isfinite(target).all(axis=1)
        nxt = cells.copy()
        if ok.any():
            nxt[ok] = self.tree.query(target[ok], k=1)[1]
        return {"next_cell": nxt, "shift": shift_np, "delta": deltas}
