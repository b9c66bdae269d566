"""Exact shortest perturbation paths on the transition graph (the benchmark the agent is judged against).

The transition table ``table[c, a]`` (cells x actions, int32) is a deterministic graph: cell ``c`` --action
``a``--> cell ``table[c, a]``. An ``allowed`` mask (cells x actions, bool) removes edges, exactly as the test
episodes mask them (self-transitions; see :func:`cellrl.tasks.allowed_mask`). For one target cell type the
goal set is every cell that counts as "arrived" (:class:`cellrl.tasks.TaskGeometry` ``goal_mask``).

For each target type we run ONE multi-source BFS backwards from all its goal cells over the reversed graph
(a CSR of reverse edges built once for all targets). Every edge is touched once per target, so a target costs
O(cells x actions) and all targets O(cells x actions x types). The result per (cell, target):

* ``dist``: the minimum number of perturbations from the cell to any goal cell (0 on goal cells, -1 when no
  sequence of allowed actions reaches the target);
* ``next_action``: the smallest action index that moves one step closer (-1 on goal or unreachable cells).
  Following ``next_action`` from any cell reconstructs one optimal sequence; the tie-break makes it
  deterministic.

``bfs_file`` writes ``benchmark/bfs.parquet``: one row per (test cell, target type other than its own).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .errors import InputError
from .io import RECORDED_SHA256, rerun_fix, sha256_file, verify_artifact, write_json
from .tasks import check_table, load_table

log = logging.getLogger(__name__)

UNREACHABLE = -1
BFS_COLUMNS = ("cell", "cell_name", "start_type", "target_type", "target_id", "length", "reachable",
               "within_max_steps", "actions", "cells", "plan")  # benchmark/bfs.parquet


@dataclass(frozen=True)
class ReverseGraph:
    """Reverse edges of the masked transition graph in CSR form.

    For destination cell ``v`` the predecessors are ``src[indptr[v]:indptr[v + 1]]`` (reached from them by the
    actions ``act[...]``).
    """

    indptr: np.ndarray  # (cells + 1,) int64
    src: np.ndarray  # (edges,) int32 predecessor cell
    act: np.ndarray  # (edges,) int32 action taken at the predecessor
    n_cells: int


def self_transition_mask(table: np.ndarray) -> np.ndarray:
    """cells x actions bool: the test-time mask (the action moves the cell; -1 "no transition" excluded).

    The same rule the environment applies: :func:`cellrl.tasks.allowed_mask` with ``training=False``.
    """
    from .tasks import allowed_mask

    return np.asarray(allowed_mask(table, None, training=False), dtype=bool)


def reverse_graph(table: np.ndarray, allowed: np.ndarray | None = None) -> ReverseGraph:
    """Build the reverse CSR of the allowed edges of ``table`` (default: all edges except self-loops)."""
    table = np.asarray(table)
    if allowed is None:
        allowed = self_transition_mask(table)
    check_table(table, allowed)
    n, n_act = table.shape
    allowed = allowed & (table >= 0)  # -1 means "no transition": never an edge
    cell_idx, act_idx = np.nonzero(allowed)  # row-major: sorted by source cell, then action
    dst = table[cell_idx, act_idx].astype(np.int64)
    order = np.argsort(dst, kind="stable")
    counts = np.bincount(dst, minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return ReverseGraph(indptr=indptr, src=cell_idx[order].astype(np.int32), act=act_idx[order].astype(np.int32),
                        n_cells=n)


def _gather(indptr: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Edge positions of the CSR rows ``nodes``, concatenated (vectorised ranges)."""
    starts = indptr[nodes]
    lens = indptr[nodes + 1] - starts
    total = int(lens.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    ends = np.cumsum(lens)
    # position k of row i maps to starts[i] + (k - (ends[i] - lens[i]))
    offsets = np.repeat(starts - (ends - lens), lens)
    return offsets + np.arange(total, dtype=np.int64)


def distances_to(rev: ReverseGraph, goal: np.ndarray) -> np.ndarray:
    """Multi-source reverse BFS: steps from every cell to the nearest goal cell (-1: unreachable).

    ``goal`` is a bool mask (cells,) or an index array of goal cells.
    """
    n = rev.n_cells
    goal = np.asarray(goal)
    frontier = np.flatnonzero(goal) if goal.dtype == bool else np.unique(goal.astype(np.int64))
    dist = np.full(n, UNREACHABLE, dtype=np.int32)
    dist[frontier] = 0
    d = 0
    while frontier.size:
        cand = rev.src[_gather(rev.indptr, frontier)]
        cand = cand[dist[cand] == UNREACHABLE]
        if cand.size == 0:
            break
        d += 1
        fresh = np.zeros(n, dtype=bool)  # dedupe in O(cells + candidates), cheaper than a sort
        fresh[cand] = True
        frontier = np.flatnonzero(fresh)
        dist[frontier] = d
    return dist


def next_actions(table: np.ndarray, allowed: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """For each cell, the smallest allowed action whose next cell is one step closer (-1 if none / at goal)."""
    nd = dist[np.clip(table, 0, None)]  # (cells, actions) distance after each action (-1 entries: not allowed)
    ok = allowed & (table >= 0) & (nd >= 0) & (nd == (dist[:, None] - 1)) & (dist[:, None] > 0)
    nxt = np.where(ok.any(1), ok.argmax(1), UNREACHABLE).astype(np.int32)
    return nxt


@dataclass
class BfsResult:
    """Shortest-path tables for all target types: ``dist`` and ``next_action`` are (cells, types) int32."""

    dist: np.ndarray
    next_action: np.ndarray

    def path(self, table: np.ndarray, start: int, target: int) -> tuple[list[int], list[int]]:
        """One optimal sequence from ``start`` to ``target``: (actions, cells visited after each action).

        Empty lists when the start is already a goal cell; raises ValueError when unreachable.
        """
        return reconstruct(table, self.next_action[:, target], self.dist[:, target], start)


def reconstruct(table: np.ndarray, next_action: np.ndarray, dist: np.ndarray, start: int) -> tuple[list[int], list[int]]:
    """Follow ``next_action`` from ``start`` until the goal; returns (actions, cells after each action)."""
    if dist[start] < 0:
        raise ValueError(f"cell {start} cannot reach the target")
    actions: list[int] = []
    cells: list[int] = []
    c = int(start)
    for _ in range(int(dist[start])):
        a = int(next_action[c])
        c = int(table[c, a])
        actions.append(a)
        cells.append(c)
    return actions, cells


def shortest_paths(table: np.ndarray, goal_mask: np.ndarray, allowed: np.ndarray | None = None) -> BfsResult:
    """All-cells x all-targets shortest paths.

    Parameters
    ----------
    table : (cells, actions) int next-cell index.
    goal_mask : (types, cells) bool, goal cells of each target type.
    allowed : (cells, actions) bool edge mask; default: every action except self-transitions.
    """
    table = np.asarray(table)
    if allowed is None:
        allowed = self_transition_mask(table)
    allowed = np.asarray(allowed, dtype=bool)
    goal_mask = np.atleast_2d(np.asarray(goal_mask, dtype=bool))
    if goal_mask.shape[1] != table.shape[0]:
        raise InputError(f"goal mask covers {goal_mask.shape[1]} cells, table {table.shape[0]}",
                         fix="the table and model.npz must come from the same run")
    rev = reverse_graph(table, allowed)
    n_types = goal_mask.shape[0]
    dist = np.empty((table.shape[0], n_types), dtype=np.int32)
    nxt = np.empty_like(dist)
    for t in range(n_types):
        dist[:, t] = distances_to(rev, goal_mask[t])
        nxt[:, t] = next_actions(table, allowed, dist[:, t])
    return BfsResult(dist=dist, next_action=nxt)


def action_labels(regulators: np.ndarray) -> list[str]:
    """Human labels of the 2R actions: ``KO:Gene`` for 0..R-1, ``OE:Gene`` for R..2R-1."""
    regs = [str(r) for r in regulators]
    return [f"KO:{g}" for g in regs] + [f"OE:{g}" for g in regs]


def bfs_table(model: Any, table: np.ndarray, geometry: Any, allowed: np.ndarray,
              cells: np.ndarray | None = None, max_steps: int | None = None) -> tuple[pd.DataFrame, BfsResult]:
    """Long table of optimal paths for ``cells`` (default: test cells) x every other target type."""
    res = shortest_paths(table, geometry.goal_mask, allowed)
    if cells is None:
        cells = np.flatnonzero(model.split_mask("test"))
    labels = action_labels(model.regulators)
    type_names = [str(t) for t in geometry.type_names]
    type_ids = np.asarray(geometry.type_ids)
    rows = []
    for c in np.asarray(cells, dtype=np.int64):
        for t, tname in enumerate(type_names):
            if type_ids[c] == t:
                continue
            d = int(res.dist[c, t])
            acts, visited = res.path(table, c, t) if d >= 0 else ([], [])
            rows.append(dict(cell=int(c), cell_name=str(model.cell_names[c]), start_type=type_names[type_ids[c]],
                             target_type=tname, target_id=t, length=d, reachable=d >= 0,
                             within_max_steps=(d >= 0) and (max_steps is None or d <= max_steps),
                             actions=acts, cells=visited, plan=" > ".join(labels[a] for a in acts)))
    df = pd.DataFrame(rows, columns=list(BFS_COLUMNS))
    return df, res


def read_bfs_table(path: str | Path) -> pd.DataFrame:
    """Read ``benchmark/bfs.parquet``; InputError naming the file and the rule to rerun when it is missing,
    altered since the bfs rule wrote it (``bfs_stats.json``'s sha256), unreadable or not a BFS table."""
    path = Path(path)
    rerun = rerun_fix(path, "bfs")
    if not path.exists():
        raise InputError("BFS table not found", path=path, fix=f"run the bfs rule: snakemake {path}")
    verify_artifact(path, "bfs")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # truncated / not parquet (pyarrow raises its own error types)
        raise InputError(f"cannot read the BFS table ({type(e).__name__}: {e})", path=path, fix=rerun) from e
    missing = [c for c in BFS_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"not a BFS table: columns {missing} missing", path=path, fix=rerun)
    return df


def eval_allowed_mask(model: Any, table: np.ndarray) -> np.ndarray:
    """The mask the test episodes see (one source of truth: :func:`cellrl.tasks.allowed_mask`)."""
    from .tasks import allowed_mask

    return np.asarray(allowed_mask(table, model.split, training=False), dtype=bool)


def bfs_file(model_path: str | Path, table_path: str | Path, out_path: str | Path,
             env: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Rule ``bfs``: write ``benchmark/bfs.parquet`` (test cells x other target types; see module docstring)."""
    import time

    from .env import EnvParams
    from .io import write_table
    from .model import load_model
    from .tasks import TaskGeometry

    model = load_model(model_path)
    table = load_table(table_path, model.n_cells, model.n_actions)
    params = EnvParams.from_config(env)
    geometry = TaskGeometry.from_model(model, params.goal_percentile, params.centroid_percentile)
    allowed = eval_allowed_mask(model, table)
    t0 = time.perf_counter()
    max_steps = params.eval_max_steps(geometry.n_types)  # the test episodes' step limit
    df, res = bfs_table(model, table, geometry, allowed, max_steps=max_steps)
    log.info("BFS over %d cells x %d actions, %d target types: %.2f s", table.shape[0], table.shape[1],
             res.dist.shape[1], time.perf_counter() - t0)
    if len(df):
        log.info("test pairs: %d, reachable %.1f%%, mean optimal length %.2f", len(df), 100 * df.reachable.mean(),
                 df.length[df.reachable].mean() if df.reachable.any() else float("nan"))
    write_table(out_path, df, index=False)
    stats_name, field, _ = RECORDED_SHA256["bfs"]
    write_json(Path(out_path).parent / stats_name,
               {field: sha256_file(out_path), "n_pairs": int(len(df)),
                "reachable_frac": float(df.reachable.mean()) if len(df) else None,
                "max_steps": int(max_steps), "seconds": round(time.perf_counter() - t0, 3)})
    return df
