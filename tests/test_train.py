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
from cellrl import checkpoints as ckpts
from cellrl.checkpoints import latest_checkpoint
from cellrl.network import ReprogrammingExtractor
from cellrl.train import (TRAIN_DEFAULTS, build_agent, evaluate_success, fit_curriculum, load_inputs, make_vec_env,
                          merge_hpo_params, train_agent, train_files)

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


def _rows(d, skip=("wall_s", "steps_per_s")):
    with open(d / "progress.csv") as fh:
        return [{k: v for k, v in r.items() if k not in skip} for r in csv.DictReader(fh)]


RESUME_ENV = {"max_steps": 6, "curriculum": {"enabled": True, "targets_per_phase": 1, "first_phase_steps": 64,
                                             "success_threshold": 0.2, "window": 5}}


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, small):
    m, table = small
    cfg = {**TINY, "total_timesteps": 320}
    a_full, s_full = train_agent(m, table, RESUME_ENV, cfg, out_dir=tmp_path / "full", progress=False, threads=1)
    with pytest.raises(_Crash):
        train_agent(m, table, RESUME_ENV, cfg, out_dir=tmp_path / "cut", callbacks=[_CrashAt(190)],
                    progress=False, threads=1)
    ck = latest_checkpoint(tmp_path / "cut")
    assert ck is not None and ck["timesteps"] == 192
    assert not (tmp_path / "cut" / "model.zip").exists()
    (tmp_path / "cut" / "progress.csv").unlink()             # Snakemake deletes a failed job's outputs
    a_res, s_res = train_agent(m, table, RESUME_ENV, cfg, out_dir=tmp_path / "cut", resume=True, progress=False,
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
    # every row is back, those before the checkpoint from the checkpoint itself (the file was deleted)
    assert len(_rows(tmp_path / "full")) == 6 and _rows(tmp_path / "full") == _rows(tmp_path / "cut")


def test_finished_run_rerun_reproduces_its_outputs(tmp_path, small):
    """--forcerun train (or an identical regenerated table): Snakemake deletes the outputs; the rerun resumes
    from the final checkpoint and writes the same weights, progress rows (wall times included) and summary."""
    m, table = small
    cfg = {**TINY, "total_timesteps": 192}
    a1, s1 = train_agent(m, table, RESUME_ENV, cfg, out_dir=tmp_path, progress=False, threads=1)
    first = (tmp_path / "progress.csv").read_text()
    for f in ("model.zip", "progress.csv", "train_summary.json"):
        (tmp_path / f).unlink()
    a2, s2 = train_agent(m, table, RESUME_ENV, cfg, out_dir=tmp_path, resume=True,
                         progress=False, threads=1)
    assert s2["resumed_from"] == 192 and (tmp_path / "progress.csv").read_text() == first
    for k, v in _params(a1).items():
        assert th.equal(v, _params(a2)[k]), k
    # model.zip's own bytes differ (SB3 writes its start time into the zip's data): its checksum is not compared
    skip = ("resumed_from", "model_zip_sha256")
    assert {k: v for k, v in s1.items() if k not in skip} == {k: v for k, v in s2.items() if k not in skip}
    assert (tmp_path / "model.zip").exists()


def test_changed_settings_or_code_never_resume(tmp_path, small, caplog):
    """A checkpoint of another fingerprint (settings, code, table) is set aside with a log line; the run starts
    afresh and keeps the old checkpoints aside."""
    m, table = small
    cfg = {**TINY, "total_timesteps": 128}
    train_agent(m, table, RESUME_ENV, cfg, out_dir=tmp_path, progress=False, threads=1)
    old = latest_checkpoint(tmp_path)["fingerprint"]
    with caplog.at_level("WARNING", logger="cellrl.checkpoints"):
        _, s = train_agent(m, table, RESUME_ENV, {**cfg, "learning_rate": 1e-3, "total_timesteps": 64},
                           out_dir=tmp_path, resume=True, progress=False, threads=1)
    assert s["resumed_from"] is None and s["timesteps"] == 64 and len(_rows(tmp_path)) == 2
    assert "set aside" in caplog.text and old in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "set_aside" / old).iterdir()) == [
        "ckpt_0000000064.json", "ckpt_0000000064.pt", "ckpt_0000000128.json", "ckpt_0000000128.pt"]
    # what the fingerprint covers: code, every setting but tracking/retention, the table, the scaler
    geo = TaskGeometry.from_model(m)
    params = ckpts.EnvParams.from_config(RESUME_ENV)
    base = ckpts.fingerprint(params, cfg, geo, table, code="a")
    assert ckpts.fingerprint(params, cfg, geo, table, code="b") != base
    assert ckpts.fingerprint(params, {**cfg, "eval_every": 32}, geo, table, code="a") != base
    assert ckpts.fingerprint(params.__class__.from_config({**RESUME_ENV, "step_penalty": -2.0}), cfg, geo, table,
                             code="a") != base
    shuffled = table[::-1].copy()
    assert ckpts.fingerprint(params, cfg, geo, shuffled, code="a") != base
    assert ckpts.fingerprint(params, {**cfg, "wandb": {"mode": "offline"}, "keep_checkpoints": 5}, geo, table,
                             code="a") == base


