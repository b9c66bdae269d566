"""Search baselines over persistent perturbation sets: greedy, beam and exact (ground truth), plus rollouts.

All of them walk the same state space as :mod:`cellrl.persistent.env` (state = (cell, applied set); an action
adds one gene, KO or OE, never one already in the set and at most ``max_set_size`` in all, or HOLDs the set; the
engine simulates the whole set from the current cell; moves from :func:`cellrl.persistent.env.successors`) and
use its goal test (:meth:`cellrl.tasks.TaskGeometry.is_goal`). Every expansion sends all candidate (state,
action) pairs of a depth through the engine in batched calls. No search visits a state twice.

* :func:`greedy`: each step the allowed action whose next cell is most cosine-similar to the target centroid
  (the one-step gain, as :func:`cellrl.evaluate.greedy_chooser` on the table), until the goal or ``max_steps``;
* :func:`beam`: beam search of width ``width`` per task, states scored by cosine similarity to the target,
  duplicates (same cell and set) merged;
* :func:`exact`: breadth-first search over (cell, set) states with sets of up to ``max_genes`` genes from every
  start cell, for all of its targets at once, up to ``max_steps`` steps. (cell, set) is the whole state, so
  merging equal states keeps it exact: a task is solved iff some plan (genes added in some order, HOLDs in
  between) with a set of <= ``max_genes`` genes reaches the goal within ``max_steps``, and the plan found is a
  shortest one; ``tie_break`` (``env.plan_tie_break``) picks among the shortest: ``similarity``, the most
  target-similar final cell; ``hub``, the plan with the strongest master-regulator pull (:func:`hub_scores`),
  then the most target-similar;
* :func:`rollout`: a policy (e.g. a MaskablePPO agent) through the evaluation env.

Each returns a :class:`SearchResult`: per task the plan (ordered actions), the cells after each step and
whether it reached the goal. No plan repeats a gene (the engine's action mask).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..env import PLAN_TIE_BREAKS, EnvParams
from ..errors import InputError
from ..tasks import TaskGeometry
from ..xp import to_numpy
from .env import Engine, VecPersistentEnv, successors


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
    #: :func:`exact` with ``all_optimal``: per task, per step of its plan, every action that starts some
    #: shortest completion from the state there (sorted; the plan's own action among them); else None.
    optimal: list[list[list[int]]] | None = None
    #: with ``all_optimal`` and ``max_plans`` > 1: per task, up to ``max_plans`` - 1 other shortest plans, each
    #: (actions, optimal actions per step); else None.
    others: list[list[tuple[list[int], list[list[int]]]]] | None = None

    @property
    def lengths(self) -> np.ndarray:
        """(N,) plan lengths (steps, HOLD included)."""
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


def _first_per_group(group: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Index of the first row of each group after sorting by ``keys`` (first key most significant)."""
    order = np.lexsort(tuple(reversed(keys)) + (group,))
    g = group[order]
    return order[np.r_[True, g[1:] != g[:-1]]] if len(g) else order


def _keys(task: np.ndarray, cell: np.ndarray, applied: np.ndarray, n_cells: int) -> np.ndarray:
    """One key per state (task, cell, applied set): an int64 code (2 bits per regulator) when it fits in 63
    bits, else an opaque row of bytes. Keys of one search are always of one kind (fixed sizes)."""
    task = np.asarray(task, np.int64)
    cell = np.asarray(cell, np.int64)
    R = applied.shape[1]
    cell_bits = max(1, int(n_cells - 1).bit_length())
    if 2 * R + cell_bits + 24 <= 63:              # up to 2^24 tasks
        code = np.zeros(len(cell), np.int64)
        for r in range(R):
            code |= applied[:, r].astype(np.int64) << (2 * r)
        return (task << (2 * R + cell_bits)) | (cell << (2 * R)) | code
    key = np.ascontiguousarray(np.column_stack([task, cell, np.asarray(applied, np.int64)]))
    return key.view(np.dtype((np.void, key.dtype.itemsize * key.shape[1]))).ravel()


