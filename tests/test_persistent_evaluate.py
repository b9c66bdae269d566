"""Rule evaluate in persistent mode (cellrl.persistent.evaluate): the agent against exact, beam and greedy search
over sets on the test protocol, the files it writes, and the refusal of an agent trained in the other mode."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cellrl.config import load_config
from cellrl.errors import ConfigError, InputError
from cellrl.evaluate import evaluate_files
from cellrl.model import random_model
from cellrl.persistent.evaluate import method_stats, plan_frame, score_plans, task_subset
from cellrl.tasks import TaskGeometry
from cellrl.train import train_files

from rl_fixtures import random_table

TINY = dict(n_envs=2, n_steps=32, batch_size=16, n_epochs=2, embed_dims=[16, 8], actor_dims=[16],
            critic_dims=[16], eval_every=64, eval_episodes=20, checkpoint_every=64, device="cpu", seed=3,
            wandb={"mode": "disabled"})
ENV = {"max_steps": 5, "perturbation_model": "persistent", "max_set_size": 2}
ENGINE = {"n_neighbors": 30}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model and table, a persistent agent and a table agent trained by the train rule, a recipe table."""
    d = tmp_path_factory.mktemp("persistent_eval")
    m = random_model(n_cells=200, n_genes=16, n_types=3, n_regulators=4, seed=1)
    m.save(d / "model.npz")
    np.save(d / "table.npy", random_table(m, seed=2))
    train = {**TINY, "total_timesteps": 128, "warm_start": "exact", "warm_start_starts_per_type": 2,
             "warm_start_epochs": 2}
    train_files(d / "model.npz", d / "table.npy", d / "persistent", env=ENV, train=train, transitions=ENGINE,
                progress=False, threads=1)
    train_files(d / "model.npz", d / "table.npy", d / "table_run", env={"max_steps": 5},
                train={**TINY, "total_timesteps": 64, "warm_start": "none"}, progress=False, threads=1)
    geo = TaskGeometry.from_model(m)
    regs = [str(g) for g in m.regulators]
    pd.DataFrame({"start_type": [geo.type_names[0]] * 2, "target_type": [geo.type_names[1]] * 2,
                  "gene": regs[:2], "direction": ["KO", "OE"], "evidence": ["test"] * 2}) \
        .to_csv(d / "recipes.tsv", sep="\t", index=False)
    return d, m, geo


def _evaluate(d, agent, out, env=ENV, **kw):
    return evaluate_files(d / "model.npz", d / "table.npy", None, d / agent / "model.zip",
                          d / agent / "progress.csv", None, None, out / "episodes.parquet", out / "summary.json",
                          out / "plots", env=env, transitions=ENGINE, recipes_out=out / "recipes.tsv", **kw)


def test_persistent_evaluation_scores_agent_and_search_baselines(run, tmp_path):
    d, m, geo = run
    s = _evaluate(d, "persistent", tmp_path, persistent_exact_starts=2, beam_width=4, recipes=d / "recipes.tsv",
                  recipe_permutations=50)
    assert s == json.loads((tmp_path / "summary.json").read_text())
    assert s["perturbation_model"] == "persistent" and list(s["methods"]) == ["agent", "exact", "beam4", "greedy"]
    proto = s["protocol"]
    assert proto["n_exact_start_cells"] == 2 * geo.n_types and proto["exact_max_genes"] == ENV["max_set_size"]
    assert proto["n_exact_tasks"] == proto["n_exact_start_cells"] * (geo.n_types - 1) < proto["n_episodes"]
    assert proto["plan_tie_break"] == ENV.get("plan_tie_break", "hub")  # the setting exact search used
    meth = s["methods"]
    ex = meth["exact"]["exact_tasks"]["success"]
    assert "all_tasks" not in meth["exact"] and ex > 0
    for name in ("agent", "beam4", "greedy"):      # exact search is the optimum over sets on its tasks
        assert meth[name]["exact_tasks"]["success"] <= ex
        assert meth[name]["success_vs_exact"] == pytest.approx(meth[name]["exact_tasks"]["success"] / ex)
        assert set(meth[name]) >= {"exact_tasks", "all_tasks", "wall_s"}
    assert s["no_plan_repeats_a_gene"] and all(sc["repeats_a_gene"] == 0 for v in meth.values()
                                               for k, sc in v.items() if k.endswith("_tasks"))
    ep = pd.read_parquet(tmp_path / "episodes.parquet")
    assert len(ep) == 3 * proto["n_episodes"] + proto["n_exact_tasks"]
    assert ep[ep.policy == "exact"].exact_task.all() and ep.set_size.max() <= ENV["max_set_size"]
    ok = ep[ep.policy == "beam4"]
    assert ok.success.mean() == pytest.approx(meth["beam4"]["all_tasks"]["success"])
    assert s["recipes"]["available"] and set(s["recipes"]["policies"]) >= {"agent", "exact", "beam4", "greedy"}
    rec = pd.read_csv(tmp_path / "recipes.tsv", sep="\t")
    assert {"exact", "greedy"} <= set(rec.policy)
    assert {"method_success.png", "learning_curve.png"} <= set(s["plots"])
    assert all((tmp_path / "plots" / f).exists() for f in s["plots"])
    assert s["engine"]["settings"] == ENGINE and s["ground_truth"]["available"] is False


