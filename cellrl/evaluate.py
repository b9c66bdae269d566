"""Test protocol: the trained agent against the random, greedy and BFS-optimal policies on the same episodes.

Episodes start from the **test cells**; the target is every other cell type (all pairs, or a seeded sample of
``n_episodes`` pairs when there are more). Every policy walks the same tasks through the same environment
(:class:`cellrl.env.VecReprogrammingEnv`, evaluation mode: test-time mask, the final curriculum phase's step
limit), so success means the same thing for all of them:

* ``agent``: the MaskablePPO model (deterministic or sampled actions, config ``evaluate.deterministic``);
* ``random``: a uniformly random allowed action;
* ``greedy``: the allowed action whose next cell is most cosine-similar to the target centroid;
* ``bfs``: the next hop of an exact shortest path (:mod:`cellrl.bfs`): the ceiling.

Per episode (``episodes.parquet``): policy, start cell and type, target type, success, length, actions, cells
visited, activation (overexpression) fraction, stagnations (steps that end on a cell already visited in the
episode, a loop or a no-op), the BFS optimum for the pair, the final cosine distance to the target.

Summary (``summary.json``): success overall and on BFS-reachable pairs (within the step limit), length ratio
agent/BFS on the pairs both solve, a per-target table, the training curve's endpoints and, on the demo atlas,
the ground-truth check: do BFS and agent plans use the planted master regulators in the planted direction?
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from .agent_io import load_agent
from .bfs import BfsResult, eval_allowed_mask, read_bfs_table, shortest_paths
from .tasks import load_table
from .errors import InputError

log = logging.getLogger(__name__)

POLICIES = ("agent", "greedy", "random", "bfs")


# ---------------------------------------------------------------------------------------------- actions
def action_table(n_actions: int, regulators: Sequence[str], actions_path: str | Path | None = None) -> pd.DataFrame:
    """Columns index, gene, kind (KO/OE), label for every action of the table.

    Read from ``actions.tsv`` (written by the transitions rule) when given; otherwise actions 0..R-1 are
    knockouts and R..2R-1 overexpressions of ``regulators``.
    """
    if actions_path is not None and Path(actions_path).exists():
        try:
            df = pd.read_csv(actions_path, sep="\t")
        except Exception as e:  # binary, empty or malformed file
            raise InputError(f"cannot read the actions table ({type(e).__name__}: {e})", path=actions_path,
                             fix="rebuild it with the transitions rule") from e
        missing = {"gene", "kind"} - set(df.columns)
        if missing:
            raise InputError(f"actions table lacks columns {sorted(missing)}", path=actions_path,
                             fix="rebuild it with the transitions rule")
        if "index" in df.columns:
            df = df.sort_values("index")
        df = df.reset_index(drop=True)
        if len(df) != n_actions:
            raise InputError(f"actions table lists {len(df)} actions, the transition table has {n_actions}",
                             path=actions_path, fix="table.npy and actions.tsv must come from the same run")
        df["kind"] = df["kind"].astype(str).str.upper()
    else:
        regs = [str(r) for r in regulators]
        if n_actions != 2 * len(regs):
            raise InputError(f"the table has {n_actions} actions but the model {len(regs)} regulators (expected "
                             f"{2 * len(regs)}); pass actions.tsv", field="actions")
        df = pd.DataFrame({"gene": regs + regs, "kind": ["KO"] * len(regs) + ["OE"] * len(regs)})
    df["index"] = np.arange(len(df))
    df["gene"] = df["gene"].astype(str)
    df["label"] = df["kind"] + ":" + df["gene"]
    return df[["index", "gene", "kind", "label"]]


# ---------------------------------------------------------------------------------------------- tasks
def eval_tasks(geometry: Any, n_episodes: int | None = None, seed: int = 0,
               split: str = "test") -> tuple[np.ndarray, np.ndarray, int]:
    """(starts, targets, n_pairs): every (cell of ``split``, other type) pair, or a seeded sample of them.

    All pairs are used when there are at most ``n_episodes`` (or ``n_episodes`` is None); otherwise a sample
    without replacement, sorted by (start, target) so the episode order does not depend on the draw.
    """
    cells = np.flatnonzero(np.asarray(geometry.split).astype(str) == split)
    if len(cells) == 0:
        raise InputError(f"no {split} cells in the model", field="split", fix="check the split stage")
    T = geometry.n_types
    starts = np.repeat(cells, T)
    targets = np.tile(np.arange(T), len(cells))
    keep = geometry.type_ids[starts] != targets
    starts, targets = starts[keep], targets[keep]
    n_pairs = len(starts)
    if n_episodes is not None and n_pairs > n_episodes:
        pick = np.sort(np.random.default_rng(seed).choice(n_pairs, int(n_episodes), replace=False))
        starts, targets = starts[pick], targets[pick]
    return starts.astype(np.int64), targets.astype(np.int64), n_pairs


# ---------------------------------------------------------------------------------------------- policies
Chooser = Callable[[Mapping[str, np.ndarray], np.ndarray, Any], np.ndarray]


def greedy_chooser(geometry: Any, table: np.ndarray) -> Chooser:
    """Pick the allowed action whose next cell has the highest cosine similarity to the target centroid."""
    safe = np.clip(table, 0, None)

    def choose(obs, masks, batch):
        sim = geometry.cos_sim[safe[batch.cell], batch.target[:, None]]  # (N, A)
        sim = np.where(masks, sim, -np.inf)
        return sim.argmax(1)

    return choose


def random_chooser(seed: int) -> Chooser:
    """A uniformly random allowed action (seeded)."""
    rng = np.random.default_rng(seed)

    def choose(obs, masks, batch):
        return batch.sample_masked_actions(rng)

    return choose


def bfs_chooser(res: BfsResult) -> Chooser:
    """Follow the stored next hop of a shortest path (the first allowed action where there is none)."""

    def choose(obs, masks, batch):
        a = res.next_action[batch.cell, batch.target]
        return np.where(a >= 0, a, masks.argmax(1))

    return choose


def _policy_masks(masks: np.ndarray) -> np.ndarray:
    """``masks`` with rows that allow nothing opened (such a cell ends its episode anyway; keeps the policy
    distribution defined)."""
    m = masks.copy()
    m[~m.any(1)] = True
    return m


def agent_chooser(agent: Any, deterministic: bool = True) -> Chooser:
    """MaskablePPO actions for all episodes in one batched forward pass per step."""

    def choose(obs, masks, batch):
        m = _policy_masks(masks)
        a, _ = agent.predict(obs, action_masks=m, deterministic=deterministic)
        return np.asarray(a, dtype=np.int64).reshape(-1)

    return choose


def ensemble_chooser(agents: list[Any]) -> Chooser:
    """Deterministic actions of an ensemble of MaskablePPO agents: the argmax of their masked action
    probabilities averaged (ties to the lower action); one batched forward pass per agent per step."""
    import torch as th

    def choose(obs, masks, batch):
        m = _policy_masks(masks)
        probs = 0.0
        for agent in agents:
            pol = agent.policy
            pol.set_training_mode(False)
            with th.no_grad():
                dist = pol.get_distribution(pol.obs_to_tensor(obs)[0], action_masks=m)
                probs = probs + dist.distribution.probs.cpu().numpy()
        return np.asarray(np.where(m, probs, -1.0).argmax(1), dtype=np.int64)

    return choose


def check_agent_spaces(agent: Any, geometry: Any, n_actions: int, source: object = "agent") -> None:
    """Raise InputError when the agent was trained on another gene set or action space."""
    n_out = getattr(agent.action_space, "n", None)
    if n_out is not None and int(n_out) != n_actions:
        raise InputError(f"the agent has {n_out} actions, the transition table {n_actions}", path=source,
                         fix="the agent, model.npz and table.npy must come from the same dataset")
    sp = getattr(agent.observation_space, "spaces", {})
    cur = sp.get("current_expression")
    if cur is not None and cur.shape[0] != geometry.n_genes:
        raise InputError(f"the agent expects {cur.shape[0]} genes, the model has {geometry.n_genes}", path=source,
                         fix="the agent and model.npz must come from the same dataset")


# ---------------------------------------------------------------------------------------------- rollouts
def rollout(geometry: Any, table: np.ndarray, env_params: Any, starts: np.ndarray, targets: np.ndarray,
            choose: Chooser, max_steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Run one episode per (start, target) with ``choose`` in the evaluation environment.

    Returns arrays ``success``, ``length``, ``final_cell``, ``return`` (N,) and lists ``actions``, ``cells``
    (the cell after each step), in task order.
    """
    from .env import VecReprogrammingEnv

    n = len(starts)
    env = VecReprogrammingEnv(geometry, table, n, env_params, split="test", training=False, max_steps=max_steps,
                              seed=seed)
    env.set_tasks(starts, targets)
    obs = env.reset()
    b = env.batch
    active = np.ones(n, bool)
    success = np.zeros(n, bool)
    length = np.zeros(n, np.int64)
    ret = np.zeros(n, np.float64)
    final = np.asarray(starts, np.int64).copy()
    acts: list[list[int]] = [[] for _ in range(n)]
    cells: list[list[int]] = [[] for _ in range(n)]
    guard = 0
    while active.any():
        guard += 1
        if guard > 10_000:  # pragma: no cover - the env truncates at max_steps
            raise RuntimeError("evaluation rollout did not terminate")
        masks = env.action_masks().copy()
        a = np.asarray(choose(obs, masks, b), dtype=np.int64).reshape(n)
        obs, _, done, infos = env.step(a)
        for i in np.flatnonzero(active).tolist():
            acts[i].append(int(a[i]))
            if done[i]:
                inf = infos[i]
                cells[i].append(int(inf["final_cell"]))
                success[i] = bool(inf["is_success"])
                length[i] = int(inf["episode"]["l"])
                ret[i] = float(inf["episode"]["r"])
                final[i] = int(inf["final_cell"])
            else:
                cells[i].append(int(b.cell[i]))
        active &= ~done
    return dict(success=success, length=length, final_cell=final, ret=ret, actions=acts, cells=cells)


