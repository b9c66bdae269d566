"""Warm start from exact shortest paths: behaviour cloning of BFS next hops before PPO (``train.warm_start``).

Before the first PPO update of a fresh run, the agent's policy network is fitted by supervised learning to the
next hops of exact shortest paths, and its value head to the return of those paths; PPO then fine-tunes from
there. Behaviour cloning takes no environment step (with ``bfs`` the budget ``train.total_timesteps`` is all
PPO's; the DAgger rollouts below are paid from it).

Leakage: everything comes from the TRAINING graph only. The BFS (:func:`cellrl.bfs.shortest_paths`) runs on
the table with the training mask (:func:`cellrl.tasks.allowed_mask` with ``training=True``: no move into a
validation or test cell) and, in addition, no edge out of a held-out cell and no held-out goal cell, so no
distance, label or path involves a held-out cell. States are (training cell, target type) pairs whose
training-graph distance is at least 1; their observations are built exactly as
:class:`cellrl.env.VecReprogrammingEnv` builds them at the start of an episode (z-scored expression of the
cell, the target's centroid, the training mask of the cell, which at an episode's start is also the mask with
``env.mask_revisits``), from the :class:`~cellrl.tasks.TaskGeometry` arrays directly.

Labels: every optimal next hop (an allowed action whose next cell is one step closer to the target). The
policy loss is the cross-entropy of the SET of optimal actions under the masked distribution, as MaskablePPO
computes it (masked logits at -1e8): ``-log sum_{a optimal} softmax(masked logits)_a``. The value target is the
discounted return (``train.gamma``) of the shortest path that :func:`cellrl.bfs.next_actions` picks, under the
environment's reward (step penalty, potential shaping, goal bonus); the value head is fitted on the shared
features detached, so it does not pull on what the policy learns. Optimiser: torch's Adam (learning rate
:data:`BC_LEARNING_RATE` decaying linearly to 0 over ``train.warm_start_epochs`` passes, minibatches of
:data:`BC_BATCH_SIZE`), minibatches drawn by a NumPy generator of its own (the global RNGs are left alone), so
the same settings give the same weights. PPO then trains at ``learning_rate x warm_start_ppo_lr_scale``
(:func:`ppo_config`).

DAgger (``train.warm_start: dagger``): after the BC pass, ``train.warm_start_dagger_rounds`` rounds of: roll out
the cloned policy greedily (argmax of the masked distribution, as evaluation acts) from the BC samples'
(training cell, other target type) pairs in the TRAINING environment (:class:`cellrl.env.EpisodeBatch` with the
training mask and the revisit mask, step limit of evaluation); keep every visited state whose observation the
data lacks (a cell whose mask lost moves back into the episode's path, so BC never saw it); label it with the
allowed actions whose next cell is nearest the target on the training graph (:func:`label_states`, the same
function that labels BC: at an episode's start they are exactly the optimal next hops); aggregate and refit for
``train.warm_start_epochs``. Rollouts stay on training cells (the training mask has no move into a held-out
cell) and labels use only the training graph, so DAgger is leakage-safe too. Each round rolls out at most
``train.warm_start_dagger_episodes`` episodes (a seeded subset of the starts). The rollouts are environment
steps, unlike BC: ``env_steps`` in the record, and :func:`cellrl.train.train_agent` takes them out of
``train.total_timesteps`` (PPO trains the rest), so runs compare at equal environment steps. With
``env.mask_revisits: false`` a training cell's observation is always the one BC already holds, so DAgger finds
no new state and only spends its rollout steps.

Measured on the demo atlas (``benchmarks/warm_start.py``, ``benchmarks/results/warm_start.json``): one label
per state (the greedy or a seeded random tie-break among the optimal hops) clones far worse than the set (test
length ratio 1.53-1.55 vs 1.28 after 20 epochs); input noise and weight decay did not help; PPO after the
warm start at the from-scratch learning rate undoes it (test length ratio 1.13 -> 1.50 in 100k steps), at 0.3 and
0.1 of it drifts (1.19, 1.16), at 0.03 (the default) keeps it (1.14, success 99.9%). DAgger
(``benchmarks/results/warm_start_mesc.json``, mESC, seed 77, 100k environment steps, its 5.3k rollout steps
included): 740 BC samples underfit in 60 epochs (accuracy 0.89) and the cloned policy errs on 8% of the states
its own revisit mask creates; after two rounds (+439 states) validation length ratio 1.17 vs 1.22 (BC + PPO),
test 1.12 vs 1.29, success on BFS-reachable test pairs 96% for both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch as th

from .bfs import UNREACHABLE, shortest_paths
from .env import EpisodeBatch
from .errors import InputError
from .progress import Progress
from .tasks import TaskGeometry, allowed_mask

log = logging.getLogger("cellrl.warmstart")

#: ``train.warm_start`` values.
WARM_STARTS = ("none", "bfs", "dagger", "exact")  # exact: persistent mode only (cellrl.persistent.warmstart)
#: Behaviour cloning's minibatch size, Adam learning rate and value-loss weight (measured on the demo atlas:
#: benchmarks/warm_start.py).
BC_EPOCHS = 60
BC_BATCH_SIZE = 256
BC_LEARNING_RATE = 1e-3
BC_VALUE_COEF = 0.5
#: Defaults of ``train.warm_start_dagger_rounds`` and ``train.warm_start_dagger_episodes`` (rollouts per round).
DAGGER_ROUNDS = 2
DAGGER_EPISODES = 2000
#: Masked logits, as sb3-contrib's MaskableCategorical sets them.
MASKED_LOGIT = -1e8


@dataclass
class BcData:
    """Behaviour-cloning samples from the training graph: one per (training cell, target type) at distance >= 1.

    ``cell``, ``target`` (n,) int64; ``optimal`` (n, A) bool, the optimal next hops; ``mask`` (n, A) bool,
    the action mask of the observation; ``dist`` (n,) int32, BFS distance; ``value`` (n,) float32, the return
    of the shortest path; ``n_pairs`` the (training cell, other type) pairs with a path, ``n_pairs_total`` all.
    """

    cell: np.ndarray
    target: np.ndarray
    optimal: np.ndarray
    mask: np.ndarray
    dist: np.ndarray
    value: np.ndarray
    n_pairs: int
    n_pairs_total: int
    bfs_seconds: float
    applied: np.ndarray | None = None  # (n, R) float32 applied-set observation (persistent mode), else None

    def __len__(self) -> int:
        return int(len(self.cell))


def training_graph(geo: TaskGeometry, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(allowed (C, A), goal (T, C)) of the training graph: the training mask, no edge out of a held-out
    cell and only training goal cells, so nothing derived from it touches a validation or test cell."""
    is_train = geo.in_split("train")
    allowed = allowed_mask(table, geo.split, training=True) & is_train[:, None]
    goal = np.asarray(geo.goal_mask, bool) & is_train[None, :]
    return allowed, goal


