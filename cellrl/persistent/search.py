"""Search baselines over persistent perturbation sets: greedy, beam and exact (ground truth), plus rollouts.

All of them walk the same state space as :mod:`cellrl.persistent.env` (state = (cell, applied set); an action
adds one gene, KO or OE, never one already in the set; the engine simulates the whole set from the current
cell) and use its goal test (:meth:`cellrl.tasks.TaskGeometry.is_goal`). Every expansion sends all candidate
(state, action) pairs of a depth through the engine in one batched call (chunked to bound memory).

* :func:`greedy`: each step the allowed action whose next cell is most cosine-similar to the target centroid
  (the one-step gain, as :func:`cellrl.evaluate.greedy_chooser` on the table), until the goal or ``max_steps``;
* :func:`beam`: beam search of width ``width`` per task, states scored by cosine similarity to the target,
  duplicates (same cell and set) merged;
* :func:`exact`: breadth-first search over ordered sequences of up to ``max_genes`` genes from every start
  cell, for all of its targets at once. (cell, set) is the whole state, so merging equal states keeps it exact:
  a task is solved iff some set of <= ``max_genes`` genes, applied in some order, reaches the goal, and the
  plan found is a shortest one (the most target-similar final cell among the shortest);
* :func:`rollout`: a policy (e.g. a MaskablePPO agent) through the evaluation env.

Each returns a :class:`SearchResult`: per task the plan (ordered actions), the cells after each step and
whether it reached the goal. No plan repeats a gene (the engine's action mask).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..env import EnvParams
from ..errors import InputError
from ..tasks import TaskGeometry
from .env import Engine, VecPersistentEnv

#: Candidate (state, action) rows per engine call.
CHUNK_ROWS = 32_768


@dataclass
class SearchResult:
    """Per task (input order): ``success``, ``plans`` (ordered actions), ``cells`` (cell after each step),
    ``final_cell``; ``engine_rows``: (state, action) pairs simulated; ``wall_s``."""

    method: str
    starts: np.ndarray
    targets: np.ndarray
    success: np.ndarray
    plans: list[list[int]]
    cells: list[list[int]]
    final_cell: np.ndarray
    engine_rows: int = 0
    wall_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) plan lengths (set sizes)."""
        return np.array([len(p) for p in self.plans], np.int64)

    def summary(self) -> dict[str, Any]:
        """Success rate, mean plan length of the successes, engine rows and wall time."""
        ok = self.success
        return {"method": self.method, "n_tasks": int(len(ok)), "success_rate": float(ok.mean()) if len(ok) else None,
                "mean_success_length": float(self.lengths[ok].mean()) if ok.any() else None,
                "engine_rows": int(self.engine_rows), "wall_s": round(self.wall_s, 3), **self.info}


