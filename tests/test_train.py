"""MaskablePPO training: inputs, network, exact resume, outputs, and learning beyond a random policy."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from cellrl.errors import InputError
from cellrl.model import random_model
from cellrl.tasks import TaskGeometry
from cellrl.train import (ReprogrammingExtractor, build_agent, evaluate_success, latest_checkpoint, load_inputs,
                          make_vec_env, merge_hpo_params, train_agent, train_files)

from rl_fixtures import random_table, structured_problem

TINY = dict(n_envs=2, n_steps=32, batch_size=16, n_epochs=2, embed_dims=[16, 8], actor_dims=[16],
            critic_dims=[16], eval_every=64, eval_episodes=20, checkpoint_every=64, device="cpu", seed=3,
            wandb={"mode": "disabled"})


@pytest.fixture(scope="module")
def small():
    m = random_model(n_cells=200, n_genes=16, n_types=3, n_regulators=4, seed=1)
    return m, random_table(m, seed=2)


# ------------------------------------------------------------------------------------------------ inputs
def test_load_inputs_errors(tmp_path, small):
    m, table = small
    mp = tmp_path / "model.npz"
    m.save(mp)
    with pytest.raises(InputError, match="transition table not found.*\n  fix: run the transitions rule"):
        load_inputs(mp, tmp_path / "table.npy")
    np.save(tmp_path / "bad.npy", table[:, :-2])
    with pytest.raises(InputError, match=r"shape \(200, 6\) does not match the model \(200 cells x 8 actions"):
        load_inputs(mp, tmp_path / "bad.npy")
    np.save(tmp_path / "table.npy", table)
    m2, t2 = load_inputs(mp, tmp_path / "table.npy")
    assert t2.dtype == np.int32 and t2.shape == (m.n_cells, m.n_actions)
    with pytest.raises(InputError, match="model file not found"):
        load_inputs(tmp_path / "nope.npz", tmp_path / "table.npy")


def test_hpo_params_merge(tmp_path):
    p = tmp_path / "best.yaml"
    p.write_text("train:\n  learning_rate: 0.001\nenv:\n  step_penalty: -0.5\nent_coef: 0.01\nmax_steps: 30\n"
                 "value: 0.9\n")
    env, train = merge_hpo_params({"max_steps": 20, "curriculum": {"enabled": True}}, {"n_envs": 8}, p)
    assert env == {"max_steps": 30, "step_penalty": -0.5, "curriculum": {"enabled": True}}
    assert train == {"n_envs": 8, "learning_rate": 0.001, "ent_coef": 0.01}
    with pytest.raises(InputError, match="HPO parameter file not found"):
        merge_hpo_params({}, {}, tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------------ network
def test_reference_network_shapes(small):
    m, table = small
    env = make_vec_env(m, table, {}, 2)
    agent = build_agent(env, {"device": "cpu"})
    pol = agent.policy
    fe = pol.features_extractor
    assert isinstance(fe, ReprogrammingExtractor) and fe.features_dim == 256
    assert [l.out_features for l in fe.current if isinstance(l, th.nn.Linear)] == [512, 128]
    assert [l.out_features for l in fe.target if isinstance(l, th.nn.Linear)] == [512, 128]
    assert fe.current[0].in_features == m.n_genes
    pi = [l.out_features for l in pol.mlp_extractor.policy_net if isinstance(l, th.nn.Linear)]
    vf = [l.out_features for l in pol.mlp_extractor.value_net if isinstance(l, th.nn.Linear)]
    assert pi == [256, 64] and vf == [128, 64]
    assert any(isinstance(l, th.nn.LeakyReLU) for l in pol.mlp_extractor.policy_net)
    assert pol.action_net.out_features == m.n_actions
    assert agent.n_epochs == 11 and agent.batch_size == 64 and agent.n_steps == 1024
    assert agent.gamma == pytest.approx(0.9831) and agent.ent_coef == pytest.approx(0.0054)


def test_unique_target_embedding_is_the_same_maths(small):
    m, table = small
    env = make_vec_env(m, table, {}, 2)
    th.manual_seed(0)
    fe = ReprogrammingExtractor(env.observation_space, embed_dims=(32, 8))
    geo = env.geometry
    rng = np.random.default_rng(0)
    obs = {"current_expression": th.as_tensor(geo.z[rng.integers(0, geo.n_cells, 40)]),
           "target_expression": th.as_tensor(geo.centroids[rng.integers(0, geo.n_types, 40)]),
           "action_mask": th.ones(40, m.n_actions)}
    outs, grads = [], []
    for dedupe in (True, False):
        fe.dedupe_targets = dedupe
        fe.zero_grad()
        y = fe(obs)
        (y ** 2).sum().backward()
        outs.append(y.detach())
        grads.append(fe.target[0].weight.grad.clone())
    th.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    th.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_first_layers_update_from_gradient_factors(small):
    """On CPU the genes x 512 layers keep their gradient as (grad_output, input) for the fused Adam kernel;
    the clipping norm from K x K Gram matrices equals the norm of the full gradient."""
    from cellrl import kernels

    if kernels.load() is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    m, table = small
    env = make_vec_env(m, table, {}, 4)
    agent = build_agent(env, {**TINY, "device": "cpu"})
    assert agent._lowrank
    fe = agent.policy.features_extractor
    layers = fe.lowrank_layers()
    assert all(l.lowrank for l in layers)
    geo = env.geometry
    rng = np.random.default_rng(1)
    obs = {"current_expression": th.as_tensor(geo.z[rng.integers(0, geo.n_cells, 16)]),
           "target_expression": th.as_tensor(geo.centroids[rng.integers(0, geo.n_types, 16)])}
    agent.policy.optimizer.zero_grad()
    (fe(obs) ** 2).sum().backward()
    for l in layers:
        assert l.weight.grad is None and len(l.pending) == 1
        g, x = l.factors()
        full = g.t() @ x
        assert l.lowrank_sq_norm() == pytest.approx(float(full.double().pow(2).sum()), rel=1e-5)
    assert layers[1].pending[0][1].shape[0] < 16            # target layer saw only the unique centroids


def test_lean_evaluate_actions_is_sb3s_bit_for_bit(small):
    m, table = small
    agent = build_agent(make_vec_env(m, table, {}, 4), {**TINY, "device": "cpu"})
    agent.learn(2 * TINY["n_steps"] * 4)
    rd = next(agent.rollout_buffer.get(TINY["batch_size"]))
    acts = rd.actions.long().flatten()
    assert not rd.action_masks.all()                         # some actions are masked
    ref = agent.policy.evaluate_actions(rd.observations, acts, action_masks=rd.action_masks)
    lean = agent._evaluate_actions(rd.observations, acts, rd.action_masks)
    for name, a, b in zip(("values", "log_prob", "entropy"), ref, lean):
        assert th.equal(a, b), name


def test_lowrank_adam_steps_like_torch_adam():
    """LowRankLinear + LowRankAdam vs nn.Linear + torch's fused Adam: same weights after steps with gradient
    accumulation (two backward passes), a gradient scale and inference in between."""
    from cellrl import kernels
    from cellrl.train import LowRankAdam, LowRankLinear

    if kernels.load() is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    th.manual_seed(0)
    ref = th.nn.Linear(300, 40)
    low = LowRankLinear(300, 40)
    low.load_state_dict(ref.state_dict())
    opt_ref = th.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-5, fused=True)
    opt_low = LowRankAdam(low.parameters(), lr=1e-2, eps=1e-5, fused=True)
    assert opt_low.attach([low]) and low.lowrank
    gen = th.Generator().manual_seed(1)
    for step in range(4):
        xs = [th.randn(24, 300, generator=gen) for _ in range(2)]
        for mod, opt in ((ref, opt_ref), (low, opt_low)):
            opt.zero_grad()
            for x in xs:
                (mod(x).tanh() ** 2).sum().backward()
            opt.grad_scale = th.tensor(1.7) if step % 2 else None
            opt.found_inf = th.zeros(()) if step % 2 else None
            opt.step()
            opt.grad_scale = opt.found_inf = None
        assert low.weight.grad is None and not low.pending
        with th.no_grad():
            x = th.randn(8, 300, generator=gen)
            th.testing.assert_close(low(x), ref(x), rtol=1e-5, atol=1e-5)
    th.testing.assert_close(low.weight, ref.weight, rtol=1e-5, atol=1e-6)
    th.testing.assert_close(low.bias, ref.bias, rtol=1e-5, atol=1e-6)
    th.testing.assert_close(opt_low.state[low.weight]["exp_avg_sq"], opt_ref.state[ref.weight]["exp_avg_sq"],
                            rtol=1e-4, atol=1e-12)
    assert float(opt_low.state[low.weight]["step"]) == 4


def test_rollout_target_cache_follows_weight_updates(small):
    m, table = small
    env = make_vec_env(m, table, {}, 2)
    fe = ReprogrammingExtractor(env.observation_space, embed_dims=(16, 8))
    opt = th.optim.Adam(fe.parameters(), lr=0.1, fused=True)
    geo = env.geometry
    tgt = th.as_tensor(geo.centroids[[0, 1, 1, 2, 0]])
    obs = {"current_expression": th.as_tensor(geo.z[:5]), "target_expression": tgt}
    for _ in range(3):
        with th.no_grad():
            cached = fe(obs)
            fe.dedupe_targets = False
            plain = fe(obs)
            fe.dedupe_targets = True
        th.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        fe(obs).sum().backward()                 # a training pass, then a (fused, version-less) update
        opt.step()
    with th.no_grad():
        before = fe(obs)
        fe.load_state_dict({k: v + 1 for k, v in fe.state_dict().items()})
        after = fe(obs)
        fe.dedupe_targets = False
        th.testing.assert_close(after, fe(obs))
    assert not th.allclose(before, after)


def test_lean_ppo_matches_sb3_maskable_ppo(small):
    """CellrlMaskablePPO's rollout and update are SB3's MaskablePPO's maths (to float rounding)."""
    from sb3_contrib import MaskablePPO

    m, table = small
    cfg = {**TINY, "n_epochs": 3}
    env_cfg = {"max_steps": 3}                               # frequent truncations: batched bootstrapping
    lean = build_agent(make_vec_env(m, table, env_cfg, 2, seed=0), cfg, seed=5)
    ref_env = make_vec_env(m, table, env_cfg, 2, seed=0)
    ref = MaskablePPO("MultiInputPolicy", ref_env, seed=5, device="cpu", **{
        k: lean.__dict__[k] for k in ("n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "ent_coef",
                                      "vf_coef")}, learning_rate=lean.learning_rate,
        policy_kwargs=dict(lean.policy_kwargs))
    ref.policy.load_state_dict(lean.policy.state_dict())
    for a in (lean, ref):
        th.manual_seed(9)
        np.random.seed(9)
        a.env.seed(1)
        a.learn(2 * cfg["n_steps"] * cfg["n_envs"])
    for (k, v1), v2 in zip(lean.policy.state_dict().items(), ref.policy.state_dict().values()):
        th.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-5, msg=k)
    assert lean.num_timesteps == ref.num_timesteps


