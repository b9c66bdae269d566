"""Persistent-mode warm start (cellrl.persistent.warmstart): exact plans from training cells only, replayed in
the training env into behaviour-cloning samples; no plan repeats a gene; cloning fits the labels."""

from __future__ import annotations

import numpy as np
import pytest

from cellrl.env import EnvParams
from cellrl.model import random_model
from cellrl.persistent.env import VecPersistentEnv, hold_action
from cellrl.persistent.search import exact
from cellrl.persistent.warmstart import plan_samples, training_plans, training_starts, warm_start_persistent
from cellrl.tasks import TaskGeometry
from test_persistent_env import FakeEngine


@pytest.fixture(scope="module")
def problem():
    m = random_model(n_cells=240, n_genes=16, n_types=4, n_regulators=4, seed=2)
    geo = TaskGeometry.from_model(m)
    eng = FakeEngine(m, seed=3, scale=0.8)
    params = EnvParams.from_config({"max_steps": 12, "max_set_size": 2, "curriculum": {"enabled": False}})
    return m, eng, geo, params


def test_plans_and_samples_use_training_cells_only(problem):
    m, eng, geo, params = problem
    is_train = geo.split == "train"
    starts = training_starts(geo, 4)
    assert is_train[starts].all() and len(np.unique(geo.type_ids[starts])) == geo.n_types
    plans = training_plans(eng, geo, starts, 2, params.eval_max_steps(geo.n_types))
    assert plans.success.any()
    for ok, cells in zip(plans.success, plans.cells):
        assert is_train[cells].all()                      # every cell a plan visits is a training cell
    # unrestricted, the same search does use held-out cells here (the restriction is not vacuous)
    free = exact(eng, geo, plans.starts, plans.targets, 2, params.eval_max_steps(geo.n_types))
    assert any((~is_train[c]).any() for c in free.cells)
    data, rep = plan_samples(eng, geo, params, plans, gamma=0.98)
    assert rep["dropped_plans"] == 0 and rep["plans"] == int(plans.success.sum())
    assert len(data) == int(plans.lengths[plans.success].sum())
    assert is_train[data.cell].all()
    # the plans are the training env's: replayed there (plan_samples) every state is the plan's own (a move onto
    # a held-out cell enters its training proxy in both)
    ok = np.flatnonzero(plans.success)
    walk = {i: [int(plans.starts[i]), *plans.cells[i]] for i in ok}
    want = [walk[i][k] for k in range(int(plans.lengths[ok].max())) for i in ok if k < plans.lengths[i]]
    assert data.cell.tolist() == want
    assert (data.optimal.sum(1) == 1).all() and data.mask[data.optimal].all()   # one allowed label per state
    assert data.applied.shape == (len(data), eng.n_regulators)
    # the first sample of each plan has the empty set; labels reproduce the plans
    assert (np.abs(data.applied[data.dist == data.dist.max()]).sum() == 0)


def test_no_plan_repeats_a_gene(problem):
    m, eng, geo, params = problem
    plans = training_plans(eng, geo, training_starts(geo, 6), 2, params.eval_max_steps(geo.n_types))
    hold = hold_action(eng)
    for p in plans.plans:
        genes = [a % eng.n_regulators for a in p if a != hold]
        assert len(genes) == len(set(genes)) and len(genes) <= 2


def test_behaviour_cloning_fits_the_plans(problem):
    from cellrl.train import build_agent

    m, eng, geo, params = problem
    env = VecPersistentEnv(geo, eng, 2, params, split="train", training=True, seed=0)
    agent = build_agent(env, {"n_steps": 16, "batch_size": 16, "embed_dims": [32], "actor_dims": [32],
                              "critic_dims": [16], "device": "cpu", "seed": 0})
    rec, data, plans = warm_start_persistent(agent, eng, geo, params, gamma=0.98, per_type=4, epochs=150)
    assert rec["samples"] == len(data) > 0 and rec["dropped_plans"] == 0
    assert rec["accuracy"] >= 0.8, rec["accuracy"]


