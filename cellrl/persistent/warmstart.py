"""Warm start for the persistent mode: behaviour cloning of exact plans from TRAINING cells, then PPO.

The persistent mode has no transition table to run BFS on, so the table mode's warm start
(:mod:`cellrl.warmstart`) cannot label states. Here the labels come from :func:`cellrl.persistent.search.exact`
(shortest plans over sets of up to ``max_genes`` genes):

1. starts: ``per_type`` training cells of every cell type (evenly spread over each type's training cells, in
   index order; deterministic);
2. plans: exact search from each start to every other cell type on training cells only (``proxy=`` of
   :func:`~cellrl.persistent.search.exact`: a move onto a validation or test cell enters its training proxy,
   :func:`~cellrl.persistent.env.training_proxy`, as in the training env, so no goal, label or path involves
   a held-out cell);
3. samples: each plan is replayed in the TRAINING environment (:class:`~cellrl.persistent.env.PersistentBatch`,
   ``training=True``, no curriculum, evaluation step limit), and every state on it becomes a sample with the
   observation the env gives there (cell, target, applied set, action mask), the plan's action as its label
   and the discounted return of the rest of the plan (the env's own rewards) as its value target. A plan whose
   action the training env masks (none expected) is dropped whole;
4. fit: :func:`cellrl.warmstart.behaviour_clone` (masked cross-entropy of the label under MaskablePPO's masked
   distribution, value MSE on detached features), unchanged: :class:`~cellrl.warmstart.BcData` carries the
   applied sets.

Labels (``train.warm_start_labels``): ``one``, the action of the one plan exact search keeps (among the
shortest: the one ``env.plan_tie_break`` picks, so the agent inherits it); ``all``, every action that starts SOME shortest completion from
the state (:func:`~cellrl.persistent.search.exact` with ``all_optimal``: a backward pass over every edge into a
state new at its depth), cloned with the set's cross-entropy ``-log sum_{a optimal} pi(a|s)``
(:func:`cellrl.warmstart.behaviour_clone` already takes a set per row); ``all_plans``, ``all`` on the states of up
to :data:`MAX_PLANS` shortest plans per task (the kept plan, then depth-first), each distinct observation once.
Why: cells of one type often have several shortest plans (the genes of one set added in another order) and
``one`` picks one per cell, so the clone sees conflicting labels for near-identical states.

DAgger (``dagger_rounds`` > 0): roll the cloned policy out greedily from the same (training start, target)
tasks in the training env; every visited state the samples lack (cell, target, applied set) is labelled by
exact search FROM that state (:func:`~cellrl.persistent.search.exact` with ``start_applied``; training cells
only, through the proxy; the genes already applied count towards ``max_genes``), with the first action of its
plan (dropped when the env masks it) and the plan's return as value target; aggregate and refit. The rollouts
are environment steps (``env_steps`` in the record).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..env import EpisodeBatch
from ..tasks import TaskGeometry
from ..warmstart import (BC_BATCH_SIZE, BC_EPOCHS, BC_LEARNING_RATE, BC_VALUE_COEF, BcData, behaviour_clone,
                         concat_data)
from .env import Engine, PersistentBatch, applied_obs, hold_action, training_proxy
from .search import SearchResult, exact

#: Training start cells per cell type (default).
STARTS_PER_TYPE = 20
#: Labels per plan state (``train.warm_start_labels``): the plan's action, or every optimal action.
LABELS = ("one", "all", "all_plans")
#: Shortest plans per task whose states ``all_plans`` clones (the plan and up to this many - 1 others).
MAX_PLANS = 32


def training_starts(geo: TaskGeometry, per_type: int) -> np.ndarray:
    """``per_type`` training cells of each cell type, evenly spread over its training cells (index order)."""
    is_train = geo.in_split("train")
    out = []
    for t in range(geo.n_types):
        cells = np.flatnonzero(is_train & (geo.type_ids == t))
        k = min(int(per_type), len(cells))
        if k:
            out.append(cells[np.unique(np.linspace(0, len(cells) - 1, k).round().astype(int))])
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def label_search(labels: str) -> dict[str, Any]:
    """:func:`training_plans` options that the ``labels`` of :func:`plan_samples` need."""
    return {"all_optimal": labels != "one", "max_plans": MAX_PLANS if labels == "all_plans" else 1}


def training_plans(engine: Engine, geo: TaskGeometry, starts: np.ndarray, max_genes: int,
                   max_steps: int, all_optimal: bool = False, max_plans: int = 1,
                   tie_break: str = "similarity") -> SearchResult:
    """Exact plans from each of ``starts`` (training cells) to every other cell type, on training cells only (a
    move onto a held-out cell enters its training proxy, as in the training env; ``all_optimal``: with every
    optimal action per plan state and up to ``max_plans`` - 1 other shortest plans; ``tie_break``: which
    shortest plan, ``env.plan_tie_break``; :func:`~cellrl.persistent.search.exact`)."""
    is_train = geo.in_split("train")
    starts = np.asarray(starts, np.int64)
    if not is_train[starts].all():
        raise ValueError("warm-start plans must start from training cells")
    s = np.repeat(starts, geo.n_types)
    t = np.tile(np.arange(geo.n_types), len(starts))
    keep = geo.type_ids[s] != t
    return exact(engine, geo, s[keep], t[keep], max_genes, max_steps, proxy=training_proxy(geo),
                 all_optimal=all_optimal, max_plans=max_plans, tie_break=tie_break)


def plan_samples(engine: Engine, geo: TaskGeometry, params: Any, plans: SearchResult,
                 gamma: float, labels: str = "one") -> tuple[BcData, dict[str, Any]]:
    """Replay the successful plans in the training env (module docstring): one sample per state. ``labels``:
    ``one``, the plan's action; ``all``, every optimal action there (``plans.optimal``, from
    ``exact(..., all_optimal=True)``) that the env allows; ``all_plans``, as ``all`` on the states of the other
    shortest plans too (``plans.others``, ``max_plans`` > 1), each distinct observation once."""
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    if labels != "one" and (plans.optimal is None or (labels == "all_plans" and plans.others is None)):
        raise ValueError(f"labels={labels!r} needs plans searched with all_optimal=True"
                         + (" and max_plans > 1" if labels == "all_plans" else ""))
    ok = np.flatnonzero(plans.success & (plans.lengths > 0))
    A = hold_action(engine) + 1
    empty = BcData(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, A), bool), np.zeros((0, A), bool),
                   np.zeros(0, np.int32), np.zeros(0, np.float32), 0, len(plans.success), 0.0,
                   applied=np.zeros((0, engine.n_regulators), np.float32))
    if not len(ok):
        return empty, {"plans": 0, "dropped_plans": 0}
    acts = [plans.plans[i] for i in ok]
    opts = [plans.optimal[i] for i in ok] if labels != "one" else None
    n_main = len(ok)
    if labels == "all_plans":                                    # the other shortest plans, after the plans
        other = [(i, p, o) for i in ok.tolist() for p, o in plans.others[i]]
        ok = np.r_[ok, [i for i, _, _ in other]].astype(np.int64)
        acts += [p for _, p, _ in other]
        opts += [o for _, _, o in other]
    starts, targets = plans.starts[ok], plans.targets[ok]
    n = len(ok)
    length = np.array([len(p) for p in acts])
    batch = PersistentBatch(geo, engine, n, params, split="train", training=True, curriculum=False,
                            max_steps=max(int(params.eval_max_steps(geo.n_types)), int(length.max())))
    batch.set_tasks(starts, targets)
    batch.reset_envs(np.arange(n))
    cells, tgts, applied, masks, acted, rewards, owner, step = [], [], [], [], [], [], [], []
    broken = np.zeros(n, bool)
    reached = np.zeros(n, bool)
    for k in range(int(length.max())):
        act = k < length
        a = np.array([acts[i][k] if act[i] else 0 for i in range(n)], np.int64)
        a = np.where(act, a, batch.mask.argmax(1))               # finished envs: any allowed action (ignored)
        broken |= act & ~batch.mask[np.arange(n), a]
        j = np.flatnonzero(act & ~broken)
        cells.append(batch.cell[j].copy())
        tgts.append(batch.target[j].copy())
        applied.append(batch.applied_obs(j))
        masks.append(batch.mask[j].copy())
        acted.append(a[j])
        owner.append(j)
        step.append(np.full(len(j), k))
        reward, success, _, _ = batch.step(a)
        rewards.append(reward[j])
        reached[j[k == length[j] - 1]] = success[j[k == length[j] - 1]]
    broken |= ~reached                                           # a replay must end at the goal, as the plan did
    cell, target, label = np.concatenate(cells), np.concatenate(tgts), np.concatenate(acted)
    own, stp, rew = np.concatenate(owner), np.concatenate(step), np.concatenate(rewards)
    optimal = np.eye(A, dtype=bool)[label]
    m = np.concatenate(masks)
    if opts is not None:                                         # the plan's action stays one of them
        r, c = zip(*[(row, x) for row, (i, k) in enumerate(zip(own.tolist(), stp.tolist()))
                     for x in opts[i][k]]) if len(own) else ((), ())
        optimal[np.asarray(r, np.int64), np.asarray(c, np.int64)] = True
        optimal &= m
    value = np.zeros(len(cell))
    for i in np.flatnonzero(~broken):                            # discounted return of the rest of each plan
        rows = np.flatnonzero(own == i)
        rows = rows[np.argsort(stp[rows])]
        g = 0.0
        for r in rows[::-1]:
            g = rew[r] + gamma * g
            value[r] = g
    ap = np.concatenate(applied)
    keep = ~broken[own]
    if labels == "all_plans":                                    # one sample per distinct observation
        idx = np.flatnonzero(keep)
        key = np.column_stack([cell[idx], target[idx], ap[idx], m[idx]]).astype(np.float32)
        keep = np.zeros(len(cell), bool)
        keep[idx[np.unique(key, axis=0, return_index=True)[1]]] = True
    data = BcData(cell=cell[keep], target=target[keep], optimal=optimal[keep], mask=m[keep],
                  dist=(length[own] - stp)[keep].astype(np.int32), value=value[keep].astype(np.float32),
                  n_pairs=int((~broken[:n_main]).sum()), n_pairs_total=len(plans.success),
                  bfs_seconds=plans.wall_s, applied=ap[keep])
    return data, {"plans": int((~broken[:n_main]).sum()), "dropped_plans": int(broken[:n_main].sum()),
                  "other_plans": int((~broken[n_main:]).sum()), "labels": labels,
                  "labels_per_sample": round(float(data.optimal.sum(1).mean()), 3) if len(data) else None}


def _greedy(agent: Any, geo: TaskGeometry, batch: PersistentBatch, idx: np.ndarray) -> np.ndarray:
    """The agent's deterministic (argmax of the masked distribution) actions in envs ``idx``."""
    obs = {"current_expression": geo.z[batch.cell[idx]], "target_expression": geo.centroids[batch.target[idx]],
           "action_mask": batch.mask[idx].astype(np.float32), "applied": batch.applied_obs(idx)}
    return np.asarray(agent.predict(obs, action_masks=batch.mask[idx], deterministic=True)[0], np.int64)


