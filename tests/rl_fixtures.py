"""Small models and transition tables for the environment and training tests (no CellOracle needed)."""

from __future__ import annotations

import numpy as np

from cellrl.model import OracleModel, random_model
from cellrl.tasks import TaskGeometry


def random_table(model: OracleModel, seed: int = 0, self_frac: float = 0.2) -> np.ndarray:
    """Uniformly random next cells (any split), with a fraction of self-transitions."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, model.n_cells, (model.n_cells, model.n_actions))
    stay = rng.random(table.shape) < self_frac
    table[stay] = np.broadcast_to(np.arange(model.n_cells)[:, None], table.shape)[stay]
    return table.astype(np.int32)


def structured_problem(n_cells: int = 400, n_genes: int = 24, n_types: int = 4, n_regulators: int = 10,
                       seed: int = 0) -> tuple[OracleModel, np.ndarray]:
    """A learnable task: from type s, one action per target type t jumps to a goal cell of t.

    Every other action moves to a random cell of the same type. A policy that reads the current and the
    target type from the observation solves any task in one step; a random masked policy needs luck
    (one right action of ~2R).
    """
    m = random_model(n_cells=n_cells, n_genes=n_genes, n_types=n_types, n_regulators=n_regulators, seed=seed)
    rng = np.random.default_rng(seed + 1)
    geo = TaskGeometry.from_model(m)
    ids = geo.type_ids
    A = m.n_actions
    members = [np.flatnonzero(ids == t) for t in range(n_types)]
    goals = [np.flatnonzero(geo.goal_mask[t]) for t in range(n_types)]
    table = np.empty((m.n_cells, A), np.int64)
    for s in range(n_types):
        route = rng.permutation(A)[: n_types]          # route[t] = the action from s that reaches t
        cells = members[s]
        for a in range(A):
            hit = np.flatnonzero(route == a)
            t = int(hit[0]) if len(hit) and hit[0] != s else s
            pool = goals[t] if t != s else members[s]
            table[cells, a] = rng.choice(pool, len(cells))
    same = table == np.arange(m.n_cells)[:, None]
    table[same] = (table[same] + 1) % m.n_cells          # rare self-loop: step to a neighbour index
    return m, table.astype(np.int32)