# ------------------------------------------------------------------------------------------------ resume
class _Crash(Exception):
    pass


class _CrashAt(BaseCallback):
    """Simulates a killed job: raises at the first rollout boundary at or after ``step``."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def _on_rollout_start(self) -> None:
        if self.num_timesteps >= self.step:
            raise _Crash(self.num_timesteps)

    def _on_step(self) -> bool:
        return True


def _params(agent) -> dict[str, th.Tensor]:
    return {k: v.detach().clone() for k, v in agent.policy.state_dict().items()}


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, small):
    m, table = small
    cfg = {**TINY, "total_timesteps": 320}
    env_cfg = {"max_steps": 6, "curriculum": {"enabled": True, "targets_per_phase": 1, "first_phase_steps": 64,
                                              "success_threshold": 0.2, "window": 5}}
    a_full, s_full = train_agent(m, table, env_cfg, cfg, out_dir=tmp_path / "full", progress=False, threads=1)
    with pytest.raises(_Crash):
        train_agent(m, table, env_cfg, cfg, out_dir=tmp_path / "cut", callbacks=[_CrashAt(190)],
                    progress=False, threads=1)
    ck = latest_checkpoint(tmp_path / "cut")
    assert ck is not None and ck["timesteps"] == 192
    assert not (tmp_path / "cut" / "model.zip").exists()
    a_res, s_res = train_agent(m, table, env_cfg, cfg, out_dir=tmp_path / "cut", resume=True, progress=False,
                               threads=1)
    assert s_res["resumed_from"] == 192 and s_res["timesteps"] == s_full["timesteps"] == 320
    p1, p2 = _params(a_full), _params(a_res)
    assert p1.keys() == p2.keys()
    for k in p1:
        assert th.equal(p1[k], p2[k]), k
    o1 = a_full.policy.optimizer.state_dict()["state"]
    o2 = a_res.policy.optimizer.state_dict()["state"]
    for i in o1:
        assert th.equal(o1[i]["exp_avg_sq"], o2[i]["exp_avg_sq"])
    # the curriculum advanced during the run and resumed where it was
    assert s_full["curriculum_phase"] == s_res["curriculum_phase"] >= 1
    assert s_full["final_val_success"] == s_res["final_val_success"]

    def rows(d):
        with open(d / "progress.csv") as fh:
            return [{k: v for k, v in r.items() if k not in ("wall_s", "steps_per_s")} for r in csv.DictReader(fh)]

    assert rows(tmp_path / "full") == rows(tmp_path / "cut")
    # a second resume of a finished run does not train further
    a3, s3 = train_agent(m, table, env_cfg, cfg, out_dir=tmp_path / "cut", resume=True, progress=False, threads=1)
    assert s3["timesteps"] == 320
    for k, v in _params(a3).items():
        assert th.equal(v, p1[k])
    # other settings (here the learning rate) never resume a stale checkpoint: the run starts afresh
    _, s4 = train_agent(m, table, env_cfg, {**cfg, "learning_rate": 1e-3, "total_timesteps": 64},
                        out_dir=tmp_path / "cut", resume=True, progress=False, threads=1)
    assert s4["resumed_from"] is None and s4["timesteps"] == 64


def test_train_files_outputs(tmp_path, small):
    m, table = small
    m.save(tmp_path / "model.npz")
    np.save(tmp_path / "table.npy", table)
    hp = tmp_path / "best.yaml"
    hp.write_text("train:\n  learning_rate: 0.0005\n")
    out = tmp_path / "run"
    summary = train_files(tmp_path / "model.npz", tmp_path / "table.npy", out, env={"max_steps": 5},
                          train={**TINY, "total_timesteps": 128, "keep_checkpoints": 1}, hpo_params=hp,
                          progress=False, threads=1)
    assert (out / "model.zip").exists() and (out / "progress.csv").exists()
    saved = json.loads((out / "train_summary.json").read_text())
    for k in ("timesteps", "wall_s", "steps_per_s", "final_val_success", "random_val_success"):
        assert k in saved and k in summary
    assert saved["train"]["learning_rate"] == 0.0005
    assert len(list((out / "checkpoints").glob("ckpt_*.zip"))) == 1
    from sb3_contrib import MaskablePPO

    agent = MaskablePPO.load(out / "model.zip", device="cpu")
    assert agent.learning_rate == 0.0005


def test_wandb_offline_needs_no_account(tmp_path, small, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    m, table = small
    cfg = {**TINY, "total_timesteps": 64, "wandb": {"mode": "offline", "project": "cellrl-test"}}
    train_agent(m, table, {"max_steps": 4}, cfg, out_dir=tmp_path, progress=False, threads=1)
    assert list((tmp_path / "wandb").glob("offline-run-*"))


# ------------------------------------------------------------------------------------------------ learning
def test_random_policy_baseline_is_seeded(small):
    m, table = small
    geo = TaskGeometry.from_model(m)
    r1 = evaluate_success(None, geo, table, {}, split="val", n_episodes=50, seed=4, return_episodes=True)
    r2 = evaluate_success(None, geo, table, {}, split="val", n_episodes=50, seed=4)
    assert r1["success_rate"] == r2["success_rate"] and r1["n_episodes"] == 50
    assert (geo.split[r1["episodes"]["start"]] == "val").all()
    assert (geo.type_ids[r1["episodes"]["start"]] != r1["episodes"]["target"]).all()


@pytest.mark.slow
def test_training_beats_a_random_masked_policy(tmp_path):
    """CI-sized run on a learnable synthetic problem: validation success well above random."""
    m, table = structured_problem(n_cells=400, n_genes=24, n_types=4, n_regulators=10, seed=0)
    env_cfg = {"max_steps": 4, "curriculum": {"enabled": False}}
    cfg = {"total_timesteps": 12_000, "n_envs": 8, "n_steps": 128, "batch_size": 64, "n_epochs": 4,
           "learning_rate": 1e-3, "embed_dims": [64, 32], "actor_dims": [64], "critic_dims": [64],
           "eval_every": 4000, "eval_episodes": 200, "checkpoint_every": 100_000, "device": "cpu", "seed": 0,
           "wandb": {"mode": "disabled"}}
    agent, summary = train_agent(m, table, env_cfg, cfg, out_dir=tmp_path, progress=False, threads=1)
    print("trained val success", summary["final_val_success"], "random", summary["random_val_success"])
    assert summary["final_val_success"] >= summary["random_val_success"] + 0.3


def _tiny_demo_results(tmp_path):
    """results/demo of the tiny demo atlas (tests/config_test.yaml): the session's full workflow run when one
    was built already, else a local run of the pipeline up to the transition table (~2 min on 2 cores)."""
    import workflow_copy as wc

    built = wc._TINY.get("run")
    if built is not None and not isinstance(built, BaseException):
        return built.workdir / "results" / "demo"
    wd = wc.make_copy(tmp_path / "wf")
    wc.snakemake(wd, "--cores", "2", "results/demo/transitions/table.npy", timeout=900)
    return wd / "results" / "demo"


@pytest.mark.slow
def test_training_on_the_tiny_demo_atlas_beats_random(tmp_path):
    """The demo atlas as the pipeline builds it (tests/config_test.yaml: 600 cells, 4 types): a ~30k-step run
    reaches validation success well above a random masked policy."""
    res = _tiny_demo_results(tmp_path)
    m, table = load_inputs(res / "oracle" / "model.npz", res / "transitions" / "table.npy")
    cfg = {"total_timesteps": 30_000, "learning_rate": 5e-4, "n_steps": 256, "n_epochs": 5, "eval_every": 10_000,
           "eval_episodes": 200, "checkpoint_every": 100_000, "device": "cpu", "wandb": {"mode": "disabled"}}
    _, summary = train_agent(m, table, {"max_steps": 20}, cfg, out_dir=tmp_path / "run", progress=False,
                             threads=1)
    print("tiny demo: val success", summary["final_val_success"], "random", summary["random_val_success"])
    assert summary["final_val_success"] >= summary["random_val_success"] + 0.25
    assert summary["final_val_success"] >= 3 * summary["random_val_success"]