def _empty_rollout(starts: np.ndarray) -> dict[str, Any]:
    n = len(starts)
    return dict(success=np.zeros(n, bool), length=np.zeros(n, np.int64), final_cell=np.asarray(starts, np.int64).copy(),
                ret=np.zeros(n, np.float64), actions=[[] for _ in range(n)], cells=[[] for _ in range(n)])


def _scatter(out: dict[str, Any], sub: Mapping[str, Any], idx: np.ndarray) -> None:
    for k in ("success", "length", "final_cell", "ret"):
        out[k][idx] = sub[k]
    for k in ("actions", "cells"):
        for j, i in enumerate(idx.tolist()):
            out[k][i] = sub[k][j]


def episode_frame(policy: str, out: Mapping[str, Any], starts: np.ndarray, targets: np.ndarray, geometry: Any,
                  cell_names: np.ndarray, is_oe: np.ndarray, bfs_len: np.ndarray) -> pd.DataFrame:
    """One row per episode with the per-episode metrics (see module docstring); ``is_oe``: (A,) bool."""
    act_frac, stag = [], []
    for s, acts, cells in zip(starts, out["actions"], out["cells"]):
        act_frac.append(float(np.mean(is_oe[acts])) if acts else float("nan"))
        seen = {int(s)}
        k = 0
        for c in cells:
            if c in seen:
                k += 1
            seen.add(c)
        stag.append(k)
    tn = np.asarray(geometry.type_names).astype(str)
    final = out["final_cell"]
    return pd.DataFrame({
        "policy": policy, "episode": np.arange(len(starts)), "start_cell": starts,
        "start_name": np.asarray(cell_names).astype(str)[starts], "start_type": tn[geometry.type_ids[starts]],
        "target_type": tn[targets], "target_id": targets, "success": out["success"], "length": out["length"],
        "actions": out["actions"], "cells": out["cells"], "activation_frac": act_frac, "stagnations": stag,
        "final_cell": final, "final_type": tn[geometry.type_ids[final]],
        "final_cos_dist": 1.0 - geometry.cos_sim[final, targets].astype(np.float64),
        "return": out["ret"], "bfs_length": bfs_len,
    })


