"""MaskablePPO training on the reprogramming environment: build the agent, learn, write the run's outputs.

Stock sb3-contrib ``MaskablePPO`` with the reference network (:mod:`cellrl.network`) and torch's Adam.
Run state, checkpoints and resume live in :mod:`cellrl.checkpoints`.

Public API (used by ``workflow_scripts/train.py``, ``cellrl.hpo`` and ``cellrl.evaluate``):

* :func:`load_inputs` - model.npz + table.npy with clear errors;
* :func:`make_vec_env` - the vectorised environment for a split;
* :func:`build_agent` - MaskablePPO with the reference network and the ``train`` hyperparameters;
* :func:`evaluate_success` - success rate / episode length of an agent (or a random masked policy);
* :func:`train_agent` - train (or resume) with checkpoints, evaluation, CSV/W&B logs, console progress;
* :func:`train_files` - the rule's entry point: files in, ``model.zip`` + logs + ``train_summary.json`` out.

Outputs of a run in ``out_dir``: ``model.zip`` (SB3), ``checkpoints/`` (see :mod:`cellrl.checkpoints`),
``progress.csv`` (one row per rollout: timesteps, wall time, steps/s, phase, training and validation success,
rewards), ``train_summary.json``, ``wandb/`` (offline run unless ``train.wandb.mode`` says otherwise).

Reruns: a run resumes only from a checkpoint with its own fingerprint (code, libraries, inputs, settings).
Resumed at step k, it ends with the same weights and progress rows as an uninterrupted run (on CPU); a
finished run that reruns with nothing changed resumes from its final checkpoint and writes the same outputs.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch as th
import yaml
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import Logger, make_output_format

from . import checkpoints as ckpts
from .checkpoints import PROGRESS_FIELDS, RunState
from .config import deep_merge
from .env import EnvParams, VecReprogrammingEnv
from .errors import InputError
from .io import atomic_path, sha256_file, write_json
from .model import OracleModel, load_model
from .network import policy_kwargs
from .progress import Progress
from .tasks import TaskGeometry, load_table
from .warmstart import ppo_config, warm_start
from .xp import blas_threads

log = logging.getLogger("cellrl.train")

#: Reference defaults; equal to config/config.yaml ``train`` (tests/test_train.py checks it). Missing keys of a
#: train config fall back to these.
TRAIN_DEFAULTS: dict[str, Any] = {
    "total_timesteps": 2_500_000, "n_envs": 8, "n_steps": 1024, "batch_size": 64, "n_epochs": 11,
    "learning_rate": 1.07e-4, "gamma": 0.9831, "gae_lambda": 0.9013, "ent_coef": 0.0054, "vf_coef": 0.4075,
    "clip_range": 0.2, "embed_dims": [512, 128], "actor_dims": [256, 64], "critic_dims": [128, 64],
    "checkpoint_every": 100_000, "keep_checkpoints": 2, "eval_every": 20_000, "eval_episodes": 200,
    "device": "auto", "seed": 77, "use_hpo": False, "warm_start": "bfs", "warm_start_epochs": 60,
    "warm_start_ppo_lr_scale": 0.03, "warm_start_dagger_rounds": 2,
    "warm_start_dagger_episodes": 2000, "warm_start_starts_per_type": 20, "warm_start_labels": "one",
    "wandb": {"mode": "offline", "project": "cellrl"},
}


# ---------------------------------------------------------------------------------------------- inputs
def load_inputs(model_path: str | Path, table_path: str | Path) -> tuple[OracleModel, np.ndarray]:
    """Load ``model.npz`` and ``table.npy`` and check that they belong together.

    Returns the model and the (cells, 2 * regulators) int32 table. Raises InputError naming the file for a
    missing table, a table whose shape does not match the model, out-of-range entries, or a model or table that
    differs from the sha256 its stage recorded in the ``stats.json`` next to it.
    """
    model = load_model(model_path)
    table = load_table(table_path, model.n_cells, model.n_actions)  # the model is checked by load_model
    return model, table


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a CUDA GPU is visible, else "cpu"."""
    if device == "auto":
        return "cuda" if th.cuda.is_available() else "cpu"
    if device == "cuda" and not th.cuda.is_available():
        raise InputError("train.device is 'cuda' but no CUDA GPU is visible", field="train.device",
                         fix="set train.device: auto or cpu")
    return device