def test_corrupt_checkpoint_is_discarded_and_the_previous_one_resumed(tmp_path, small, caplog):
    m, table = small
    cfg = {**TINY, "total_timesteps": 192, "checkpoint_every": 64, "keep_checkpoints": 3}
    train_agent(m, table, RESUME_ENV, cfg, out_dir=tmp_path, progress=False, threads=1)
    ck = tmp_path / "checkpoints"
    (ck / "ckpt_0000000192.pt").write_bytes(b"garbage")                      # bad weights
    doc = json.loads((ck / "ckpt_0000000128.json").read_text())
    doc["state"]["timesteps"] = 7                                          # altered state
    (ck / "ckpt_0000000128.json").write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="cellrl.checkpoints"):
        _, s = train_agent(m, table, RESUME_ENV, cfg, out_dir=tmp_path, resume=True, progress=False, threads=1)
    assert s["resumed_from"] == 64 and s["timesteps"] == 192
    assert "ckpt_0000000192.pt" in caplog.text and "ckpt_0000000128.json" in caplog.text


def test_checkpoints_load_without_unpickling(tmp_path, small):
    """Checkpoint weights load with torch.load(weights_only=True); the rest is plain JSON."""
    m, table = small
    train_agent(m, table, RESUME_ENV, {**TINY, "total_timesteps": 64}, out_dir=tmp_path, progress=False, threads=1)
    js = sorted((tmp_path / "checkpoints").glob("ckpt_*.json"))[-1]
    json.loads(js.read_text())
    w = th.load(js.with_suffix(".pt"), weights_only=True)
    assert set(w) == {"policy", "optimizer", "rng"}


def test_defaults_equal_config_yaml(repo_root):
    """Defaults written in code are config/config.yaml's (the one source of truth)."""
    import dataclasses

    import yaml

    from cellrl.env import EnvParams

    cfg = yaml.safe_load((repo_root / "config" / "config.yaml").read_text())
    assert TRAIN_DEFAULTS == cfg["train"]
    assert dataclasses.asdict(EnvParams()) == cfg["env"]


def test_curriculum_fits_its_budget():
    from cellrl.env import EnvParams

    p = EnvParams.from_config({"curriculum": {"targets_per_phase": 2, "first_phase_steps": 100_000}})
    fitted, warn = fit_curriculum(p, n_types=7, total_timesteps=100_000)     # 6 targets -> 3 phases
    assert fitted.curriculum.first_phase_steps == 33_333 and "scaled" in warn[0]
    assert fit_curriculum(p, n_types=7, total_timesteps=1_000_000) == (p, [])
    assert fit_curriculum(p, n_types=3, total_timesteps=1_000) == (p, [])    # one phase: nothing to fit