def path_returns(table: np.ndarray, next_action: np.ndarray, dist: np.ndarray, target: int, geo: TaskGeometry,
                 env_params: Any, gamma: float) -> np.ndarray:
    """(C,) discounted return of following ``next_action`` to target type ``target`` from every cell (0 at
    goal and unreachable cells), under the environment's reward, by levels of ``dist`` (vectorised)."""
    p = env_params
    value = np.zeros(table.shape[0], np.float64)
    cos = geo.cos_sim[:, target].astype(np.float64)
    for d in range(1, int(dist.max(initial=0)) + 1):
        cells = np.flatnonzero(dist == d)
        nxt = table[cells, next_action[cells]]
        value[cells] = EpisodeBatch.reward(p, cos[cells], cos[nxt], d == 1) + gamma * value[nxt]
    return value


@dataclass
class TrainingPaths:
    """Shortest paths on the training graph (:func:`training_graph`): ``allowed`` (C, A) and ``goal`` (T, C)
    the graph; ``dist`` / ``next_action`` (C, T) the BFS result; ``value`` (C, T) float64 the return of the
    path BFS picks (:func:`path_returns`)."""

    allowed: np.ndarray
    goal: np.ndarray
    dist: np.ndarray
    next_action: np.ndarray
    value: np.ndarray
    bfs_seconds: float