def set_torch_threads(threads: int | None = None) -> int:
    """Use ``threads`` (default: the CPUs this process may run on) intra-op threads; return the number."""
    n = threads or len(os.sched_getaffinity(0))
    th.set_num_threads(max(1, int(n)))
    return th.get_num_threads()


def make_vec_env(model: OracleModel | TaskGeometry, table: np.ndarray,
                 env_cfg: Mapping[str, Any] | EnvParams | None, n_envs: int, split: str = "train",
                 seed: int | None = 0, training: bool = True, engine: Any = None,
                 **kwargs: Any) -> VecReprogrammingEnv:
    """The vectorised environment over ``split`` (see :class:`cellrl.env.VecReprogrammingEnv`).

    ``training=True`` masks transitions into non-training cells and runs the curriculum; evaluation envs
    (``training=False``) draw any other cell type as target and allow ``max_steps`` of the final phase.
    Pass a :class:`~cellrl.tasks.TaskGeometry` instead of the model to share one between envs. With a
    persistent-perturbation ``engine`` (:mod:`cellrl.persistent`) the env is the persistent one (table unused).
    """
    if engine is not None:
        from .persistent.env import VecPersistentEnv

        return VecPersistentEnv(model, engine, n_envs, env_cfg, split=split, training=training, seed=seed, **kwargs)
    return VecReprogrammingEnv(model, table, n_envs, env_cfg, split=split, training=training, seed=seed,
                               **kwargs)


