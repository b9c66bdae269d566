"""Transition table (``cellrl.transitions``): for every cell and every action (knock out / overexpress one active
regulator), the next cell.

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
5. Next cell (``transitions.next_cell: celloracle``): the cell nearest to ``E_i + shift_i`` (scipy cKDTree; the
   cell itself included; a stagnation when it is ``i``). The other next-cell models (``pca``, ``pca_step``,
   ``pca_direction``, ``pca_step_direction``, ``prob_max``) work in the PCA space of ``X`` (:mod:`.next_cell`);
   all but ``prob_max`` read only the PCA displacement ``delta L``, so for them steps 2-4 are skipped (no embedding
   neighbours, correlation, ``P`` or shift; ``delta L`` comes from the same linear split as in step 3).

Memory: O(chunk x (sum_a |S_a| + A x k)) per chunk plus bounded Gram blocks and correction batches, O(cells x k)
for the neighbour lists, one copy of ``X`` and one (cells x A) ``Q`` per worker thread; never cells x cells.

CPU: chunks run on ``threads`` worker threads (numpy, BLAS, scipy's sparse products and the KD-tree release the
GIL; BLAS is held to one thread each); the neighbour search uses scipy's cKDTree on all cores with sklearn's
tree answering tied rows (:func:`knn_like_sklearn`), and the per-cluster plans are built meanwhile.
CellOracle's ``calculate_embedding_shift`` allocates several dense cells x cells float64 arrays (see
``celloracle_dense_bytes``).

Modules: :mod:`.settings` (settings, actions), :mod:`.maths` (CellOracle's maths: propagation, correlation,
probabilities, embedding shift), :mod:`.neighbors` (CellOracle-compatible neighbour sampling), :mod:`.next_cell`
(next-cell models), :mod:`.runner` (one chunk, chunk plan, cache, stats, the rule's files). Every public name is
re-exported here; the logger stays ``cellrl.transitions``.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from . import maths, neighbors, runner, settings
from .maths import (CORRECTION_BATCH, EXACT_BELOW, GRAM_BLOCK, ROUNDING_TOL, SPARSE_Q_BELOW, TINY_INPUT,
                    ChunkCorrelation, ClusterLinear, ClusterPlan, cluster_linear, correlation, embedding_float32,
                    embedding_shift, neighbor_stats, packed_expression, perturbation_input, plan_cluster, propagate,
                    reachable, reachable_sets, transition_probabilities, unit_response, unit_vectors, unpack)
from .neighbors import knn_like_sklearn, sample_neighbors, weighted_choice_rows
from .runner import (ChunkResult, Context, bytes_per_cell, celloracle_dense_bytes, choose_chunk_cells, chunk_plan,
                     chunk_workers, compute_table, log, model_fingerprint, nearest_cells, prepare, run_chunk,
                     select_backend, simulate_actions, spatial_order, transitions_files)
from . import next_cell
from .settings import ACTION_KINDS, NEXT_CELL_MODELS, Actions, TransitionSettings, build_actions

_ENGINE = (settings, maths, neighbors, next_cell, runner)


class _Package(ModuleType):
    """Setting a module constant here (tests monkeypatch ``CORRECTION_BATCH``, ``SPARSE_Q_BELOW``) sets it in
    every engine module that reads it, as when the engine was one module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name.isupper():
            for m in _ENGINE:
                if hasattr(m, name):
                    setattr(m, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
