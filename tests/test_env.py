"""Reprogramming environment: API checks, reward, goal, masking/leakage, curriculum, vector = single env."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from cellrl.env import ENV_ID, EnvParams, ReprogrammingEnv, VecReprogrammingEnv
from cellrl.errors import InputError
from cellrl.model import random_model
from cellrl.tasks import TaskGeometry

from rl_fixtures import random_table


@pytest.fixture(scope="module")
def problem():
    m = random_model(n_cells=300, n_genes=20, n_types=4, n_regulators=6, seed=0)
    return m, random_table(m, seed=1), TaskGeometry.from_model(m)


def test_gymnasium_and_sb3_check_env(problem):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    m, table, geo = problem
    check_env(ReprogrammingEnv(geo, table, {}), skip_render_check=True)
    sb3_check_env(ReprogrammingEnv(geo, table, {}), warn=True)
    env = gym.make(ENV_ID, model=m, table=table, env_cfg={"max_steps": 5})
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    env.close()


def test_reward_goal_and_observation(problem):
    m, table, geo = problem
    p = EnvParams.from_config({"goal_bonus": 3.0})
    env = ReprogrammingEnv(geo, table, p, split="train", training=True)
    obs, info = env.reset(seed=1)
    c, t = info["cell"], info["target_type"]
    np.testing.assert_array_equal(obs["current_expression"], geo.z[c])
    np.testing.assert_array_equal(obs["target_expression"], geo.centroids[t])
    mask = env.action_masks()
    np.testing.assert_array_equal(obs["action_mask"].astype(bool), mask)
    a = int(np.flatnonzero(mask)[0])
    nxt = int(table[c, a])
    obs2, r, term, trunc, info2 = env.step(a)
    want = p.step_penalty + p.distance_reward_scale * (p.gamma * geo.cos_sim[nxt, t] - geo.cos_sim[c, t])
    want += p.goal_bonus * geo.goal_mask[t, nxt]
    assert info2["cell"] == nxt
    assert r == pytest.approx(float(want), rel=1e-5)
    assert term == bool(geo.goal_mask[t, nxt])
    # a fixed task through reset options, target by name; an unknown name is a clear error
    goal_cell = int(np.flatnonzero(geo.goal_mask[2])[0])
    src = int(np.flatnonzero((geo.type_ids != 2) & (geo.split == "train"))[0])
    obs, info = env.reset(options={"start_cell": src, "target_type": str(geo.type_names[2])})
    assert info["cell"] == src and info["target_type"] == 2
    with pytest.raises(InputError, match="unknown target cell type"):
        env.reset(options={"start_cell": src, "target_type": "NoSuchType"})
    assert goal_cell >= 0


def test_goal_terminates_with_success():
    m = random_model(n_cells=120, n_genes=10, n_types=3, n_regulators=2, seed=2)
    geo = TaskGeometry.from_model(m)
    goal = int(np.flatnonzero(geo.goal_mask[1] & (geo.split == "train"))[0])
    table = np.tile(np.arange(m.n_cells, dtype=np.int32)[:, None], (1, m.n_actions))
    table[:, 0] = goal                                   # action 0 jumps to a goal cell of type 1
    env = ReprogrammingEnv(geo, table, {"goal_bonus": 10.0})
    src = int(np.flatnonzero((geo.type_ids == 0) & (geo.split == "train"))[0])
    env.reset(options={"start_cell": src, "target_type": 1})
    _, r, term, trunc, info = env.step(0)
    assert term and not trunc and info["is_success"]
    assert r > 5


def test_dead_end_truncates_and_masked_action_stays():
    m = random_model(n_cells=100, n_genes=10, n_types=3, n_regulators=2, seed=4)
    geo = TaskGeometry.from_model(m)
    table = np.tile(np.arange(m.n_cells, dtype=np.int32)[:, None], (1, m.n_actions))
    src = int(np.flatnonzero((geo.type_ids == 0) & (geo.split == "train"))[0])
    dead = int(np.flatnonzero((geo.type_ids == 0) & (geo.split == "train") & ~geo.goal_mask[1])[1])
    table[src, 1] = dead                                 # dead has only self-loops
    env = ReprogrammingEnv(geo, table, {})
    env.reset(options={"start_cell": src, "target_type": 1})
    _, _, term, trunc, info = env.step(0)                # masked (self-loop): stays, episode continues
    assert info["invalid_action"] and info["cell"] == src and not (term or trunc)
    _, _, term, trunc, info = env.step(1)
    assert info["cell"] == dead and trunc and not term
    with pytest.raises(InputError, match="no usable start cells"):
        VecReprogrammingEnv(geo, np.tile(np.arange(m.n_cells, dtype=np.int32)[:, None], (1, m.n_actions)), 2)


def test_no_training_episode_visits_a_held_out_cell(problem):
    """Leakage: random (even unmasked) actions over many training episodes only ever visit training cells."""
    m, table, geo = problem
    held_out = geo.split != "train"
    assert held_out[table].mean() > 0.1                  # the table does lead into held-out cells
    env = VecReprogrammingEnv(geo, table, 64, {"max_steps": 12}, split="train", training=True, seed=5)
    env.reset()
    rng = np.random.default_rng(0)
    visited = np.zeros(geo.n_cells, bool)
    episodes = 0
    for step in range(600):
        visited[env.batch.cell] = True
        a = env.sample_masked_actions(rng) if step % 2 else rng.integers(0, m.n_actions, 64)
        _, _, dones, infos = env.step(a)
        episodes += int(dones.sum())
        for i in np.flatnonzero(dones):
            visited[infos[i]["final_cell"]] = True
            visited[infos[i]["start_cell"]] = True
    assert episodes > 2000
    assert not visited[held_out].any()
    # evaluation mode does reach held-out cells (the mask differs only in training)
    ev = VecReprogrammingEnv(geo, table, 64, {}, split="test", training=False, seed=5)
    ev.reset()
    assert (geo.split[ev.batch.start] == "test").all()
    seen = np.zeros(geo.n_cells, bool)
    for _ in range(50):
        ev.step(ev.sample_masked_actions(rng))
        seen[ev.batch.cell] = True
    assert seen[held_out & (geo.split == "val")].any()


def test_vec_env_matches_single_env_and_keeps_observations(problem):
    m, table, geo = problem
    n = 6
    vec = VecReprogrammingEnv(geo, table, n, {"max_steps": 4}, seed=11)
    obs = vec.reset()
    singles = [ReprogrammingEnv(geo, table, {"max_steps": 4}) for _ in range(n)]
    for i, e in enumerate(singles):
        e.reset(options={"start_cell": int(vec.batch.cell[i]), "target_type": int(vec.batch.target[i])})
    rng = np.random.default_rng(3)
    prev = {k: v.copy() for k, v in obs.items()}
    for _ in range(3):
        a = vec.sample_masked_actions(rng)
        obs_before = obs
        obs, r, d, infos = vec.step(a)
        # the previous observation is still intact (two buffers used in turn)
        for k in prev:
            np.testing.assert_array_equal(obs_before[k], prev[k])
        for i, e in enumerate(singles):
            o, ri, term, trunc, _ = e.step(int(a[i]))
            assert ri == pytest.approx(float(r[i]), rel=1e-6)
            assert d[i] == (term or trunc)
            if not d[i]:
                np.testing.assert_array_equal(o["current_expression"], obs["current_expression"][i])
                np.testing.assert_array_equal(o["action_mask"], obs["action_mask"][i])
            else:
                np.testing.assert_array_equal(o["current_expression"],
                                              infos[i]["terminal_observation"]["current_expression"])
        prev = {k: v.copy() for k, v in obs.items()}
        if d.any():
            break
    np.testing.assert_array_equal(vec.action_masks(), obs["action_mask"].astype(bool))
    np.testing.assert_array_equal(obs["target_expression"], geo.centroids[vec.batch.target])
    np.testing.assert_array_equal(obs["current_expression"], geo.z[vec.batch.cell])


def test_vec_env_sb3_contract_and_seeding(problem):
    from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported

    m, table, geo = problem
    vec = VecReprogrammingEnv(geo, table, 5, {}, seed=0)
    assert is_masking_supported(vec)
    vec.seed(123)
    o1 = {k: v.copy() for k, v in vec.reset().items()}
    assert get_action_masks(vec).shape == (5, m.n_actions)
    vec.seed(123)
    o2 = vec.reset()
    for k in o1:
        np.testing.assert_array_equal(o1[k], o2[k])
    state = vec.get_state()
    a = vec.sample_masked_actions(np.random.default_rng(0))
    out1 = vec.step(a)
    cur1 = out1[0]["current_expression"].copy()        # observations are reused buffers: copy to keep
    vec.set_state(state)
    out2 = vec.step(a)
    np.testing.assert_array_equal(out1[1], out2[1])
    np.testing.assert_array_equal(cur1, out2[0]["current_expression"])


def test_curriculum_phases_targets_and_max_steps():
    m = random_model(n_cells=600, n_genes=12, n_types=8, n_regulators=4, seed=5)
    geo = TaskGeometry.from_model(m)
    table = random_table(m, seed=2)
    cfg = {"max_steps": 10, "curriculum": {"enabled": True, "targets_per_phase": 2, "first_phase_steps": 100,
                                           "success_threshold": 0.5, "step_increase_per_phase": 3,
                                           "window": 10}}
    p = EnvParams.from_config(cfg)
    assert p.n_phases(8) == 4 and p.eval_max_steps(8) == 19
    env = VecReprogrammingEnv(geo, table, 32, p, seed=0)
    env.reset()
    b = env.batch
    assert b.phase == 0 and b.n_targets == 2 and (b.limit == 10).all()
    start, target = b.sample_tasks(2000)
    order = geo.target_order()
    assert all(t in order[geo.type_ids[s], :2] for s, t in zip(start, target))
    # successes before first_phase_steps do not advance; after, they do (window full, rate >= threshold)
    b.record_outcomes(np.ones(10, bool))
    assert b.phase == 0
    b.total_steps = 100
    b.record_outcomes(np.ones(10, bool))
    assert b.phase == 1 and b.n_targets == 4 and b.max_steps == 13
    b.record_outcomes(np.array([1, 0] * 5, bool))          # 50% >= 0.5: later phases need no minimum steps
    assert b.phase == 2
    b.record_outcomes(np.zeros(10, bool))
    assert b.phase == 2
    b.record_outcomes(np.ones(10, bool))
    assert b.phase == 3 and b.n_targets == 7 and b.max_steps == 19
    b.record_outcomes(np.ones(50, bool))
    assert b.phase == 3                                     # final phase
    # evaluation envs: no curriculum, all targets, the final phase's step limit
    ev = VecReprogrammingEnv(geo, table, 4, p, split="val", training=False)
    assert ev.batch.n_targets == 7 and ev.batch.max_steps == 19 and ev.batch.n_phases == 1


def test_bad_settings():
    with pytest.raises(InputError, match="unknown env settings"):
        EnvParams.from_config({"max_step": 3})
    m = random_model(n_cells=60, n_genes=8, n_types=2, n_regulators=2, seed=0)
    with pytest.raises(InputError, match="unknown split"):
        VecReprogrammingEnv(m, random_table(m), 2, {}, split="training")
    with pytest.raises(InputError, match="does not match"):
        VecReprogrammingEnv(m, random_table(m)[:-1], 2, {})


# ------------------------------------------------------------------------------------------------ no loops
def _episode_paths(env, steps, rng):
    """Run ``steps`` vector steps with random masked actions; return every finished episode's cells."""
    b = env.batch
    cur = [[int(c)] for c in b.cell]
    done_paths = []
    for _ in range(steps):
        _, _, dones, infos = env.step(env.sample_masked_actions(rng))
        for i in range(env.num_envs):
            if dones[i]:
                cur[i].append(infos[i]["final_cell"])
                done_paths.append(cur[i])
                cur[i] = [int(b.cell[i])]
            else:
                cur[i].append(int(b.cell[i]))
    return done_paths