def dagger_samples(agent: Any, engine: Engine, geo: TaskGeometry, params: Any, data: BcData,
                   starts: np.ndarray, targets: np.ndarray, gamma: float,
                   max_genes: int) -> tuple[BcData, dict[str, Any]]:
    """One DAgger round (module docstring): new samples from the policy's own states and its env steps."""
    n = len(starts)
    max_steps = int(params.eval_max_steps(geo.n_types))
    batch = PersistentBatch(geo, engine, n, params, split="train", training=True, curriculum=False,
                            max_steps=max_steps)
    batch.set_tasks(np.asarray(starts, np.int64), np.asarray(targets, np.int64))
    batch.reset_envs(np.arange(n))
    known = {(int(c), int(t), a.tobytes()) for c, t, a in zip(data.cell, data.target, data.applied)}
    found: dict[tuple, tuple[int, int, np.ndarray, np.ndarray, int]] = {}
    active = batch.mask.any(1)
    steps = 0
    while active.any():
        idx = np.flatnonzero(active)
        obs_ap = batch.applied_obs(idx)
        for j, i in enumerate(idx.tolist()):
            key = (int(batch.cell[i]), int(batch.target[i]), obs_ap[j].tobytes())
            if key not in known and key not in found:
                found[key] = (int(batch.cell[i]), int(batch.target[i]), batch.applied[i].copy(),
                              batch.mask[i].copy(), int(batch.limit[i] - batch.t[i]))
        a = np.zeros(n, np.int64)
        a[idx] = _greedy(agent, geo, batch, idx)
        _, success, truncated, _ = batch.step(a)
        steps += len(idx)
        active &= ~(success | truncated)
    rec = {"env_steps": steps, "visited_new": len(found)}
    A = hold_action(engine) + 1
    if not found:
        return BcData(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, A), bool), np.zeros((0, A), bool),
                      np.zeros(0, np.int32), np.zeros(0, np.float32), 0, 0, 0.0,
                      applied=np.zeros((0, engine.n_regulators), np.float32)), {**rec, "new_samples": 0}
    cell, target, ap, mask, left = (np.array([f[k] for f in found.values()]) for k in range(5))
    res = exact(engine, geo, cell, target, max_genes, int(left.max()), proxy=training_proxy(geo),
                start_applied=ap, tie_break=params.plan_tie_break)
    ok = res.success & (res.lengths > 0) & (res.lengths <= left)
    first = np.array([p[0] if len(p) else 0 for p in res.plans], np.int64)
    ok &= mask[np.arange(len(cell)), first]
    value = np.zeros(len(cell))
    for i in np.flatnonzero(ok):                                  # the plan's return under the env's reward
        path = np.r_[cell[i], res.cells[i]]
        r = EpisodeBatch.reward(params, geo.cos_sim[path[:-1], target[i]], geo.cos_sim[path[1:], target[i]],
                                np.arange(len(path) - 1) == len(path) - 2)
        value[i] = float(np.sum(r * gamma ** np.arange(len(r))))
    k = np.flatnonzero(ok)
    new = BcData(cell=cell[k], target=target[k], optimal=np.eye(A, dtype=bool)[first[k]], mask=mask[k],
                 dist=res.lengths[k].astype(np.int32), value=value[k].astype(np.float32), n_pairs=data.n_pairs,
                 n_pairs_total=data.n_pairs_total, bfs_seconds=res.wall_s, applied=applied_obs(ap[k]))
    return new, {**rec, "new_samples": int(len(k)), "unsolved": int((~res.success).sum()),
                 "exact_seconds": round(res.wall_s, 2)}


