"""Persistent-perturbation env: gymnasium/SB3 API, set bookkeeping, masks, leakage (training proxy), reward, vector =
single env, checkpoint state, the network reading the applied set. A small fake engine stands in for
cellrl.persistent.engine (same contract: apply, action_mask, step)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import scipy.sparse as sp

from cellrl.env import EnvParams
from cellrl.errors import InputError
from cellrl.model import random_model
from cellrl.persistent.env import (PERSISTENT_ENV_ID, PersistentReprogrammingEnv, VecPersistentEnv, applied_obs,
                                   set_labels, simulate, training_proxy)
from cellrl.tasks import TaskGeometry


class FakeEngine:
    """The PersistentEngine contract on a random model: each action adds a fixed expression push; the set's
    pushes add up and the next cell is the cell nearest (in expression) to the current one plus their sum.
    Also the arrays the ``hub`` plan tie-break reads (GRN rows of the regulators stacked over clusters,
    regulator expression, none/KO/OE levels, action codes and regulators)."""

    def __init__(self, model, seed: int = 0, scale: float = 0.6):
        rng = np.random.default_rng(seed)
        self.X = np.asarray(model.X, np.float64)
        self.n_cells, self.n_regulators = model.n_cells, model.n_regulators
        self.n_actions = 2 * self.n_regulators
        self.regulators = np.asarray(model.regulators)
        ids = np.asarray(model.cluster_ids)
        means = np.stack([self.X[ids == t].mean(0) for t in range(ids.max() + 1)])
        pull = means[rng.integers(0, len(means), self.n_actions)] - self.X.mean(0)
        self.push = scale * pull + 0.1 * rng.normal(size=pull.shape)     # (A, G)
        self.calls = 0
        R = self.n_regulators
        self.regulator_idx = np.asarray(model.regulator_idx)
        self.W_all = sp.vstack([sp.csr_matrix(W)[self.regulator_idx] for W in model.coefs]).tocsr()
        self.XR = self.X[:, self.regulator_idx].copy()
        self.values = np.stack([np.zeros(R), model.ko_values, model.oe_values])
        self.action_code = np.r_[np.ones(R), 2 * np.ones(R)].astype(np.int8)
        self.action_regulator = np.arange(2 * R) % R

    def apply(self, applied, actions):
        out = np.array(applied, np.int8, copy=True)
        a = np.asarray(actions, np.int64)
        out[np.arange(len(a)), a % self.n_regulators] = 1 + a // self.n_regulators
        return out

    def action_mask(self, applied):
        free = np.asarray(applied) == 0
        return np.concatenate([free, free], 1)

    def delta(self, cells, applied):
        ap = np.asarray(applied)
        return (ap == 1).astype(float) @ self.push[:self.n_regulators] + (ap == 2).astype(float) @ self.push[
            self.n_regulators:]

    def step(self, cells, applied):
        self.calls += 1
        x = self.X[np.asarray(cells)] + self.delta(cells, applied)
        d = (x ** 2).sum(1)[:, None] - 2 * x @ self.X.T + (self.X ** 2).sum(1)[None]
        return d.argmin(1)


@pytest.fixture(scope="module")
def problem():
    m = random_model(n_cells=300, n_genes=20, n_types=4, n_regulators=6, seed=0)
    return m, FakeEngine(m), TaskGeometry.from_model(m)


def test_gymnasium_and_sb3_check_env(problem):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    m, eng, geo = problem
    check_env(PersistentReprogrammingEnv(geo, eng, {}), skip_render_check=True)
    sb3_check_env(PersistentReprogrammingEnv(geo, eng, {}), warn=True)
    env = gym.make(PERSISTENT_ENV_ID, model=m, engine=eng, env_cfg={"max_steps": 5})
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["applied"].shape == (6,) and not obs["applied"].any()
    env.close()


def test_step_applies_set_masks_genes_and_rewards(problem):
    m, eng, geo = problem
    p = EnvParams.from_config({"goal_bonus": 2.0, "max_steps": 8})
    env = PersistentReprogrammingEnv(geo, eng, p, split="test", training=False)
    src = int(np.flatnonzero((geo.split == "test") & (geo.type_ids != 1))[0])
    obs, info = env.reset(options={"start_cell": src, "target_type": 1})
    applied = np.zeros((1, 6), np.int8)
    cell = src
    for a in (2, 6 + 4, 0):                          # KO g2, OE g4, KO g0
        assert env.action_masks()[a]
        obs, r, term, trunc, info = env.step(a)
        applied = eng.apply(applied, [a])
        nxt = int(eng.step([cell], applied)[0])      # the whole set, simulated from the current cell
        want = p.step_penalty + p.distance_reward_scale * (p.gamma * geo.cos_sim[nxt, 1] - geo.cos_sim[cell, 1])
        want += p.goal_bonus * geo.goal_mask[1, nxt]
        assert info["cell"] == nxt and r == pytest.approx(float(want), rel=1e-5)
        np.testing.assert_array_equal(obs["applied"], applied_obs(applied)[0])
        np.testing.assert_array_equal(obs["current_expression"], geo.z[nxt])
        cell = nxt
        if term or trunc:
            break
    if not (term or trunc):
        mask = env.action_masks()
        assert not mask[:12].any()                   # the set is full (max_set_size 3): only HOLD is left
        hold_next = int(eng.step([cell], applied)[0])
        assert mask[12] == (hold_next != cell and geo.split[hold_next] in ("train", "val", "test"))
    assert info["plan"] == [2, 10, 0][:len(info["plan"])]
    assert set_labels(applied[0], eng.regulators)[:1] == [f"KO:{eng.regulators[0]}"]
    np.testing.assert_array_equal(obs["applied"], [-1, 0, -1, 0, 1, 0])


def test_gene_masks_and_hold_never_loops(problem):
    m, eng, geo = problem
    env = PersistentReprogrammingEnv(geo, eng, {"max_steps": 40, "max_set_size": 2}, split="train", training=False)
    obs, _ = env.reset(seed=3)
    assert env.action_space.n == 13 and not env.action_masks()[12]     # HOLD needs a non-empty set
    _, _, term, trunc, info = env.step(1)                              # KO g1
    mask = env.action_masks()
    assert not mask[1] and not mask[7] and mask[[0, 2, 3, 4, 5, 6, 8]].all()   # KO and OE of g1 exclude
    if not (term or trunc):
        _, _, term, trunc, info = env.step(6 + 3)                      # OE g3: the set is full
    run = [info["cell"]]
    while not (term or trunc):
        mask = env.action_masks()
        assert not mask[:12].any() and mask[12]
        _, _, term, trunc, info = env.step(12)
        run.append(info["cell"])
    assert len(set(run)) == len(run)                                   # holding never revisits a cell
    assert info["plan"][:2] == [1, 9] and set(info["plan"][2:]) <= {12}
    assert term or len(info["plan"]) == 40 or not env.action_masks().any()


def test_training_never_enters_heldout_cells_moves_there_enter_the_proxy(problem):
    m, eng, geo = problem
    proxy = training_proxy(geo)
    is_train = geo.split == "train"
    out = np.flatnonzero(~is_train)
    assert (proxy[is_train] == np.flatnonzero(is_train)).all() and is_train[proxy].all()
    d = ((geo.z[out][:, None, :].astype(np.float64) - geo.z[None].astype(np.float64)) ** 2).sum(-1)
    same = (geo.goal_mask[:, out].T[:, None, :] == geo.goal_mask.T[None]).all(-1) & is_train[None]
    assert same[np.arange(len(out)), proxy[out]].all()     # a training cell with the same goal status ...
    assert (proxy[out] == np.where(same, d, np.inf).argmin(1)).all()     # ... the nearest one
    assert (~geo.goal_mask[:, out]).all(0).any() and geo.goal_mask[:, out].any(0).any()  # both kinds occur
    env = VecPersistentEnv(geo, eng, 32, {"max_steps": 6, "curriculum": {"enabled": False}}, split="train",
                           training=True, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    b = env.batch
    proxied = 0
    for _ in range(60):
        before_cell, before_set = b.cell.copy(), b.applied.copy()
        a = env.sample_masked_actions(rng)
        hold_next = b.hold_next.copy()
        gene = a < b.hold
        want = simulate(eng, before_cell[gene], eng.apply(before_set[gene], a[gene]))  # where the engine lands
        _, _, done, infos = env.step(a)
        landed = np.where(done, [inf.get("final_cell", -1) for inf in infos], b.cell)
        assert (landed[gene] == proxy[want]).all()                  # a gene move enters its cell's proxy
        assert (landed[~gene] == hold_next[~gene]).all() and is_train[hold_next[~gene]].all()
        assert (b.applied[gene & ~done] != before_set[gene & ~done]).any(1).all()  # the set changed all the same
        proxied += int((~is_train[want]).sum())
        assert is_train[landed].all()
    assert proxied > 0                                    # the fake engine does lead into val/test cells
    ev = VecPersistentEnv(geo, eng, 8, {"max_steps": 6, "curriculum": {"enabled": False}}, split="test",
                          training=False, seed=0)
    assert ev.batch.proxy is None                         # evaluation walks every cell


def test_training_proxy_falls_back_to_the_nearest_training_cell(problem):
    """A held-out cell whose goal status no training cell shares gets the nearest training cell of all."""
    import dataclasses

    m, eng, geo = problem
    is_train = geo.split == "train"
    c = int(np.flatnonzero(~is_train)[0])
    goal = np.array(geo.goal_mask, copy=True)
    goal[:, c] = True                                     # a goal of every type: no training cell is
    assert not goal[:, is_train].all(0).any()
    proxy = training_proxy(dataclasses.replace(geo, goal_mask=goal))
    d = ((geo.z[is_train].astype(np.float64) - geo.z[c].astype(np.float64)) ** 2).sum(1)
    assert proxy[c] == np.flatnonzero(is_train)[d.argmin()]


def test_vec_env_equals_single_env_and_state_roundtrip(problem):
    m, eng, geo = problem
    cfg = {"max_steps": 5}
    starts = np.flatnonzero(geo.split == "test")[:6]
    targets = (geo.type_ids[starts] + 1) % geo.n_types
    vec = VecPersistentEnv(geo, eng, len(starts), cfg, split="test", training=False, seed=0)
    vec.set_tasks(starts, targets)
    obs = vec.reset()
    singles = [PersistentReprogrammingEnv(geo, eng, cfg, split="test", training=False) for _ in starts]
    for e, s, t in zip(singles, starts, targets):
        e.reset(options={"start_cell": int(s), "target_type": int(t)})
    rng = np.random.default_rng(1)
    alive = np.ones(len(starts), bool)
    for k in range(3):
        a = vec.sample_masked_actions(rng)
        if k == 1:
            state = vec.get_state()
            vec2 = VecPersistentEnv(geo, eng, len(starts), cfg, split="test", training=False)
            vec2.set_state(state)
            np.testing.assert_array_equal(vec2.current_obs()["applied"], obs["applied"])
            np.testing.assert_array_equal(vec2.action_masks(), vec.action_masks())
        obs, rew, done, infos = vec.step(a)
        for i in np.flatnonzero(alive):
            o, r, *_ = singles[i].step(int(a[i]))
            assert r == pytest.approx(float(rew[i]), rel=1e-5)
            if not done[i]:
                np.testing.assert_array_equal(o["applied"], obs["applied"][i])
        alive &= ~done
        if k == 0:
            assert alive.all()


def test_bad_engine_and_setting_are_clear_errors(problem):
    m, eng, geo = problem
    small = random_model(n_cells=100, n_genes=20, n_types=4, n_regulators=6, seed=1)
    with pytest.raises(InputError, match="engine has 300 cells"):
        VecPersistentEnv(TaskGeometry.from_model(small), eng, 2, {})
    with pytest.raises(InputError, match="perturbation_model"):
        EnvParams.from_config({"perturbation_model": "sticky"})
    assert EnvParams.from_config({"perturbation_model": "persistent"}).perturbation_model == "persistent"


def test_maskable_ppo_learns_on_the_persistent_env(problem):
    """The reference network accepts the applied set (concatenated to the cell's input) and PPO runs."""
    from cellrl.train import build_agent

    m, eng, geo = problem
    env = VecPersistentEnv(geo, eng, 4, {"max_steps": 4}, split="train", seed=0)
    agent = build_agent(env, {"n_steps": 16, "batch_size": 32, "n_epochs": 1, "embed_dims": [16, 8],
                              "actor_dims": [8], "critic_dims": [8], "device": "cpu"})
    fe = agent.policy.features_extractor
    assert fe.with_applied and fe.current[0].in_features == geo.n_genes + 6
    agent.learn(64)
    obs = env.reset()
    a, _ = agent.predict(obs, action_masks=env.action_masks(), deterministic=True)
    assert env.action_masks()[np.arange(4), a].all()


def test_train_agent_builds_the_persistent_env(problem, tmp_path):
    """cellrl.train.train_agent with an engine trains and validates in persistent mode (no BFS warm start) and
    writes its outputs; a resume from its final checkpoint restores the persistent env state."""
    from cellrl.train import train_agent

    m, eng, geo = problem
    train = {"total_timesteps": 64, "n_envs": 4, "n_steps": 16, "batch_size": 32, "n_epochs": 1,
             "embed_dims": [16, 8], "actor_dims": [8], "critic_dims": [8], "device": "cpu", "eval_every": 32,
             "eval_episodes": 8, "checkpoint_every": 32, "warm_start": "bfs", "wandb": {"mode": "disabled"}}
    env = {"max_steps": 4, "perturbation_model": "persistent"}
    dummy = np.zeros((geo.n_cells, eng.n_actions), np.int32)
    agent, summary = train_agent(geo, dummy, env, train, out_dir=tmp_path, progress=False, engine=eng)
    assert agent.action_space.n == eng.n_actions + 1 and "applied" in agent.observation_space.spaces
    assert summary["timesteps"] == 64 and 0.0 <= summary["final_val_success"] <= 1.0
    assert not summary["warm_start"] and (tmp_path / "model.zip").exists()
    agent2, summary2 = train_agent(geo, dummy, env, train, out_dir=tmp_path, progress=False, engine=eng,
                                   resume=True)
    assert summary2["timesteps"] == 64