# ---------------------------------------------------------------------------------------------- agent
def train_config(train_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """``train_cfg`` merged over :data:`TRAIN_DEFAULTS`."""
    return deep_merge(TRAIN_DEFAULTS, train_cfg or {})


def build_agent(vec_env: VecReprogrammingEnv, train_cfg: Mapping[str, Any] | None,
                seed: int | None = None, device: str | None = None, verbose: int = 0) -> MaskablePPO:
    """sb3-contrib MaskablePPO with the reference network (:func:`cellrl.network.policy_kwargs`) and the
    hyperparameters of ``train_cfg``. ``seed`` defaults to ``train_cfg["seed"]``; ``device`` to
    ``train_cfg["device"]`` ("auto": CUDA if any)."""
    cfg = train_config(train_cfg)
    agent = MaskablePPO(
        "MultiInputPolicy", vec_env, learning_rate=cfg["learning_rate"], n_steps=int(cfg["n_steps"]),
        batch_size=int(cfg["batch_size"]), n_epochs=int(cfg["n_epochs"]), gamma=cfg["gamma"],
        gae_lambda=cfg["gae_lambda"], ent_coef=cfg["ent_coef"], vf_coef=cfg["vf_coef"],
        clip_range=cfg["clip_range"], policy_kwargs=policy_kwargs(cfg), seed=cfg["seed"] if seed is None else seed,
        device=resolve_device(device or cfg["device"]), verbose=verbose,
    )
    # values are still recorded (callbacks read them); without this SB3 makes an empty /tmp/SB3-<time> per learn()
    agent.set_logger(Logger(folder=None, output_formats=[make_output_format("stdout", "")] if verbose else []))
    return agent


@contextlib.contextmanager
def quiet_numerics() -> Iterator[None]:
    """Around learning: skip torch.distributions' argument checks (they re-validate every masked Categorical's
    logits; values unchanged) and hold NumPy's BLAS to one thread (the env's small products do not need more,
    and BLAS threads competing with torch's on a few cores slow rollouts several-fold)."""
    before = th.distributions.Distribution._validate_args
    th.distributions.Distribution.set_default_validate_args(False)
    try:
        with blas_threads(1):
            yield
    finally:
        th.distributions.Distribution.set_default_validate_args(before)


def fit_curriculum(params: EnvParams, n_types: int, total_timesteps: int) -> tuple[EnvParams, list[str]]:
    """Scale the curriculum's first phase to the budget: with ``n`` phases it lasts at most ``total / n`` steps,
    so a short run still reaches the later phases. Returns the settings and the warnings to report."""
    n = params.n_phases(n_types)
    cur = params.curriculum
    if n <= 1 or cur.first_phase_steps <= total_timesteps // n:
        return params, []
    fitted = max(1, total_timesteps // n)
    msg = (f"env.curriculum.first_phase_steps {cur.first_phase_steps} scaled to {fitted} so that the "
           f"{n} curriculum phases fit total_timesteps {total_timesteps}")
    return dataclasses.replace(params, curriculum=dataclasses.replace(cur, first_phase_steps=fitted)), [msg]


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_success(agent: MaskablePPO | None, model: OracleModel | TaskGeometry, table: np.ndarray,
                     env_cfg: Mapping[str, Any] | EnvParams | None, split: str = "val", n_episodes: int = 200,
                     seed: int = 0, deterministic: bool = True, n_envs: int = 64,
                     tasks: tuple[np.ndarray, np.ndarray] | None = None,
                     return_episodes: bool = False, engine: Any = None) -> dict[str, Any]:
    """Run ``n_episodes`` seeded episodes from ``split`` cells (target: any other type) and score them.

    ``agent=None`` runs a uniformly random masked policy (the baseline). Episodes use the evaluation env
    (no curriculum, held-out cells reachable, ``max_steps`` of the final curriculum phase). ``tasks`` =
    (start cells, target types) fixes the episodes instead of sampling them with ``seed``.

    Returns ``success_rate``, ``mean_length`` (all episodes), ``mean_success_length``, ``mean_return``,
    ``n_episodes``; with ``return_episodes`` also ``episodes``: dict of arrays (start, target, success,
    length, return, final_cell) in task order.
    """
    params = EnvParams.from_config(env_cfg)
    geo = model if isinstance(model, TaskGeometry) else TaskGeometry.from_model(
        model, params.goal_percentile, params.centroid_percentile)
    n_envs = max(1, min(n_envs, n_episodes))
    env = make_vec_env(geo, table, params, n_envs, split=split, training=False, seed=seed, engine=engine)
    if tasks is None:
        starts, targets = env.batch.sample_tasks(n_episodes)
    else:
        starts, targets = (np.asarray(a, np.int64) for a in tasks)
        n_episodes = len(starts)
    env.set_tasks(starts, targets)
    rng = np.random.default_rng(seed + 1)
    obs = env.reset()
    out = {k: np.zeros(n_episodes, dt) for k, dt in
           (("success", bool), ("length", np.int64), ("return", np.float64), ("final_cell", np.int64))}
    seen = np.zeros(n_episodes, bool)
    while not seen.all():
        if agent is None:
            actions = env.sample_masked_actions(rng)
        else:
            actions, _ = agent.predict(obs, deterministic=deterministic, action_masks=env.action_masks())
        obs, _, dones, infos = env.step(actions)
        for i in np.flatnonzero(dones).tolist():
            tid = infos[i]["task_id"]
            if tid >= 0 and not seen[tid]:
                seen[tid] = True
                out["success"][tid] = infos[i]["is_success"]
                out["length"][tid] = infos[i]["episode"]["l"]
                out["return"][tid] = infos[i]["episode"]["r"]
                out["final_cell"][tid] = infos[i]["final_cell"]
    succ = out["success"]
    res: dict[str, Any] = {
        "success_rate": float(succ.mean()),
        "mean_length": float(out["length"].mean()),
        "mean_success_length": float(out["length"][succ].mean()) if succ.any() else float("nan"),
        "mean_return": float(out["return"].mean()),
        "n_episodes": int(n_episodes), "split": split, "max_steps": env.batch.max_steps,
        "policy": "random_masked" if agent is None else ("deterministic" if deterministic else "stochastic"),
    }
    if return_episodes:
        res["episodes"] = {"start": starts, "target": targets, **out}
    return res


def path_quality(agent: MaskablePPO | None, geo: TaskGeometry, table: np.ndarray, params: EnvParams,
                 split: str = "val", n_episodes: int = 200, seed: int = 0) -> dict[str, Any]:
    """Deterministic episodes on every (``split`` cell, other type) pair (a seeded sample of ``n_episodes`` when
    there are more), scored against BFS over the graph evaluation episodes see: ``success``,
    ``success_reachable`` (pairs with a path within the step limit), ``length_ratio`` (mean agent / BFS length
    over solved pairs), ``episodes``. Used for the warm start's before/after-PPO record."""
    from .bfs import eval_allowed_mask, shortest_paths
    from .evaluate import eval_tasks

    starts, targets, _ = eval_tasks(geo, n_episodes, seed, split=split)
    ev = evaluate_success(agent, geo, table, params, split=split, seed=seed, tasks=(starts, targets),
                          return_episodes=True)
    e = ev["episodes"]
    d = shortest_paths(table, geo.goal_mask, eval_allowed_mask(geo, table)).dist[starts, targets]
    reach = (d >= 0) & (d <= ev["max_steps"])
    ok = e["success"] & (d > 0)
    return {"split": split, "episodes": int(len(starts)), "success": float(e["success"].mean()),
            "success_reachable": float(e["success"][reach].mean()) if reach.any() else None,
            "length_ratio": float((e["length"][ok] / d[ok]).mean()) if ok.any() else None}


# ---------------------------------------------------------------------------------------------- tracking
class TrackingCallback(BaseCallback):
    """At each rollout boundary: evaluate when due, add a progress row (CSV + W&B), checkpoint when due.

    Rollout boundaries (after the PPO update, before the next rollout) are the only points where the
    training state is complete, so checkpoints and evaluations happen there (and at the end of training).
    """

    def __init__(self, run: "_Run"):
        super().__init__()
        self.run = run

    def _on_rollout_start(self) -> None:
        self.run.boundary(self.model)

    def _on_step(self) -> bool:
        self.run.tick(self.model)
        return True

    def _on_training_end(self) -> None:
        self.run.boundary(self.model, final=True)


class _Run:
    """One training run's files and schedules (progress rows, evaluation, checkpoints, W&B, console progress)."""

    def __init__(self, out_dir: Path | None, cfg: Mapping[str, Any], params: EnvParams, geo: TaskGeometry,
                 table: np.ndarray, env: VecReprogrammingEnv, progress: bool, total: int, engine: Any = None):
        self.out_dir = out_dir
        self.cfg = cfg
        self.params = params
        self.geo = geo
        self.table = table
        self.env = env
        self.engine = engine
        self.state = RunState()
        self.total = total
        self.progress = progress
        self.bar: Progress | None = None
        self.wandb_run = None
        self._tick = 0
        self.val_split = "val" if (geo.split == "val").any() else "train"
        # persistent mode: the engine's settings shape the env too (a checkpoint made under others is not resumed)
        fp_cfg = cfg if engine is None or not hasattr(engine, "settings") else \
            {**cfg, "persistent_engine": dataclasses.asdict(engine.settings)}
        self.fingerprint = ckpts.fingerprint(params, fp_cfg, geo, table)

    def boundary(self, agent: MaskablePPO, final: bool = False) -> None:
        ts = int(agent.num_timesteps)
        s = self.state
        if ts <= s.last_logged:
            return
        val = {}
        if ts >= s.next_eval or final:
            val = evaluate_success(agent, self.geo, self.table, self.params, split=self.val_split,
                                   n_episodes=int(self.cfg["eval_episodes"]), seed=int(self.cfg["seed"]),
                                   engine=self.engine)
            s.last_val = {"timesteps": ts, **val}
            while s.next_eval <= ts:
                s.next_eval += int(self.cfg["eval_every"])
        self.add_row(agent, ts, val)
        s.last_logged = ts
        if self.out_dir is not None and (ts >= s.next_ckpt or final) and ts > 0:
            while s.next_ckpt <= ts:
                s.next_ckpt += int(self.cfg["checkpoint_every"])
            ckpts.save_checkpoint(self.out_dir / "checkpoints", agent, self.env, s, self.fingerprint,
                                  keep=int(self.cfg["keep_checkpoints"]))
        elif ts == 0:
            s.next_ckpt = int(self.cfg["checkpoint_every"])

    def tick(self, agent: MaskablePPO) -> None:
        self._tick += 1
        if self.bar is not None and self._tick % 64 == 0:
            self._update_bar(agent)

    def _update_bar(self, agent: MaskablePPO) -> None:
        post = {"succ": f"{self.env.success_rate:.2f}", "phase": self.env.phase}
        if self.state.last_val:
            post["val"] = f"{self.state.last_val['success_rate']:.2f}"
        self.bar.update(max(0, min(int(agent.num_timesteps), self.total) - self.bar.n), **post)

    def add_row(self, agent: MaskablePPO, ts: int, val: Mapping[str, Any]) -> None:
        """Append a progress row (run state, progress.csv, W&B)."""
        b = self.env.batch
        eps = list(agent.ep_info_buffer or [])
        row = {
            "timesteps": ts, "wall_s": round(self.state.wall(), 3), "steps_per_s": round(self.state.rate(ts), 1),
            "phase": b.phase, "n_targets": b.n_targets, "max_steps": b.max_steps,
            "train_success": b.success_rate,
            "ep_reward_mean": float(np.mean(np.asarray([e["r"] for e in eps], np.float64))) if eps else math.nan,
            "ep_len_mean": float(np.mean(np.asarray([e["l"] for e in eps], np.float64))) if eps else math.nan,
            "val_success": val.get("success_rate", math.nan), "val_mean_length": val.get("mean_length", math.nan),
            "episodes": b.episodes,
        }
        self.state.rows.append(row)
        if val:
            log.info("step %d: val success %.3f (len %.1f), train success %.3f, phase %d, %.0f steps/s",
                     ts, row["val_success"], row["val_mean_length"], row["train_success"], row["phase"],
                     row["steps_per_s"])
        if self.out_dir is not None:
            path = self.out_dir / "progress.csv"
            new = not path.exists()
            with open(path, "a", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=PROGRESS_FIELDS)
                if new:
                    w.writeheader()
                w.writerow(row)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))},
                               step=ts)
        if self.bar is not None:
            self._update_bar(agent)

    def write_progress(self) -> None:
        """Rewrite progress.csv whole from the run state's rows (after a resume)."""
        if self.out_dir is None:
            return
        with atomic_path(self.out_dir / "progress.csv") as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=PROGRESS_FIELDS)
            w.writeheader()
            w.writerows(self.state.rows)

    def open(self) -> None:
        start = min(self.state.steps_at_start, self.total)
        self.bar = Progress(self.total, "train", unit="step", log=log, enabled=self.progress, initial=start)
        mode = (self.cfg.get("wandb") or {}).get("mode", "offline")
        if self.out_dir is not None and mode != "disabled":
            self.wandb_run = _wandb_init(self.out_dir, self.cfg, self.params, mode, self.state)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as e:  # pragma: no cover - tracking must never fail a run
                log.warning("wandb finish failed: %s", e)
            self.wandb_run = None