def test_short_run_warns_when_it_never_reaches_the_last_phase(tmp_path, small):
    m, table = small
    env_cfg = {"max_steps": 4, "curriculum": {"targets_per_phase": 1, "success_threshold": 1.0}}
    _, s = train_agent(m, table, env_cfg, {**TINY, "total_timesteps": 64}, progress=False, threads=1)
    assert s["curriculum_phases"] == 2 and s["curriculum_first_phase_steps"] == 32
    assert any("first_phase_steps" in w for w in s["warnings"])
    assert any("curriculum phase 1 of 2" in w for w in s["warnings"])


PERSISTENT_ENV = {"max_steps": 5, "perturbation_model": "persistent", "max_set_size": 2}
ENGINE_SETTINGS = {"n_neighbors": 30}  # the persistent engine's transitions settings (200 cells)


def test_train_rule_trains_a_persistent_agent(tmp_path, small):
    """env.perturbation_model: persistent: the rule builds the engine from model.npz + the transitions settings,
    clones exact plans (warm_start: exact) and trains on sets; the summary records the mode and the engine
    settings, and only a persistent load of the agent accepts it."""
    from cellrl.agent_io import load_agent
    from cellrl.persistent.engine import PersistentEngine

    m, table = small
    m.save(tmp_path / "model.npz")
    np.save(tmp_path / "table.npy", table)
    out = tmp_path / "run"
    train = {**TINY, "total_timesteps": 256, "warm_start": "exact", "warm_start_starts_per_type": 2,
             "warm_start_epochs": 3}
    summary = train_files(tmp_path / "model.npz", tmp_path / "table.npy", out, env=PERSISTENT_ENV, train=train,
                          transitions=ENGINE_SETTINGS, progress=False, threads=1)
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["perturbation_model"] == "persistent" and saved["transitions"] == ENGINE_SETTINGS
    assert summary["timesteps"] == 256 and saved["warm_start"]["method"] == "exact"
    assert saved["warm_start"]["start_cells"] == 2 * 3 and saved["warm_start"]["samples"] > 0
    eng = PersistentEngine.from_model(m, ENGINE_SETTINGS)
    geo = TaskGeometry.from_model(m)
    agent = load_agent(out / "model.zip", geo, eng.n_actions + 1, engine=eng)
    assert agent.action_space.n == m.n_actions + 1 and "applied" in agent.observation_space.spaces
    with pytest.raises(InputError, match="trained with env.perturbation_model: persistent") as e:
        load_agent(out / "model.zip", geo, m.n_actions)           # a table-mode evaluation or plan
    assert e.value.field == "env.perturbation_model" and "set env.perturbation_model: persistent" in e.value.fix


def test_train_rule_refuses_an_engine_that_does_not_fit_the_table(tmp_path, small):
    m, table = small
    m.save(tmp_path / "model.npz")
    np.save(tmp_path / "table.npy", table)
    with pytest.raises(InputError, match="persistent engine has 4 actions, the transition table 8"):
        train_files(tmp_path / "model.npz", tmp_path / "table.npy", tmp_path / "run", env=PERSISTENT_ENV,
                    train={**TINY, "total_timesteps": 64}, transitions={**ENGINE_SETTINGS, "actions": "ko"},
                    progress=False, threads=1)


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
    assert len(list((out / "checkpoints").glob("ckpt_*.json"))) == 1
    from sb3_contrib import MaskablePPO

    assert saved["perturbation_model"] == "table" and "transitions" not in saved
    agent = MaskablePPO.load(out / "model.zip", device="cpu")
    assert agent.learning_rate == pytest.approx(0.0005 * TRAIN_DEFAULTS["warm_start_ppo_lr_scale"])  # bfs warm start
    assert type(agent.policy.optimizer) is th.optim.Adam                    # no cellrl-private optimizer class
    import zipfile

    assert b"cellrl" not in zipfile.ZipFile(out / "model.zip").read("data").replace(b"cellrl.network", b"")


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
    # and fails at most half as often as random (random succeeds 35% here under the default next-cell model)
    assert 1 - summary["final_val_success"] <= 0.5 * (1 - summary["random_val_success"])