def training_paths(geo: TaskGeometry, table: np.ndarray, env_params: Any, gamma: float) -> TrainingPaths:
    """One BFS per target type over the training graph, and the paths' returns."""
    t0 = time.perf_counter()
    table = np.asarray(table)
    allowed, goal = training_graph(geo, table)
    res = shortest_paths(table, goal, allowed)
    bfs_s = time.perf_counter() - t0
    value = np.stack([path_returns(table, res.next_action[:, t], res.dist[:, t], t, geo, env_params, gamma)
                      for t in range(geo.n_types)], 1)
    return TrainingPaths(allowed, goal, res.dist, res.next_action, value, bfs_s)


def label_states(paths: TrainingPaths, table: np.ndarray, cell: np.ndarray, target: np.ndarray,
                 mask: np.ndarray) -> np.ndarray:
    """(n, A) bool: the actions allowed by ``mask`` whose next cell is nearest target type ``target`` on the
    training graph (all of them; none where no allowed move leads to a cell with a path). With the static
    training mask these are exactly the optimal next hops (next cell at distance - 1)."""
    nd = paths.dist[np.clip(table[cell], 0, None), target[:, None]].astype(np.int64)      # (n, A)
    nd = np.where(mask & (nd != UNREACHABLE), nd, np.iinfo(np.int64).max)
    best = nd.min(1, keepdims=True)
    return (nd == best) & (best < np.iinfo(np.int64).max)


def bc_data(geo: TaskGeometry, table: np.ndarray, env_params: Any, gamma: float, labels: str = "all",
            seed: int = 0, paths: TrainingPaths | None = None) -> BcData:
    """Samples and labels from the training graph (see the module docstring).

    ``labels``: ``all`` keeps every optimal next hop; ``greedy`` keeps the one whose next cell is most similar to
    the target centroid (ties: lowest index); ``random`` one drawn with ``seed``. ``paths``: a precomputed
    :func:`training_paths` (computed here when None)."""
    table = np.asarray(table)
    paths = paths if paths is not None else training_paths(geo, table, env_params, gamma)
    allowed = paths.allowed
    is_train = geo.in_split("train")
    safe = np.clip(table, 0, None)
    cells, targets, optimal = [], [], []
    n_pairs = n_total = 0
    for t in range(geo.n_types):
        dist = paths.dist[:, t]
        c = np.flatnonzero(is_train & (dist > 0))
        opt = label_states(paths, table, c, np.full(len(c), t), allowed[c])
        if labels == "greedy":
            score = np.where(opt, geo.cos_sim[safe[c], t], -np.inf)
            opt = np.eye(opt.shape[1], dtype=bool)[score.argmax(1)]
        elif labels == "random":
            u = np.where(opt, np.random.default_rng([seed, t]).random(opt.shape), -1.0)
            opt = np.eye(opt.shape[1], dtype=bool)[u.argmax(1)]
        cells.append(c)
        targets.append(np.full(len(c), t, np.int64))
        optimal.append(opt)
        starts = is_train & (geo.type_ids != t)
        n_total += int(starts.sum())
        n_pairs += int((starts & (dist > 0)).sum())
    cell = np.concatenate(cells).astype(np.int64)
    target = np.concatenate(targets)
    return BcData(cell=cell, target=target, optimal=np.concatenate(optimal), mask=allowed[cell],
                  dist=paths.dist[cell, target], value=paths.value[cell, target].astype(np.float32),
                  n_pairs=n_pairs, n_pairs_total=n_total, bfs_seconds=paths.bfs_seconds)