# ---------------------------------------------------------------------------------------------- summaries
def _mean(x: Any) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else None


def oe_fraction(ep: pd.DataFrame) -> float | None:
    """Share of overexpressions among all actions of these episodes (pooled; the report's "OE fraction")."""
    n = ep.actions.map(len).to_numpy(np.float64)
    f = ep.activation_frac.to_numpy(np.float64)
    ok = n > 0
    return float((f[ok] * n[ok]).sum() / n[ok].sum()) if ok.any() else None


def length_ratio(ep: pd.DataFrame, policy: str) -> tuple[float | None, float | None, int]:
    """Mean and median of length/BFS length over pairs ``policy`` solves (BFS solves them by construction)."""
    d = ep[(ep.policy == policy) & ep.success & (ep.bfs_length > 0)]
    if d.empty:
        return None, None, 0
    r = d.length.to_numpy(float) / d.bfs_length.to_numpy(float)
    return float(r.mean()), float(np.median(r)), int(len(r))


def policy_stats(ep: pd.DataFrame, max_steps: int) -> dict[str, dict[str, Any]]:
    """Per policy: success overall / on BFS-reachable pairs, lengths, length ratio, OE fraction, stagnations."""
    out = {}
    reach = (ep.bfs_length >= 0) & (ep.bfs_length <= max_steps)
    for p in POLICIES:
        d = ep[ep.policy == p]
        if d.empty:
            continue
        ok = d[d.success]
        r_mean, r_med, _ = length_ratio(ep, p)
        out[p] = dict(episodes=int(len(d)), success=float(d.success.mean()),
                      success_reachable=float(d.success[reach[d.index]].mean()) if reach[d.index].any() else None,
                      mean_length=float(ok.length.mean()) if len(ok) else None,
                      median_length=float(ok.length.median()) if len(ok) else None,
                      length_ratio_vs_bfs=r_mean, length_ratio_vs_bfs_median=r_med,
                      activation_frac=oe_fraction(d), stagnations_mean=float(d.stagnations.mean()),
                      mean_return=float(d["return"].mean()))
    return out


def per_target_table(ep: pd.DataFrame) -> pd.DataFrame:
    """Success rate per target type and policy, BFS-reachable fraction and mean lengths."""
    rows = []
    for t, d in ep.groupby("target_type", sort=True):
        row: dict[str, Any] = {"target_type": t, "episodes": int((d.policy == d.policy.iloc[0]).sum())}
        for p in POLICIES:
            dp = d[d.policy == p]
            if len(dp):
                row[p] = float(dp.success.mean())
        b = d[d.policy == d.policy.iloc[0]]
        row["bfs_reachable_any_length"] = float((b.bfs_length >= 0).mean())
        row["bfs_mean_length"] = _mean(b.bfs_length[b.bfs_length > 0])
        a = d[(d.policy == "agent") & d.success]
        row["agent_mean_length"] = _mean(a.length) if len(a) else None
        rows.append(row)
    return pd.DataFrame(rows)


def training_summary(progress: str | Path | None) -> dict[str, Any]:
    """Endpoints of the training log (last/best success rate, timesteps, phases)."""
    from .plots import read_progress

    df = read_progress(progress)
    if df.empty:
        return {}
    out: dict[str, Any] = {"timesteps": int(df.timesteps.max())}
    if "success" in df and df.success.notna().any():
        s = df.dropna(subset=["success"])
        out.update(final_success_rate=float(s.success.iloc[-1]), best_success_rate=float(s.success.max()))
    if "reward" in df and df.reward.notna().any():
        out["final_mean_reward"] = float(df.dropna(subset=["reward"]).reward.iloc[-1])
    if "phase" in df and df.phase.notna().any():
        out["final_phase"] = int(df.phase.dropna().iloc[-1])
    return out


# ---------------------------------------------------------------------------------------------- ground truth
def _plan_flags(actions: Sequence[int], planted: set[int], wrong: set[int]) -> tuple[bool, float, bool]:
    """(agrees, recall, uses a master in the wrong direction) of one plan (see :func:`ground_truth_check`)."""
    s = set(int(a) for a in actions)
    agree = bool(s & planted) and not (s & wrong)
    recall = len(s & planted) / len(planted) if planted else float("nan")
    return agree, recall, bool(s & wrong)


def planted_responses(model: Any, settings: Mapping[str, Any] | None, action_ids: Sequence[int],
                      max_values: float = 2e8) -> dict[str, Any] | None:
    """The simulator's raw response to the planted actions: expression change ``delta`` (A', cells, genes) and
    embedding ``shift`` (A', cells, 2), from the same code as the table (:func:`cellrl.transitions.simulate_actions`).

    ``None`` when the transition settings are unknown or the arrays would be too large (demo-sized data only).
    """
    if settings is None or not len(action_ids):
        return None
    ids = np.asarray(sorted(set(int(a) for a in action_ids)))
    if len(ids) * model.n_cells * model.n_genes > max_values:
        log.info("ground truth: simulator check skipped (%d actions x %d cells x %d genes too large)", len(ids),
                 model.n_cells, model.n_genes)
        return None
    from .transitions import simulate_actions

    t0 = time.perf_counter()
    r = simulate_actions(model, dict(settings), action_ids=ids)
    log.info("ground truth: simulated %d planted actions (%.1f s)", len(ids), time.perf_counter() - t0)
    return {"ids": ids, "delta": r["delta"], "shift": r["shift"]}