def test_agent_of_the_other_mode_is_refused(run, tmp_path):
    """A table agent in persistent evaluation, and a persistent agent in table evaluation: a clear error naming
    env.perturbation_model and the fix."""
    d, _, _ = run
    with pytest.raises(InputError, match="trained with env.perturbation_model: table, but is used with "
                                         "persistent") as e:
        _evaluate(d, "table_run", tmp_path / "a")
    assert e.value.field == "env.perturbation_model" and "retrain it with persistent" in e.value.fix
    with pytest.raises(InputError, match="trained with env.perturbation_model: persistent") as e:
        _evaluate(d, "persistent", tmp_path / "b", env={"max_steps": 5})
    assert "set env.perturbation_model: persistent" in e.value.fix
    assert not (tmp_path / "a" / "summary.json").exists() and not (tmp_path / "b" / "summary.json").exists()


def test_score_plans_scopes_and_repeats():
    """Stats on the exact tasks and on all tasks; a plan that uses a gene twice (KO then OE of gene 0) counts;
    HOLD (action >= n_actions) is not a gene."""
    m = random_model(n_cells=60, n_genes=8, n_types=3, n_regulators=2, seed=0)
    geo = TaskGeometry.from_model(m)
    starts = np.flatnonzero(geo.split == "test")[:4]
    targets = (geo.type_ids[starts] + 1) % geo.n_types
    plans = [[0, 4, 4], [0, 2], [1], []]          # 4 actions (2 regulators x KO/OE) + HOLD = 4
    f = plan_frame("x", starts, targets, [True, True, False, False], plans, geo)
    st = method_stats(f, 4)
    assert st["repeats_a_gene"] == 1 and st["success"] == 0.5
    assert st["mean_success_length"] == 2.5 and st["mean_success_set_size"] == 1.0
    sub = np.array([True, False, True, False])
    res = score_plans(f, sub, 4)
    assert res["exact_tasks"]["success"] == 0.5 and res["all_tasks"]["success"] == 0.5
    assert res["exact_tasks"]["repeats_a_gene"] == 0 and res["all_tasks"]["repeats_a_gene"] == 1
    assert res["exact_tasks"]["mean_success_length"] == 3.0 and res["all_tasks"]["mean_success_length"] == 2.5
    only = score_plans(f[sub], sub, 4, agreement=lambda g: {"n": len(g)})
    assert list(only) == ["exact_tasks"] and only["exact_tasks"]["recipe"] == {"n": 2}
    assert list(score_plans(f, np.ones(4, bool), 4)) == ["exact_tasks"]


def test_task_subset_keeps_n_start_cells_per_type():
    m = random_model(n_cells=120, n_genes=8, n_types=3, n_regulators=2, seed=0)
    geo = TaskGeometry.from_model(m)
    starts = np.repeat(np.flatnonzero(geo.split == "test"), 2)
    sub = task_subset(geo, starts, 2)
    kept = np.unique(starts[sub])
    assert len(kept) == 2 * geo.n_types and np.bincount(geo.type_ids[kept]).tolist() == [2] * geo.n_types
    assert task_subset(geo, starts, None).all()


@pytest.mark.parametrize("key,value,ok", [("persistent_exact_starts", 0, False),
                                           ("persistent_exact_max_genes", None, True),
                                           ("persistent_exact_max_genes", 0, False),
                                           ("beam_width", "8", False), ("beam_width", 16, True)])
def test_persistent_evaluate_settings_are_validated(key, value, ok):
    extra = {"evaluate": {key: value}}
    if ok:
        assert load_config(extra=extra)["evaluate"][key] == value
    else:
        with pytest.raises(ConfigError, match=f"evaluate.{key}"):
            load_config(extra=extra)


def test_cellrl_plan_uses_the_persistent_agent_of_the_train_rule(run):
    """`cellrl plan` in persistent mode loads the rule's persistent agent (persistent spaces, checked summary);
    a table agent is not used there, and the note says why."""
    import functools

    from cellrl.agent_io import load_agent
    from cellrl.cli import plan

    d, m, geo = run
    table = np.load(d / "table.npy")
    start, target = str(geo.type_names[0]), str(geo.type_names[1])
    p = plan(m, table, functools.partial(load_agent, d / "persistent" / "model.zip"), start, target, env=ENV,
             transitions=ENGINE)
    assert "agent_note" not in p and p["agent"]["length"] >= 1 and len(p["agent"]["set"]) <= ENV["max_set_size"]
    p = plan(m, table, functools.partial(load_agent, d / "table_run" / "model.zip"), start, target, env=ENV,
             transitions=ENGINE)
    assert "agent" not in p and "env.perturbation_model: table" in p["agent_note"]


def test_cellrl_plan_command_takes_mode_and_engine_settings_from_the_run(run, capsys):
    """`cellrl plan --agent <persistent run>`: the run's train_summary.json gives the mode (env) and the engine
    settings it trained with (transitions), so the agent plans over sets without further flags."""
    from cellrl.cli import main

    d, m, geo = run
    code = main(["plan", "--model", str(d / "model.npz"), "--table", str(d / "table.npy"), "--agent",
                 str(d / "persistent" / "model.zip"), "--start", str(geo.type_names[0]), "--target",
                 str(geo.type_names[1]), "--json"])
    p = json.loads(capsys.readouterr().out)
    assert p.get("perturbation_model") == "persistent", p
    assert "agent" in p and "agent_note" not in p
    assert code == (0 if p["agent"]["success"] else 1)
