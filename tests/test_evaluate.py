"""Evaluation protocol: policies on shared tasks, metrics, ground-truth check, files and plots."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from results_fixture import ENV, UNREACHABLE_TYPE, build_results

from cellrl.bfs import bfs_file
from cellrl.errors import InputError
from cellrl.evaluate import (_plan_flags, action_table, eval_tasks, evaluate, evaluate_files, load_agent,
                             policy_stats)
from cellrl.model import load_model
from cellrl.plots import read_progress
from cellrl.recipes import read_recipes, write_demo_recipes
from cellrl.tasks import TaskGeometry


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_results(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def evaluated(tiny):
    out = tiny["results"] / "benchmark"
    bfs_file(tiny["model"], tiny["table"], out / "bfs.parquet", env=ENV)
    write_demo_recipes(tiny["truth"], out / "recipes_in.tsv")
    summary = evaluate_files(model=tiny["model"], table=tiny["table"], actions=tiny["actions"], agent=tiny["agent"],
                             progress=tiny["progress"], bfs=out / "bfs.parquet", truth=tiny["truth"],
                             episodes_out=out / "default" / "episodes.parquet",
                             summary_out=out / "default" / "summary.json", plots_dir=out / "default" / "plots",
                             env=ENV, n_episodes=2000, seed=0, deterministic=True,
                             recipes=out / "recipes_in.tsv", recipes_out=out / "default" / "recipes.tsv",
                             recipe_permutations=200)
    return out, summary


def test_bfs_file_covers_test_pairs(tiny, evaluated):
    out, _ = evaluated
    df = pd.read_parquet(out / "bfs.parquet")
    m = load_model(tiny["model"])
    n_test = int(m.split_mask("test").sum())
    assert len(df) == n_test * 3 and (df.start_type != df.target_type).all()
    # the planted unreachable type is unreachable from every other type, the others are reached
    assert (df[df.target_type == UNREACHABLE_TYPE].length == -1).all()
    ok = df[df.reachable]
    assert len(ok) and (ok.actions.map(len) == ok.length).all() and ok.plan.str.contains("KO:|OE:").all()


def test_summary_and_episodes(evaluated):
    out, s = evaluated
    ep = pd.read_parquet(out / "default" / "episodes.parquet")
    assert set(ep.policy) == {"agent", "greedy", "random", "bfs"}
    n = s["protocol"]["n_episodes"]
    assert n == s["protocol"]["n_pairs_total"] and not s["protocol"]["sampled"]
    assert (ep.groupby("policy").size() == n).all()
    # the BFS policy is the ceiling: it solves exactly the pairs with an optimal path within the step limit
    b = ep[ep.policy == "bfs"]
    within = (b.bfs_length >= 0) & (b.bfs_length <= s["protocol"]["max_steps"])
    assert (b.success == within).all() and s["policies"]["bfs"]["success"] == pytest.approx(within.mean())
    assert s["policies"]["bfs"]["success_reachable"] == 1.0
    for p in ("agent", "greedy", "random"):
        d = ep[ep.policy == p]
        assert not (d.success & ~within.to_numpy()).any()  # nobody beats the exact optimum
        assert (d.length[d.success] >= d.bfs_length[d.success]).all()
        assert s["policies"][p]["success"] <= s["policies"]["bfs"]["success"] + 1e-12
    assert 0 < s["bfs_reachable_frac"] < 1  # T3 is unreachable
    # per-episode records are consistent: one action and one visited cell per step
    assert (ep.actions.map(len) == ep.length).all() and (ep.cells.map(len) == ep.length).all()
    assert ep.activation_frac.dropna().between(0, 1).all() and (ep.stagnations >= 0).all()
    assert {r["target_type"] for r in s["per_target"]} == {"T0", "T1", "T2", "T3"}
    t3 = next(r for r in s["per_target"] if r["target_type"] == UNREACHABLE_TYPE)
    assert t3["bfs"] == 0 and t3["agent"] == 0
    assert s["training"]["final_success_rate"] == pytest.approx(0.3) and s["training"]["timesteps"] == 64
    json.loads((out / "default" / "summary.json").read_text())  # valid JSON on disk


def test_ground_truth_table(evaluated):
    _, s = evaluated
    gt = s["ground_truth"]
    assert gt["available"] and gt["n_pairs"] == 12
    assert 0 <= gt["bfs_agreement"] <= 1 and gt["bfs_plans"] > 0
    pair = next(p for p in gt["pairs"] if p["target"] == UNREACHABLE_TYPE)
    assert pair["verdict"] == "table: target unreachable"
    assert all(p["verdict"] for p in gt["pairs"])
    # the complementary best-planted-action percentile: defined wherever planted_rank is, a percentile
    both = [p for p in gt["pairs"] if p["planted_rank"] is not None]
    assert both and all(0 <= p["planted_best_rank"] <= 1 for p in both)
    assert all(p["planted_best_rank"] is None for p in gt["pairs"] if p["planted_rank"] is None)
    assert 0 <= gt["mean_planted_best_rank"] <= 1


def test_ground_truth_simulator_levels(tiny):
    """With the transition settings the check also measures the simulator's response to the planted actions."""
    m = load_model(tiny["model"])
    table = np.load(tiny["table"])
    truth = json.loads(tiny["truth"].read_text())
    ev = evaluate(m, table, None, env=ENV, n_episodes=60, seed=0, policies=("bfs",), truth=truth,
                  transition_settings={"n_neighbors": 30, "backend": "numpy"})
    gt = ev.summary["ground_truth"]
    assert gt["simulator_checked"] and 0 <= gt["mean_grn_toward"] <= 1 and 0 <= gt["mean_shift_toward"] <= 1
    assert 0 <= gt["chance_agreement"] <= 1
    ok = [p for p in gt["pairs"] if p["target"] != UNREACHABLE_TYPE]
    assert all(p["grn_toward"] is not None and p["verdict"] for p in ok)