def concat_data(a: BcData, b: BcData) -> BcData:
    """The samples of ``a`` followed by those of ``b`` (pair counts and BFS time of ``a``)."""
    cat = {k: np.concatenate([getattr(a, k), getattr(b, k)]) for k in ("cell", "target", "optimal", "mask", "dist",
                                                                          "value")}
    applied = None if a.applied is None or b.applied is None else np.concatenate([a.applied, b.applied])
    return BcData(**cat, n_pairs=a.n_pairs, n_pairs_total=a.n_pairs_total, bfs_seconds=a.bfs_seconds,
                  applied=applied)


@th.no_grad()
def greedy_actions(agent: Any, geo: TaskGeometry, cell: np.ndarray, target: np.ndarray,
                   mask: np.ndarray) -> np.ndarray:
    """(n,) the argmax of the agent's masked distribution in states (cell, target type, action mask)."""
    policy = agent.policy
    obs = {"current_expression": th.as_tensor(geo.z[cell], device=policy.device),
           "target_expression": th.as_tensor(geo.centroids[target], device=policy.device),
           "action_mask": th.as_tensor(mask, dtype=th.float32, device=policy.device)}
    logp, _ = _forward(policy, obs, th.as_tensor(mask, device=policy.device))
    return logp.argmax(1).cpu().numpy()


def dagger_states(agent: Any, geo: TaskGeometry, table: np.ndarray, env_params: Any, paths: TrainingPaths,
                  data: BcData, gamma: float, max_episodes: int | None = None,
                  seed: int = 0) -> tuple[BcData, int]:
    """One DAgger round's new samples and the environment steps it took (see the module docstring).

    One greedy episode per sample of ``data`` whose target is not its cell's own type (a random subset of
    ``max_episodes`` of them, drawn with ``seed``, when there are more), in the training
    environment (training mask, ``env_params.mask_revisits``, evaluation step limit); every state after a step
    whose mask differs from its cell's static training mask and that has a label is kept once (duplicates of a
    cell, target and mask dropped). Value target: the best return among the labelled hops,
    reward + ``gamma`` x the training path's return from the next cell."""
    from .env import EpisodeBatch

    table = np.asarray(table)
    keep = geo.type_ids[data.cell] != data.target
    pick = np.flatnonzero(keep)
    if max_episodes is not None and len(pick) > max_episodes:
        pick = np.sort(np.random.default_rng(seed).choice(pick, int(max_episodes), replace=False))
    starts, targets = data.cell[pick], data.target[pick]
    empty = BcData(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, table.shape[1]), bool),
                   np.zeros((0, table.shape[1]), bool), np.zeros(0, np.int32), np.zeros(0, np.float32),
                   data.n_pairs, data.n_pairs_total, 0.0)
    if len(starts) == 0:
        return empty, 0
    batch = EpisodeBatch(geo, table, len(starts), env_params, split="train", training=True, curriculum=False,
                         max_steps=env_params.eval_max_steps(geo.n_types))
    batch.set_tasks(starts, targets)
    batch.reset_envs(np.arange(len(starts)))
    active = batch.mask.any(1)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    steps = 0
    while active.any():
        idx = np.flatnonzero(active)
        a = np.zeros(batch.n, np.int64)
        a[idx] = greedy_actions(agent, geo, batch.cell[idx], batch.target[idx], batch.mask[idx])
        _, success, truncated, _ = batch.step(a)
        steps += len(idx)
        active &= ~(success | truncated)
        new = active & (batch.mask != paths.allowed[batch.cell]).any(1)
        if new.any():
            found.append((batch.cell[new].copy(), batch.target[new].copy(), batch.mask[new].copy()))
    if not found:
        return empty, steps
    cell, target, mask = (np.concatenate(x) for x in zip(*found))
    _, first = np.unique(np.concatenate([np.stack([cell, target], 1), mask], 1), axis=0, return_index=True)
    cell, target, mask = cell[np.sort(first)], target[np.sort(first)], mask[np.sort(first)]
    optimal = label_states(paths, table, cell, target, mask)
    ok = optimal.any(1)
    cell, target, mask, optimal = cell[ok], target[ok], mask[ok], optimal[ok]
    nxt = np.clip(table[cell], 0, None)                                                   # (n, A)
    q = EpisodeBatch.reward(env_params, geo.cos_sim[cell, target][:, None], geo.cos_sim[nxt, target[:, None]],
                            paths.goal[target[:, None], nxt]) + gamma * paths.value[nxt, target[:, None]]
    value = np.where(optimal, q, -np.inf).max(1).astype(np.float32)
    return BcData(cell=cell, target=target, optimal=optimal, mask=mask, dist=paths.dist[cell, target],
                  value=value, n_pairs=data.n_pairs, n_pairs_total=data.n_pairs_total, bfs_seconds=0.0), steps


