"""Persistent vs table mode on real data (issue 14): mESC and the Paul15 subset, reachability and recipe metrics.

    .venv/bin/python benchmarks/persistent_real.py [--datasets mesc paul15_subset] [--results-root results]
        [--n-starts 3] [--beam-width 8] [--max-genes mesc=3 paul15_subset=3] [--recipe-starts N] [--quick]

Reads (never rebuilds) each dataset's ``oracle/model.npz``, ``transitions/table.npy``, ``transitions/actions.tsv``
and ``transitions/stats.json`` under ``--results-root/<dataset>``; settings: ``config/config.yaml`` merged with
``config/examples/<dataset>.yaml``; the persistent engine uses the transition settings the table was built with
(``stats.json`` ``settings``, next_cell ``pca_direction``), so both modes share one next-cell model.

Tasks: the evaluation protocol's (test cell x every other type, :func:`cellrl.evaluate.eval_tasks`) restricted to
``--n-starts`` test cells per start type (:func:`cellrl.persistent.evaluate.task_subset`), plus, for the curated
recipe pairs, ``--recipe-starts`` test cells of the recipe's start type (default: the same sample). Per dataset:

* reachability: share of tasks solved (and of (start type, target type) pairs with >= 1 solved task) by table
  BFS (:func:`cellrl.evaluate.evaluate`, the exact table optimum) and by persistent ``exact`` (every set of up to
  ``--max-genes`` genes), ``beam<width>`` and ``greedy`` (:mod:`cellrl.persistent.search`), all within the
  evaluation step limit;
* recipe metrics (:func:`cellrl.evaluate.recipe_check` -> :func:`cellrl.recipes.recipe_benchmark`, the
  perturbation-score baseline skipped) of each method's plans on the curated pairs: AUC (rank of recipe actions
  by plan usage), permutation p-value, precision/recall@k, wrong direction. HOLD steps are dropped from
  persistent plans (they perturb nothing).

Writes benchmarks/out/persistent_real_<timestamp>.json and, unless ``--quick``, benchmarks/results/persistent_real.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import machine_with_load  # noqa: E402
from persistent_demo import save_result  # noqa: E402

from cellrl.config import dataset_config, load_config  # noqa: E402
from cellrl.env import EnvParams  # noqa: E402
from cellrl.evaluate import action_table, eval_tasks, evaluate, recipe_check  # noqa: E402
from cellrl.persistent.engine import PersistentEngine  # noqa: E402
from cellrl.persistent.evaluate import method_stats, plan_frame, search_runs, task_subset  # noqa: E402
from cellrl.recipes import read_recipes  # noqa: E402
from cellrl.tasks import TaskGeometry  # noqa: E402
from cellrl.train import load_inputs  # noqa: E402

DEFAULT_MAX_GENES = {"mesc": 3, "paul15_subset": 3}
RECIPE_KEYS = ("auc", "p_value", "precision@1", "recall@1", "precision@3", "recall@3", "precision@5", "recall@5",
               "wrong_direction")


def settings_of(dataset: str) -> tuple[dict[str, Any], Path | None]:
    """Stage settings of ``dataset`` (config.yaml + config/examples/<dataset>.yaml) and its recipe table."""
    extra = yaml.safe_load((ROOT / "config" / "examples" / f"{dataset}.yaml").read_text())
    cfg = load_config(ROOT / "config" / "config.yaml", extra)
    rec = cfg["datasets"][dataset].get("recipes")
    return dataset_config(cfg, dataset), (ROOT / rec if rec else None)


def reach(frame: pd.DataFrame) -> dict[str, Any]:
    """Share of tasks solved and of (start type, target type) pairs with at least one solved task."""
    per = frame.groupby(["start_type", "target_type"]).success.agg(["mean", "any"])
    return {"tasks_solved": float(frame.success.mean()), "n_tasks": int(len(frame)),
            "pairs_any_solved": float(per["any"].mean()), "pairs_mean_solved": float(per["mean"].mean()),
            "n_pairs": int(len(per))}


def recipe_scores(recipes: pd.DataFrame, frame: pd.DataFrame, n_actions: int, acts: pd.DataFrame, geo: TaskGeometry,
                  model: Any, n_perm: int, source: object) -> dict[str, Any]:
    """Recipe metrics of one method's plans (HOLD dropped), scored as recipes.py scores the BFS policy."""
    ep = frame.assign(policy="bfs", actions=[[a for a in p if a < n_actions] for p in frame.actions])
    summ, df = recipe_check(recipes, ep, acts, geo, model, None, n_perm=n_perm, seed=0, max_values=0,
                            source=source)
    d = df[df.policy == "bfs"]
    pairs = [{"start": r["start_type"], "target": r["target_type"], "recipe": r["recipe"],
              "not_in_action_space": r["not_in_action_space"], "n_plans": int(r["n_plans"]),
              "success": float(r["success"]),
              **{k: None if pd.isna(r.get(k)) else float(r[k]) for k in RECIPE_KEYS}} for _, r in d.iterrows()]
    mean = summ["policies"].get("bfs", {})
    return {"mean": {k: mean.get(k) for k in RECIPE_KEYS if k != "p_value"}
            | {"pairs_scored": mean.get("pairs_scored"), "pairs_p_below_0.05": mean.get("pairs_p_below_0.05")},
            "pairs": pairs}