def test_no_episode_revisits_a_cell(problem):
    """mask_revisits (default): training and evaluation episodes never come back to a cell they visited;
    without it random walks on the same table do."""
    m, table, geo = problem
    assert EnvParams().mask_revisits
    rng = np.random.default_rng(0)
    for split, training in (("train", True), ("test", False)):
        env = VecReprogrammingEnv(geo, table, 32, {"max_steps": 30}, split=split, training=training, seed=1)
        env.reset()
        paths = _episode_paths(env, 300, rng)
        assert len(paths) > 100
        assert all(len(set(p)) == len(p) for p in paths)
        # the mask never offers a move into the path; the observation carries the same mask
        b = env.batch
        for i in range(env.num_envs):
            nxt = table[b.cell[i], env.action_masks()[i]]
            assert not np.isin(nxt, b.path[i, :b.t[i] + 1]).any()
        np.testing.assert_array_equal(env.action_masks(), b.masks_of())
    loops = VecReprogrammingEnv(geo, table, 32, {"max_steps": 30, "mask_revisits": False}, seed=1)
    loops.reset()
    assert any(len(set(p)) < len(p) for p in _episode_paths(loops, 300, rng))


def test_revisit_mask_dead_end_truncates():
    """A cell whose only move leads back into the episode's path ends the episode (truncated)."""
    m = random_model(n_cells=100, n_genes=10, n_types=3, n_regulators=2, seed=4)
    geo = TaskGeometry.from_model(m)
    a, b = (int(c) for c in np.flatnonzero((geo.type_ids == 0) & (geo.split == "train"))[:2])
    table = np.tile(np.arange(m.n_cells, dtype=np.int32)[:, None], (1, m.n_actions))
    table[a, 0], table[b, 0] = b, a                          # a <-> b, nothing else moves
    env = ReprogrammingEnv(geo, table, {})
    env.reset(options={"start_cell": a, "target_type": 1})
    assert env.action_masks().tolist() == [True] + [False] * (m.n_actions - 1)
    _, _, term, trunc, info = env.step(0)
    assert info["cell"] == b and trunc and not term         # b's only move returns to a
    env = ReprogrammingEnv(geo, table, {"mask_revisits": False, "max_steps": 3})
    env.reset(options={"start_cell": a, "target_type": 1})
    _, _, term, trunc, _ = env.step(0)
    assert not (term or trunc) and env.action_masks()[0]