def _forward(policy: Any, obs: Mapping[str, th.Tensor], mask: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """(masked log-probabilities (n, A), values (n,)) as MaskablePPO computes them, except that the value
    head sees the shared features detached: its loss trains the critic layers only, not the features the
    policy is being fitted on (sharing them measurably lengthened the cloned paths on the demo)."""
    features = policy.extract_features(obs)
    if policy.share_features_extractor:
        latent_pi = policy.mlp_extractor.forward_actor(features)
        latent_vf = policy.mlp_extractor.forward_critic(features.detach())
    else:
        latent_pi = policy.mlp_extractor.forward_actor(features[0])
        latent_vf = policy.mlp_extractor.forward_critic(features[1])
    logits = policy.action_net(latent_pi)
    logits = th.where(mask, logits, th.tensor(MASKED_LOGIT, dtype=logits.dtype, device=logits.device))
    return th.log_softmax(logits, dim=1), policy.value_net(latent_vf).squeeze(1)


def _obs(geo_z: th.Tensor, cents: th.Tensor, data: BcData, idx: np.ndarray, device: Any) -> dict[str, th.Tensor]:
    c = th.as_tensor(data.cell[idx])
    t = th.as_tensor(data.target[idx])
    obs = {"current_expression": geo_z.index_select(0, c).to(device),
           "target_expression": cents.index_select(0, t).to(device),
           "action_mask": th.as_tensor(data.mask[idx], dtype=th.float32, device=device)}
    if data.applied is not None:  # persistent mode: the applied set is part of the observation
        obs["applied"] = th.as_tensor(data.applied[idx], dtype=th.float32, device=device)
    return obs


def behaviour_clone(agent: Any, geo: TaskGeometry, data: BcData, epochs: int = 10, batch_size: int = 256,
                    learning_rate: float = 1e-3, value_coef: float = 0.5, seed: int = 0,
                    progress: bool = True) -> dict[str, Any]:
    """Fit ``agent.policy`` to ``data`` (multi-label masked cross-entropy + ``value_coef`` x value MSE) with
    Adam for ``epochs`` passes of seeded minibatches, the learning rate decaying linearly to 0. Returns the
    record (loss per epoch, accuracy, value error)."""
    policy = agent.policy
    device = policy.device
    geo_z = th.from_numpy(np.ascontiguousarray(geo.z))
    cents = th.from_numpy(np.ascontiguousarray(geo.centroids))
    n = len(data)
    if n == 0:
        return {"epochs": 0, "samples": 0, "accuracy": None, "value_rmse": None, "loss_per_epoch": []}
    opt = th.optim.Adam(policy.parameters(), lr=learning_rate)
    rng = np.random.default_rng(seed)
    optimal = th.as_tensor(data.optimal)
    mask = th.as_tensor(data.mask)
    value = th.as_tensor(data.value)
    policy.set_training_mode(True)
    history = []
    n_updates = int(epochs) * -(-n // int(batch_size))
    sched = th.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / n_updates)
    bar = Progress(n_updates, f"warm start: behaviour cloning ({n:,} samples x {int(epochs)} epochs)",
                   unit="update", log=log, enabled=progress)
    for _ in range(int(epochs)):
        perm = rng.permutation(n)
        tot = 0.0
        for s in range(0, n, int(batch_size)):
            idx = perm[s:s + int(batch_size)]
            ti = th.as_tensor(idx)
            m = mask.index_select(0, ti).to(device)
            logp, v = _forward(policy, _obs(geo_z, cents, data, idx, device), m)
            opt_set = optimal.index_select(0, ti).to(device)
            ce = -th.logsumexp(th.where(opt_set, logp, th.tensor(-th.inf, device=device)), dim=1).mean()
            vl = th.nn.functional.mse_loss(v, value.index_select(0, ti).to(device))
            loss = ce + value_coef * vl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(ce.detach()) * len(idx)
            bar.update(1)
        history.append(round(tot / n, 5))
        bar.set_postfix(loss=history[-1])
    bar.close()
    policy.set_training_mode(False)
    acc, v_err = bc_accuracy(agent, geo, data)
    return {"epochs": int(epochs), "samples": n, "batch_size": int(batch_size), "learning_rate": learning_rate,
            "value_coef": value_coef, "loss_per_epoch": history, "accuracy": acc, "value_rmse": v_err}


@th.no_grad()
def bc_accuracy(agent: Any, geo: TaskGeometry, data: BcData, chunk: int = 4096) -> tuple[float, float]:
    """(fraction of samples whose greedy masked action is optimal, RMSE of the value head)."""
    policy = agent.policy
    geo_z = th.from_numpy(np.ascontiguousarray(geo.z))
    cents = th.from_numpy(np.ascontiguousarray(geo.centroids))
    hit, se = 0, 0.0
    for s in range(0, len(data), chunk):
        idx = np.arange(s, min(s + chunk, len(data)))
        m = th.as_tensor(data.mask[idx], device=policy.device)
        logp, v = _forward(policy, _obs(geo_z, cents, data, idx, policy.device), m)
        a = logp.argmax(1).cpu().numpy()
        hit += int(data.optimal[idx, a].sum())
        se += float(((v.cpu() - th.as_tensor(data.value[idx])) ** 2).sum())
    return hit / max(len(data), 1), float(np.sqrt(se / max(len(data), 1)))


def ppo_config(train_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The settings PPO trains with: after a warm start (``bfs`` or ``dagger``), ``learning_rate`` x ``warm_start_ppo_lr_scale``
    (PPO at the from-scratch rate undoes much of what behaviour cloning learnt; fine-tuning needs a smaller
    step). A resumed run builds its agent with the same settings."""
    cfg = dict(train_cfg)
    if str(cfg.get("warm_start", "none")) != "none":
        cfg["learning_rate"] = float(cfg["learning_rate"]) * float(cfg.get("warm_start_ppo_lr_scale", 1.0))
    return cfg


def warm_start(agent: Any, geo: TaskGeometry, table: np.ndarray, env_params: Any,
               train_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``train.warm_start`` for a fresh run: ``none`` does nothing; ``bfs`` behaviour-clones the training
    graph's shortest paths into ``agent.policy``; ``dagger`` then adds ``warm_start_dagger_rounds`` rounds of
    the agent's own labelled states (see the module docstring). Returns what it did (for
    ``train_summary.json``; ``dagger`` per round: new samples, environment steps, accuracy)."""
    method = str(train_cfg.get("warm_start", "none"))
    if method not in WARM_STARTS:
        raise InputError(f"unknown train.warm_start {method!r}; use one of {list(WARM_STARTS)}",
                         field="train.warm_start")
    if method == "none":
        return {"method": "none", "env_steps": 0}
    if method == "exact":
        raise InputError("train.warm_start exact clones exact plans over applied sets: persistent mode only",
                         field="train.warm_start", fix="use bfs or dagger with env.perturbation_model: table")
    t0 = time.perf_counter()
    gamma = float(train_cfg["gamma"])
    paths = training_paths(geo, table, env_params, gamma)
    data = bc_data(geo, table, env_params, gamma=gamma, paths=paths)
    log.info("warm start: %d behaviour-cloning samples from %d training pairs (BFS %.1f s)", len(data),
             data.n_pairs, data.bfs_seconds)
    fit = dict(epochs=int(train_cfg.get("warm_start_epochs", BC_EPOCHS)), batch_size=BC_BATCH_SIZE,
               learning_rate=BC_LEARNING_RATE, value_coef=BC_VALUE_COEF, seed=int(train_cfg.get("seed", 0)))
    rec = behaviour_clone(agent, geo, data, **fit)
    out = {"method": method, "pairs": data.n_pairs, "pairs_total": data.n_pairs_total,
           "training_cells": int(geo.in_split("train").sum()),
           "mean_optimal_length": float(data.dist.mean()) if len(data) else None,
           "mean_optimal_actions": float(data.optimal.sum(1).mean()) if len(data) else None,
           **rec, "ppo_learning_rate": ppo_config(train_cfg)["learning_rate"], "env_steps": 0,
           "bfs_seconds": round(data.bfs_seconds, 3)}
    if method == "dagger" and len(data):
        bc_samples, rounds, agg = len(data), [], data
        for r in range(int(train_cfg.get("warm_start_dagger_rounds", DAGGER_ROUNDS))):
            new, steps = dagger_states(agent, geo, table, env_params, paths, data, gamma,
                                       max_episodes=int(train_cfg.get("warm_start_dagger_episodes", DAGGER_EPISODES)),
                                       seed=fit["seed"] + 1000)
            if len(agg) > bc_samples:      # drop the states an earlier round already holds
                seen = {(int(c), int(t), m.tobytes()) for c, t, m in
                        zip(agg.cell[bc_samples:], agg.target[bc_samples:], agg.mask[bc_samples:])}
                fresh = np.array([(int(c), int(t), m.tobytes()) not in seen
                                  for c, t, m in zip(new.cell, new.target, new.mask)], bool)
                new = BcData(**{k: getattr(new, k)[fresh] for k in ("cell", "target", "optimal", "mask", "dist",
                                                                      "value")},
                             n_pairs=new.n_pairs, n_pairs_total=new.n_pairs_total, bfs_seconds=0.0)
            before = bc_accuracy(agent, geo, new)[0] if len(new) else None   # the policy on its own states
            agg = concat_data(agg, new)
            out["env_steps"] += steps
            fit["seed"] += 1
            r_rec = behaviour_clone(agent, geo, agg, **fit)
            rounds.append({"round": r + 1, "new_samples": len(new), "samples": len(agg), "env_steps": steps,
                           "accuracy": r_rec["accuracy"], "new_accuracy_before_refit": before,
                           "loss_final": r_rec["loss_per_epoch"][-1] if r_rec["loss_per_epoch"] else None})
            log.info("warm start DAgger round %d: %d new states (%d env steps), %d samples, accuracy %.3f",
                     r + 1, len(new), steps, len(agg), r_rec["accuracy"] or 0)
        out.update(dagger_rounds=rounds, samples=len(agg), accuracy=rounds[-1]["accuracy"] if rounds else
                   out["accuracy"], bc_accuracy=rec["accuracy"])
    out["seconds"] = round(time.perf_counter() - t0, 3)
    if not len(data):
        log.warning("warm start: no training cell has a path to another cell type on the training graph, so PPO "
                    "starts from random weights at learning_rate x warm_start_ppo_lr_scale; set "
                    "train.warm_start: none for this dataset")
    log.info("warm start (%s): %d samples from %d training pairs, %d epochs, accuracy %.3f, value RMSE %.2f, "
             "%.1f s", method, out["samples"], out["pairs"], out["epochs"], out["accuracy"] or 0,
             out["value_rmse"] or 0, out["seconds"])
    return out
