"""Warm start from exact shortest paths: leakage (training graph only, BC and DAgger), labels, value targets, BC
learns, DAgger's budget, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th

from cellrl.bfs import shortest_paths
from cellrl.env import EnvParams, ReprogrammingEnv
from cellrl.errors import InputError
from cellrl.model import random_model
from cellrl.tasks import TaskGeometry, allowed_mask
from cellrl.train import (TRAIN_DEFAULTS, build_agent, evaluate_success, make_vec_env, set_torch_threads,
                          train_agent, train_config)
from cellrl.warmstart import (bc_data, dagger_states, label_states, ppo_config, training_graph, training_paths,
                              warm_start)

from rl_fixtures import random_table, structured_problem

SMALL_NET = dict(embed_dims=[32, 16], actor_dims=[32], critic_dims=[32], device="cpu", seed=3,
                 wandb={"mode": "disabled"})


@pytest.fixture(scope="module")
def problem():
    m = random_model(n_cells=240, n_genes=16, n_types=3, n_regulators=4, seed=1)
    return m, random_table(m, seed=2), TaskGeometry.from_model(m)


def test_bc_never_sees_a_held_out_cell(problem):
    """Every sample's cell, every optimal next hop and every cell of every path the labels trace is a training
    cell, and each path ends on a training goal cell in exactly the recorded distance."""
    m, table, geo = problem
    train = geo.split == "train"
    assert (~train)[table].mean() > 0.1                       # the table does lead into held-out cells
    data = bc_data(geo, table, EnvParams(), gamma=0.98)
    assert len(data) > 100 and train[data.cell].all()
    assert data.optimal.any(1).all() and not (data.optimal & ~data.mask).any()
    hop = table[data.cell[:, None], np.arange(table.shape[1])[None, :]]
    assert train[hop[data.optimal]].all()
    labels = {(int(c), int(t)): row for c, t, row in zip(data.cell, data.target, data.optimal)}
    for c, t, d in zip(data.cell[::7], data.target[::7], data.dist[::7]):
        cell, steps = int(c), 0
        while (cell, int(t)) in labels:
            cell = int(table[cell, int(np.flatnonzero(labels[(cell, int(t))])[0])])
            steps += 1
            assert train[cell]
        assert steps == d and geo.goal_mask[t, cell]
    # the mask of every observation is the training env's mask at an episode's start
    np.testing.assert_array_equal(data.mask, allowed_mask(table, geo.split, training=True)[data.cell])


def test_dagger_states_never_see_a_held_out_cell(problem):
    """DAgger's rollouts (an untrained agent, so it wanders) and labels stay on training cells: every state's
    cell, every move its mask allows and every labelled next hop is a training cell; every state is one BC
    lacks (a revisit-masked mask) and its labels are the nearest allowed next hops on the training graph."""
    set_torch_threads(1)
    m, table, geo = problem
    train = geo.split == "train"
    params = EnvParams.from_config({"max_steps": 8, "mask_revisits": True})
    paths = training_paths(geo, table, params, 0.98)
    data = bc_data(geo, table, params, gamma=0.98, paths=paths)
    agent = build_agent(make_vec_env(geo, table, params, 2, seed=0), train_config(SMALL_NET))
    new, steps = dagger_states(agent, geo, table, params, paths, data, 0.98)
    assert len(new) > 20 and steps > len(new)
    assert train[new.cell].all()
    hop = table[new.cell[:, None], np.arange(table.shape[1])[None, :]]
    assert train[hop[new.mask]].all() and train[hop[new.optimal]].all()
    assert not (new.optimal & ~new.mask).any() and new.optimal.any(1).all()
    assert (new.mask != paths.allowed[new.cell]).any(1).all()          # only states BC does not hold
    nd = paths.dist[hop, new.target[:, None]]
    nd = np.where(new.mask & (nd >= 0), nd, 10 ** 6)
    np.testing.assert_array_equal(new.optimal, nd == nd.min(1, keepdims=True))
    assert len(np.unique(np.concatenate([new.cell[:, None], new.target[:, None], new.mask], 1), axis=0)) == len(new)
    sub, sub_steps = dagger_states(agent, geo, table, params, paths, data, 0.98, max_episodes=10, seed=1)
    assert 0 < sub_steps <= 10 * params.eval_max_steps(geo.n_types) < steps


def test_labels_under_a_revisit_mask_take_the_nearest_open_hop():
    """s -a0-> x -> g (2 steps) and s -a1-> y -> z -> g (3 steps). With a0 open the label is a0 (BC's optimal
    hop); with a0 masked (x already visited) it is a1, the nearest hop still open; with both masked, none."""
    m = random_model(n_cells=200, n_genes=10, n_types=3, n_regulators=2, seed=3)
    geo = TaskGeometry.from_model(m)
    tr = np.flatnonzero((geo.split == "train") & (geo.type_ids == 0) & ~geo.goal_mask[1])
    s, x, y, z = (int(c) for c in tr[:4])
    g = int(np.flatnonzero(geo.goal_mask[1] & (geo.split == "train"))[0])
    table = np.tile(np.arange(m.n_cells, dtype=np.int32)[:, None], (1, m.n_actions))   # self-loops: masked
    table[s, 0], table[x, 0] = x, g
    table[s, 1], table[y, 1], table[z, 1] = y, z, g
    paths = training_paths(geo, table, EnvParams(), 0.98)
    cell, target = np.array([s, s, s]), np.array([1, 1, 1])
    mask = np.zeros((3, m.n_actions), bool)
    mask[0, :2] = mask[1, 1] = True
    got = label_states(paths, table, cell, target, mask)
    assert np.flatnonzero(got[0]).tolist() == [0] and np.flatnonzero(got[1]).tolist() == [1] and not got[2].any()


def test_bc_labels_avoid_a_shortcut_through_a_validation_cell():
    """Start s -> validation cell v -> goal g is 2 steps; the training graph only has s -> x -> y -> g (3).
    BC labels the 3-step route, the test-time BFS the 2-step one."""
    m = random_model(n_cells=200, n_genes=10, n_types=3, n_regulators=2, seed=3)
    geo = TaskGeometry.from_model(m)
    tr = np.flatnonzero((geo.split == "train") & (geo.type_ids == 0) & ~geo.goal_mask[1])
    s, x, y = (int(c) for c in tr[:3])
    v = int(np.flatnonzero(geo.split == "val")[0])
    g = int(np.flatnonzero(geo.goal_mask[1] & (geo.split == "train"))[0])
    table = np.tile(np.arange(m.n_cells, dtype=np.int32)[:, None], (1, m.n_actions))   # self-loops: masked
    table[s, 0], table[v, 0] = v, g                          # the shortcut through v
    table[s, 1], table[x, 1], table[y, 1] = x, y, g          # the training route
    full = shortest_paths(table, geo.goal_mask, allowed_mask(table, geo.split, training=False))
    assert full.dist[s, 1] == 2 and full.next_action[s, 1] == 0
    data = bc_data(geo, table, EnvParams(), gamma=0.98)
    row = np.flatnonzero((data.cell == s) & (data.target == 1))
    assert len(row) == 1
    assert data.dist[row[0]] == 3 and np.flatnonzero(data.optimal[row[0]]).tolist() == [1]
    assert not data.mask[row[0], 0]                          # the move into v is masked in the observation
    assert v not in data.cell
    allowed, goal = training_graph(geo, table)
    assert not allowed[v].any() and not goal[:, geo.split != "train"].any()


def test_value_targets_are_the_env_return_of_the_shortest_path(problem):
    m, table, geo = problem
    params = EnvParams.from_config({"goal_bonus": 2.0, "max_steps": 50})
    gamma = 0.97
    data = bc_data(geo, table, params, gamma=gamma)
    allowed, goal = training_graph(geo, table)
    res = shortest_paths(table, goal, allowed)
    env = ReprogrammingEnv(geo, table, params, training=True)
    for i in np.flatnonzero((data.dist >= 2) & (geo.type_ids[data.cell] != data.target))[:20]:
        c, t = int(data.cell[i]), int(data.target[i])
        env.reset(options={"start_cell": c, "target_type": t})
        ret, k, done = 0.0, 0, False
        while not done:
            _, r, term, trunc, _ = env.step(int(res.next_action[env.batch.cell[0], t]))
            ret += gamma ** k * r
            k += 1
            done = term or trunc
        assert term and k == data.dist[i]
        assert data.value[i] == pytest.approx(ret, rel=1e-4, abs=1e-4)


def test_behaviour_cloning_alone_solves_a_structured_problem():
    """structured_problem: one right action of ~2R per task. BC alone (no env step) reaches nearly every
    validation task; a random masked policy does not."""
    set_torch_threads(1)
    m, table = structured_problem(n_cells=400, n_genes=24, n_types=4, n_regulators=10, seed=0)
    geo = TaskGeometry.from_model(m)
    env_cfg = {"max_steps": 4, "curriculum": {"enabled": False}}
    cfg = train_config({**SMALL_NET, "warm_start_epochs": 30})
    agent = build_agent(make_vec_env(geo, table, env_cfg, 4, seed=0), cfg)
    rec = warm_start(agent, geo, table, EnvParams.from_config(env_cfg), cfg)
    assert rec["method"] == "bfs" and rec["epochs"] == 30 and rec["accuracy"] > 0.6  # type-t cells: random labels
    assert rec["samples"] >= rec["pairs"] > 0 and rec["seconds"] >= rec["bfs_seconds"] >= 0
    bc = evaluate_success(agent, geo, table, env_cfg, split="val", n_episodes=200, seed=0)
    rnd = evaluate_success(None, geo, table, env_cfg, split="val", n_episodes=200, seed=0)
    assert bc["success_rate"] >= 0.85 and bc["success_rate"] >= rnd["success_rate"] + 0.5


def test_warm_start_settings_seeding_and_summary(problem, tmp_path):
    m, table, geo = problem
    env_cfg = {"max_steps": 6, "curriculum": {"enabled": False}}
    cfg = {**SMALL_NET, "total_timesteps": 64, "n_envs": 2, "n_steps": 32, "batch_size": 16, "n_epochs": 1,
           "eval_every": 64, "eval_episodes": 10, "warm_start_epochs": 3}
    a1, s1 = train_agent(m, table, env_cfg, cfg, progress=False, threads=1)
    a2, s2 = train_agent(m, table, env_cfg, cfg, progress=False, threads=1)
    for k, v in a1.policy.state_dict().items():
        assert th.equal(v, a2.policy.state_dict()[k]), k
    ws = s1["warm_start"]
    assert ws["method"] == "bfs" and ws["epochs"] == 3 and len(ws["loss_per_epoch"]) == 3 and ws["env_steps"] == 0
    assert {k: v for k, v in ws.items() if "seconds" not in k} == \
        {k: v for k, v in s2["warm_start"].items() if "seconds" not in k}
    for key in ("val_before_ppo", "val_after_ppo"):       # validation quality right after the warm start, after PPO
        q = ws[key]
        assert q["split"] == "val" and q["episodes"] == 10 and 0 <= q["success"] <= 1
    scale = TRAIN_DEFAULTS["warm_start_ppo_lr_scale"]
    assert a1.learning_rate == pytest.approx(train_config(cfg)["learning_rate"] * scale)
    assert ppo_config({"learning_rate": 1e-3, "warm_start": "none", "warm_start_ppo_lr_scale": 0.1})[
        "learning_rate"] == 1e-3
    a3, s3 = train_agent(m, table, env_cfg, {**cfg, "warm_start": "none"}, progress=False, threads=1)
    assert s3["warm_start"]["method"] == "none" and s3["warm_start"]["env_steps"] == 0
    assert not all(th.equal(v, a3.policy.state_dict()[k]) for k, v in a1.policy.state_dict().items())
    with pytest.raises(InputError, match="unknown train.warm_start"):
        train_agent(m, table, env_cfg, {**cfg, "warm_start": "bogus"}, progress=False, threads=1)


def test_dagger_rounds_pay_from_the_step_budget(problem):
    """``dagger``: BC, then rounds of new labelled states; their rollout steps come out of total_timesteps (PPO
    trains the rest, in whole rollouts), the record says so, and the run is seeded like ``bfs``."""
    m, table, geo = problem
    env_cfg = {"max_steps": 6, "curriculum": {"enabled": False}}
    cfg = {**SMALL_NET, "n_envs": 2, "n_steps": 32, "batch_size": 16, "n_epochs": 1, "eval_every": 64,
           "eval_episodes": 10, "warm_start": "dagger", "warm_start_epochs": 3, "warm_start_dagger_rounds": 2,
           "warm_start_dagger_episodes": 30}
    probe = warm_start(build_agent(make_vec_env(geo, table, env_cfg, 2, seed=0), train_config(cfg)), geo, table,
                       EnvParams.from_config(env_cfg), train_config(cfg))
    total = probe["env_steps"] + 128
    a1, s1 = train_agent(m, table, env_cfg, {**cfg, "total_timesteps": total}, progress=False, threads=1)
    ws = s1["warm_start"]
    assert ws["method"] == "dagger" and len(ws["dagger_rounds"]) == 2
    assert ws["env_steps"] == sum(r["env_steps"] for r in ws["dagger_rounds"]) == probe["env_steps"] > 0
    assert ws["samples"] == ws["dagger_rounds"][-1]["samples"] > ws["dagger_rounds"][0]["samples"] - \
        ws["dagger_rounds"][0]["new_samples"]
    assert s1["timesteps"] == 128 and s1["env_steps"] == total
    assert a1.learning_rate == pytest.approx(train_config(cfg)["learning_rate"] * cfg.get(
        "warm_start_ppo_lr_scale", TRAIN_DEFAULTS["warm_start_ppo_lr_scale"]))
    a2, s2 = train_agent(m, table, env_cfg, {**cfg, "total_timesteps": total}, progress=False, threads=1)
    for k, v in a1.policy.state_dict().items():
        assert th.equal(v, a2.policy.state_dict()[k]), k
    _, s3 = train_agent(m, table, env_cfg, {**cfg, "total_timesteps": 10}, progress=False, threads=1)
    assert s3["timesteps"] == 0 and s3["warm_start"]["env_steps"] > 10     # the rollouts took the whole budget


def test_report_has_a_warm_start_section(tmp_path):
    """The pipeline report shows the warm start of train_summary.json: method, samples, and the validation numbers
    before and after PPO; without a train summary there is no such section."""
    import json

    from cellrl.report import write_report

    s = tmp_path / "default" / "summary.json"
    s.parent.mkdir()
    s.write_text(json.dumps({"policies": {}}))
    t = tmp_path / "train_summary.json"
    t.write_text(json.dumps({"warm_start": {
        "method": "dagger", "samples": 1179, "epochs": 60, "accuracy": 0.9958, "env_steps": 5293, "seconds": 16.9,
        "val_before_ppo": {"split": "val", "episodes": 80, "success": 0.325, "success_reachable": 1.0,
                           "length_ratio": 1.169},
        "val_after_ppo": {"split": "val", "episodes": 80, "success": 0.3125, "success_reachable": 0.9615,
                          "length_ratio": 1.2041}}}))
    html = write_report(tmp_path / "r.html", "x", [s], [], train_summaries=[t]).read_text()
    sec = html[html.index("<h3>Warm start</h3>"):]
    for needle in ("DAgger", "1,179", "5,293", "warm start only (before PPO)", "after PPO", "1.17", "1.2", "96.2%"):
        assert needle in sec, needle
    assert sec.index("before PPO") < sec.index("after PPO")
    assert "<h3>Warm start</h3>" not in write_report(tmp_path / "r2.html", "x", [s], []).read_text()