def warm_start_persistent(agent: Any, engine: Engine, geo: TaskGeometry, params: Any, gamma: float,
                          per_type: int = STARTS_PER_TYPE, max_genes: int | None = None,
                          epochs: int = BC_EPOCHS, seed: int = 0, dagger_rounds: int = 0,
                          plans: SearchResult | None = None,
                          labels: str = "one") -> tuple[dict[str, Any], BcData, SearchResult]:
    """Exact plans from training cells (``plans``: precomputed ones), their samples (``labels``:
    :func:`plan_samples`), behaviour cloning into ``agent.policy`` and ``dagger_rounds`` DAgger rounds. Returns
    (record, samples, plans)."""
    t0 = time.perf_counter()
    starts = training_starts(geo, per_type)
    max_genes = int(max_genes or params.max_set_size)
    if plans is None:
        plans = training_plans(engine, geo, starts, max_genes, int(params.eval_max_steps(geo.n_types)),
                               **label_search(labels), tie_break=params.plan_tie_break)
    data, rep = plan_samples(engine, geo, params, plans, gamma, labels)
    fit = dict(epochs=epochs, batch_size=BC_BATCH_SIZE, learning_rate=BC_LEARNING_RATE, value_coef=BC_VALUE_COEF)
    rec = behaviour_clone(agent, geo, data, seed=seed, **fit)
    rounds, env_steps = [], 0
    for r in range(int(dagger_rounds)):
        new, info = dagger_samples(agent, engine, geo, params, data, plans.starts, plans.targets, gamma, max_genes)
        data = concat_data(data, new)
        env_steps += info["env_steps"]
        r_rec = behaviour_clone(agent, geo, data, seed=seed + r + 1, **fit)
        rounds.append({"round": r + 1, **info, "samples": len(data), "accuracy": r_rec["accuracy"]})
        rec.update({k: v for k, v in r_rec.items() if k in ("samples", "accuracy", "value_rmse", "loss_per_epoch")})
    return ({"method": "exact", "dagger_rounds": rounds, "start_cells": int(len(starts)),
             "starts_per_type": int(per_type), "max_genes": max_genes, "tasks": int(len(plans.success)),
             "solved": float(plans.success.mean()) if len(plans.success) else None,
             "mean_plan_length": float(plans.lengths[plans.success].mean()) if plans.success.any() else None, "exact_seconds": round(plans.wall_s, 2), **rep, **rec,
             "env_steps": env_steps, "seconds": round(time.perf_counter() - t0, 2)}, data, plans)
