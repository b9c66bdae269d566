"""Persistent perturbations on the demo (issue 14): exact, beam, greedy and a MaskablePPO agent over sets, with
the table mode's numbers for the same tasks side by side.

    .venv/bin/python benchmarks/persistent_demo.py [--results results/demo] [--truth resources/demo/ground_truth.json]
        [--n-starts N] [--beam-width 8] [--max-genes 3] [--agent-steps 200000] [--next-cell pca_direction]
        [--warm-start none|exact] [--bc-starts 20] [--bc-epochs 60] [--bc-dagger 0] [--bc-labels one|all]
        [--plans-cache DIR] [--seed N] [--agents K]
        [--torch-threads N] [--quick]

Needs the demo's ``oracle/model.npz``, ``transitions/table.npy`` and (for the table agent)
``models/default/model.zip`` under ``--results``, and the demo's planted ground truth. Settings:
``config/config.yaml`` merged with the demo's overrides (``env``, ``train``, ``transitions``).

Tasks: the evaluation protocol's (every test cell x every other cell type; ``--n-starts`` keeps that many test
cells, evenly spread, for a shorter run). Persistent mode (:mod:`cellrl.persistent`): ``exact`` (every set of up
to ``--max-genes`` genes in every order: the ground truth), ``beam`` (width ``--beam-width``), ``greedy``
(one-step best cosine gain), ``agent`` (MaskablePPO trained in persistent mode with the demo's train settings,
``--agent-steps`` env steps, default the ``total_timesteps`` of config/examples/demo_persistent.yaml's run: from scratch, or with
``--warm-start exact`` after behaviour cloning of exact plans from ``--bc-starts`` TRAINING cells per type (default
``train.warm_start_starts_per_type``; :mod:`cellrl.persistent.warmstart`; ``--plans-cache`` keeps their exact plans
between runs; ``agent_bc_only`` scores the cloned policy before PPO), PPO then at learning_rate x warm_start_ppo_lr_scale). ``--next-cell`` overrides
``transitions.next_cell`` for the persistent engine (the table results keep theirs). Table mode
(:func:`cellrl.evaluate.evaluate`): ``bfs``, ``greedy`` and the pipeline's trained agent.

Per method: success, success within ``--max-genes`` steps, mean plan length of the successes, and the planted
recipe check of :func:`cellrl.persistent.evaluate.planted_agreement` (a plan *agrees* when its set holds >= 1
planted action and no master TF in the wrong direction): ``agree`` over successful plans, ``agree_all`` over every
non-empty plan, the chance level, and the per-pair table. Goals (issue 14): persistent plans agree in >= 90%
of test plans; agent success >= 95% of exact search's.

Writes benchmarks/out/persistent_demo_<timestamp>.json and, unless ``--quick``,
benchmarks/results/persistent_demo.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import machine_with_load  # noqa: E402
from cellrl.bfs import eval_allowed_mask  # noqa: E402
from cellrl.config import dataset_config, load_config  # noqa: E402
from cellrl.env import EnvParams  # noqa: E402
from cellrl.evaluate import action_table, agent_chooser, ensemble_chooser, eval_tasks, evaluate  # noqa: E402
from cellrl.io import sha256_file, write_json  # noqa: E402
from cellrl.persistent.engine import PersistentEngine  # noqa: E402
from cellrl.persistent.env import VecPersistentEnv  # noqa: E402
from cellrl.persistent.evaluate import (planted_agreement, plan_frame, score_plans, search_runs,  # noqa: E402
                                        success_vs_exact, task_subset)
from cellrl.persistent.search import SearchResult, rollout  # noqa: E402
from cellrl.persistent.warmstart import (LABELS, STARTS_PER_TYPE, label_search, training_plans,  # noqa: E402
                                        training_starts, warm_start_persistent)
from cellrl.tasks import TaskGeometry  # noqa: E402
from cellrl.train import (build_agent, fit_curriculum, load_inputs, quiet_numerics, set_torch_threads,  # noqa: E402
                          train_config)
from cellrl.warmstart import BC_EPOCHS, ppo_config  # noqa: E402


OVERLAY = ROOT / "config" / "examples" / "demo_persistent.yaml"  # the pipeline's persistent run on the demo


def demo_settings() -> dict[str, Any]:
    """The settings of the pipeline's persistent run on the demo: config.yaml + datasets.demo.overrides + the
    ``persistent`` run of config/examples/demo_persistent.yaml (its PPO budget, warm-start starts)."""
    import yaml

    s = dataset_config(load_config(extra=yaml.safe_load(OVERLAY.read_text())), "demo", "persistent")
    s["train"].update(device="cpu", wandb={"mode": "disabled"}, warm_start="none")
    return s


def planted_recipe_rollout(engine: PersistentEngine, geo: TaskGeometry, truth: dict, acts: pd.DataFrame,
                           starts: np.ndarray, targets: np.ndarray, max_steps: int) -> dict[str, Any]:
    """Does the planted recipe itself reach the goal in persistent mode? Per task, the planted actions of its
    (start type, target type) pair are added one per step (knockouts first, as listed), then the set is held
    until the goal or ``max_steps`` (the set-size cap does not apply: 4 recipes hold 4 genes)."""
    index = {(k, g.lower()): i for i, (k, g) in enumerate(zip(acts.kind, acts.gene))}
    tl = {str(t).lower(): i for i, t in enumerate(geo.type_names)}
    recipes: dict[tuple[int, int], list[int]] = {}
    for rec in truth.get("reprogramming", []):
        key = (tl.get(str(rec["start"]).lower()), tl.get(str(rec["target"]).lower()))
        recipes[key] = [index[("KO", g.lower())] for g in rec.get("knockout", []) if ("KO", g.lower()) in index] + \
            [index[("OE", g.lower())] for g in rec.get("overexpress", []) if ("OE", g.lower()) in index]
    plan = [recipes.get((int(geo.type_ids[s]), int(t)), []) for s, t in zip(starts, targets)]
    has = np.array([len(p) > 0 for p in plan])
    cell = np.asarray(starts, np.int64).copy()
    applied = np.zeros((len(cell), engine.n_regulators), np.int8)
    done = ~has
    success = np.zeros(len(cell), bool)
    length = np.zeros(len(cell), np.int64)
    for k in range(int(max_steps)):
        idx = np.flatnonzero(~done)
        if not len(idx):
            break
        add = np.array([k < len(plan[i]) for i in idx])
        if add.any():
            j = idx[add]
            applied[j] = engine.apply(applied[j], np.array([plan[i][k] for i in j]))
        nxt = np.asarray(engine.step(cell[idx], applied[idx]), np.int64)
        stuck = (nxt == cell[idx]) & ~add                       # holding no longer moves the cell
        cell[idx] = nxt
        length[idx] = k + 1
        hit = geo.is_goal(nxt, targets[idx])
        success[idx[hit]] = True
        done[idx[hit | stuck]] = True
    return {"success": float(success[has].mean()) if has.any() else None, "n_tasks": int(has.sum()),
            "mean_success_length": float(length[success].mean()) if success.any() else None,
            "per_pair": pd.DataFrame({"s": geo.type_names[geo.type_ids[starts]], "t": geo.type_names[targets],
                                      "ok": success}).groupby(["s", "t"]).ok.mean().round(3)
                     .reset_index().to_dict("records")}


def train_persistent_agent(geo: TaskGeometry, engine: PersistentEngine, env_cfg: dict, train_cfg: dict,
                           steps: int, warm: str = "none", bc_starts: int = STARTS_PER_TYPE,
                           bc_epochs: int = BC_EPOCHS, threads: int | None = None,
                           after_bc: Any = None, dagger_rounds: int = 0,
                           plans: SearchResult | None = None, labels: str = "one") -> tuple[Any, dict[str, Any]]:
    """MaskablePPO (reference network, demo train settings) on the persistent env: from scratch (``warm``
    none), or after behaviour cloning of exact plans from ``bc_starts`` training cells per type (``warm`` exact,
    :mod:`cellrl.persistent.warmstart`; PPO then at learning_rate x warm_start_ppo_lr_scale, as in table mode).
    ``after_bc(agent)`` is called between the two (to score the cloned policy); ``plans``: the training plans
    already searched (:func:`cached_training_plans`); ``labels``: one or all optimal actions per plan state."""
    cfg = train_config({**train_cfg, "total_timesteps": int(steps), "warm_start": "none" if warm == "none" else "bfs"})
    threads = set_torch_threads(threads)
    params, warnings = fit_curriculum(EnvParams.from_config(env_cfg), geo.n_types, int(steps))
    env = VecPersistentEnv(geo, engine, int(cfg["n_envs"]), params, split="train", training=True,
                           seed=int(cfg["seed"]))
    agent = build_agent(env, ppo_config(cfg), device="cpu")
    rec: dict[str, Any] = {"warm_start": {"method": "none"}}
    if warm == "exact":
        ws, _, _ = warm_start_persistent(agent, engine, geo, params, float(cfg["gamma"]), per_type=bc_starts,
                                         epochs=bc_epochs, seed=int(cfg["seed"]), dagger_rounds=dagger_rounds,
                                         plans=plans, labels=labels)
        rec["warm_start"] = {k: v for k, v in ws.items() if k != "loss_per_epoch"}
        rec["warm_start"]["loss_last"] = ws["loss_per_epoch"][-1] if ws["loss_per_epoch"] else None
        print("warm start", rec["warm_start"], flush=True)
        if after_bc is not None:
            rec["after_bc"] = after_bc(agent)
    t0 = time.perf_counter()
    with quiet_numerics():
        if steps > 0:
            agent.learn(int(steps))
    wall = time.perf_counter() - t0
    return agent, {**rec, "timesteps": int(agent.num_timesteps), "wall_s": round(wall, 1),
                   "steps_per_s": round(agent.num_timesteps / max(wall, 1e-9), 1), "torch_threads": threads,
                   "train_success_last100": env.success_rate, "training_proxy": True,
                   "warnings": warnings, "n_envs": int(cfg["n_envs"]), "learning_rate": agent.learning_rate}


def cached_training_plans(cache_dir: Path, model_path: Path, engine: PersistentEngine, geo: TaskGeometry,
                          settings: dict[str, Any], per_type: int, max_genes: int,
                          max_steps: int, labels: str = "one") -> tuple[SearchResult, str]:
    """The warm start's exact plans (:func:`cellrl.persistent.warmstart.training_plans`, the expensive part),
    kept in ``cache_dir`` under a key of everything they depend on (the oracle model's bytes, the env and
    transitions settings, starts per type, set size, steps), so reruns and probes search once. Returns the
    plans and ``computed`` or ``cache``. ``labels`` all: plans with every optimal action (a cache of their own)."""
    extra = {"labels": labels} if labels != "one" else {}  # the key of one-label plans is unchanged
    key = hashlib.sha256(json.dumps({"model": sha256_file(model_path), "env": settings["env"],
                                     "transitions": settings["transitions"], "per_type": int(per_type),
                                     "max_genes": int(max_genes), "max_steps": int(max_steps), **extra},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"persistent_plans_{per_type}_{key}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes()), "cache"
    plans = training_plans(engine, geo, training_starts(geo, per_type), max_genes, max_steps, **label_search(labels),
                           tie_break=EnvParams.from_config(settings["env"]).plan_tie_break)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(plans))
    return plans, "computed"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(ROOT / "results" / "demo"))
    ap.add_argument("--truth", default=str(ROOT / "resources" / "demo" / "ground_truth.json"))
    ap.add_argument("--n-starts", type=int, default=None, help="test cells to use (default: all)")
    ap.add_argument("--beam-width", type=int, default=8)
    ap.add_argument("--max-genes", type=int, default=None, help="exact search's set size (default env.max_set_size)")
    ap.add_argument("--agent-steps", type=int, default=None, help="default: total_timesteps of the persistent run in config/examples/demo_persistent.yaml")
    ap.add_argument("--next-cell", default=None, help="transitions.next_cell of the persistent engine "
                    "(default: the demo's, pca_direction)")
    ap.add_argument("--warm-start", choices=("none", "exact"), default="none",
                    help="exact: behaviour cloning of exact plans from training cells before PPO")
    ap.add_argument("--bc-starts", type=int, default=None,
                    help="training start cells per type (default: train.warm_start_starts_per_type)")
    ap.add_argument("--bc-epochs", type=int, default=None, help="default: train.warm_start_epochs")
    ap.add_argument("--plans-cache", default=None, help="folder keeping the warm start's exact training plans "
                    "(searched once per settings; default: none, search every run)")
    ap.add_argument("--bc-dagger", type=int, default=0, help="DAgger rounds after cloning (exact labels)")
    ap.add_argument("--bc-labels", choices=LABELS, default=None, help="one: the plan's action per state; all: every "
                    "action starting a shortest completion; all_plans: all, on the states of up to MAX_PLANS shortest "
                    "plans per task (default: train.warm_start_labels)")
    ap.add_argument("--seed", type=int, default=None, help="train.seed of the agent (default: the demo's)")
    ap.add_argument("--agents", type=int, default=1, help="train this many agents (seeds seed, seed+1, ...) and "
                    "also score their ensemble (masked probabilities averaged: agent_ensemble)")
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--no-table", action="store_true", help="skip the table-mode evaluation")
    ap.add_argument("--quick", action="store_true", help="do not overwrite benchmarks/results/")
    args = ap.parse_args(argv)

    res_dir = Path(args.results)
    s = demo_settings()
    args.bc_starts = int(args.bc_starts or s["train"].get("warm_start_starts_per_type", STARTS_PER_TYPE))
    args.bc_epochs = int(args.bc_epochs or s["train"].get("warm_start_epochs", BC_EPOCHS))
    args.bc_labels = args.bc_labels or s["train"].get("warm_start_labels", "one")
    if args.seed is not None:
        s["train"]["seed"] = int(args.seed)
    if args.next_cell:
        s["transitions"]["next_cell"] = args.next_cell
    truth = json.loads(Path(args.truth).read_text())
    model, table = load_inputs(res_dir / "oracle" / "model.npz", res_dir / "transitions" / "table.npy")
    params = EnvParams.from_config(s["env"])
    geo = TaskGeometry.from_model(model, params.goal_percentile, params.centroid_percentile)
    max_steps = params.eval_max_steps(geo.n_types)
    args.max_genes = int(args.max_genes or params.max_set_size)
    starts, targets, n_pairs = eval_tasks(geo, None, seed=0)
    sub = task_subset(geo, starts, args.n_starts)  # the tasks exact search runs on
    acts = action_table(table.shape[1], model.regulators, res_dir / "transitions" / "actions.tsv")
    allowed = eval_allowed_mask(model, table)
    cmd = " ".join(["benchmarks/persistent_demo.py", *(sys.argv[1:] if argv is None else argv)])
    out: dict[str, Any] = {"machine": machine_with_load(), "command": cmd, "results": str(res_dir),
                           "n_tasks": int(len(starts)),
                           "n_exact_tasks": int(sub.sum()), "n_exact_start_cells": int(len(np.unique(starts[sub]))),
                           "n_types": int(geo.n_types), "max_steps": int(max_steps), "max_genes": int(args.max_genes),
                           "beam_width": int(args.beam_width), "env": s["env"], "transitions": s["transitions"],
                           "persistent": {}, "table": {}}
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    def score(frame: pd.DataFrame, n_gene_actions: int) -> dict[str, Any]:
        """Stats and recipe check on the exact-search tasks and (when run on them) on all test tasks."""
        return score_plans(frame, sub, n_gene_actions,
                           lambda f: planted_agreement(truth, f, geo, acts, table, allowed))

    t0 = time.perf_counter()
    engine = PersistentEngine.from_model(model, s["transitions"])
    out["engine_build_s"] = round(time.perf_counter() - t0, 2)
    for name, fn in search_runs(engine, geo, starts, targets, sub, args.max_genes, args.beam_width, max_steps,
                                params.max_set_size, params.plan_tie_break):
        r: SearchResult = fn()
        log(name, f"{r.wall_s:.1f} s, {r.engine_rows} engine rows")
        f = plan_frame(name, r.starts, r.targets, r.success, r.plans, geo)
        out["persistent"][name] = {**score(f, engine.n_actions), "engine_rows": r.engine_rows,
                                   "wall_s": round(r.wall_s, 2), "rows_per_s": round(r.engine_rows / max(r.wall_s, 1e-9)),
                                   "info": r.info}

    pr = planted_recipe_rollout(engine, geo, truth, acts, starts, targets, max_steps)
    out["planted_recipe_rollout"] = pr
    log("planted recipe applied then held: success", pr["success"], "mean length", pr["mean_success_length"])

    steps = int(s["train"]["total_timesteps"] if args.agent_steps is None else args.agent_steps)

    def score_agent(agent: Any, name: str, choose: Any = None) -> dict[str, Any]:
        r = rollout(geo, engine, params, starts, targets, choose or agent_chooser(agent, deterministic=True),
                    max_steps=max_steps)
        f = plan_frame(name, starts, targets, r.success, r.plans, geo)
        res = {**score(f, engine.n_actions), "eval_wall_s": round(r.wall_s, 2)}
        res["success_vs_exact"] = success_vs_exact(res, out["persistent"]["exact"])
        log(name, "success / exact", res["success_vs_exact"])
        return res

    if steps > 0 or args.warm_start != "none":
        plans, plans_from = None, None
        if args.warm_start == "exact" and args.plans_cache:
            plans, plans_from = cached_training_plans(Path(args.plans_cache), res_dir / "oracle" / "model.npz", engine,
                                                      geo, s, args.bc_starts, params.max_set_size, max_steps,
                                                      args.bc_labels)
        seed0, agents = int(s["train"]["seed"]), []
        for k in range(int(args.agents)):  # --agents K: seeds seed..seed+K-1, the first one's record as "agent"
            name = "agent" if k == 0 else f"agent_seed{seed0 + k}"
            after_bc = (lambda ag, nm=name: score_agent(ag, nm.replace("agent", "agent_bc_only"))) \
                if args.warm_start != "none" else None
            agent, train_rec = train_persistent_agent(geo, engine, s["env"], {**s["train"], "seed": seed0 + k}, steps,
                                                      args.warm_start, args.bc_starts, args.bc_epochs,
                                                      args.torch_threads, after_bc, args.bc_dagger, plans,
                                                      args.bc_labels)
            if plans_from:  # exact_seconds is then the search time of the run that filled the cache
                train_rec["warm_start"]["plans_from"] = plans_from
            if "after_bc" in train_rec:
                out["persistent"][name.replace("agent", "agent_bc_only")] = train_rec.pop("after_bc")
            log("agent trained", train_rec)
            out["persistent"][name] = {**score_agent(agent, name), "training": train_rec}
            agents.append(agent)
        if len(agents) > 1:
            out["persistent"]["agent_ensemble"] = {**score_agent(None, "agent_ensemble", ensemble_chooser(agents)),
                                                   "seeds": list(range(seed0, seed0 + len(agents)))}

    if not args.no_table:
        from cellrl.agent_io import load_agent

        zip_path = res_dir / "models" / "default" / "model.zip"
        agent_t = (lambda g, n: load_agent(zip_path, g, n)) if zip_path.exists() else None
        t0 = time.perf_counter()
        ev = evaluate(model, table, agent_t, env=s["env"], actions=acts, n_episodes=None, seed=0,
                      policies=("agent", "greedy", "bfs"))
        out["table"]["wall_s"] = round(time.perf_counter() - t0, 1)
        ep = ev.episodes
        key = pd.MultiIndex.from_arrays([starts, targets])
        for pol in ("bfs", "greedy", "agent"):
            e = ep[ep.policy == pol]
            if not len(e):
                continue
            e = e.set_index(["start_cell", "target_id"]).loc[key].reset_index()
            f = plan_frame(pol, e.start_cell.to_numpy(), e.target_id.to_numpy(), e.success.to_numpy(),
                           list(e.actions), geo)
            log("table", pol)
            out["table"][pol] = score(f, table.shape[1])
            for sc in out["table"][pol].values():
                sc["repeated_action_plans"] = float(np.mean([len(set(a)) < len(a) for a in f.actions]))

    p = out["persistent"]
    agree = {k: v["exact_tasks"]["recipe"]["agree"] for k, v in p.items()}
    out["goals"] = {
        "recipe_agreement_ge_0.9": {k: (v or 0) >= 0.9 for k, v in agree.items()},
        "agent_success_ge_0.95_exact": (p["agent"]["success_vs_exact"] or 0) >= 0.95 if "agent" in p else None,
        **({"agent_ensemble_success_ge_0.95_exact": (p["agent_ensemble"]["success_vs_exact"] or 0) >= 0.95}
           if "agent_ensemble" in p else {}),
        "no_plan_repeats_a_gene": all(sc["repeats_a_gene"] == 0 for v in p.values() for k, sc in v.items()
                                      if k in ("exact_tasks", "all_tasks")),
    }
    log("goals", out["goals"])
    save_result("persistent_demo", out, quick=args.quick)
    return out


def save_result(name: str, out: dict, quick: bool = False) -> None:
    """``benchmarks/out/<name>_<time>.json`` always; ``benchmarks/results/<name>.json`` unless ``quick``."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    (ROOT / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    write_json(ROOT / "benchmarks" / "out" / f"{name}_{stamp}.json", out)
    if not quick:
        write_json(ROOT / "benchmarks" / "results" / f"{name}.json", out)


if __name__ == "__main__":
    main()