def test_train_agent_exact_warm_start_in_persistent_mode(problem, tmp_path):
    """train.warm_start exact clones exact plans before PPO (PPO then at the scaled learning rate); the table
    warm starts (bfs) leave the persistent agent at the from-scratch rate; exact in table mode is refused."""
    from cellrl.errors import InputError
    from cellrl.train import train_agent

    m, eng, geo, params = problem
    train = {"total_timesteps": 32, "n_envs": 2, "n_steps": 16, "batch_size": 16, "n_epochs": 1,
             "embed_dims": [16], "actor_dims": [8], "critic_dims": [8], "device": "cpu", "eval_every": 32,
             "eval_episodes": 4, "checkpoint_every": 32, "warm_start": "exact", "warm_start_epochs": 2,
             "warm_start_starts_per_type": 2, "learning_rate": 1e-3, "wandb": {"mode": "disabled"}}
    env = {"max_steps": 6, "max_set_size": 2, "perturbation_model": "persistent"}
    dummy = np.zeros((geo.n_cells, eng.n_actions), np.int32)
    agent, summary = train_agent(geo, dummy, env, train, out_dir=tmp_path / "a", progress=False, engine=eng)
    ws = summary["warm_start"]
    assert ws["method"] == "exact" and ws["samples"] > 0 and ws["start_cells"] == 2 * geo.n_types
    assert agent.learning_rate == pytest.approx(1e-3 * 0.03)
    assert summary["timesteps"] == 32 and ws["labels"] == "one" and ws["labels_per_sample"] == 1
    _, summary = train_agent(geo, dummy, env, dict(train, warm_start_labels="all_plans"), out_dir=tmp_path / "c",
                             progress=False, engine=eng)                 # train.warm_start_labels reaches the warm start
    assert summary["warm_start"]["labels"] == "all_plans" and summary["warm_start"]["labels_per_sample"] > 1
    assert summary["warm_start"]["samples"] > ws["samples"]
    agent, summary = train_agent(geo, dummy, env, dict(train, warm_start="bfs", total_timesteps=64),
                                 out_dir=tmp_path / "b", progress=False, engine=eng)
    assert not summary["warm_start"] and agent.learning_rate == pytest.approx(1e-3)
    assert summary["timesteps"] == 64
    with pytest.raises(InputError, match="persistent mode only"):
        train_agent(geo, dummy, {"max_steps": 6}, train, out_dir=None, progress=False)


def test_dagger_labels_the_policys_own_states_on_training_cells(problem):
    from cellrl.persistent.warmstart import dagger_samples
    from cellrl.train import build_agent

    m, eng, geo, params = problem
    env = VecPersistentEnv(geo, eng, 2, params, split="train", training=True, seed=0)
    agent = build_agent(env, {"n_steps": 16, "batch_size": 16, "embed_dims": [16], "actor_dims": [16],
                              "critic_dims": [8], "device": "cpu", "seed": 0})
    # 8 starts per type: most states this untrained policy visits cannot reach the goal any more
    plans = training_plans(eng, geo, training_starts(geo, 8), 2, params.eval_max_steps(geo.n_types))
    data, _ = plan_samples(eng, geo, params, plans, gamma=0.98)
    new, info = dagger_samples(agent, eng, geo, params, data, plans.starts, plans.targets, 0.98, 2)
    assert info["env_steps"] > 0 and info["new_samples"] == len(new) > 0
    assert (geo.split[new.cell] == "train").all() and new.mask[new.optimal].all()
    known = {(c, t, a.tobytes()) for c, t, a in zip(data.cell, data.target, data.applied)}
    assert not any((c, t, a.tobytes()) in known for c, t, a in zip(new.cell, new.target, new.applied))
    assert (np.abs(new.applied).sum(1) <= 2).all()
    rec, data2, _ = warm_start_persistent(agent, eng, geo, params, 0.98, per_type=3, epochs=3, dagger_rounds=1,
                                          plans=plans)
    assert rec["env_steps"] > 0 and len(data2) == len(data) + rec["dagger_rounds"][0]["new_samples"]