def _tasks(geo: TaskGeometry, starts: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.asarray(starts, np.int64).reshape(-1)
    targets = np.asarray(targets, np.int64).reshape(-1)
    if starts.shape != targets.shape:
        raise InputError("starts and targets must have the same length", field="tasks")
    if len(starts) and (starts.min() < 0 or starts.max() >= geo.n_cells or targets.min() < 0
                        or targets.max() >= geo.n_types):
        raise InputError("start cell or target type out of range", field="tasks")
    return starts, targets


def expand(engine: Engine, cells: np.ndarray, applied: np.ndarray,
           chunk: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every allowed action of every state: (parent state index, action, new applied set, next cell)."""
    p, a = np.nonzero(np.asarray(engine.action_mask(applied), bool))
    new = np.asarray(engine.apply(applied[p], a), np.int8) if len(p) else np.zeros((0, applied.shape[1]), np.int8)
    nxt = np.empty(len(p), np.int64)
    for s in range(0, len(p), chunk):
        e = min(s + chunk, len(p))
        nxt[s:e] = np.asarray(engine.step(cells[p[s:e]], new[s:e]), np.int64)
    return p.astype(np.int64), a.astype(np.int64), new, nxt


def _first_per_group(group: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Index of the first row of each group after sorting by ``keys`` (first key most significant)."""
    order = np.lexsort(tuple(reversed(keys)) + (group,))
    g = group[order]
    return order[np.r_[True, g[1:] != g[:-1]]] if len(g) else order


def _unique_states(*cols: np.ndarray) -> np.ndarray:
    """Index of one row per distinct state (rows = the columns side by side)."""
    key = np.column_stack([np.asarray(c, np.int64).reshape(len(cols[0]), -1) for c in cols])
    return np.sort(np.unique(key, axis=0, return_index=True)[1])


# ---------------------------------------------------------------------------------------------- greedy
def greedy(engine: Engine, geo: TaskGeometry, starts: np.ndarray, targets: np.ndarray,
           max_steps: int) -> SearchResult:
    """Greedy one-step look-ahead (module docstring); ties go to the lower action index."""
    t0 = time.perf_counter()
    starts, targets = _tasks(geo, starts, targets)
    n = len(starts)
    cell = starts.copy()
    applied = np.zeros((n, engine.n_regulators), np.int8)
    plans: list[list[int]] = [[] for _ in range(n)]
    cells: list[list[int]] = [[] for _ in range(n)]
    success = np.zeros(n, bool)
    active = np.ones(n, bool)
    rows = 0
    for _ in range(int(max_steps)):
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        p, a, new, nxt = expand(engine, cell[idx], applied[idx])
        rows += len(p)
        has = np.zeros(len(idx), bool)
        has[p] = True
        active[idx[~has]] = False                  # every gene already in the set
        if not len(p):
            break
        score = geo.cos_sim[nxt, targets[idx[p]]]
        best = _first_per_group(p, -score, a)
        r = idx[p[best]]
        cell[r] = nxt[best]
        applied[r] = new[best]
        for i, ai, ci in zip(r.tolist(), a[best].tolist(), nxt[best].tolist()):
            plans[i].append(ai)
            cells[i].append(ci)
        reached = geo.is_goal(cell[r], targets[r])
        success[r[reached]] = True
        active[r[reached]] = False
    return SearchResult("greedy", starts, targets, success, plans, cells, cell, rows, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- beam
def beam(engine: Engine, geo: TaskGeometry, starts: np.ndarray, targets: np.ndarray, width: int,
         max_steps: int) -> SearchResult:
    """Beam search: per task keep the ``width`` distinct states most cosine-similar to the target; stop at the
    first depth where a state reaches the goal (its most target-similar goal state)."""
    if int(width) < 1:
        raise InputError(f"beam width must be >= 1, got {width}", field="beam_width")
    t0 = time.perf_counter()
    starts, targets = _tasks(geo, starts, targets)
    n = len(starts)
    task = np.arange(n)
    cell = starts.copy()
    applied = np.zeros((n, engine.n_regulators), np.int8)
    plan = np.zeros((n, 0), np.int64)
    path = np.zeros((n, 0), np.int64)
    success = np.zeros(n, bool)
    plans: list[list[int]] = [[] for _ in range(n)]
    cells: list[list[int]] = [[] for _ in range(n)]
    final = starts.copy()
    best_score = geo.cos_sim[starts, targets].astype(np.float64)
    rows = 0
    for _ in range(int(max_steps)):
        if not len(task):
            break
        p, a, new, nxt = expand(engine, cell, applied)
        rows += len(p)
        if not len(p):
            break
        t = task[p]
        score = geo.cos_sim[nxt, targets[t]].astype(np.float64)
        plan_c = np.column_stack([plan[p], a])
        path_c = np.column_stack([path[p], nxt])
        goal = geo.is_goal(nxt, targets[t])
        top = _first_per_group(t, -score)
        hit = np.flatnonzero(goal)
        if len(hit):
            win = hit[_first_per_group(t[hit], -score[hit])]
            for j in win.tolist():
                i = int(t[j])
                success[i] = True
                plans[i], cells[i], final[i] = plan_c[j].tolist(), path_c[j].tolist(), int(nxt[j])
        for j in top.tolist():                     # fallback plan: the best state seen (unsolved tasks)
            i = int(t[j])
            if not success[i] and score[j] > best_score[i]:
                best_score[i] = score[j]
                plans[i], cells[i], final[i] = plan_c[j].tolist(), path_c[j].tolist(), int(nxt[j])
        keep = np.flatnonzero(~success[t])
        keep = keep[_unique_states(t[keep], nxt[keep], new[keep])]
        order = keep[np.lexsort((a[keep], -score[keep], t[keep]))]
        tg = t[order]
        start_of = np.r_[0, np.flatnonzero(tg[1:] != tg[:-1]) + 1] if len(tg) else np.zeros(0, np.int64)
        rank = np.arange(len(tg)) - np.repeat(start_of, np.diff(np.r_[start_of, len(tg)]))
        sel = order[rank < int(width)]
        task, cell, applied, plan, path = t[sel], nxt[sel], new[sel], plan_c[sel], path_c[sel]
    return SearchResult(f"beam{int(width)}", starts, targets, success, plans, cells, final, rows,
                        time.perf_counter() - t0, {"width": int(width)})


# ---------------------------------------------------------------------------------------------- exact
def exact(engine: Engine, geo: TaskGeometry, starts: np.ndarray, targets: np.ndarray,
          max_genes: int = 3) -> SearchResult:
    """Exact breadth-first search over sets of up to ``max_genes`` genes (module docstring). Unsolved tasks get
    an empty plan. ``info``: states expanded per depth."""
    t0 = time.perf_counter()
    starts, targets = _tasks(geo, starts, targets)
    n = len(starts)
    ustart, sid_of_task = np.unique(starts, return_inverse=True)
    T = geo.n_types
    need = np.zeros((len(ustart), T), bool)                 # (start, target) still to solve
    need[sid_of_task, targets] = True
    sid = np.arange(len(ustart))
    cell = ustart.copy()
    applied = np.zeros((len(ustart), engine.n_regulators), np.int8)
    plan = np.zeros((len(ustart), 0), np.int64)
    path = np.zeros((len(ustart), 0), np.int64)
    found: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    rows = 0
    states = []
    for _ in range(int(max_genes)):
        states.append(int(len(sid)))
        if not len(sid):
            break
        p, a, new, nxt = expand(engine, cell, applied)
        rows += len(p)
        if not len(p):
            break
        s = sid[p]
        hit = geo.goal_mask[:, nxt].T & need[s]               # (M, T)
        if hit.any():
            m, tt = np.nonzero(hit)
            score = geo.cos_sim[nxt[m], tt]
            win = _first_per_group(s[m] * T + tt, -score, m)
            for j in win.tolist():
                k = int(m[j])
                found[(int(s[k]), int(tt[j]))] = (np.r_[plan[p[k]], a[k]].astype(int).tolist(),
                                                 np.r_[path[p[k]], nxt[k]].astype(int).tolist())
                need[s[k], tt[j]] = False
        keep = np.flatnonzero(need[s].any(1))               # drop states of fully solved starts
        keep = keep[_unique_states(s[keep], nxt[keep], new[keep])]
        plan = np.column_stack([plan[p[keep]], a[keep]])
        path = np.column_stack([path[p[keep]], nxt[keep]])
        sid, cell, applied = s[keep], nxt[keep], new[keep]
    success = np.zeros(n, bool)
    plans: list[list[int]] = [[] for _ in range(n)]
    cells: list[list[int]] = [[] for _ in range(n)]
    final = starts.copy()
    for i in range(n):
        hitp = found.get((int(sid_of_task[i]), int(targets[i])))
        if hitp is not None:
            success[i] = True
            plans[i], cells[i] = list(hitp[0]), list(hitp[1])
            final[i] = hitp[1][-1]
    return SearchResult("exact", starts, targets, success, plans, cells, final, rows, time.perf_counter() - t0,
                        {"max_genes": int(max_genes), "states_per_depth": states})


# ---------------------------------------------------------------------------------------------- policies
Chooser = Callable[[Mapping[str, np.ndarray], np.ndarray, Any], np.ndarray]


def rollout(geo: TaskGeometry, engine: Engine, env_params: EnvParams | Mapping[str, Any] | None,
            starts: np.ndarray, targets: np.ndarray, choose: Chooser, max_steps: int | None = None,
            method: str = "agent", seed: int = 0) -> SearchResult:
    """One episode per task with ``choose(obs, masks, batch)`` in the persistent evaluation env (test-time
    mask, the final curriculum phase's step limit unless ``max_steps``); e.g.
    :func:`cellrl.evaluate.agent_chooser` for a MaskablePPO agent."""
    t0 = time.perf_counter()
    starts, targets = _tasks(geo, starts, targets)
    n = len(starts)
    env = VecPersistentEnv(geo, engine, n, env_params, split="test", training=False, max_steps=max_steps, seed=seed)
    env.set_tasks(starts, targets)
    obs = env.reset()
    b = env.batch
    success = np.zeros(n, bool)
    final = starts.copy()
    plans: list[list[int]] = [[] for _ in range(n)]
    cells: list[list[int]] = [[] for _ in range(n)]
    active = np.ones(n, bool)
    while active.any():
        masks = env.action_masks().copy()
        a = np.asarray(choose(obs, masks, b), np.int64).reshape(n)
        obs, _, done, infos = env.step(a)
        for i in np.flatnonzero(active).tolist():
            if not infos[i].get("invalid_action"):
                plans[i].append(int(a[i]))
                cells[i].append(int(infos[i]["final_cell"]) if done[i] else int(b.cell[i]))
            if done[i]:
                success[i] = bool(infos[i]["is_success"])
                final[i] = int(infos[i]["final_cell"])
        active &= ~done
    return SearchResult(method, starts, targets, success, plans, cells, final, int(b.total_steps),
                        time.perf_counter() - t0)