def _new_states(keys: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Index of one row per distinct key of ``keys`` that is not in ``seen`` (sorted)."""
    first = np.sort(np.unique(keys, return_index=True)[1])
    return first[~np.isin(keys[first], seen)] if len(seen) else first


# ---------------------------------------------------------------------------------------------- greedy
def greedy(engine: Engine, geo: TaskGeometry, starts: np.ndarray, targets: np.ndarray, max_steps: int,
           max_set_size: int = 3) -> SearchResult:
    """Greedy one-step look-ahead (module docstring) over unvisited states; ties go to the lower action."""
    t0 = time.perf_counter()
    starts, targets = _tasks(geo, starts, targets)
    n = len(starts)
    cell = starts.copy()
    applied = np.zeros((n, engine.n_regulators), np.int8)
    plans: list[list[int]] = [[] for _ in range(n)]
    cells: list[list[int]] = [[] for _ in range(n)]
    success = np.zeros(n, bool)
    active = np.ones(n, bool)
    seen = _keys(np.arange(n), cell, applied, geo.n_cells)
    rows = 0
    for _ in range(int(max_steps)):
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        p, a, new, nxt = successors(engine, cell[idx], applied[idx], max_set_size)
        rows += len(p)
        k = _keys(idx[p], nxt, new, geo.n_cells)
        fresh = ~np.isin(k, seen)
        p, a, new, nxt, k = p[fresh], a[fresh], new[fresh], nxt[fresh], k[fresh]
        has = np.zeros(len(idx), bool)
        has[p] = True
        active[idx[~has]] = False                  # no move left (a dead end)
        if not len(p):
            break
        score = geo.cos_sim[nxt, targets[idx[p]]]
        best = _first_per_group(p, -score, a)
        r = idx[p[best]]
        cell[r] = nxt[best]
        applied[r] = new[best]
        seen = np.concatenate([seen, k[best]])
        for i, ai, ci in zip(r.tolist(), a[best].tolist(), nxt[best].tolist()):
            plans[i].append(ai)
            cells[i].append(ci)
        reached = geo.is_goal(cell[r], targets[r])
        success[r[reached]] = True
        active[r[reached]] = False
    return SearchResult("greedy", starts, targets, success, plans, cells, cell, rows, time.perf_counter() - t0,
                        {"max_set_size": int(max_set_size)})


# ---------------------------------------------------------------------------------------------- beam
def beam(engine: Engine, geo: TaskGeometry, starts: np.ndarray, targets: np.ndarray, width: int,
         max_steps: int, max_set_size: int = 3) -> SearchResult:
    """Beam search: per task keep the ``width`` unvisited states most cosine-similar to the target; stop at the
    first depth where a state reaches the goal (its most target-similar goal state). An unsolved task's plan
    leads to the most target-similar state seen."""
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
    seen = _keys(task, cell, applied, geo.n_cells)
    success = np.zeros(n, bool)
    plans: list[list[int]] = [[] for _ in range(n)]
    cells: list[list[int]] = [[] for _ in range(n)]
    final = starts.copy()
    best_score = geo.cos_sim[starts, targets].astype(np.float64)
    rows = 0
    for _ in range(int(max_steps)):
        if not len(task):
            break
        p, a, new, nxt = successors(engine, cell, applied, max_set_size)
        rows += len(p)
        t = task[p]
        k = _keys(t, nxt, new, geo.n_cells)
        keep = _new_states(k, seen)
        p, a, new, nxt, t, k = p[keep], a[keep], new[keep], nxt[keep], t[keep], k[keep]
        if not len(p):
            break
        score = geo.cos_sim[nxt, targets[t]].astype(np.float64)
        plan_c = np.column_stack([plan[p], a])
        path_c = np.column_stack([path[p], nxt])
        hit = np.flatnonzero(geo.is_goal(nxt, targets[t]))
        if len(hit):
            for j in hit[_first_per_group(t[hit], -score[hit])].tolist():
                i = int(t[j])
                success[i] = True
                plans[i], cells[i], final[i] = plan_c[j].tolist(), path_c[j].tolist(), int(nxt[j])
        for j in _first_per_group(t, -score).tolist():    # fallback plan: the best state seen (unsolved tasks)
            i = int(t[j])
            if not success[i] and score[j] > best_score[i]:
                best_score[i] = score[j]
                plans[i], cells[i], final[i] = plan_c[j].tolist(), path_c[j].tolist(), int(nxt[j])
        live = np.flatnonzero(~success[t])
        order = live[np.lexsort((a[live], -score[live], t[live]))]
        tg = t[order]
        first = np.r_[0, np.flatnonzero(tg[1:] != tg[:-1]) + 1] if len(tg) else np.zeros(0, np.int64)
        rank = np.arange(len(tg)) - np.repeat(first, np.diff(np.r_[first, len(tg)]))
        sel = order[rank < int(width)]
        seen = np.concatenate([seen, k[sel]])
        task, cell, applied, plan, path = t[sel], nxt[sel], new[sel], plan_c[sel], path_c[sel]
    return SearchResult(f"beam{int(width)}", starts, targets, success, plans, cells, final, rows,
                        time.perf_counter() - t0, {"width": int(width), "max_set_size": int(max_set_size)})


# ---------------------------------------------------------------------------------------------- exact
def regulator_reach(engine: Engine) -> np.ndarray:
    """(R,) regulatory reach of each regulator in the fitted GRN: its summed |coefficient| onto all genes over
    every cluster's network (the engine's stacked ``W_all``, rows cluster-major)."""
    W = engine.W_all
    W = W.get() if hasattr(W, "get") else W                 # cupy sparse -> scipy
    return np.asarray(abs(W).sum(1), np.float64).ravel().reshape(-1, engine.n_regulators).sum(0)


def hub_scores(engine: Engine, geo: TaskGeometry, plans: np.ndarray, cells: np.ndarray,
               targets: np.ndarray, reach: np.ndarray | None = None) -> np.ndarray:
    """(H, d) master-regulator pull of plans (H, d) (actions) from start ``cells`` to ``targets``, per plan
    sorted strongest first (compare rows lexicographically: the plan whose strongest action pulls hardest, then
    its second, ...). An action's pull: reach(r) x how much closer it brings regulator r to its level in the
    target, |x_cell - x_target| - |x_action - x_target| (x_action: the KO/OE value; expression units, target = its
    centroid; 0 when it does not get closer, e.g. an OE far past the target's level; HOLD 0).
    Reach x expression change is the action's direct (first-hop) push on its targets, as Mogrify-style rankings
    weigh differential expression by network influence: masters of the target (or start) type score highest.
    Reads the :class:`~cellrl.persistent.engine.PersistentEngine` arrays ``W_all``, ``regulator_idx``, ``XR``,
    ``values``, ``action_code`` and ``action_regulator`` (``reach``: :func:`regulator_reach`, when already known)."""
    plans = np.asarray(plans, np.int64).reshape(len(cells), -1)
    if not plans.size:
        return np.zeros(plans.shape)
    reach = regulator_reach(engine) if reach is None else reach
    ridx = np.asarray(engine.regulator_idx)
    level = geo.centroids[:, ridx] * geo.std[ridx] + geo.mean[ridx]          # (T, R) target levels
    gene = plans < engine.n_actions
    a = np.where(gene, plans, 0)
    r = np.asarray(engine.action_regulator)[a]
    goal = level[np.asarray(targets)[:, None], r]
    now = to_numpy(engine.XR)[np.asarray(cells)[:, None], r]
    after = to_numpy(engine.values)[np.asarray(engine.action_code)[a], r]   # values: (3, R) none, KO, OE level
    pull = np.abs(now - goal) - np.abs(after - goal)
    return -np.sort(-np.where(gene, reach[r] * np.maximum(pull, 0.0), 0.0), axis=1)


def exact(engine: Engine, geo: TaskGeometry, starts: np.ndarray, targets: np.ndarray, max_genes: int = 3,
          max_steps: int = 20, proxy: np.ndarray | None = None,
          start_applied: np.ndarray | None = None, all_optimal: bool = False, max_plans: int = 1,
          tie_break: str = "similarity") -> SearchResult:
    """Exact breadth-first search over (cell, set) states, sets of up to ``max_genes`` genes, up to
    ``max_steps`` steps (module docstring). Unsolved tasks get an empty plan. ``info``: new states per depth.
    ``proxy``: (C,) int64, the cell a move that lands on c enters instead (identity when None; the warm start
    passes :func:`~cellrl.persistent.env.training_proxy`, so its plans never touch a held-out cell).
    ``start_applied``: (N, R) int8 sets already applied at the starts (empty when None; the plan then adds at
    most ``max_genes`` genes in all, those included).
    ``all_optimal``: also keep, per depth, every edge into a state new at that depth (:func:`_shortest_dag`)
    and fill ``optimal`` and (``max_plans`` > 1) ``others`` (:func:`_optimal_actions`); plans, success and the
    other outputs are unchanged. ``tie_break``: which shortest plan (:data:`cellrl.env.PLAN_TIE_BREAKS`, module
    docstring); the others (``others``) stay in depth-first order."""
    if tie_break not in PLAN_TIE_BREAKS:
        raise InputError(f"plan tie-break must be one of {PLAN_TIE_BREAKS}, got {tie_break!r}",
                         field="env.plan_tie_break")
    reach = regulator_reach(engine) if tie_break == "hub" else None  # once per search, not per depth
    t0 = time.perf_counter()
    starts, targets = _tasks(geo, starts, targets)
    n = len(starts)
    ap0 = (np.zeros((n, engine.n_regulators), np.int8) if start_applied is None
           else np.asarray(start_applied, np.int8).reshape(n, engine.n_regulators))
    _, first, sid_of_task = np.unique(_keys(np.zeros(n, np.int64), starts, ap0, geo.n_cells), return_index=True,
                                      return_inverse=True)
    sid_of_task = sid_of_task.reshape(-1)
    ustart = starts[first]
    T = geo.n_types
    need = np.zeros((len(ustart), T), bool)                 # (start, target) still to solve
    need[sid_of_task, targets] = True
    sid = np.arange(len(ustart))
    cell = ustart.copy()
    applied = ap0[first].copy()
    plan = np.zeros((len(ustart), 0), np.int64)
    path = np.zeros((len(ustart), 0), np.int64)
    seen = _keys(sid, cell, applied, geo.n_cells)
    found: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    rows = 0
    states = []
    depth_found = np.full((len(ustart), T), -1, np.int64)    # depth of the shortest plan per (start, target)
    dag: list[tuple[np.ndarray, ...]] = []                 # all_optimal: per depth (sid, cell, edges)
    live_prev = np.arange(len(ustart))                      # all_optimal: expanded states -> index at their depth
    for d in range(1, int(max_steps) + 1):
        states.append(int(len(sid)))
        if not len(sid):
            break
        p, a, new, nxt = successors(engine, cell, applied, max_genes)
        rows += len(p)
        if proxy is not None:
            nxt = np.asarray(proxy, np.int64)[nxt]
        s = sid[p]
        k = _keys(s, nxt, new, geo.n_cells)
        keep = _new_states(k, seen)
        if all_optimal:
            dag.append(_shortest_dag(k, seen, keep, live_prev[p], a, s[keep], nxt[keep]))
        p, a, new, nxt, s, k = p[keep], a[keep], new[keep], nxt[keep], s[keep], k[keep]
        hit = geo.goal_mask[:, nxt].T & need[s]               # (M, T)
        if hit.any():
            m, tt = np.nonzero(hit)
            keys = (-geo.cos_sim[nxt[m], tt], m)
            if tie_break == "hub":
                hub = hub_scores(engine, geo, np.column_stack([plan[p[m]], a[m]]), ustart[s[m]], tt, reach)
                keys = tuple(-hub.T) + keys
            for j in _first_per_group(s[m] * T + tt, *keys).tolist():
                q = int(m[j])
                found[(int(s[q]), int(tt[j]))] = (np.r_[plan[p[q]], a[q]].astype(int).tolist(),
                                                 np.r_[path[p[q]], nxt[q]].astype(int).tolist())
                need[s[q], tt[j]] = False
                depth_found[s[q], tt[j]] = d
        live = np.flatnonzero(need[s].any(1))               # drop states of fully solved starts
        live_prev = live
        seen = np.concatenate([seen, k])
        plan = np.column_stack([plan[p[live]], a[live]])
        path = np.column_stack([path[p[live]], nxt[live]])
        sid, cell, applied = s[live], nxt[live], new[live]
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
    optimal, others = (_optimal_actions(dag, depth_found, geo.goal_mask, sid_of_task, targets, plans, success,
                                        max_plans) if all_optimal else (None, None))
    return SearchResult("exact", starts, targets, success, plans, cells, final, rows, time.perf_counter() - t0,
                        {"max_genes": int(max_genes), "max_steps": int(max_steps), "states_per_depth": states},
                        optimal, others if int(max_plans) > 1 else None)


def _shortest_dag(k: np.ndarray, seen: np.ndarray, keep: np.ndarray, parent: np.ndarray, action: np.ndarray,
                  sid: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, ...]:
    """One depth of the shortest-plan graph: the depth's new states (``sid``, ``cell``: those of ``keep``) and
    EVERY edge into one of them (duplicates within the depth included, so no shortest plan is lost) as
    (parent index at the previous depth, action, child index among the new states). ``k``: keys of all moves
    of the depth, ``parent``: their parents' indices at the previous depth."""
    fresh = np.flatnonzero(~np.isin(k, seen)) if len(seen) else np.arange(len(k))
    _, first, inv = np.unique(k[fresh], return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))   # keep lists first occurrences in order
    assert np.array_equal(fresh[np.sort(first)], keep)
    return (sid, cell, parent[fresh].astype(np.int64), action[fresh].astype(np.int64),
            rank[np.asarray(inv).reshape(-1)])