def test_benchmark_plan_cache_searches_once_per_settings(problem, tmp_path, monkeypatch):
    """benchmarks/persistent_demo.py --plans-cache: the warm start's exact plans are searched once per settings
    and read back equal; other settings (starts per type) get their own entry."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "persistent_demo", Path(__file__).resolve().parent.parent / "benchmarks" / "persistent_demo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    m, eng, geo, params = problem
    model_file = tmp_path / "model.npz"
    model_file.write_bytes(b"model")
    settings = {"env": {"max_set_size": 2}, "transitions": {"next_cell": "pca_direction"}}
    steps = params.eval_max_steps(geo.n_types)
    p1, how1 = bench.cached_training_plans(tmp_path / "c", model_file, eng, geo, settings, 2, 2, steps)
    monkeypatch.setattr(bench, "training_plans", lambda *a, **k: pytest.fail("searched again"))
    p2, how2 = bench.cached_training_plans(tmp_path / "c", model_file, eng, geo, settings, 2, 2, steps)
    assert (how1, how2) == ("computed", "cache")
    assert (p1.starts == p2.starts).all() and p1.plans == p2.plans and (p1.success == p2.success).all()
    assert (p1.starts == np.repeat(training_starts(geo, 2), geo.n_types - 1)).all()
    with pytest.raises(pytest.fail.Exception, match="searched again"):
        bench.cached_training_plans(tmp_path / "c", model_file, eng, geo, settings, 3, 2, steps)
    assert len(list((tmp_path / "c").iterdir())) == 1
    monkeypatch.undo()                                   # multi-label plans: an entry of their own, with the labels
    p3, how3 = bench.cached_training_plans(tmp_path / "c", model_file, eng, geo, settings, 2, 2, steps, "all")
    assert how3 == "computed" and p3.optimal is not None and p3.plans == p1.plans and p1.optimal is None
    assert len(list((tmp_path / "c").iterdir())) == 2


def test_all_labels_samples_and_multi_label_cloning(problem):
    """labels='all': the same samples as 'one', each labelled with every optimal action the env allows (the
    plan's among them; several on some states); cloning puts the policy's mass on the SET: the loss is
    -log sum_{a optimal} pi(a|s), so a state with two optimal actions is fitted by either of them."""
    import torch as th

    from cellrl.train import build_agent
    from cellrl.warmstart import _forward, _obs, behaviour_clone

    m, eng, geo, params = problem
    starts = training_starts(geo, 4)
    steps = params.eval_max_steps(geo.n_types)
    plans = training_plans(eng, geo, starts, 2, steps, all_optimal=True)
    one, _ = plan_samples(eng, geo, params, plans, 0.98, labels="one")
    data, rep = plan_samples(eng, geo, params, plans, 0.98, labels="all")
    assert len(data) == len(one) and (data.cell == one.cell).all() and (data.value == one.value).all()
    assert (data.optimal >= one.optimal).all() and not (data.optimal & ~data.mask).any()
    multi = data.optimal.sum(1) > 1
    assert multi.any() and rep["labels_per_sample"] == round(float(data.optimal.sum(1).mean()), 3) > 1
    with pytest.raises(ValueError, match="all_optimal"):
        plan_samples(eng, geo, params, training_plans(eng, geo, starts[:2], 2, steps), 0.98, labels="all")

    env = VecPersistentEnv(geo, eng, 2, params, split="train", training=True, seed=0)
    agent = build_agent(env, {"n_steps": 16, "batch_size": 16, "embed_dims": [32], "actor_dims": [32],
                              "critic_dims": [16], "device": "cpu", "seed": 0})
    geo_z, cents = th.from_numpy(np.ascontiguousarray(geo.z)), th.from_numpy(np.ascontiguousarray(geo.centroids))
    idx = np.arange(len(data))

    def set_loss():
        with th.no_grad():
            logp, _ = _forward(agent.policy, _obs(geo_z, cents, data, idx, "cpu"), th.as_tensor(data.mask))
        p = logp.exp().numpy()
        return float(-np.log((p * data.optimal).sum(1)).mean()), p

    before, p0 = set_loss()
    rec = behaviour_clone(agent, geo, data, epochs=150, seed=0, progress=False)
    after, p = set_loss()
    assert rec["loss_per_epoch"][0] == pytest.approx(before, rel=0.2) and after < 0.25 * before
    assert abs(rec["loss_per_epoch"][-1] - after) < 0.1        # the recorded loss is the set's cross-entropy
    # on multi-label states the mass is on the set, not necessarily on the plan's own action
    assert (p * data.optimal).sum(1)[multi].mean() > 0.8
    assert rec["accuracy"] >= 0.9


def test_all_plans_samples_cover_the_other_shortest_plans(problem):
    """labels='all_plans': the 'all' samples plus the states of the other shortest plans, each observation once,
    every label allowed; without others searched it is refused."""
    m, eng, geo, params = problem
    starts = training_starts(geo, 4)
    steps = params.eval_max_steps(geo.n_types)
    plans = training_plans(eng, geo, starts, 2, steps, all_optimal=True, max_plans=50)
    alln, _ = plan_samples(eng, geo, params, plans, 0.98, labels="all")
    data, rep = plan_samples(eng, geo, params, plans, 0.98, labels="all_plans")
    assert rep["other_plans"] == sum(len(o) for o in plans.others) > 0 and rep["plans"] == alln.n_pairs
    key = lambda d: {(int(c), int(t), a.tobytes()) for c, t, a in zip(d.cell, d.target, d.applied)}  # noqa: E731
    assert key(alln) < key(data) and len(key(data)) == len(data)          # more states, none twice
    assert not (data.optimal & ~data.mask).any() and data.optimal.any(1).all()
    with pytest.raises(ValueError, match="max_plans"):
        plan_samples(eng, geo, params, training_plans(eng, geo, starts[:2], 2, steps, all_optimal=True), 0.98,
                     labels="all_plans")