def simulated_shifts(model: Any, settings: Mapping[str, Any] | None, n_actions: int,
                     max_values: float = 2e8, batch_values: float = 2.5e7) -> tuple[np.ndarray | None, str]:
    """Embedding shift (A, cells, 2) of every action from the table's engine
    (:func:`cellrl.transitions.simulate_actions`), in batches of actions whose dense expression change stays
    under ``batch_values`` floats; (None, reason) without transition settings or above ``max_values``."""
    if settings is None:
        return None, "skipped (no transition settings: transitions/stats.json missing)"
    size = n_actions * model.n_cells * model.n_genes
    if size > max_values:
        return None, (f"skipped (too large: {n_actions} actions x {model.n_cells} cells x {model.n_genes} genes "
                      f"> evaluate.recipe_score_max_values = {max_values:.3g})")
    from .transitions import simulate_actions

    per = max(1, int(batch_values // max(1, model.n_cells * model.n_genes)))
    shifts = [simulate_actions(model, dict(settings), action_ids=np.arange(a, min(a + per, n_actions)))["shift"]
              for a in range(0, n_actions, per)]
    return np.concatenate(shifts, 0), "computed"


def _toward(vectors: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Per row: does ``vectors`` point towards ``directions`` (cosine > 0)? NaN where either is zero."""
    num = np.einsum("ij,ij->i", vectors, directions)
    den = np.linalg.norm(vectors, axis=1) * np.linalg.norm(directions, axis=1)
    return np.where(den > 0, (num > 0).astype(float), np.nan)


def ground_truth_check(truth: Mapping[str, Any], ep: pd.DataFrame, bfs_df: pd.DataFrame, acts: pd.DataFrame,
                       geometry: Any, table: np.ndarray, allowed: np.ndarray, model: Any = None,
                       transition_settings: Mapping[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """Compare BFS and agent plans with the planted recipe of every (start type, target type) pair.

    A plan *agrees* when it contains at least one planted action (KO of a start master the target lacks, OE of
    a target master the start lacks) and no master TF in the wrong direction (KO of a master that is on in the
    target, OE of one that is off in it; ``bfs_wrong``: share of plans that do). ``bfs_recall``: share of the
    planted actions a plan contains. ``bfs_chance``: the agreement of uniformly random action sequences of the
    same lengths (the null). Where a pair fails, three measurements on the start type's test cells say which
    stage loses the planted signal:

    * ``grn_toward``: share of (cell, planted action) whose simulated expression change (GRN propagation) points
      towards the target centroid (cosine > 0 in z-space);
    * ``shift_toward``: share whose embedding shift points towards the target type's embedding centroid;
    * ``planted_rank``: percentile (0..1, 0.5 = like a random action) of the planted actions' one-step gain in
      cosine similarity to the target centroid among all allowed actions in the transition table;
    * ``planted_best_rank`` (complementary, not a replacement): per start cell the best of those percentiles over
      the recipe's planted actions, averaged over cells -- whether the recipe offers a top first step. Recipes of
      3-4 changes contain actions that help only after others (OE of a fate master from Stem before the
      progenitor master is on; KO of the start master towards a distant fate), which ``planted_rank`` averages in.
    """
    gene_l = acts.gene.str.lower().to_numpy()
    kind = acts.kind.to_numpy()
    index = {(k, g): i for i, (k, g) in enumerate(zip(kind, gene_l))}
    type_l = {str(t).lower(): i for i, t in enumerate(geometry.type_names)}
    state = {str(t).lower(): {str(m).lower(): int(v) for m, v in ms.items()}
             for t, ms in (truth.get("master_state") or {}).items()}
    safe = np.clip(table, 0, None)
    rng = np.random.default_rng(seed)
    recs = []
    for rec in truth.get("reprogramming", []):
        s_name, t_name = str(rec["start"]), str(rec["target"])
        if s_name.lower() in type_l and t_name.lower() in type_l:
            planted = {index[k] for k in [("KO", g.lower()) for g in rec.get("knockout", [])]
                       + [("OE", g.lower()) for g in rec.get("overexpress", [])] if k in index}
            recs.append((rec, s_name, t_name, planted))
    if not recs:
        return {"available": False, "reason": "no (start, target) pair of the ground truth matches the model's types"}
    sim = None
    if model is not None:
        sim = planted_responses(model, transition_settings, sorted(set().union(*(r[3] for r in recs))))
    emb = np.asarray(model.embedding, dtype=np.float64) if model is not None else None
    pairs, verdicts = [], {}
    all_bfs, all_agent, all_chance = [], [], []
    for rec, s_name, t_name, planted in recs:
        ti = type_l[t_name.lower()]
        n_planted = len(rec.get("knockout", [])) + len(rec.get("overexpress", []))
        tstate = state.get(t_name.lower(), {})
        wrong = {index[k] for k in [("KO", m) for m, v in tstate.items() if v == 1]
                 + [("OE", m) for m, v in tstate.items() if v == 0] if k in index}
        recipe = [f"KO:{g}" for g in rec.get("knockout", [])] + [f"OE:{g}" for g in rec.get("overexpress", [])]
        pair_rows = bfs_df[(bfs_df.start_type.str.lower() == s_name.lower())
                           & (bfs_df.target_type.str.lower() == t_name.lower())]
        b = pair_rows[pair_rows.length > 0]
        bf = [_plan_flags(x, planted, wrong) for x in b.actions]
        chance = [_plan_flags(rng.integers(0, table.shape[1], len(x)), planted, wrong)[0]
                  for x in b.actions for _ in range(20)]
        a = ep[(ep.policy == "agent") & (ep.start_type.str.lower() == s_name.lower())
               & (ep.target_type.str.lower() == t_name.lower())]
        af = [_plan_flags(x, planted, wrong) for x in a[a.success].actions]
        all_bfs += [f[0] for f in bf]
        all_agent += [f[0] for f in af]
        all_chance += chance
        cells = np.unique(np.concatenate([pair_rows.cell.to_numpy(np.int64), a.start_cell.to_numpy(np.int64)]))
        rank = best_rank = grn = shift = None
        if planted and len(cells):
            # table level: percentile of the planted actions' one-step gain among the allowed actions
            gain = geometry.cos_sim[safe[cells], ti] - geometry.cos_sim[cells, ti][:, None]  # (n, A)
            vals, best = [], {}
            for j in sorted(planted):
                for ci in np.flatnonzero(allowed[cells, j]):
                    others = gain[ci][allowed[cells[ci]]]
                    if len(others) > 1:
                        g = gain[ci, j]
                        vals.append(((others < g).sum() + 0.5 * ((others == g).sum() - 1)) / (len(others) - 1))
                        best[ci] = max(best.get(ci, 0.0), vals[-1])
            rank = float(np.mean(vals)) if vals else None
            best_rank = float(np.mean(list(best.values()))) if best else None
            if sim is not None:
                pos = {int(x): k for k, x in enumerate(sim["ids"])}
                ks = [pos[j] for j in sorted(planted)]
                dz = sim["delta"][ks][:, cells] / geometry.std[None, None, :]  # (P, n, G) in z units
                to_c = np.broadcast_to(geometry.centroids[ti][None] - geometry.z[cells], dz.shape)
                grn = _mean(_toward(dz.reshape(-1, dz.shape[-1]), to_c.reshape(-1, dz.shape[-1])))
                sh = sim["shift"][ks][:, cells]
                to_e = np.broadcast_to(geometry.embedding_centroids[ti][None] - emb[cells], sh.shape)
                shift = _mean(_toward(sh.reshape(-1, 2), to_e.reshape(-1, 2)))
        row = dict(start=s_name, target=t_name, planted=" ".join(recipe), n_planted=n_planted,
                   n_planted_in_actions=len(planted), n_bfs=len(bf),
                   bfs_agree=_mean([f[0] for f in bf]), bfs_chance=_mean(chance), bfs_recall=_mean([f[1] for f in bf]),
                   bfs_wrong=_mean([f[2] for f in bf]),
                   n_agent=int(len(a)), agent_success=_mean(a.success) if len(a) else None,
                   agent_agree=_mean([f[0] for f in af]), agent_recall=_mean([f[1] for f in af]),
                   grn_toward=grn, shift_toward=shift, planted_rank=rank, planted_best_rank=best_rank,
                   bfs_mean_length=_mean(b.length) if len(b) else None)
        row["verdict"] = _verdict(row, bfs_reachable=bool((pair_rows.length >= 0).any()))
        verdicts[row["verdict"]] = verdicts.get(row["verdict"], 0) + 1
        pairs.append(row)

    def frac_pairs(key: str) -> float | None:
        v = [p[key] for p in pairs if p[key] is not None]
        return float(np.mean([x >= 0.5 for x in v])) if v else None

    def mean_of(key: str) -> float | None:
        return _mean([p[key] for p in pairs if p[key] is not None])

    return {"available": True, "n_pairs": len(pairs),
            "bfs_agreement": _mean(all_bfs), "agent_agreement": _mean(all_agent),
            "chance_agreement": _mean(all_chance), "bfs_plans": len(all_bfs), "agent_plans": len(all_agent),
            "bfs_pairs_agree": frac_pairs("bfs_agree"), "agent_pairs_agree": frac_pairs("agent_agree"),
            "mean_grn_toward": mean_of("grn_toward"), "mean_shift_toward": mean_of("shift_toward"),
            "mean_planted_rank": mean_of("planted_rank"), "mean_planted_best_rank": mean_of("planted_best_rank"),
            "simulator_checked": sim is not None,
            "verdicts": verdicts, "pairs": pairs}


def _verdict(row: Mapping[str, Any], bfs_reachable: bool) -> str:
    """First stage that breaks the chain planted GRN -> oracle -> simulator -> table -> BFS -> agent."""
    if row["n_planted"] and row["n_planted_in_actions"] == 0:
        return "oracle: planted masters are not perturbable regulators"
    if not bfs_reachable:
        return "table: target unreachable"
    if (row["bfs_agree"] or 0) < 0.5:
        if row["grn_toward"] is not None and row["grn_toward"] < 0.5:
            return "simulator (GRN propagation): planted perturbations do not move expression towards the target"
        if row["shift_toward"] is not None and row["shift_toward"] < 0.5:
            return "simulator (embedding shift): planted perturbations do not push cells towards the target"
        if row["planted_rank"] is not None and row["planted_rank"] < 0.6:
            return "table: planted perturbations are not among the best next-cell moves"
        if (row["bfs_wrong"] or 0) >= 0.5:
            return "table: shortest paths also move masters in the wrong direction"
        return "table: shortest paths use other regulators"
    if row["n_agent"] == 0:
        return "ok (BFS; no agent evaluated)"
    if (row["agent_success"] or 0) < 0.5:
        return "agent: fails to reach the target"
    if (row["agent_agree"] or 0) < 0.5:
        return "agent: reaches the target with other regulators"
    return "ok"


# ---------------------------------------------------------------------------------------------- plots
def make_plots(plots_dir: str | Path, ep: pd.DataFrame, per_target: pd.DataFrame, model: Any, geometry: Any,
               acts: pd.DataFrame, progress: str | Path | None, n_examples: int = 6,
               recipes: pd.DataFrame | None = None) -> list[str]:
    """Write the evaluation figures (see :mod:`cellrl.plots`) into ``plots_dir``; return their file names.

    ``recipes``: the per-(pair, policy) recipe metrics (:func:`cellrl.recipes.recipe_benchmark`), if any."""
    from . import plots

    d = Path(plots_dir)
    d.mkdir(parents=True, exist_ok=True)
    files = []
    ag = ep[ep.policy == "agent"].set_index("episode")
    bf = ep[ep.policy == "bfs"].set_index("episode")
    # Example paths: agent successes with a BFS path, one per target type first, then failures.
    cand = ag[(ag.bfs_length > 0)].copy()
    cand["order"] = (~cand.success).astype(int)
    cand = cand.sort_values(["order", "episode"])
    picked, seen = [], set()
    for i, r in cand.iterrows():
        key = r.target_type
        if key in seen:
            continue
        seen.add(key)
        picked.append(i)
        if len(picked) >= n_examples:
            break
    examples = [dict(start=int(ag.loc[i, "start_cell"]), agent=list(ag.loc[i, "cells"]),
                     bfs=list(bf.loc[i, "cells"]) if i in bf.index else [],
                     label=f"{ag.loc[i, 'start_type']}->{ag.loc[i, 'target_type']}"
                           f"{'' if ag.loc[i, 'success'] else ' (fail)'}") for i in picked]
    files.append(plots.umap_paths(np.asarray(model.embedding), np.asarray(model.cell_types).astype(str),
                                  [str(t) for t in geometry.type_names], examples, d / "umap_paths.png"))
    files.append(plots.success_by_target(per_target, d / "success_by_target.png"))
    ok_bfs = ep[(ep.policy == "bfs") & ep.success]
    files.append(plots.length_hist(ag[ag.success].length.to_numpy(), ok_bfs.length.to_numpy(),
                                   d / "length_hist.png",
                                   other={"greedy": ep[(ep.policy == "greedy") & ep.success].length.to_numpy()}))
    files.append(plots.learning_curve(progress, d / "learning_curve.png"))
    regs_label = acts.gene.tolist()
    # action_usage expects KO block then OE block over the same regulators; build it from actions.tsv.
    genes = list(dict.fromkeys(regs_label))
    gi = {g: k for k, g in enumerate(genes)}
    remap = np.array([gi[g] + (len(genes) if k == "OE" else 0) for g, k in zip(acts.gene, acts.kind)])
    for name, sel, title in (("action_usage", ep.policy == "agent", "Agent, all test episodes"),
                             ("action_usage_bfs", (ep.policy == "bfs") & ep.success, "BFS-optimal plans")):
        seqs = [remap[np.asarray(a, dtype=np.int64)] if len(a) else [] for a in ep[sel].actions]
        frac = oe_fraction(ep[sel])  # the same number as the policy table's "OE fraction"
        files.append(plots.action_usage(seqs, genes, d / f"{name}.png",
                                        title=f"{title}: action usage (OE fraction "
                                              f"{'n/a' if frac is None else f'{100 * frac:.1f}%'})"))
    files += _recipe_plot(recipes, d)
    return [Path(f).name for f in files]


# ---------------------------------------------------------------------------------------------- entry points
@dataclass
class Evaluation:
    """Result of :func:`evaluate`: the episode table, the summary (JSON-ready) and what produced them."""

    episodes: pd.DataFrame
    summary: dict[str, Any]
    geometry: Any
    bfs: BfsResult
    bfs_df: pd.DataFrame
    recipes: pd.DataFrame | None = None  # per (pair, policy) recipe metrics (cellrl.recipes)


def evaluate(model: Any, table: np.ndarray, agent: Any | None, env: Mapping[str, Any] | None = None,
             actions: pd.DataFrame | None = None, n_episodes: int | None = 2000, seed: int = 0,
             deterministic: bool = True, bfs_df: pd.DataFrame | None = None,
             truth: Mapping[str, Any] | None = None, progress: str | Path | None = None,
             policies: Sequence[str] = POLICIES,
             transition_settings: Mapping[str, Any] | None = None, recipes: pd.DataFrame | None = None,
             recipe_permutations: int = 1000, recipe_score_max_values: float = 2e8,
             recipes_source: object = "recipes") -> Evaluation:
    """Run the test protocol in memory (``agent=None`` skips the agent). ``agent`` is a policy with ``predict``
    or a function ``(geometry, n_actions) -> policy`` that loads one (e.g. :func:`cellrl.agent_io.load_agent`).

    ``recipes``: a validated recipe table (:func:`cellrl.recipes.read_recipes`) scored by
    :func:`recipe_check` into ``summary["recipes"]``; None records that no table is set."""
    from .bfs import bfs_table
    from .env import EnvParams
    from .tasks import TaskGeometry

    params = EnvParams.from_config(env)
    geo = TaskGeometry.from_model(model, params.goal_percentile, params.centroid_percentile)
    if actions is None:
        actions = action_table(table.shape[1], model.regulators)
    if agent is not None:
        if callable(agent) and not hasattr(agent, "predict"):
            agent = agent(geo, table.shape[1])
        check_agent_spaces(agent, geo, table.shape[1])
    max_steps = params.eval_max_steps(geo.n_types)
    allowed = eval_allowed_mask(model, table)
    t0 = time.perf_counter()
    res = shortest_paths(table, geo.goal_mask, allowed)
    if bfs_df is None:
        bfs_df, _ = bfs_table(model, table, geo, allowed, max_steps=max_steps)
    else:
        _check_bfs(bfs_df, res, model)
    log.info("BFS: %.2f s", time.perf_counter() - t0)
    starts, targets, n_pairs = eval_tasks(geo, n_episodes, seed)
    bfs_len = res.dist[starts, targets]
    is_oe = (actions.kind.to_numpy() == "OE")
    choosers: dict[str, Chooser] = {"greedy": greedy_chooser(geo, table), "random": random_chooser(seed),
                                    "bfs": bfs_chooser(res)}
    if agent is not None:
        choosers["agent"] = agent_chooser(agent, deterministic)
        try:
            from stable_baselines3.common.utils import set_random_seed

            set_random_seed(seed)
        except Exception:  # pragma: no cover
            pass
    frames = []
    for p in policies:
        if p not in choosers:
            continue
        t0 = time.perf_counter()
        if p == "bfs":
            # BFS proves unreachable pairs have no path: nothing to walk (success False, no steps)
            walk = bfs_len >= 0
            out = _empty_rollout(starts)
            if walk.any():
                sub = rollout(geo, table, params, starts[walk], targets[walk], choosers[p], max_steps=max_steps,
                              seed=seed)
                _scatter(out, sub, np.flatnonzero(walk))
        else:
            out = rollout(geo, table, params, starts, targets, choosers[p], max_steps=max_steps, seed=seed)
        frames.append(episode_frame(p, out, starts, targets, geo, model.cell_names, is_oe, bfs_len))
        log.info("%-6s: %d episodes, success %.1f%% (%.1f s)", p, len(starts), 100 * out["success"].mean(),
                 time.perf_counter() - t0)
    ep = pd.concat(frames, ignore_index=True)
    # the BFS policy must reach exactly the pairs with an optimal path within the step limit
    b = ep[ep.policy == "bfs"]
    expect = (b.bfs_length >= 0) & (b.bfs_length <= max_steps)
    if not (b.success == expect).all() or not (b.length[b.success] == b.bfs_length[b.success]).all():
        raise RuntimeError("BFS policy disagrees with the BFS distances: environment and BFS masks differ")
    per_target = per_target_table(ep)
    r_mean, r_med, r_n = length_ratio(ep, "agent")
    summary: dict[str, Any] = {
        "protocol": dict(split="test", n_test_cells=int(len(np.unique(starts))), n_types=int(geo.n_types),
                         n_pairs_total=int(n_pairs), n_episodes=int(len(starts)), sampled=bool(n_pairs > len(starts)),
                         max_steps=int(max_steps), deterministic=bool(deterministic), seed=int(seed),
                         goal_percentile=params.goal_percentile, centroid_percentile=params.centroid_percentile),
        "policies": policy_stats(ep, max_steps),
        "bfs_reachable_frac": float((bfs_len >= 0).mean()),
        "bfs_reachable_within_max_steps_frac": float(((bfs_len >= 0) & (bfs_len <= max_steps)).mean()),
        "bfs_mean_length": _mean(bfs_len[bfs_len > 0]),
        "length_ratio_agent_bfs": r_mean, "length_ratio_agent_bfs_median": r_med, "length_ratio_pairs": r_n,
        "per_target": per_target.to_dict("records"),
        "training": training_summary(progress),
    }
    if truth is not None:
        summary["ground_truth"] = ground_truth_check(truth, ep, bfs_df, actions, geo, table, allowed, model=model,
                                                     transition_settings=transition_settings, seed=seed)
        gt = summary["ground_truth"]
        if gt.get("available"):
            log.info("ground truth: BFS plans agree %.1f%%, agent plans %s", 100 * (gt["bfs_agreement"] or 0),
                     "n/a" if gt["agent_agreement"] is None else f"{100 * gt['agent_agreement']:.1f}%")
    else:
        summary["ground_truth"] = {"available": False, "reason": "no ground truth for this dataset"}
    rec_df = None
    if recipes is not None:
        summary["recipes"], rec_df = recipe_check(recipes, ep, actions, geo, model, transition_settings,
                                                  n_perm=recipe_permutations, seed=seed,
                                                  max_values=recipe_score_max_values, source=recipes_source)
    else:
        summary["recipes"] = {"available": False, "reason": "no recipe table set (datasets.<name>.recipes)"}
    return Evaluation(episodes=ep, summary=summary, geometry=geo, bfs=res, bfs_df=bfs_df, recipes=rec_df)


def recipe_check(recipes: pd.DataFrame, ep: pd.DataFrame, acts: pd.DataFrame, geometry: Any, model: Any,
                 transition_settings: Mapping[str, Any] | None, n_perm: int = 1000, seed: int = 0,
                 max_values: float = 2e8, source: object = "recipes",
                 policies: Sequence[str] | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """The known-recipe benchmark of this evaluation (:func:`cellrl.recipes.recipe_benchmark`): the episodes'
    plans, the linear expression baseline and, when the data are small enough, CellOracle's perturbation score
    from the table's own simulator. ``policies``: the episodes' policies to score (None: the table mode's)."""
    from .recipes import ROLLOUT_POLICIES, check_recipe_types, recipe_benchmark

    recipes = check_recipe_types(recipes, geometry.type_names, source)
    gidx = {str(g): j for j, g in enumerate(np.asarray(model.gene_names).astype(str))}
    missing = sorted(set(acts.gene) - set(gidx))
    if missing:
        raise InputError(f"action genes {missing[:5]} are not genes of the model", field="actions",
                         fix="actions.tsv and model.npz must come from the same run")
    t0 = time.perf_counter()
    shift, status = simulated_shifts(model, transition_settings, len(acts), max_values=max_values)
    out, df = recipe_benchmark(recipes, ep, acts, geometry, np.array([gidx[g] for g in acts.gene]), shift=shift,
                               embedding=np.asarray(model.embedding, dtype=np.float64), n_perm=n_perm, seed=seed,
                               score_status=status, policies=policies or ROLLOUT_POLICIES)
    out["source"] = str(source)
    for p, m in out["policies"].items():
        log.info("recipes %-18s: AUC %s, precision@1 %s, recall@5 %s, %d/%d pairs p < 0.05", p,
                 _f3(m.get("auc")), _f3(m.get("precision@1")), _f3(m.get("recall@5")), m["pairs_p_below_0.05"],
                 m["pairs_scored"])
    log.info("recipes: %d rows (%d not in the action space), %d pairs, perturbation score %s (%.1f s)",
             out["n_rows"], out["n_not_in_action_space"], out["n_pairs"], status, time.perf_counter() - t0)
    return out, df


def _f3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _check_bfs(bfs_df: pd.DataFrame, res: BfsResult, model: Any) -> None:
    """bfs.parquet must match the distances recomputed here (else it is stale)."""
    if bfs_df.empty:
        return
    cells, tids = bfs_df.cell.to_numpy(np.int64), bfs_df.target_id.to_numpy(np.int64)
    if cells.min() < 0 or cells.max() >= res.dist.shape[0] or tids.min() < 0 or tids.max() >= res.dist.shape[1]:
        raise InputError(f"bfs.parquet refers to cells or target types outside this model ({res.dist.shape[0]} "
                         f"cells, {res.dist.shape[1]} types)", field="bfs",
                         fix="bfs.parquet is stale: rerun the bfs rule")
    d = res.dist[cells, tids]
    bad = d != bfs_df.length.to_numpy()
    if bad.any():
        raise InputError(f"bfs.parquet disagrees with the transition table on {int(bad.sum())} pairs",
                         field="bfs", fix="bfs.parquet is stale: rerun the bfs rule")


def evaluate_files(model: str | Path, table: str | Path, actions: str | Path | None, agent: str | Path,
                   progress: str | Path | None, bfs: str | Path | None, truth: str | Path | None,
                   episodes_out: str | Path, summary_out: str | Path, plots_dir: str | Path,
                   env: Mapping[str, Any] | None = None, n_episodes: int = 2000, seed: int = 0,
                   deterministic: bool = True, transition_stats: str | Path | None = None,
                   recipes: str | Path | None = None, recipes_out: str | Path | None = None,
                   recipe_permutations: int = 1000, recipe_score_max_values: float = 2e8,
                   transitions: Mapping[str, Any] | None = None, persistent_exact_starts: int = 2,
                   persistent_exact_max_genes: int | None = None, beam_width: int = 8) -> dict[str, Any]:
    """Rule ``evaluate``: write ``episodes.parquet``, ``summary.json``, ``plots/`` and (``recipes_out``) the
    per-(pair, policy) recipe metrics as TSV (header only when no recipe table is set) for one run.

    ``transition_stats`` (the transitions rule's stats.json) supplies the simulator settings for the
    ground-truth check's simulator level; without it that level is skipped. The agent is loaded without
    unpickling (:func:`cellrl.agent_io.load_agent`: checked against its train_summary.json, network rebuilt from it).
    With ``env.perturbation_model: persistent`` the agent is scored against exact, beam and greedy search over sets
    instead (:func:`cellrl.persistent.evaluate.evaluate_persistent`: ``transitions`` are the engine's settings;
    exact search on ``persistent_exact_starts`` test cells per start type, sets of up to
    ``persistent_exact_max_genes`` genes (None: env.max_set_size); beam width ``beam_width``); ``bfs`` is unused.
    """
    import json

    from .env import EnvParams
    from .io import write_json, write_table
    from .model import load_model

    persistent = EnvParams.from_config(env).perturbation_model == "persistent"
    m = load_model(model)
    tab = load_table(table, m.n_cells)
    acts = action_table(tab.shape[1], m.regulators, actions)
    ag = functools.partial(load_agent, agent)  # loaded by evaluate() once the run's geometry is known
    bfs_df = read_bfs_table(bfs) if bfs is not None and Path(bfs).exists() and not persistent else None
    tr = json.loads(Path(truth).read_text()) if truth else None
    tset = None
    if transition_stats is not None and Path(transition_stats).exists():
        tset = json.loads(Path(transition_stats).read_text()).get("settings")
    from .recipes import RECIPE_COLUMNS, read_recipes

    rec = read_recipes(recipes) if recipes else None
    if persistent:
        from .persistent.evaluate import evaluate_persistent

        ev = evaluate_persistent(m, tab, ag, env, transitions, actions=acts, n_episodes=n_episodes, seed=seed,
                                 deterministic=deterministic, exact_starts=persistent_exact_starts,
                                 exact_max_genes=persistent_exact_max_genes, beam_width=beam_width, truth=tr,
                                 recipes=rec, recipe_permutations=recipe_permutations,
                                 recipe_score_max_values=recipe_score_max_values, recipes_source=recipes,
                                 transition_settings=tset, progress=progress)
    else:
        ev = evaluate(m, tab, ag, env=env, actions=acts, n_episodes=n_episodes, seed=seed,
                      deterministic=deterministic, bfs_df=bfs_df, truth=tr, progress=progress,
                      transition_settings=tset, recipes=rec, recipe_permutations=recipe_permutations,
                      recipe_score_max_values=recipe_score_max_values, recipes_source=recipes)
    ep, summary, geo = ev.episodes, ev.summary, ev.geometry
    summary["dataset"] = m.meta.get("dataset")
    summary["run"] = Path(episodes_out).parent.name
    summary["inputs"] = {"model": str(model), "table": str(table), "agent": str(agent), "bfs": str(bfs)}
    from .report import git_state

    summary["git"] = git_state()  # the code that produced these numbers (the report may be rebuilt later)
    if persistent:
        summary["plots"] = persistent_plots(plots_dir, summary, progress, ev.recipes)
    else:
        per_target = pd.DataFrame(summary["per_target"])
        summary["plots"] = make_plots(plots_dir, ep, per_target, m, geo, acts, progress, recipes=ev.recipes)
    write_table(episodes_out, ep, index=False)
    if recipes_out is not None:
        write_table(recipes_out, ev.recipes if ev.recipes is not None
                    else pd.DataFrame(columns=[*RECIPE_COLUMNS[:2], "policy"]))
    write_json(summary_out, summary)
    if persistent:
        log.info("summary (persistent): %s", ", ".join(
            f"{k} {100 * v['exact_tasks']['success']:.1f}% on the exact tasks" for k, v in summary["methods"].items()))
        return summary
    pol = summary["policies"]
    log.info("summary: agent %.1f%%, greedy %.1f%%, random %.1f%%, BFS-reachable %.1f%%, length ratio %s",
             100 * pol.get("agent", {}).get("success", float("nan")), 100 * pol["greedy"]["success"],
             100 * pol["random"]["success"], 100 * summary["bfs_reachable_within_max_steps_frac"],
             summary["length_ratio_agent_bfs"])
    return summary


def _recipe_plot(recipes: pd.DataFrame | None, d: Path) -> list[Path]:
    """The recipe-metrics figure when some pair has an AUC (else none)."""
    from . import plots

    if recipes is not None and not recipes.empty and "auc" in recipes and recipes.auc.notna().any():
        return [plots.recipe_metrics(recipes, d / "recipe_metrics.png")]
    return []


def persistent_plots(plots_dir: str | Path, summary: Mapping[str, Any], progress: str | Path | None,
                     recipes: pd.DataFrame | None = None) -> list[str]:
    """Persistent mode's figures in ``plots_dir``: success per method, the learning curve and (with a recipe
    table) the recipe metrics per method; returns their file names."""
    from . import plots

    d = Path(plots_dir)
    d.mkdir(parents=True, exist_ok=True)
    files = [plots.method_success(summary["methods"], d / "method_success.png"),
             plots.learning_curve(progress, d / "learning_curve.png")]
    files += _recipe_plot(recipes, d)
    return [Path(f).name for f in files]
