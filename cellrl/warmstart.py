"""Warm start from exact shortest paths: behaviour cloning of BFS next hops before PPO (``train.warm_start``).

Before the first PPO update of a fresh run, the agent's policy network is fitted by supervised learning to the
next hops of exact shortest paths, and its value head to the return of those paths; PPO then fine-tunes from
there. No environment step is taken (the budget ``train.total_timesteps`` is all PPO's).

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

Measured on the demo atlas (``benchmarks/warm_start.py``, ``benchmarks/results/warm_start.json``): one label
per state (the greedy or a seeded random tie-break among the optimal hops) clones far worse than the set (test
length ratio 1.53-1.55 vs 1.28 after 20 epochs); input noise and weight decay did not help; PPO after the
warm start at the from-scratch learning rate undoes it (test length ratio 1.13 -> 1.50 in 100k steps), at 0.3 and
0.1 of it drifts (1.19, 1.16), at 0.03 (the default) keeps it (1.14, success 99.9%); no DAgger pass:
the samples already hold every (training cell, target) state a training episode can be in, and the states
only the agent's own episodes add are held-out cells, which cannot be labelled without leakage.
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
from .tasks import TaskGeometry, allowed_mask

log = logging.getLogger("cellrl.warmstart")

#: ``train.warm_start`` values.
WARM_STARTS = ("none", "bfs")
#: Behaviour cloning's minibatch size, Adam learning rate and value-loss weight (measured on the demo atlas:
#: benchmarks/warm_start.py).
BC_EPOCHS = 60
BC_BATCH_SIZE = 256
BC_LEARNING_RATE = 1e-3
BC_VALUE_COEF = 0.5
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

    def __len__(self) -> int:
        return int(len(self.cell))


def training_graph(geo: TaskGeometry, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(allowed (C, A), goal (T, C)) of the training graph: the training mask, no edge out of a held-out
    cell and only training goal cells, so nothing derived from it touches a validation or test cell."""
    is_train = np.asarray(geo.split).astype(str) == "train"
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


def bc_data(geo: TaskGeometry, table: np.ndarray, env_params: Any, gamma: float, labels: str = "all",
            seed: int = 0) -> BcData:
    """Samples and labels from the training graph (see the module docstring).

    ``labels``: ``all`` keeps every optimal next hop; ``greedy`` keeps the one whose next cell is most similar to
    the target centroid (ties: lowest index); ``random`` one drawn with ``seed``."""
    t0 = time.perf_counter()
    table = np.asarray(table)
    allowed, goal = training_graph(geo, table)
    res = shortest_paths(table, goal, allowed)
    bfs_s = time.perf_counter() - t0
    is_train = np.asarray(geo.split).astype(str) == "train"
    safe = np.clip(table, 0, None)
    cells, targets, optimal, value = [], [], [], []
    n_pairs = n_total = 0
    for t in range(geo.n_types):
        dist = res.dist[:, t]
        c = np.flatnonzero(is_train & (dist > 0))
        nd = dist[safe[c]]
        opt = allowed[c] & (nd != UNREACHABLE) & (nd == dist[c, None] - 1)
        if labels == "greedy":
            score = np.where(opt, geo.cos_sim[safe[c], t], -np.inf)
            opt = np.eye(opt.shape[1], dtype=bool)[score.argmax(1)]
        elif labels == "random":
            u = np.where(opt, np.random.default_rng([seed, t]).random(opt.shape), -1.0)
            opt = np.eye(opt.shape[1], dtype=bool)[u.argmax(1)]
        cells.append(c)
        targets.append(np.full(len(c), t, np.int64))
        optimal.append(opt)
        value.append(path_returns(table, res.next_action[:, t], dist, t, geo, env_params, gamma)[c])
        starts = is_train & (geo.type_ids != t)
        n_total += int(starts.sum())
        n_pairs += int((starts & (dist > 0)).sum())
    cell = np.concatenate(cells).astype(np.int64)
    target = np.concatenate(targets)
    return BcData(cell=cell, target=target, optimal=np.concatenate(optimal), mask=allowed[cell],
                  dist=res.dist[cell, target], value=np.concatenate(value).astype(np.float32), n_pairs=n_pairs,
                  n_pairs_total=n_total, bfs_seconds=bfs_s)


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
    return {"current_expression": geo_z.index_select(0, c).to(device),
            "target_expression": cents.index_select(0, t).to(device),
            "action_mask": th.as_tensor(data.mask[idx], dtype=th.float32, device=device)}


def behaviour_clone(agent: Any, geo: TaskGeometry, data: BcData, epochs: int = 10, batch_size: int = 256,
                    learning_rate: float = 1e-3, value_coef: float = 0.5, seed: int = 0) -> dict[str, Any]:
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
        history.append(round(tot / n, 5))
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
    """The settings PPO trains with: after a BFS warm start, ``learning_rate`` x ``warm_start_ppo_lr_scale``
    (PPO at the from-scratch rate undoes much of what behaviour cloning learnt; fine-tuning needs a smaller
    step). A resumed run builds its agent with the same settings."""
    cfg = dict(train_cfg)
    if str(cfg.get("warm_start", "none")) == "bfs":
        cfg["learning_rate"] = float(cfg["learning_rate"]) * float(cfg.get("warm_start_ppo_lr_scale", 1.0))
    return cfg


def warm_start(agent: Any, geo: TaskGeometry, table: np.ndarray, env_params: Any,
               train_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``train.warm_start`` for a fresh run: ``none`` does nothing; ``bfs`` behaviour-clones the training
    graph's shortest paths into ``agent.policy`` (see the module docstring). Returns what it did (for
    ``train_summary.json``)."""
    method = str(train_cfg.get("warm_start", "none"))
    if method not in WARM_STARTS:
        raise InputError(f"unknown train.warm_start {method!r}; use one of {list(WARM_STARTS)}",
                         field="train.warm_start")
    if method == "none":
        return {"method": "none"}
    t0 = time.perf_counter()
    data = bc_data(geo, table, env_params, gamma=float(train_cfg["gamma"]))
    rec = behaviour_clone(agent, geo, data, epochs=int(train_cfg.get("warm_start_epochs", BC_EPOCHS)),
                          batch_size=BC_BATCH_SIZE, learning_rate=BC_LEARNING_RATE,
                          value_coef=BC_VALUE_COEF, seed=int(train_cfg.get("seed", 0)))
    out = {"method": "bfs", "pairs": data.n_pairs, "pairs_total": data.n_pairs_total,
           "training_cells": int((np.asarray(geo.split).astype(str) == "train").sum()),
           "mean_optimal_length": float(data.dist.mean()) if len(data) else None,
           "mean_optimal_actions": float(data.optimal.sum(1).mean()) if len(data) else None,
           **rec, "ppo_learning_rate": ppo_config(train_cfg)["learning_rate"],
           "bfs_seconds": round(data.bfs_seconds, 3), "seconds": round(time.perf_counter() - t0, 3)}
    if not len(data):
        log.warning("warm start: no training cell has a path to another cell type on the training graph, so PPO "
                    "starts from random weights at learning_rate x warm_start_ppo_lr_scale; set "
                    "train.warm_start: none for this dataset")
    log.info("warm start (BFS behaviour cloning): %d samples from %d training pairs, %d epochs, accuracy %.3f, "
             "value RMSE %.2f, %.1f s", out["samples"], out["pairs"], out["epochs"], out["accuracy"] or 0,
             out["value_rmse"] or 0, out["seconds"])
    return out