# ---------------------------------------------------------------------------------------------- training
def train_agent(model: OracleModel | TaskGeometry, table: np.ndarray, env_cfg: Mapping[str, Any] | None,
                train_cfg: Mapping[str, Any] | None, out_dir: str | Path | None = None,
                callbacks: Iterable[BaseCallback] = (), resume: bool = False, progress: bool = True,
                threads: int | None = None, engine: Any = None) -> tuple[MaskablePPO, dict[str, Any]]:
    """Train MaskablePPO, or with ``resume`` continue the newest checkpoint in ``out_dir`` that has this run's
    fingerprint (others are set aside, never resumed; see :mod:`cellrl.checkpoints`).

    ``callbacks`` run after cellrl's own tracking callback (a callback returning False from ``_on_step``
    stops training early, e.g. an Optuna pruner). Writes the outputs listed in the module docstring when
    ``out_dir`` is given (``model.zip`` only at the end). Returns the agent and the summary dict (also
    ``train_summary.json``): timesteps, wall_s, steps_per_s, final validation success, random baseline.
    ``engine``: train in persistent-perturbation mode (:mod:`cellrl.persistent`); its warm start is
    ``train.warm_start: exact`` (:mod:`cellrl.persistent.warmstart`), bfs/dagger there mean none.
    """
    cfg = train_config(train_cfg)
    if engine is not None and str(cfg["warm_start"]) in ("bfs", "dagger"):
        # the table warm starts need a table; in persistent mode only ``exact`` warm-starts (nor is the PPO
        # learning rate scaled without it)
        log.info("train.warm_start %s is the table mode's; persistent mode trains from scratch (use exact)",
                 cfg["warm_start"])
        cfg["warm_start"] = "none"
    threads = set_torch_threads(threads)
    device = resolve_device(cfg["device"])
    total = int(cfg["total_timesteps"])
    geo = model if isinstance(model, TaskGeometry) else None
    params = EnvParams.from_config(env_cfg)
    if geo is None:
        geo = TaskGeometry.from_model(model, params.goal_percentile, params.centroid_percentile)
    params, warnings = fit_curriculum(params, geo.n_types, total)
    for w in warnings:
        log.warning(w)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    env = make_vec_env(geo, table, params, int(cfg["n_envs"]), split="train", seed=int(cfg["seed"]), training=True,
                       engine=engine)
    run = _Run(out, cfg, params, geo, table, env, progress, total, engine)
    ckpt = ckpts.resumable_checkpoint(out, run.fingerprint, resume=resume) if out is not None else None
    agent = build_agent(env, ppo_config(cfg), device=device)
    if ckpt is not None:
        log.info("resuming from %s (step %d)", ckpt["path"], ckpt["timesteps"])
        ckpts.restore(ckpt, agent, env, run.state)
        run.state.steps_at_start = int(agent.num_timesteps)
        run.write_progress()
    elif out is not None:
        for stale in (out / "progress.csv", out / "train_summary.json", out / "model.zip"):
            stale.unlink(missing_ok=True)
    if ckpt is None and engine is None:  # a fresh run (a resumed one has the warm-started weights in its checkpoint)
        run.state.warm_start = warm_start(agent, geo, table, params, cfg)
        run.state.warm_start["val_before_ppo"] = path_quality(agent, geo, table, params, run.val_split,
                                                              int(cfg["eval_episodes"]), int(cfg["seed"]))
    elif ckpt is None and cfg["warm_start"] == "exact":  # persistent mode: clone exact plans from training cells
        from .persistent.warmstart import warm_start_persistent

        run.state.warm_start = warm_start_persistent(
            agent, engine, geo, params, float(cfg["gamma"]), per_type=int(cfg["warm_start_starts_per_type"]),
            epochs=int(cfg["warm_start_epochs"]), seed=int(cfg["seed"]), labels=str(cfg["warm_start_labels"]))[0]
        log.info("warm start (exact plans): %d samples from %d plans, accuracy %.3f, %.1f s",
                 run.state.warm_start["samples"], run.state.warm_start["plans"],
                 run.state.warm_start["accuracy"] or 0, run.state.warm_start["seconds"])
    run.open()
    try:
        ws_steps = int(run.state.warm_start.get("env_steps", 0))     # DAgger's rollouts count against the budget
        remaining = total - ws_steps - int(agent.num_timesteps)
        with quiet_numerics():
            if remaining > 0:
                agent.learn(remaining, callback=CallbackList([TrackingCallback(run), *callbacks]),
                            reset_num_timesteps=ckpt is None, progress_bar=False)
            else:
                run.boundary(agent, final=True)
    finally:
        run.close()
    summary = _summary(agent, run, ckpt, device, threads, warnings)
    summary["warm_start"] = dict(run.state.warm_start)
    if engine is None:  # path quality is scored against table BFS: not defined for the persistent mode
        summary["warm_start"]["val_after_ppo"] = path_quality(agent, geo, table, run.params, run.val_split,
                                                              int(cfg["eval_episodes"]), int(cfg["seed"]))
    summary["env_steps"] = summary["timesteps"] + ws_steps
    if out is not None:
        with atomic_path(out / "model.zip") as tmp:
            agent.save(tmp)
        summary["model_zip_sha256"] = sha256_file(out / "model.zip")  # checked by evaluate and `cellrl plan`
        write_json(out / "train_summary.json", summary)
    log.info("trained %d steps in %.0f s (%.0f steps/s); val success %.3f (random masked %.3f)",
             summary["timesteps"], summary["wall_s"], summary["steps_per_s"], summary["final_val_success"],
             summary["random_val_success"])
    return agent, summary


