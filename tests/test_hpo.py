"""Two-phase Optuna search (cellrl.hpo): AULC, spaces, parallel workers on one study, resume, pruning, rules.

The studies run on a designed task where learning matters: a random model whose transition table sends action
``a`` straight to a goal cell of type ``a % n_types`` and episodes of one step. A deterministic untrained
policy then succeeds on ~1/n_types of the validation tasks and a trained one on nearly all, in ~1K steps
(about 1 s per trial), so absurdly small learning rates form a clearly bad region.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cellrl import hpo as H
from cellrl.config import load_config
from cellrl.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

ENV = {"max_steps": 1, "curriculum": {"enabled": False}}
# warm_start none: these trials measure PPO from scratch (a BFS warm start solves the 1-step task before any
# trial step, leaving nothing for the search or the pruner to tell apart)
TRAIN = {"n_envs": 4, "n_steps": 64, "batch_size": 32, "n_epochs": 4, "learning_rate": 1e-3,
         "embed_dims": [16, 8], "actor_dims": [16], "critic_dims": [16], "device": "cpu", "seed": 0,
         "warm_start": "none"}
SPACE = {"learning_rate": {"low": 1e-9, "high": 1e-2, "log": True}, "n_epochs": {"low": 2, "high": 6, "int": True},
         "embed_dims": {"choices": [[16, 8], [32, 8]]}, "step_penalty": {"low": -2.0, "high": -0.1}}


def hpo_cfg(**kw):
    cfg = {"storage": "sqlite", "n_workers": 1, "phase1_trials": 4, "phase2_trials": 3, "trial_timesteps": 1024,
           "eval_points": 4, "eval_episodes": 60, "pruner": "median", "pruner_startup_trials": 2,
           "sampler_startup_trials": 4, "top_k": 2, "importance": "fanova", "phase2_narrow": 0.25,
           "enqueue_reference": True, "seed": 0, "search_space": SPACE}
    cfg.update(kw)
    return cfg


def write_inputs(d: Path, n_types: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """model.npz + table.npy of the designed one-step task (see module docstring)."""
    from cellrl.io import save_npy
    from cellrl.model import random_model
    from cellrl.tasks import TaskGeometry

    m = random_model(n_cells=160, n_genes=16, n_types=n_types, n_regulators=3, seed=seed)
    geo = TaskGeometry.from_model(m)
    train = np.asarray(m.split) == "train"
    goal = [int(np.flatnonzero(geo.goal_mask[t] & train)[0]) for t in range(n_types)]
    table = np.empty((m.n_cells, m.n_actions), np.int32)
    for a in range(m.n_actions):
        table[:, a] = goal[a % n_types]
    for t, g in enumerate(goal):  # a goal cell's own action would be a self-loop
        table[g, table[g] == g] = goal[(t + 1) % n_types]
    d.mkdir(parents=True, exist_ok=True)
    m.save(d / "model.npz")
    save_npy(d / "table.npy", table)
    return d / "model.npz", d / "table.npy"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("hpo_inputs"))


def trials_of(study_dir: Path, phase: int, hpo: dict):
    return H.load_phase_study(study_dir, phase, hpo).get_trials(deepcopy=False)


def spawn_worker(tmp: Path, name: str, **kwargs) -> subprocess.Popen:
    args = tmp / f"{name}.json"
    args.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}))
    log = open(tmp / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "cellrl.hpo", "worker", str(args)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)


# ------------------------------------------------------------------------------------------------ units
def test_aulc_is_the_trapezoid_mean():
    assert H.aulc([0.5]) == 0.5
    assert H.aulc([0, 1]) == pytest.approx(0.5)
    assert H.aulc([0.2, 0.4, 0.6, 0.8]) == pytest.approx(0.5)
    assert H.aulc([1, 1, 1]) == 1.0
    # learning early beats learning late at the same final value
    assert H.aulc([0.8, 0.9, 0.9]) > H.aulc([0.1, 0.5, 0.9])
    assert H.eval_schedule(30000, 5) == [6000, 12000, 18000, 24000, 30000]


def test_narrowing_stays_inside_and_centres_on_the_best():
    lr = H.ParamSpec.from_config("learning_rate", {"low": 1e-5, "high": 1e-3, "log": True})
    n = lr.narrow(1e-4, 0.25)
    assert lr.low <= n.low < 1e-4 < n.high <= lr.high
    assert np.log(n.high / n.low) == pytest.approx(0.25 * np.log(100))
    edge = lr.narrow(1e-3, 0.25)  # at the bound: shifted inside, same width
    assert edge.high == pytest.approx(1e-3) and np.log(edge.high / edge.low) == pytest.approx(0.25 * np.log(100))
    ep = H.ParamSpec.from_config("n_epochs", {"low": 3, "high": 15, "int": True}).narrow(10, 0.25)
    assert ep.int and 3 <= ep.low <= 10 <= ep.high <= 15 and ep.high - ep.low <= 5
    dims = H.ParamSpec.from_config("embed_dims", {"choices": [[256, 64], [512, 128], [1024, 256]]})
    assert dims.narrow([1024, 256], 0.25).choices == ("512x128", "1024x256")
    assert dims.to_config() == {"choices": [[256, 64], [512, 128], [1024, 256]]}


def test_params_become_train_and_env_overrides():
    over = H.params_to_overrides({"learning_rate": 3e-4, "gamma": 0.97, "embed_dims": "64x32",
                                  "step_penalty": -0.5, "distance_reward_scale": 2.0})
    assert over == {"train": {"learning_rate": 3e-4, "gamma": 0.97, "embed_dims": [64, 32]},
                    "env": {"gamma": 0.97, "step_penalty": -0.5, "distance_reward_scale": 2.0}}
    with pytest.raises(ConfigError):
        H.params_to_overrides({"lr": 1})


def test_config_search_space_is_validated():
    cfg = load_config()
    space = H.search_space(cfg["hpo"])
    assert set(space) == set(H.SEARCHABLE)
    ref = H.reference_params(cfg["env"], cfg["train"], space)
    assert all(space[n].contains(v) for n, v in ref.items()), "reference defaults must lie in the phase-1 space"
    for bad in ({"lr": {"low": 1, "high": 2}}, {"n_steps": {"choices": [1.5]}}, {"gamma": {"choices": [0.9]}},
                {"embed_dims": {"choices": [64]}}, {"learning_rate": {"low": 1e-3, "high": 1e-2, "step": 2}}):
        with pytest.raises(ConfigError):
            load_config(extra={"hpo": {"search_space": bad}})
    assert "learning_rate" not in H.search_space({"search_space": {**SPACE, "learning_rate": None}})
    with pytest.raises(ConfigError, match="low"):
        H.search_space({"search_space": {"gamma": {"low": 0.99, "high": 0.9}}})


def test_persistent_run_with_hpo_is_refused_naming_dataset_run_and_fix():
    """The study tunes table-mode agents: a persistent run with use_hpo is refused at load, whether the run or
    the dataset sets the perturbation model; each alone loads."""
    per = {"env": {"perturbation_model": "persistent"}}
    hpo = {"train": {"use_hpo": True}}
    with pytest.raises(ConfigError, match=r"dataset 'demo', run 'p': train.use_hpo: true .*Fix: set train.use_hpo"):
        load_config(extra={"runs": {"p": {"overrides": {**per, **hpo}}}})
    with pytest.raises(ConfigError, match="run 'default'"):
        load_config(extra={"datasets": {"demo": {"overrides": per}}, "train": {"use_hpo": True}})
    load_config(extra={"runs": {"p": {"overrides": per}}, "train": {"use_hpo": False}})
    load_config(extra={"runs": {"p": {"overrides": hpo}}})


# ------------------------------------------------------------------------------------------------ studies
def test_pruning_stops_trials_in_the_bad_region(inputs, tmp_path):
    """Half the log-range of learning rates is absurdly small (no learning in 1K steps): the median pruner
    stops such trials once two trials have finished."""
    model, table = inputs
    hpo = hpo_cfg(phase1_trials=8, enqueue_reference=False, sampler_startup_trials=8,
                  search_space={"learning_rate": SPACE["learning_rate"]})
    H.run_worker(model, table, tmp_path, 1, 0, hpo, ENV, TRAIN)
    trials = trials_of(tmp_path, 1, hpo)
    states = [t.state.name for t in trials]
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert len(trials) == 8 and len(pruned) >= 1, states
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert best.params["learning_rate"] > 1e-5
    assert all(len(t.user_attrs["curve"]) < hpo["eval_points"] for t in pruned)  # stopped early


def test_trial_seeds_average_the_aulc_over_trainings(inputs, tmp_path):
    model, table = inputs
    hpo = hpo_cfg(phase1_trials=1, trial_seeds=2, pruner="none", trial_timesteps=512, eval_points=2)
    H.run_worker(model, table, tmp_path, 1, 0, hpo, ENV, TRAIN)
    (t,) = trials_of(tmp_path, 1, hpo)
    assert len(t.user_attrs["seed_aulcs"]) == 2
    assert t.value == pytest.approx(np.mean(t.user_attrs["seed_aulcs"]))
    assert t.user_attrs["seed_aulcs"][0] == pytest.approx(H.aulc(t.user_attrs["curve"]))


def test_two_worker_processes_share_one_study(inputs, tmp_path):
    """Two processes released at the same moment on one journal-file study: the budget is met exactly,
    trial numbers are unique, and both workers ran trials."""
    model, table = inputs
    hpo = hpo_cfg(storage="journal", phase1_trials=6, pruner="none")
    gate = tmp_path / "go"
    procs = [spawn_worker(tmp_path, f"w{w}", model_path=model, table_path=table, study_dir=tmp_path / "hpo",
                          phase=1, worker=w, hpo=hpo, env=ENV, train=TRAIN, wait_for=gate) for w in (0, 1)]
    time.sleep(0.5)
    gate.touch()
    for p in procs:
        assert p.wait(timeout=150) == 0, (tmp_path / "w0.log").read_text()[-3000:]
    trials = trials_of(tmp_path / "hpo", 1, hpo)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(6))
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 6  # workers sample different points
    by_worker = {w: [t.number for t in trials if t.user_attrs["worker"] == w] for w in (0, 1)}
    assert by_worker[0] and by_worker[1], by_worker
    ran = [json.loads((tmp_path / f"w{w}.log").read_text().strip().splitlines()[-1])["trials_run"] for w in (0, 1)]
    assert sorted(ran[0] + ran[1]) == list(range(6))


def test_killed_worker_resumes_without_repeating_trials(inputs, tmp_path):
    """kill -9 a worker mid-trial; the rerun retires the dead trial, retries its parameters and finishes the
    budget; trials finished before the kill are kept as they were."""
    model, table = inputs
    hpo = hpo_cfg(phase1_trials=4, pruner="none")
    study_dir = tmp_path / "hpo"
    proc = spawn_worker(tmp_path, "w0", model_path=model, table_path=table, study_dir=study_dir, phase=1, worker=0,
                        hpo=hpo, env=ENV, train=TRAIN)
    log = tmp_path / "w0.log"
    deadline = time.time() + 150
    try:  # kill as soon as trial 1 has measured its first point: trial 0 is finished, trial 1 is mid-way
        while time.time() < deadline and proc.poll() is None:
            text = log.read_text()
            if "trial 0: AULC" in text and "trial 1: step" in text:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    before = {t.number: t for t in trials_of(study_dir, 1, hpo)}
    killed = [t for t in before.values() if t.state.name == "RUNNING"]
    finished = {n: t for n, t in before.items() if t.state.name == "COMPLETE"}
    assert len(killed) == 1 and finished

    summary = H.run_worker(model, table, study_dir, 1, 0, hpo, ENV, TRAIN)
    after = {t.number: t for t in trials_of(study_dir, 1, hpo)}
    for n, t in finished.items():  # not rerun: same value, same completion time
        assert after[n].state.name == "COMPLETE"
        assert after[n].value == t.value and after[n].datetime_complete == t.datetime_complete
    dead = after[killed[0].number]
    assert dead.state.name == "FAIL" and dead.user_attrs["stale"]
    retry = [t for t in after.values() if t.user_attrs.get("retry_of") == dead.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == dead.params
    assert H.budget_used(H.load_phase_study(study_dir, 1, hpo)) == 4
    assert sum(t.state.name == "COMPLETE" for t in after.values()) == 4
    assert set(summary["trials_run"]) == set(after) - set(finished) - {dead.number}
    # a further rerun has nothing left to do
    assert H.run_worker(model, table, study_dir, 1, 0, hpo, ENV, TRAIN)["trials_run"] == []


@pytest.mark.slow
def test_rules_run_both_phases_and_train_uses_best_params(inputs, tmp_path):
    """snakemake: 2 parallel hpo_worker jobs per phase -> hpo_phase -> hpo_best -> train with use_hpo."""
    from workflow_copy import make_copy, snakemake

    space = {n: None for n in H.SEARCHABLE} | {"learning_rate": SPACE["learning_rate"],
                                                 "embed_dims": SPACE["embed_dims"],
                                                 "step_penalty": SPACE["step_penalty"]}
    sections = {
        "env": ENV,
        "train": {**{k: v for k, v in TRAIN.items() if k != "learning_rate"}, "total_timesteps": 256,
                  "use_hpo": True, "eval_episodes": 10, "wandb": {"mode": "disabled"}},
        "hpo": {"n_workers": 2, "phase1_trials": 4, "phase2_trials": 2, "trial_timesteps": 512, "eval_points": 2,
                "eval_episodes": 40, "pruner": "none", "top_k": 2, "sampler_startup_trials": 2,
                "enqueue_reference": False, "compare_seeds": [1], "search_space": space},
    }
    # as dataset overrides, so they win over whatever the checkout's config sets for the demo dataset
    overlay = {"datasets": {"demo": {"overrides": sections}}}
    wd = make_copy(tmp_path / "wf", overlay=overlay)
    res = wd / "results" / "demo"
    write_inputs(res / "oracle")
    (res / "transitions").mkdir(parents=True)
    os.replace(res / "oracle" / "table.npy", res / "transitions" / "table.npy")
    target = "results/demo/models/default/train_summary.json"
    snakemake(wd, target, "--cores", "2", "--allowed-rules", "hpo_worker", "hpo_phase", "hpo_best", "train",
              timeout=400)
    hp = res / "hpo"
    p1, p2 = (yaml.safe_load((hp / f"phase{n}.yaml").read_text()) for n in (1, 2))
    assert p1["trials"] == {"complete": 4} and p2["trials"] == {"complete": 2}
    assert set(p1["top_k"]) == set(p2["best_params"]) - set(p1["phase2_fixed"])
    for n in (1, 2):
        for kind in ("history", "importances", "parallel", "intermediate"):
            assert (hp / f"phase{n}_{kind}.png").stat().st_size > 1000
    workers = {json.loads((hp / "phase1" / f"worker{w}.done").read_text())["worker"] for w in (0, 1)}
    assert workers == {0, 1}
    best = yaml.safe_load((hp / "best_params.yaml").read_text())
    summary = json.loads((res / "models" / "default" / "train_summary.json").read_text())
    assert summary["inputs"]["hpo_params"].endswith("best_params.yaml")
    for section in ("train", "env"):
        for k, v in best[section].items():
            assert summary[section][k] == v, (section, k)
    from cellrl.config import dataset_config

    configured = dataset_config(load_config(wd / "config" / "config.yaml"), "demo")["train"]["learning_rate"]
    assert summary["train"]["learning_rate"] != configured  # the sampled value, not the configured one
    cmp = json.loads((hp / "tuned_vs_reference.json").read_text())
    assert set(cmp) >= {"reference", "tuned", "difference"}