def _optimal_actions(dag: list[tuple[np.ndarray, ...]], depth_found: np.ndarray, goal_mask: np.ndarray,
                     sid_of_task: np.ndarray, targets: np.ndarray, plans: list[list[int]], success: np.ndarray,
                     max_plans: int = 1) -> tuple[list[list[list[int]]], list[list[tuple[list[int], list[list[int]]]]]]:
    """Backward pass over :func:`_shortest_dag`'s depths: a state at depth d is on a shortest plan to type t
    iff it is a goal of t at t's shortest depth from its start, or an edge leads from it to such a state at
    d + 1; the optimal actions of a state are the actions of those edges. Returns per task (1) per plan step
    (the state before the step) the sorted optimal actions and (2) up to ``max_plans`` - 1 OTHER shortest
    plans, each with its optimal actions per step (depth-first, lower actions first)."""
    D = len(dag)
    useful: list[np.ndarray] = [np.zeros(0)] * (D + 1)     # useful[d] (states at depth d, T), d >= 1
    for d in range(D, 0, -1):
        sid, cell = dag[d - 1][0], dag[d - 1][1]
        u = goal_mask[:, cell].T & (depth_found[sid] == d)
        if d < D:
            _, _, par, _, child = dag[d]
            e, t = np.nonzero(useful[d + 1][child])
            u[par[e], t] = True
        useful[d] = u
    index = []                                             # per depth: edges sorted by (parent, action)
    for d in range(D):
        _, _, par, act, child = dag[d]
        order = np.lexsort((act, par))
        index.append((par[order], act[order], child[order]))

    def moves(d: int, node: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(optimal actions, their children) of state ``node`` at depth d for target t (sorted by action)."""
        ps, acts, ch = index[d]
        lo, hi = np.searchsorted(ps, node, "left"), np.searchsorted(ps, node, "right")
        good = useful[d + 1][ch[lo:hi], t]
        return acts[lo:hi][good], ch[lo:hi][good]

    optimal: list[list[list[int]]] = [[] for _ in range(len(plans))]
    others: list[list[tuple[list[int], list[list[int]]]]] = [[] for _ in range(len(plans))]
    for i in np.flatnonzero(success).tolist():
        t, node = int(targets[i]), int(sid_of_task[i])
        for d, a in enumerate(plans[i]):                   # the plan's own states
            acts, ch = moves(d, node, t)
            optimal[i].append(acts.tolist())
            node = int(ch[acts == a][0])
        stack = [(int(sid_of_task[i]), [], [])]            # depth-first over the other shortest plans
        while stack and len(others[i]) < int(max_plans) - 1:
            node, plan, opt = stack.pop()
            if len(plan) == len(plans[i]):
                if plan != plans[i]:
                    others[i].append((plan, opt))
                continue
            acts, ch = moves(len(plan), node, t)
            labels = opt + [acts.tolist()]
            stack.extend((int(c), plan + [int(a)], labels) for a, c in zip(acts[::-1], ch[::-1]))
    return optimal, others


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