def _summary(agent: MaskablePPO, run: _Run, ckpt: Mapping[str, Any] | None, device: str, threads: int,
             warnings: list[str]) -> dict[str, Any]:
    """train_summary.json: final numbers of the run, from its rows (the same after a rerun that reproduces it)."""
    cfg, geo, env = run.cfg, run.geo, run.env
    ts = int(agent.num_timesteps)
    final = run.state.last_val if run.state.last_val.get("timesteps") == ts else \
        {"timesteps": ts, **evaluate_success(agent, geo, run.table, run.params, split=run.val_split,
                                             n_episodes=int(cfg["eval_episodes"]), seed=int(cfg["seed"]),
                                             engine=run.engine)}
    rand = evaluate_success(None, geo, run.table, run.params, split=run.val_split,
                            n_episodes=int(cfg["eval_episodes"]), seed=int(cfg["seed"]), engine=run.engine)
    wall = float(run.state.rows[-1]["wall_s"]) if run.state.rows else run.state.wall()
    warnings = list(warnings)
    n_phases = env.batch.n_phases
    if env.phase < n_phases - 1:
        warnings.append(f"training ended in curriculum phase {env.phase + 1} of {n_phases}: it trained on the "
                        f"nearest targets only but is evaluated on all; raise train.total_timesteps or lower "
                        f"env.curriculum.success_threshold")
        log.warning(warnings[-1])
    return {
        "timesteps": ts, "wall_s": round(wall, 2), "steps_per_s": round(ts / max(wall, 1e-9), 1),
        "final_val_success": final["success_rate"], "final_val_mean_length": final["mean_length"],
        "random_val_success": rand["success_rate"], "val_split": run.val_split,
        "val_episodes": int(cfg["eval_episodes"]), "eval_max_steps": final.get("max_steps"),
        "curriculum_phase": env.phase, "curriculum_phases": n_phases,
        "curriculum_first_phase_steps": run.params.curriculum.first_phase_steps,
        "warnings": warnings, "device": device, "torch_threads": threads,
        "resumed_from": ckpt["timesteps"] if ckpt else None, "fingerprint": run.fingerprint,
        "n_params": int(sum(p.numel() for p in agent.policy.parameters())),
        "n_cells": geo.n_cells, "n_genes": geo.n_genes, "n_actions": int(run.table.shape[1]),
        "seed": int(cfg["seed"]),
    }


