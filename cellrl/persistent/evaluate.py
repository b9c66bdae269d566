"""Persistent-mode evaluation (issue 14): the agent against exact, beam and greedy search over sets on the
evaluation protocol's test tasks.

Tasks: :func:`cellrl.evaluate.eval_tasks` (every test cell x every other type, or a seeded sample). ``exact``
(every set of up to ``exact_max_genes`` genes in every order: the ground truth; exponential in the set size)
runs on the tasks of ``exact_starts`` test cells per start type (:func:`task_subset`); ``beam<width>``,
``greedy`` and the agent run on every task. Per method (:func:`score_plans`): success, plan length, set size
(distinct genes) and the plans that use a gene twice (must be none), on the exact-search tasks and on all tasks;
the agent's success relative to exact search's on the same tasks; with a planted ground truth, the agreement of
the plans with the planted recipe (:func:`planted_agreement`); with a recipe table, the known-recipe metrics of
:func:`cellrl.evaluate.recipe_check` for every method.

Used by rule ``evaluate`` (:func:`cellrl.evaluate.evaluate_files` in persistent mode) and by
benchmarks/persistent_demo.py and benchmarks/persistent_real.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from ..errors import InputError
from ..tasks import TaskGeometry

log = logging.getLogger("cellrl.persistent.evaluate")

#: Default number of test cells per start type that exact search runs on (config: evaluate.persistent_exact_starts).
EXACT_STARTS = 2


@dataclass
class PersistentEvaluation:
    """Result of :func:`evaluate_persistent`: one row per (method, task) and the JSON-ready summary."""

    episodes: pd.DataFrame
    summary: dict[str, Any]
    geometry: TaskGeometry
    recipes: pd.DataFrame | None = None  # per (pair, method) recipe metrics (cellrl.recipes)


def task_subset(geo: TaskGeometry, starts: np.ndarray, n_starts: int | None) -> np.ndarray:
    """(N,) bool: the tasks of ``n_starts`` start cells per start type, evenly spread over each type's cells
    (all tasks when None)."""
    if n_starts is None:
        return np.ones(len(starts), bool)
    keep = []
    for t in range(geo.n_types):
        cells = np.unique(starts[geo.type_ids[starts] == t])
        k = min(n_starts, len(cells))
        keep += cells[np.linspace(0, len(cells) - 1, k).round().astype(int)].tolist() if k else []
    return np.isin(starts, keep)


def plan_frame(policy: str, starts: np.ndarray, targets: np.ndarray, success: np.ndarray, plans: list,
               geo: TaskGeometry) -> pd.DataFrame:
    """The episode/BFS-frame columns :func:`cellrl.evaluate.ground_truth_check` reads, one row per task."""
    tn = np.asarray(geo.type_names).astype(str)
    return pd.DataFrame({"policy": policy, "start_cell": starts, "cell": starts,
                         "start_type": tn[geo.type_ids[starts]], "target_type": tn[targets],
                         "success": np.asarray(success, bool), "actions": [list(map(int, p)) for p in plans],
                         "length": [len(p) for p in plans]})


def planted_agreement(truth: Mapping[str, Any], frame: pd.DataFrame, geo: TaskGeometry, acts: pd.DataFrame,
                      table: np.ndarray, allowed: np.ndarray) -> dict[str, Any]:
    """Planted-recipe agreement of one method's plans (:func:`cellrl.evaluate.ground_truth_check` with them in
    both slots): a plan agrees when its set holds >= 1 planted action and no master TF in the wrong direction.
    ``agree`` over successful plans, ``agree_all`` over every non-empty plan, ``chance`` for random plans."""
    from ..evaluate import ground_truth_check

    ep = frame.assign(policy="agent")
    gt = ground_truth_check(truth, ep, frame, acts, geo, table, allowed, model=None)
    wrong = [p["bfs_wrong"] for p in gt["pairs"] if p["bfs_wrong"] is not None]
    return {"agree": gt["agent_agreement"], "agree_all": gt["bfs_agreement"], "chance": gt["chance_agreement"],
            "n_success_plans": gt["agent_plans"], "n_plans": gt["bfs_plans"],
            "pairs_agree": gt["agent_pairs_agree"], "wrong_direction": float(np.mean(wrong)) if wrong else None,
            "pairs": [{k: p[k] for k in ("start", "target", "planted", "n_agent", "agent_agree", "agent_recall")}
                      for p in gt["pairs"]]}


def plan_genes(plan: list[int], n_gene_actions: int) -> list[int]:
    """The gene of each gene action of a plan, in order (KO ``r`` and OE ``R + r`` are gene ``r``; actions >=
    ``n_gene_actions`` are HOLD and dropped)."""
    return [a % (n_gene_actions // 2) for a in plan if a < n_gene_actions]


def method_stats(frame: pd.DataFrame, n_genes_actions: int) -> dict[str, Any]:
    """Success, plan lengths (steps), set sizes (distinct genes; actions >= ``n_genes_actions`` are HOLD) and
    the plans that use a gene twice (KO/OE of one gene or one action repeated)."""
    ok = frame.success.to_numpy()
    ln = frame.length.to_numpy()
    genes = [plan_genes(p, n_genes_actions) for p in frame.actions]
    size = np.array([len(set(g)) for g in genes])
    return {"success": float(ok.mean()),
            "mean_success_length": float(ln[ok].mean()) if ok.any() else None,
            "max_success_length": int(ln[ok].max()) if ok.any() else None,
            "mean_success_set_size": float(size[ok].mean()) if ok.any() else None,
            "repeats_a_gene": int(sum(len(set(g)) != len(g) for g in genes))}


def score_plans(frame: pd.DataFrame, exact_mask: np.ndarray, n_gene_actions: int,
                agreement: Callable[[pd.DataFrame], dict[str, Any]] | None = None) -> dict[str, Any]:
    """:func:`method_stats` (and ``agreement(frame)`` under ``recipe`` when given) on the exact-search tasks
    (``exact_mask`` over all tasks) and, for a frame over all tasks, on all of them (not repeated when the exact
    tasks are all). A frame of the exact tasks only (exact search's) gets ``exact_tasks`` alone."""
    exact_mask = np.asarray(exact_mask, bool)
    scopes = {}
    if len(frame) == len(exact_mask):
        scopes["exact_tasks"] = frame[exact_mask]
        if not exact_mask.all():
            scopes["all_tasks"] = frame
    else:
        scopes["exact_tasks"] = frame
    res = {}
    for scope, f in scopes.items():
        res[scope] = method_stats(f, n_gene_actions)
        if agreement is not None:
            res[scope]["recipe"] = agreement(f)
        log.info("%-12s %-11s %s", frame.policy.iloc[0] if len(frame) else "", scope,
                 {k: v for k, v in res[scope].items() if k != "recipe"})
    return res


def search_runs(engine: Any, geo: TaskGeometry, starts: np.ndarray, targets: np.ndarray, exact_mask: np.ndarray,
                max_genes: int, beam_width: int, max_steps: int, max_set_size: int, tie_break: str
                ) -> list[tuple[str, Callable[[], Any]]]:
    """The search baselines as (name, run) pairs, run on demand (:mod:`cellrl.persistent.search`): ``exact`` over
    sets of <= ``max_genes`` genes on the ``exact_mask`` tasks (its shortest plan by ``tie_break``,
    ``env.plan_tie_break``), ``beam<width>`` and ``greedy`` on every task."""
    from .search import beam, exact, greedy

    return [("exact", lambda: exact(engine, geo, starts[exact_mask], targets[exact_mask], max_genes, max_steps,
                                    tie_break=tie_break)),
            (f"beam{beam_width}", lambda: beam(engine, geo, starts, targets, beam_width, max_steps, max_set_size)),
            ("greedy", lambda: greedy(engine, geo, starts, targets, max_steps, max_set_size))]


def success_vs_exact(scores: Mapping[str, Any], exact_scores: Mapping[str, Any]) -> float | None:
    """A method's success on the exact-search tasks over exact search's (None when exact solves none)."""
    ex = exact_scores["exact_tasks"]["success"]
    return scores["exact_tasks"]["success"] / ex if ex else None


def evaluate_persistent(model: Any, table: np.ndarray, agent: Any | None, env: Mapping[str, Any] | None,
                        transitions: Mapping[str, Any] | None, actions: pd.DataFrame | None = None,
                        n_episodes: int | None = 2000, seed: int = 0, deterministic: bool = True,
                        exact_starts: int | None = EXACT_STARTS, exact_max_genes: int | None = None,
                        beam_width: int = 8, truth: Mapping[str, Any] | None = None,
                        recipes: pd.DataFrame | None = None, recipe_permutations: int = 1000,
                        recipe_score_max_values: float = 2e8, recipes_source: object = "recipes",
                        transition_settings: Mapping[str, Any] | None = None,
                        progress: str | Path | None = None) -> PersistentEvaluation:
    """The persistent-mode test protocol in memory (see the module docstring). ``agent``: a policy with
    ``predict`` or a loader ``(geometry, n_actions, engine=...) -> policy`` (:func:`cellrl.agent_io.load_agent`);
    None skips it. ``transitions``: the engine's settings (the ones the agent trained with);
    ``transition_settings``: the table's (the recipe check's perturbation-score baseline)."""
    from ..bfs import eval_allowed_mask
    from ..env import EnvParams
    from ..evaluate import action_table, agent_chooser, eval_tasks, recipe_check, training_summary
    from ..train import persistent_engine
    from .search import rollout

    params = EnvParams.from_config(env)
    if params.perturbation_model != "persistent":
        raise InputError(f"env.perturbation_model is {params.perturbation_model!r}, not persistent",
                         field="env.perturbation_model", fix="use cellrl.evaluate.evaluate for table mode")
    geo = TaskGeometry.from_model(model, params.goal_percentile, params.centroid_percentile)
    if actions is None:
        actions = action_table(table.shape[1], model.regulators)
    t0 = time.perf_counter()
    engine = persistent_engine(model, table, transitions)
    build_s = time.perf_counter() - t0
    hold = int(engine.n_actions)
    if agent is not None and callable(agent) and not hasattr(agent, "predict"):
        agent = agent(geo, hold + 1, engine=engine)
    max_steps = params.eval_max_steps(geo.n_types)
    max_genes = int(exact_max_genes or params.max_set_size)
    starts, targets, n_pairs = eval_tasks(geo, n_episodes, seed)
    sub = task_subset(geo, starts, exact_starts)
    allowed = eval_allowed_mask(model, table)
    agreement = (lambda f: planted_agreement(truth, f, geo, actions, table, allowed)) if truth is not None else None

    runs: list[tuple[str, Callable[[], Any]]] = []
    if agent is not None:
        runs.append(("agent", lambda: rollout(geo, engine, params, starts, targets,
                                              agent_chooser(agent, deterministic), max_steps=max_steps, seed=seed)))
    runs += search_runs(engine, geo, starts, targets, sub, max_genes, beam_width, max_steps, params.max_set_size,
                        params.plan_tie_break)
    methods: dict[str, dict[str, Any]] = {}
    frames = []
    for name, fn in runs:
        r = fn()
        f = plan_frame(name, r.starts, r.targets, r.success, r.plans, geo)
        f["target_id"] = np.asarray(r.targets, np.int64)
        f["exact_task"] = sub if len(f) == len(sub) else True
        methods[name] = {**score_plans(f, sub, hold, agreement), "wall_s": round(r.wall_s, 2),
                         "engine_rows": int(r.engine_rows)}
        frames.append(f)
        log.info("%-8s: %d tasks, %.1f s", name, len(f), r.wall_s)
    for name, m in methods.items():
        if name != "exact":
            m["success_vs_exact"] = success_vs_exact(m, methods["exact"])
    ep = pd.concat(frames, ignore_index=True)
    ep["set_size"] = [len(set(plan_genes(p, hold))) for p in ep.actions]

    summary: dict[str, Any] = {
        "perturbation_model": "persistent",
        "protocol": dict(split="test", n_test_cells=int(len(np.unique(starts))), n_types=int(geo.n_types),
                         n_pairs_total=int(n_pairs), n_episodes=int(len(starts)), sampled=bool(n_pairs > len(starts)),
                         max_steps=int(max_steps), deterministic=bool(deterministic), seed=int(seed),
                         goal_percentile=params.goal_percentile, centroid_percentile=params.centroid_percentile,
                         max_set_size=int(params.max_set_size), exact_max_genes=max_genes,
                         exact_starts_per_type=exact_starts, n_exact_tasks=int(sub.sum()),
                         n_exact_start_cells=int(len(np.unique(starts[sub]))), beam_width=int(beam_width),
                         plan_tie_break=params.plan_tie_break),
        "methods": methods,
        "no_plan_repeats_a_gene": all(sc["repeats_a_gene"] == 0 for m in methods.values()
                                      for k, sc in m.items() if k in ("exact_tasks", "all_tasks")),
        "engine": {"build_s": round(build_s, 2), "n_actions": hold, "hold_action": hold,
                   "settings": dict(transitions or {})},
        "training": training_summary(progress),
        "ground_truth": {"available": truth is not None,
                         **({} if truth is not None else {"reason": "no ground truth for this dataset"})},
    }
    rec_df = None
    if recipes is not None:
        # HOLD steps perturb nothing: dropped from the plans the recipe metrics rank
        rep = ep.assign(actions=[[a for a in p if a < hold] for p in ep.actions])
        summary["recipes"], rec_df = recipe_check(recipes, rep, actions, geo, model, transition_settings,
                                                  n_perm=recipe_permutations, seed=seed,
                                                  max_values=recipe_score_max_values, source=recipes_source,
                                                  policies=list(methods))
    else:
        summary["recipes"] = {"available": False, "reason": "no recipe table set (datasets.<name>.recipes)"}
    return PersistentEvaluation(episodes=ep, summary=summary, geometry=geo, recipes=rec_df)