def test_plots_written(evaluated):
    out, s = evaluated
    names = {p.name for p in (out / "default" / "plots").glob("*.png")}
    assert {"umap_paths.png", "success_by_target.png", "length_hist.png", "learning_curve.png",
            "action_usage.png", "action_usage_bfs.png", "recipe_metrics.png"} <= names
    assert set(s["plots"]) == names


def test_oe_fraction_is_pooled(evaluated, tiny):
    """The policy table's OE fraction is the share of OE among all actions (the action_usage titles use it)."""
    out, s = evaluated
    ep = pd.read_parquet(out / "default" / "episodes.parquet")
    acts = pd.read_csv(tiny["actions"], sep="\t")
    oe = set(acts.index[acts.kind == "OE"])
    for p in ("agent", "greedy", "random"):
        a = [int(x) for seq in ep[ep.policy == p].actions for x in seq]
        assert s["policies"][p]["activation_frac"] == pytest.approx(np.mean([x in oe for x in a]))


def test_recipe_section(evaluated):
    """summary.json's recipes section and the per-(pair, policy) TSV, scored against the planted recipes."""
    out, s = evaluated
    r = s["recipes"]
    assert r["available"] and r["n_not_in_action_space"] == 0 and r["permutations"] == 200
    df = pd.read_csv(out / "default" / "recipes.tsv", sep="\t")
    n_pairs = len(read_recipes(out / "recipes_in.tsv").groupby(["start_type", "target_type"]))
    assert r["n_pairs"] == n_pairs == 12
    assert set(df.policy) == {"agent", "bfs", "greedy", "random", "perturbation_score", "expression_diff"}
    assert (df.groupby("policy").size() == n_pairs).all()
    # without transitions/stats.json the perturbation score is skipped and says so
    assert r["perturbation_score"].startswith("skipped") and df[df.policy == "perturbation_score"].auc.isna().all()
    sc = df.dropna(subset=["auc"])
    assert sc.auc.between(0, 1).all() and sc.p_value.between(0, 1).all()
    # the fixture's model is random, unrelated to its "planted" recipes: no policy is consistently significant
    assert all(m["pairs_p_below_0.05"] < 6 for m in r["policies"].values())
    assert r["policies"]["bfs"]["auc"] == pytest.approx(df[df.policy == "bfs"].auc.mean())
    assert (df[df.policy == "bfs"].n_plans >= 0).all()