def merge_hpo_params(env_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any],
                     hpo_params: str | Path | Mapping[str, Any] | None) -> tuple[dict, dict]:
    """Merge HPO results over the configs: a YAML/dict ``{train: {...}, env: {...}}`` (flat keys are sorted
    into the section that knows them)."""
    if hpo_params is None:
        return dict(env_cfg), dict(train_cfg)
    if isinstance(hpo_params, (str, Path)):
        p = Path(hpo_params)
        if not p.exists():
            raise InputError("HPO parameter file not found", path=p, fix="run the hpo rules or set use_hpo: false")
        hp = yaml.safe_load(p.read_text()) or {}
    else:
        hp = dict(hpo_params)
    env_over = dict(hp.get("env") or {})
    train_over = dict(hp.get("train") or {})
    env_keys = set(EnvParams.__dataclass_fields__)
    for k, v in hp.items():
        if k in ("env", "train"):
            continue
        if k in env_keys:
            env_over[k] = v
        elif k in TRAIN_DEFAULTS:
            train_over[k] = v
        # other keys (e.g. objective values, trial ids) are provenance, not settings
    return deep_merge(env_cfg, env_over), deep_merge(train_cfg, train_over)


def train_files(model_path: str | Path, table_path: str | Path, out_dir: str | Path,
                env: Mapping[str, Any], train: Mapping[str, Any], hpo_params: str | Path | None = None,
                resume: bool = True, progress: bool = True, threads: int | None = None,
                transitions: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Rule ``train``: files in, ``out_dir/{model.zip, train_summary.json, progress.csv, checkpoints/}`` out.

    ``hpo_params``: best_params.yaml of the HPO stage, merged over ``env``/``train``. With ``resume`` (the
    default) a run in ``out_dir`` continues from its newest checkpoint with the same fingerprint. With
    ``env.perturbation_model: persistent`` the agent trains on sets simulated on the fly by the persistent engine
    of ``model_path`` with the ``transitions`` settings (:mod:`cellrl.persistent`; ``train.warm_start: exact``
    clones exact plans first); train_summary.json records the perturbation model (checked where it is loaded,
    :func:`cellrl.agent_io.load_agent`) and those settings.
    """
    env_cfg, train_cfg = merge_hpo_params(env, train, hpo_params)
    mode = EnvParams.from_config(env_cfg).perturbation_model
    model, table = load_inputs(model_path, table_path)
    engine = persistent_engine(model, table, transitions) if mode == "persistent" else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, summary = train_agent(model, table, env_cfg, train_cfg, out_dir=out, resume=resume, progress=progress,
                             threads=threads, engine=engine)
    extra = {"transitions": dict(transitions or {})} if engine is not None else {}
    write_json(out / "train_summary.json", {**summary, "inputs": {"model": str(model_path),
                                                                  "table": str(table_path),
                                                                  "hpo_params": str(hpo_params) if hpo_params else None},
                                            "perturbation_model": mode, **extra, "env": env_cfg, "train": train_cfg})
    return summary


def persistent_engine(model: OracleModel, table: np.ndarray, transitions: Mapping[str, Any] | None) -> Any:
    """The persistent-mode engine of ``model`` with the ``transitions`` settings; InputError when its actions are
    not the table's (the table and the engine must describe the same action space)."""
    from .persistent.engine import PersistentEngine

    engine = PersistentEngine.from_model(model, dict(transitions or {}))
    if engine.n_actions != table.shape[1]:
        raise InputError(f"the persistent engine has {engine.n_actions} actions, the transition table "
                         f"{table.shape[1]}", field="transitions.actions",
                         fix="rerun the transitions rule with the current transitions settings")
    return engine


def _wandb_init(out_dir: Path, cfg: Mapping[str, Any], params: EnvParams, mode: str, state: RunState):
    """Start (or resume) a W&B run in ``out_dir/wandb``; offline mode needs no account or network."""
    os.environ["WANDB_DIR"] = str(out_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb

        state.wandb_id = state.wandb_id or f"cellrl-{int(time.time())}-{os.getpid()}"
        return wandb.init(project=(cfg.get("wandb") or {}).get("project", "cellrl"), mode=mode,
                          dir=str(out_dir), id=state.wandb_id, resume="allow", reinit=True,
                          config={"train": dict(cfg), "env": dataclasses.asdict(params)})
    except Exception as e:  # tracking must never fail a training run
        log.warning("W&B disabled (%s); progress.csv still records the run", e)
        return None