def run_dataset(name: str, root: Path, n_starts: int, beam_width: int, max_genes: int,
                recipe_starts: int | None, n_perm: int) -> dict[str, Any]:
    log = lambda *a: print(f"[{name}]", *a, flush=True)  # noqa: E731
    res_dir = root / name
    s, rec_path = settings_of(name)
    stats = json.loads((res_dir / "transitions" / "stats.json").read_text())
    tset = dict(stats["settings"])
    model, table = load_inputs(res_dir / "oracle" / "model.npz", res_dir / "transitions" / "table.npy")
    params = EnvParams.from_config(s["env"])
    geo = TaskGeometry.from_model(model, params.goal_percentile, params.centroid_percentile)
    max_steps = params.eval_max_steps(geo.n_types)
    acts = action_table(table.shape[1], model.regulators, res_dir / "transitions" / "actions.tsv")
    recipes = read_recipes(rec_path)
    starts, targets, _ = eval_tasks(geo, None, seed=0)
    tn = np.asarray(geo.type_names).astype(str)
    sub = task_subset(geo, starts, n_starts)
    tl = {t.lower(): i for i, t in enumerate(tn)}
    rpairs = {(tl[a.lower()], tl[b.lower()]) for a, b in zip(recipes.start_type, recipes.target_type)}
    on_recipe = np.array([(int(geo.type_ids[a]), int(b)) in rpairs for a, b in zip(starts, targets)])
    rsub = (task_subset(geo, starts, recipe_starts) if recipe_starts is not None else sub) & on_recipe
    use = sub | rsub
    S, T = starts[use], targets[use]
    in_sub, in_rsub = sub[use], rsub[use]
    out: dict[str, Any] = {
        "results": str(res_dir), "n_cells": int(geo.n_cells), "n_types": int(geo.n_types),
        "types": tn.tolist(), "n_actions": int(table.shape[1]), "n_test_cells": int(len(np.unique(starts))),
        "n_tasks_protocol": int(len(starts)), "n_start_cells": int(len(np.unique(starts[sub]))),
        "n_tasks": int(sub.sum()), "n_recipe_tasks": int(rsub.sum()),
        "recipe_pairs": sorted(f"{tn[a]}->{tn[b]}" for a, b in rpairs), "max_steps": int(max_steps),
        "max_genes": int(max_genes), "beam_width": int(beam_width), "transitions": tset, "env": s["env"],
        "methods": {}}
    log(f"{geo.n_cells} cells, {geo.n_types} types, {table.shape[1]} actions; {sub.sum()} tasks "
        f"({out['n_start_cells']} start cells), {rsub.sum()} recipe tasks, {max_steps} steps")

    def record(method: str, frame: pd.DataFrame, n_actions: int, extra: dict[str, Any]) -> None:
        f = frame.reset_index(drop=True)
        m = {"reachability": reach(f[in_sub]), **method_stats(f[in_sub], n_actions), **extra}
        if in_rsub.any():
            m["recipes"] = recipe_scores(recipes, f[in_rsub], n_actions, acts, geo, model, n_perm, rec_path)
        out["methods"][method] = m
        log(method, m["reachability"], "recipes", m.get("recipes", {}).get("mean"))

    t0 = time.perf_counter()
    ev = evaluate(model, table, None, env=s["env"], actions=acts, n_episodes=None, seed=0, policies=("bfs",))
    e = ev.episodes[ev.episodes.policy == "bfs"].set_index(["start_cell", "target_id"])
    e = e.loc[pd.MultiIndex.from_arrays([S, T])].reset_index()
    record("table_bfs", plan_frame("table_bfs", S, T, e.success.to_numpy(), list(e.actions), geo),
           table.shape[1], {"wall_s": round(time.perf_counter() - t0, 2),
                            "all_test_tasks_solved": float(ev.summary["bfs_reachable_within_max_steps_frac"])})

    t0 = time.perf_counter()
    engine = PersistentEngine.from_model(model, tset)
    out["engine_build_s"] = round(time.perf_counter() - t0, 2)
    if engine.n_actions != table.shape[1]:
        raise RuntimeError(f"engine has {engine.n_actions} actions, table {table.shape[1]}")
    for meth, fn in search_runs(engine, geo, S, T, np.ones(len(S), bool), max_genes, beam_width, max_steps,
                                max_genes, params.plan_tie_break):
        r = fn()
        record(f"persistent_{meth}", plan_frame(meth, r.starts, r.targets, r.success, r.plans, geo),
               engine.n_actions, {"wall_s": round(r.wall_s, 2), "engine_rows": int(r.engine_rows)})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["mesc", "paul15_subset"])
    ap.add_argument("--results-root", default=str(ROOT / "results"))
    ap.add_argument("--n-starts", type=int, default=3, help="test cells per start type")
    ap.add_argument("--recipe-starts", type=int, default=None,
                    help="test cells per start type on the curated recipe pairs (default: --n-starts)")
    ap.add_argument("--beam-width", type=int, default=8)
    ap.add_argument("--max-genes", nargs="*", default=[], help="dataset=N set-size limits (default mesc=3 "
                    "paul15_subset=3); also the beam's and greedy's")
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="do not overwrite benchmarks/results/")
    args = ap.parse_args(argv)
    mg = dict(DEFAULT_MAX_GENES, **{k: int(v) for k, v in (x.split("=") for x in args.max_genes)})
    cmd = " ".join(["benchmarks/persistent_real.py", *(sys.argv[1:] if argv is None else argv)])
    out: dict[str, Any] = {"machine": machine_with_load(), "command": cmd, "datasets": {}}
    for name in args.datasets:
        t0 = time.perf_counter()
        out["datasets"][name] = run_dataset(name, Path(args.results_root), args.n_starts, args.beam_width,
                                            mg.get(name, 3), args.recipe_starts, args.permutations)
        out["datasets"][name]["wall_s"] = round(time.perf_counter() - t0, 1)
    save_result("persistent_real", out, quick=args.quick)
    return out


if __name__ == "__main__":
    main()