def test_recipes_perturbation_score(tiny):
    """With the transition settings the CellOracle-style perturbation score ranks every action per pair."""
    m = load_model(tiny["model"])
    table = np.load(tiny["table"])
    write_demo_recipes(tiny["truth"], tiny["results"] / "r.tsv")
    rec = read_recipes(tiny["results"] / "r.tsv")
    ev = evaluate(m, table, None, env=ENV, n_episodes=60, seed=0, policies=("bfs", "random"), recipes=rec,
                  transition_settings={"n_neighbors": 30, "backend": "numpy"}, recipe_permutations=100)
    r = ev.summary["recipes"]
    assert r["perturbation_score"] == "computed"
    ps = ev.recipes[ev.recipes.policy == "perturbation_score"]
    assert ps.auc.notna().all() and ps["precision@1"].between(0, 1).all()
    ev2 = evaluate(m, table, None, env=ENV, n_episodes=60, seed=0, policies=("bfs",), recipes=rec,
                   transition_settings={"n_neighbors": 30, "backend": "numpy"}, recipe_score_max_values=10)
    assert "too large" in ev2.summary["recipes"]["perturbation_score"]
    bad = rec.assign(start_type="Nope")
    with pytest.raises(InputError, match="not cell types"):
        evaluate(m, table, None, env=ENV, n_episodes=10, policies=("bfs",), recipes=bad)


def test_plan_flags():
    planted, wrong = {0, 5}, {1, 4}
    assert _plan_flags([0, 2], planted, wrong) == (True, 0.5, False)
    assert _plan_flags([0, 5, 1], planted, wrong) == (False, 1.0, True)  # a master in the wrong direction
    assert _plan_flags([2, 3], planted, wrong) == (False, 0.0, False)


def test_sampled_protocol_is_seeded(small_model):
    geo = TaskGeometry.from_model(small_model)
    s1, t1, n = eval_tasks(geo, n_episodes=10, seed=3)
    s2, t2, _ = eval_tasks(geo, n_episodes=10, seed=3)
    assert n > 10 and len(s1) == 10 and (s1 == s2).all() and (t1 == t2).all()
    assert (geo.type_ids[s1] != t1).all() and (geo.split[s1] == "test").all()


def test_baselines_without_agent_and_stagnation(tiny):
    m = load_model(tiny["model"])
    table = np.load(tiny["table"])
    ev = evaluate(m, table, None, env=ENV, n_episodes=40, seed=1, policies=("random", "bfs"))
    assert set(ev.episodes.policy) == {"random", "bfs"} and len(ev.episodes) == 80
    st = policy_stats(ev.episodes, ev.summary["protocol"]["max_steps"])
    b = ev.episodes[(ev.episodes.policy == "bfs") & ev.episodes.success]
    assert len(b) and (b.stagnations == 0).all()  # shortest paths never revisit a cell
    assert st["random"]["episodes"] == 40 and "agent" not in st


def test_errors(tiny, tmp_path):
    with pytest.raises(InputError, match="agent not found"):
        load_agent(tmp_path / "nope.zip", None, 12)
    bad = tmp_path / "actions.tsv"
    bad.write_text("index\tgene\n0\tg1\n")
    with pytest.raises(InputError, match="lacks columns"):
        action_table(12, [], bad)
    with pytest.raises(InputError, match="actions table lists"):
        action_table(10, [], tiny["actions"])


def test_read_progress_variants(tmp_path):
    p = tmp_path / "progress.csv"
    p.write_text("time/total_timesteps,eval/success_rate,rollout/ep_rew_mean\n100,0.1,-5\n200,,-4\n300,0.4,-3\n")
    df = read_progress(p)
    assert df.timesteps.tolist() == [100, 200, 300] and df.success.dropna().tolist() == [0.1, 0.4]
    assert read_progress(tmp_path / "missing.csv").empty
    (tmp_path / "junk.csv").write_text("a,b\n1,2\n")
    assert read_progress(tmp_path / "junk.csv").empty