def test_get_state_set_state_round_trip_with_the_visited_cells(problem):
    """Checkpoint state (through JSON, as checkpoints store it) restores paths and masks: the restored env
    continues exactly like the original."""
    import json

    from cellrl.checkpoints import _plain

    m, table, geo = problem
    cfg = {"max_steps": 12}
    env = VecReprogrammingEnv(geo, table, 8, cfg, seed=3)
    env.reset()
    rng = np.random.default_rng(1)
    for _ in range(5):
        env.step(env.sample_masked_actions(rng))
    assert (env.batch.t >= 2).any()
    state = json.loads(json.dumps(_plain(env.get_state())))
    twin = VecReprogrammingEnv(geo, table, 8, cfg, seed=99)
    twin.reset()
    twin.set_state(state)
    np.testing.assert_array_equal(twin.batch.path, env.batch.path)
    np.testing.assert_array_equal(twin.action_masks(), env.action_masks())
    np.testing.assert_array_equal(twin.current_obs()["action_mask"], env.current_obs()["action_mask"])
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(20):
        o1, rew1, d1, _ = env.step(env.sample_masked_actions(r1))
        o2, rew2, d2, _ = twin.step(twin.sample_masked_actions(r2))
        np.testing.assert_array_equal(rew1, rew2)
        np.testing.assert_array_equal(d1, d2)
        np.testing.assert_array_equal(o1["action_mask"], o2["action_mask"])
        np.testing.assert_array_equal(env.batch.path, twin.batch.path)
