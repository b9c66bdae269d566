"""Two-phase Optuna search for MaskablePPO, scored by the area under the validation learning curve (AULC).

Phase 1 samples every parameter of ``hpo.search_space`` (learning rate, gamma, GAE lambda, entropy and value
coefficients, clip range, n_steps, batch size, n_epochs, network widths, distance_reward_scale, step penalty).
Each trial trains for ``hpo.trial_timesteps`` steps, measures validation success at ``hpo.eval_points`` evenly
spaced points and reports the running AULC to Optuna after each, so the pruner (median | hyperband | none)
can stop poor trials early. The objective is the AULC of the whole curve (:func:`aulc`).

Phase 2 keeps the ``hpo.top_k`` parameters that Optuna's importance evaluator (seeded) ranks highest, fixes
the others at phase 1's best, and searches ranges narrowed around the best values (:meth:`ParamSpec.narrow`).
Phase 1's best is enqueued as phase 2's first trial, so phase 2 starts from the incumbent.

Parallel workers share one study per phase in ``{study_dir}/study.db`` (SQLite, one machine) or
``{study_dir}/study.journal`` (Optuna's JournalFileBackend, safe on network file systems; clusters). A lock
file serialises the "count trials, then ask for a new one" step, so the phase's trial budget is met exactly
however many workers run. Resuming: a restarted worker marks RUNNING trials left by a dead predecessor
(the same worker id, or a dead process on this host) as FAIL with ``user_attrs["stale"]`` and re-enqueues
their parameters; finished trials are never repeated. Study names carry a fingerprint of everything that
makes trials comparable (search space, budgets, env/train settings, input files), so a changed
configuration starts a new study instead of mixing incomparable trials.

Files (``study_dir`` = ``results/{dataset}/hpo``): ``phase{1,2}.yaml`` (best params, importances, phase-2
space), ``phase{n}_{history,importances,parallel,intermediate}.png`` and ``best_params.yaml`` in the form
``{train: {...}, env: {...}}`` that :func:`cellrl.train.train_files` merges over the configuration.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import yaml

from .errors import ConfigError, InputError
from .io import write_text

log = logging.getLogger("cellrl.hpo")

# Where each searchable parameter goes. `gamma` sets both the agent's discount (train.gamma) and the
# shaping discount of the reward (env.gamma): potential-based shaping keeps the optimal policy only when they
# agree.
TRAIN_PARAMS = ("learning_rate", "gamma", "gae_lambda", "ent_coef", "vf_coef", "clip_range", "n_steps",
                "batch_size", "n_epochs", "embed_dims", "actor_dims", "critic_dims")
ENV_PARAMS = ("distance_reward_scale", "step_penalty")
SEARCHABLE = TRAIN_PARAMS + ENV_PARAMS
DIMS_PARAMS = ("embed_dims", "actor_dims", "critic_dims")
# train settings that do not change what a trial measures (left out of the study fingerprint)
_TRAIN_NOT_FINGERPRINTED = ("total_timesteps", "use_hpo", "wandb", "checkpoint_every", "eval_every",
                            "eval_episodes", "device")


# --------------------------------------------------------------------------------------------------- space
def _encode(value: Any) -> Any:
    """Optuna categorical choices must be scalars: network widths [512, 128] are stored as "512x128"."""
    if isinstance(value, (list, tuple)):
        return "x".join(str(int(v)) for v in value)
    return value


def _decode(name: str, value: Any) -> Any:
    if name in DIMS_PARAMS and isinstance(value, str):
        return [int(v) for v in value.split("x")]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass(frozen=True)
class ParamSpec:
    """One searchable parameter: a float/int range (``low``..``high``, optionally log) or ``choices``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    int: bool = False
    choices: tuple[Any, ...] | None = None

    @classmethod
    def from_config(cls, name: str, d: Mapping[str, Any]) -> "ParamSpec":
        """Build from a ``search_space`` entry: ``{low, high, log?, int?}`` or ``{choices: [...]}``."""
        where = f"hpo.search_space.{name}"
        if name not in SEARCHABLE:
            raise ConfigError(f"{where}: not a searchable parameter; choose from {list(SEARCHABLE)}")
        if "choices" in d:
            choices = tuple(_encode(c) for c in d["choices"])
            if not choices:
                raise ConfigError(f"{where}.choices: empty")
            return cls(name, choices=choices)
        try:
            low, high = float(d["low"]), float(d["high"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{where}: needs low and high (or choices)") from e
        is_int = bool(d.get("int", False)) or name in ("n_steps", "batch_size", "n_epochs")
        if low > high:
            raise ConfigError(f"{where}: low {low} > high {high}")
        if d.get("log") and low <= 0:
            raise ConfigError(f"{where}: log scale needs low > 0 (got {low})")
        if is_int:
            low, high = float(math.ceil(low)), float(math.floor(high))
        return cls(name, low=low, high=high, log=bool(d.get("log", False)), int=is_int)

    def to_config(self) -> dict[str, Any]:
        """The ``search_space`` entry form (used in phase1.yaml for phase 2's narrowed space)."""
        if self.choices is not None:
            return {"choices": [_decode(self.name, c) for c in self.choices]}
        out: dict[str, Any] = {"low": int(self.low) if self.int else float(self.low),
                               "high": int(self.high) if self.int else float(self.high)}
        if self.log:
            out["log"] = True
        if self.int:
            out["int"] = True
        return out

    def suggest(self, trial: Any) -> Any:
        """Sample from an Optuna trial; returns the value as Optuna stores it (widths encoded)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def contains(self, value: Any) -> bool:
        value = _encode(value)
        if self.choices is not None:
            return value in self.choices
        try:
            v = float(value)
        except (TypeError, ValueError):
            return False
        return self.low <= v <= self.high and (not self.int or float(v).is_integer())

    def narrow(self, best: Any, fraction: float) -> "ParamSpec":
        """A range of ``fraction`` of this one's width (log width for log params) centred on ``best``.

        Clipped to the original bounds (shifted, not shrunk, when the best lies near a bound). Choices
        keep the best and its neighbours in the configured order.
        """
        best = _encode(best)
        if self.choices is not None:
            i = self.choices.index(best) if best in self.choices else 0
            return ParamSpec(self.name, choices=self.choices[max(0, i - 1): i + 2])
        tf: Callable[[float], float] = math.log if self.log else (lambda x: x)
        inv: Callable[[float], float] = math.exp if self.log else (lambda x: x)
        lo, hi, b = tf(self.low), tf(self.high), tf(float(best))
        half = (hi - lo) * fraction / 2
        new_lo, new_hi = b - half, b + half
        if new_lo < lo:
            new_lo, new_hi = lo, min(hi, lo + 2 * half)
        if new_hi > hi:
            new_lo, new_hi = max(lo, hi - 2 * half), hi
        low, high = inv(new_lo), inv(new_hi)
        low, high = max(low, self.low), min(high, self.high)  # float round-off of exp(log(x))
        if self.int:
            low, high = float(math.floor(low)), float(math.ceil(high))
            low, high = max(low, self.low), min(high, self.high)
        return ParamSpec(self.name, low=low, high=high, log=self.log, int=self.int)


def search_space(hpo: Mapping[str, Any]) -> dict[str, ParamSpec]:
    """The phase-1 space from ``hpo.search_space``; entries set to null are not searched."""
    raw = hpo.get("search_space") or {}
    space = {name: ParamSpec.from_config(name, d) for name, d in raw.items() if d is not None}
    if not space:
        raise ConfigError("hpo.search_space: no parameters to search (all null or empty)")
    return space


def space_from_config(raw: Mapping[str, Any]) -> dict[str, ParamSpec]:
    return {name: ParamSpec.from_config(name, d) for name, d in raw.items()}


def apply_params(env: Mapping[str, Any], train: Mapping[str, Any], params: Mapping[str, Any]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Copies of the env and train settings with ``params`` (Optuna values or decoded values) applied."""
    over = params_to_overrides(params)
    env2, train2 = copy.deepcopy(dict(env)), copy.deepcopy(dict(train))
    env2.update(over["env"])
    train2.update(over["train"])
    return env2, train2


def params_to_overrides(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{train: {...}, env: {...}}``: the form of best_params.yaml (widths as lists, gamma in both)."""
    out: dict[str, dict[str, Any]] = {"train": {}, "env": {}}
    for name, value in params.items():
        value = _decode(name, value)
        if name in ENV_PARAMS:
            out["env"][name] = value
        elif name in TRAIN_PARAMS:
            out["train"][name] = value
            if name == "gamma":
                out["env"]["gamma"] = value
        else:
            raise ConfigError(f"unknown HPO parameter {name!r}; choose from {list(SEARCHABLE)}")
    return out


def reference_params(env: Mapping[str, Any], train: Mapping[str, Any], space: Mapping[str, ParamSpec]
                     ) -> dict[str, Any]:
    """The configured (reference) values of the searched parameters, in Optuna's encoding (keys missing
    from partial settings take the library defaults, as training does)."""
    from dataclasses import asdict

    from .env import EnvParams
    from .train import TRAIN_DEFAULTS

    env_full = {**asdict(EnvParams()), **env}
    train_full = {**TRAIN_DEFAULTS, **train}
    return {n: _encode(env_full[n] if n in ENV_PARAMS else train_full[n]) for n in space}


# --------------------------------------------------------------------------------------------------- AULC
def aulc(values: Sequence[float]) -> float:
    """Normalised area under a learning curve sampled at evenly spaced points: the trapezoid mean.

    ``(v0/2 + v1 + ... + v_{n-2} + v_{n-1}/2) / (n-1)``, in the units of ``values`` (success rate, so 0..1);
    a single point is its own value. Late points weigh as much as early ones, so the score rewards both
    learning fast and ending high.
    """
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("aulc of an empty curve")
    if v.size == 1:
        return float(v[0])
    return float((v[:-1] + v[1:]).sum() / (2 * (v.size - 1)))


def eval_schedule(trial_timesteps: int, eval_points: int) -> list[int]:
    """Timesteps at which a trial measures validation success: evenly spaced, the last at the budget."""
    return [int(round(trial_timesteps * (k + 1) / eval_points)) for k in range(eval_points)]


# ------------------------------------------------------------------------------------------------ storage
def storage_path(study_dir: str | Path, hpo: Mapping[str, Any]) -> Path:
    kind = hpo.get("storage", "sqlite")
    return Path(study_dir) / ("study.db" if kind == "sqlite" else "study.journal")


def open_storage(study_dir: str | Path, hpo: Mapping[str, Any]) -> Any:
    """The shared storage of ``study_dir``: SQLite (60 s busy timeout) or a journal file (NFS-safe lock)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    path = storage_path(study_dir, hpo).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = hpo.get("storage", "sqlite")
    if kind == "sqlite":
        return optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 60}})
    if kind == "journal":
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    raise ConfigError(f"hpo.storage: {kind!r} is not sqlite or journal")


@contextlib.contextmanager
def study_lock(study_dir: str | Path) -> Iterator[None]:
    """Exclusive lock (O_EXCL lock file, works on NFS) for study creation and the count-then-ask step."""
    from optuna.storages.journal import JournalFileOpenLock

    Path(study_dir).mkdir(parents=True, exist_ok=True)
    lock = JournalFileOpenLock(str(Path(study_dir).resolve() / "study"), grace_period=60)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _file_digest(path: str | Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def study_fingerprint(phase: int, hpo: Mapping[str, Any], env: Mapping[str, Any], train: Mapping[str, Any],
                      space: Mapping[str, ParamSpec], fixed: Mapping[str, Any], inputs: Sequence[str | Path]
                      ) -> str:
    """Hash of everything that makes two trials comparable; part of the study name."""
    payload = {
        "phase": phase,
        "space": {n: s.to_config() for n, s in sorted(space.items())},
        "fixed": {n: _encode(v) for n, v in sorted(fixed.items())},
        "hpo": {k: hpo.get(k) for k in ("trial_timesteps", "eval_points", "eval_episodes", "trial_seeds",
                                         "pruner", "pruner_startup_trials", "pruner_warmup_points", "seed")},
        "env": env,
        "train": {k: v for k, v in train.items() if k not in _TRAIN_NOT_FINGERPRINTED},
        "inputs": [_file_digest(p) for p in inputs],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


def make_pruner(hpo: Mapping[str, Any]) -> Any:
    import optuna

    kind = hpo.get("pruner", "median")
    # steps are eval points 1..n; the first `pruner_warmup_points` are never grounds for pruning (an early
    # validation success of a few percent is mostly noise)
    first = int(hpo.get("pruner_warmup_points", 1)) + 1
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(hpo.get("pruner_startup_trials", 5)),
                                           n_warmup_steps=first)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min(first, int(hpo["eval_points"])),
                                              max_resource=int(hpo["eval_points"]), reduction_factor=3)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"hpo.pruner: {kind!r} is not median, hyperband or none")


def make_evaluator(hpo: Mapping[str, Any]) -> Any:
    import optuna

    kind = hpo.get("importance", "fanova")
    seed = int(hpo.get("seed", 0))
    if kind == "fanova":
        return optuna.importance.FanovaImportanceEvaluator(seed=seed)
    if kind == "mean_decrease_impurity":
        return optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=seed)
    if kind == "ped_anova":
        return optuna.importance.PedAnovaImportanceEvaluator()
    raise ConfigError(f"hpo.importance: {kind!r} is not fanova, mean_decrease_impurity or ped_anova")


# ----------------------------------------------------------------------------------------- trial accounting
def _counted(t: Any) -> bool:
    """Trials that use the phase budget: all but the stale ones a restarted worker failed and re-enqueued."""
    from optuna.trial import TrialState

    return not (t.state == TrialState.FAIL and t.user_attrs.get("stale"))


def budget_used(study: Any) -> int:
    return sum(_counted(t) for t in study.get_trials(deepcopy=False))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_CARRIED_ATTRS = ("reference", "incumbent")  # a retry keeps what the trial stood for


def _retire_trial(study: Any, trial_id: int, number: int, params: Mapping[str, Any], why: str,
                  user_attrs: Mapping[str, Any] | None = None) -> None:
    """Mark a RUNNING trial stale + FAIL and enqueue its parameters again (it no longer uses budget)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    try:
        storage.set_trial_user_attr(trial_id, "stale", why)
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except (UpdateFinishedTrialError, RuntimeError):
        return  # finished meanwhile (another process retired it)
    carried = {k: v for k, v in (user_attrs or {}).items() if k in _CARRIED_ATTRS}
    study.enqueue_trial(dict(params), user_attrs={**carried, "retry_of": number})
    log.warning("trial %d: %s; marked FAIL (stale) and its parameters re-enqueued", number, why)


def fail_stale_trials(study: Any, worker: int) -> list[int]:
    """Retire RUNNING trials whose worker is gone: this worker id's (a previous, killed incarnation), those
    of dead processes on this host, and untagged ones (call under :func:`study_lock`). Returns their numbers.

    Snakemake never runs two jobs of one worker id at once, so a RUNNING trial of this worker id belongs to
    a dead predecessor, wherever it ran (a SLURM job killed at its time limit on another node)."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    stale = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner, t_host, pid = t.user_attrs.get("worker"), t.user_attrs.get("host"), t.user_attrs.get("pid")
        if pid is None:  # workers tag a trial under the lock right after asking: this one's worker died then
            why = "orphaned (its worker died while starting it)"
        elif owner == worker and pid != os.getpid():
            why = f"worker {worker} restarted (previous process {t_host}:{pid} gone)"
        elif t_host == host and pid is not None and pid != os.getpid() and not _pid_alive(int(pid)):
            why = f"process {t_host}:{pid} of worker {owner} is gone"
        else:
            continue
        _retire_trial(study, t._trial_id, t.number, t.params, why, t.user_attrs)
        stale.append(t.number)
    return stale


def _finished_states() -> tuple[Any, ...]:
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class _Terminated(BaseException):
    """SIGTERM (SLURM time limit, snakemake cancel) while a trial runs."""


# ------------------------------------------------------------------------------------------------- trials
def _pruning_callback(trial: Any, evaluate: Callable[[Any], float], schedule: Sequence[int]) -> Any:
    """An SB3 callback that measures validation success at the first rollout boundary at or after each
    scheduled timestep, reports the running AULC to Optuna (step = eval point 1..n) and raises
    optuna.TrialPruned when the pruner says so."""
    import optuna
    from stable_baselines3.common.callbacks import BaseCallback

    class AulcPruningCallback(BaseCallback):
        def __init__(self) -> None:
            super().__init__(verbose=0)
            self.curve: list[float] = []
            self.timesteps: list[int] = []

        def measure(self, agent: Any, timesteps: int) -> None:
            # points falling in one rollout share a policy: measure it once
            same = bool(self.timesteps) and self.timesteps[-1] == int(timesteps)
            s = self.curve[-1] if same else float(evaluate(agent))
            self.curve.append(s)
            self.timesteps.append(int(timesteps))
            k = len(self.curve)
            trial.report(aulc(self.curve), step=k)
            trial.set_user_attr("curve", list(self.curve))
            trial.set_user_attr("curve_timesteps", list(self.timesteps))
            log.info("trial %d: step %d, validation success %.3f, running AULC %.3f",
                     trial.number, timesteps, s, aulc(self.curve))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at eval point {k} (running AULC {aulc(self.curve):.3f})")

        def due(self, timesteps: int) -> bool:
            return len(self.curve) < len(schedule) and timesteps >= schedule[len(self.curve)]

        def _catch_up(self) -> None:
            while self.due(self.num_timesteps):
                self.measure(self.model, self.num_timesteps)

        # measured after PPO updates (rollout boundaries, end of training): the policy a point scores has
        # learnt from every rollout collected before it
        def _on_rollout_start(self) -> None:
            self._catch_up()

        def _on_training_end(self) -> None:
            self._catch_up()

        def _on_step(self) -> bool:
            return True

    return AulcPruningCallback()


@dataclass
class TrialContext:
    """What every trial of one worker shares: inputs, base settings, the space and the fixed values."""

    model: Any
    table: np.ndarray
    env: dict[str, Any]
    train: dict[str, Any]
    hpo: dict[str, Any]
    space: dict[str, ParamSpec]
    fixed: dict[str, Any]
    threads: int = 1
    _geo: dict[tuple[float, float], Any] = field(default_factory=dict)

    def geometry(self, env: Mapping[str, Any]) -> Any:
        """The task geometry (scaler, centroids, goal sets) for the env's percentiles, computed once."""
        from .tasks import TaskGeometry

        key = (float(env.get("goal_percentile", 25)), float(env.get("centroid_percentile", 95)))
        if key not in self._geo:
            self._geo[key] = TaskGeometry.from_model(self.model, *key)
        return self._geo[key]


def trial_settings(ctx: TrialContext, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """env and train settings of one trial: the base settings, the fixed and sampled values, the budget."""
    env, train = apply_params(ctx.env, ctx.train, {**ctx.fixed, **params})
    train["total_timesteps"] = int(ctx.hpo["trial_timesteps"])
    train["use_hpo"] = False
    # no per-run wandb logging or periodic evaluation inside a trial: the pruning callback evaluates
    train["eval_every"] = int(ctx.hpo["trial_timesteps"]) * 10
    train["eval_episodes"] = 1  # train_agent's own start/final evaluations: unused here, keep them cheap
    train["checkpoint_every"] = int(ctx.hpo["trial_timesteps"]) * 10
    if isinstance(train.get("wandb"), dict):
        train["wandb"] = {**train["wandb"], "mode": "disabled"}
    return env, train


def learning_curve(ctx: TrialContext, params: Mapping[str, Any], trial: Any = None, seed: int | None = None
                   ) -> list[float]:
    """Train one configuration for the trial budget; validation success at each eval point.

    With an Optuna ``trial``, reports the running AULC and may raise optuna.TrialPruned. ``seed`` (default
    ``train.seed``) seeds training; validation episodes are seeded by ``hpo.seed`` for every trial and every
    point, so trials are compared on the same episodes.
    """
    from .train import evaluate_success, train_agent

    env, train = trial_settings(ctx, params)
    if seed is not None:
        train["seed"] = int(seed)
    schedule = eval_schedule(int(ctx.hpo["trial_timesteps"]), int(ctx.hpo["eval_points"]))
    n_episodes = int(ctx.hpo.get("eval_episodes", 100))
    eval_seed = int(ctx.hpo.get("seed", 0))

    split = "val" if (np.asarray(ctx.model.split) == "val").any() else "train"  # as train_agent does

    def evaluate(agent: Any) -> float:
        res = evaluate_success(agent, ctx.geometry(env), ctx.table, env, split=split, n_episodes=n_episodes,
                               seed=eval_seed, deterministic=True)
        return float(res["success_rate"])

    if trial is None:
        trial = _NoTrial()
    cb = _pruning_callback(trial, evaluate, schedule)
    agent, _summary = train_agent(ctx.geometry(env), ctx.table, env, train, out_dir=None, callbacks=[cb],
                                  resume=False, progress=False, threads=ctx.threads)
    while len(cb.curve) < len(schedule):  # budget ended between the last callback and a due point
        cb.measure(agent, schedule[len(cb.curve)])
    return list(cb.curve)


class _NoTrial:
    """Stands in for an Optuna trial outside a study (scoring a fixed configuration): never prunes."""

    number = -1

    def report(self, value: float, step: int) -> None:
        pass

    def set_user_attr(self, key: str, value: Any) -> None:
        pass

    def should_prune(self) -> bool:
        return False


def objective(trial: Any, ctx: TrialContext) -> float:
    """Sample the space, train, return the AULC of validation success (Optuna maximises it).

    With ``hpo.trial_seeds`` = k > 1 the configuration trains k times (seeds ``train.seed + i``) and the
    objective is the mean AULC: the pruner watches the first run; the others only average out the luck of
    one initialisation, which at short budgets can outweigh what the hyperparameters do.
    """
    params = {name: spec.suggest(trial) for name, spec in ctx.space.items()}
    curve = learning_curve(ctx, params, trial)
    scores = [aulc(curve)]
    base_seed = int(ctx.train.get("seed", 77))
    for i in range(1, int(ctx.hpo.get("trial_seeds", 1))):
        scores.append(aulc(learning_curve(ctx, params, seed=base_seed + i)))
    if len(scores) > 1:
        trial.set_user_attr("seed_aulcs", scores)
    return float(np.mean(scores))


# ------------------------------------------------------------------------------------------------- worker
def phase_space(study_dir: str | Path, phase: int, hpo: Mapping[str, Any]
                ) -> tuple[dict[str, ParamSpec], dict[str, Any]]:
    """(space, fixed values) of a phase: phase 1 from the config, phase 2 from ``phase1.yaml``."""
    if phase == 1:
        return search_space(hpo), {}
    p1 = Path(study_dir) / "phase1.yaml"
    if not p1.exists():
        raise InputError("phase 1 summary not found", path=p1, fix="finish phase 1 first (rule hpo_phase)")
    doc = yaml.safe_load(p1.read_text())
    return space_from_config(doc["phase2_space"]), {n: _encode(v) for n, v in doc["phase2_fixed"].items()}


def study_name(phase: int, fingerprint: str) -> str:
    return f"phase{phase}-{fingerprint}"


def open_study(study_dir: str | Path, phase: int, hpo: Mapping[str, Any], env: Mapping[str, Any],
               train: Mapping[str, Any], inputs: Sequence[str | Path], sampler: Any = None) -> Any:
    """Create or load the phase's study (under the lock). A new phase-1 study gets the reference
    configuration as its first trial (``hpo.enqueue_reference``); a new phase-2 study phase 1's best."""
    import optuna

    space, fixed = phase_space(study_dir, phase, hpo)
    name = study_name(phase, study_fingerprint(phase, hpo, env, train, space, fixed, inputs))
    storage = open_storage(study_dir, hpo)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                pruner=make_pruner(hpo), load_if_exists=True)
    if not study.get_trials(deepcopy=False):
        study.set_user_attr("phase", phase)
        study.set_user_attr("space", {n: s.to_config() for n, s in space.items()})
        study.set_user_attr("fixed", dict(fixed))
        if phase == 1 and hpo.get("enqueue_reference", True):
            ref = reference_params(env, train, space)
            outside = [n for n, v in ref.items() if not space[n].contains(v)]
            if outside:
                log.warning("reference configuration not enqueued: %s outside the search space", outside)
            else:
                study.enqueue_trial(ref, user_attrs={"reference": True})
        if phase == 2:
            doc = yaml.safe_load((Path(study_dir) / "phase1.yaml").read_text())
            inc = {n: _encode(v) for n, v in doc["best_params"].items() if n in space}
            if all(space[n].contains(v) for n, v in inc.items()):
                study.enqueue_trial(inc, user_attrs={"incumbent": True})
    return study


def run_worker(model_path: str | Path, table_path: str | Path, study_dir: str | Path, phase: int, worker: int,
               hpo: Mapping[str, Any], env: Mapping[str, Any], train: Mapping[str, Any], threads: int = 1
               ) -> dict[str, Any]:
    """Run trials of ``phase`` on the shared study until the phase's trial budget is used; return a summary.

    Budget: ``hpo.phase{phase}_trials`` trials in total over all workers, counting COMPLETE, PRUNED,
    RUNNING, WAITING and FAIL trials (a trial that raised counts; a stale one retired at restart does not).
    Safe to start any number of workers at once and to rerun after a kill.
    """
    import torch

    threads_before = torch.get_num_threads()
    try:
        return _run_worker(model_path, table_path, study_dir, phase, worker, hpo, env, train, threads)
    finally:
        torch.set_num_threads(threads_before)


def _run_worker(model_path: str | Path, table_path: str | Path, study_dir: str | Path, phase: int, worker: int,
                hpo: Mapping[str, Any], env: Mapping[str, Any], train: Mapping[str, Any], threads: int
                ) -> dict[str, Any]:
    import optuna
    import torch

    from .train import load_inputs

    torch.set_num_threads(max(1, int(threads)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hpo, env, train = dict(hpo), dict(env), dict(train)
    n_total = int(hpo[f"phase{phase}_trials"])
    model, table = load_inputs(model_path, table_path)
    space, fixed = phase_space(study_dir, phase, hpo)
    ctx = TrialContext(model=model, table=table, env=env, train=train, hpo=hpo, space=space, fixed=fixed,
                       threads=threads)
    inputs = [model_path, table_path]

    with study_lock(study_dir):
        probe = open_study(study_dir, phase, hpo, env, train, inputs)
        stale = fail_stale_trials(probe, worker)
        n_before = len(probe.get_trials(deepcopy=False))
        n_finished = len(probe.get_trials(deepcopy=False, states=_finished_states()))
    # fresh study: hpo.seed + worker; a worker joining a study with finished trials (a resume) gets a seed of
    # its own too, so it does not replay the random start-up draws of its earlier incarnation
    seed = int(hpo.get("seed", 0)) + worker + 1000 * n_finished
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(hpo.get("sampler_startup_trials", 10)),
                                         constant_liar=True)
    study = optuna.load_study(study_name=probe.study_name, storage=probe._storage, sampler=sampler,
                              pruner=make_pruner(hpo))
    log.info("worker %d on study %s (%s): %d trials already, budget %d, %d stale retired, sampler seed %d",
             worker, study.study_name, storage_path(study_dir, hpo), n_before, n_total, len(stale), seed)

    host, pid = socket.gethostname(), os.getpid()
    ran: list[int] = []
    current: list[Any] = []

    def on_term(signum: int, frame: Any) -> None:
        raise _Terminated()

    old_handler = None
    with contextlib.suppress(ValueError):  # not in the main thread: keep the default
        old_handler = signal.signal(signal.SIGTERM, on_term)
    try:
        while True:
            with study_lock(study_dir):
                trials = study.get_trials(deepcopy=False)
                waiting = any(t.state == optuna.trial.TrialState.WAITING for t in trials)
                if not waiting and sum(_counted(t) for t in trials) >= n_total:
                    break
                trial = study.ask()
                trial.set_user_attr("worker", worker)
                trial.set_user_attr("host", host)
                trial.set_user_attr("pid", pid)
            current[:] = [trial]
            t0 = time.time()
            state, value = optuna.trial.TrialState.COMPLETE, None
            try:
                value = objective(trial, ctx)
            except optuna.TrialPruned as e:
                state = optuna.trial.TrialState.PRUNED
                log.info("trial %d pruned: %s", trial.number, e)
            except (_Terminated, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - a diverging configuration must not stop the search
                state = optuna.trial.TrialState.FAIL
                trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
                log.warning("trial %d failed: %s: %s", trial.number, type(e).__name__, e)
            trial.set_user_attr("seconds", round(time.time() - t0, 3))
            if state == optuna.trial.TrialState.COMPLETE:
                study.tell(trial, value)
                log.info("trial %d: AULC %.4f in %.1f s  %s", trial.number, value, time.time() - t0, trial.params)
            else:
                study.tell(trial, state=state)
            current.clear()
            ran.append(trial.number)
    except (_Terminated, KeyboardInterrupt) as e:
        if current:
            t = current[0]
            _retire_trial(study, t._trial_id, t.number, t.params, f"worker {worker} terminated",
                          study._storage.get_trial(t._trial_id).user_attrs)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise SystemExit(143) from None
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    summary = {"study": study.study_name, "worker": worker, "trials_run": ran,
               "budget": n_total, "budget_used": budget_used(study)}
    log.info("worker %d done: ran %d trials; study has used %d of %d", worker, len(ran),
             summary["budget_used"], n_total)
    return summary


# ---------------------------------------------------------------------------------------- phase summaries
def load_phase_study(study_dir: str | Path, phase: int, hpo: Mapping[str, Any],
                     worker_files: Sequence[str | Path] = ()) -> Any:
    """The phase's study: the one named in the workers' done files (each holds its run_worker summary as
    JSON), else the newest study named ``phase{phase}-*`` in the storage."""
    import optuna

    storage = open_storage(study_dir, hpo)
    names = set()
    for f in worker_files:
        with contextlib.suppress(OSError, ValueError):
            names.add(json.loads(Path(f).read_text())["study"])
    if len(names) > 1:
        raise InputError(f"workers ran different studies {sorted(names)}", path=study_dir,
                         fix="rerun the hpo_worker jobs of this phase (snakemake --forcerun hpo_worker)")
    if names:
        return optuna.load_study(study_name=names.pop(), storage=storage)
    summaries = [s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
                 if s.study_name.startswith(f"phase{phase}-")]
    if not summaries:
        raise InputError(f"no phase-{phase} study", path=storage_path(study_dir, hpo),
                         fix=f"run the hpo_worker rule for phase {phase} first")
    newest = max(summaries, key=lambda s: s._study_id)
    return optuna.load_study(study_name=newest.study_name, storage=storage)


def importances(study: Any, hpo: Mapping[str, Any]) -> dict[str, float]:
    """Parameter importances (seeded evaluator) over complete trials; {} when too few trials to tell."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    try:
        imp = optuna.importance.get_param_importances(study, evaluator=make_evaluator(hpo))
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        log.warning("importances unavailable: %s", e)
        return {}
    return {k: float(v) for k, v in imp.items() if not math.isnan(v)}


def save_plots(study: Any, study_dir: str | Path, phase: int, hpo: Mapping[str, Any],
               params: Sequence[str] | None = None) -> list[str]:
    """Optimisation history, importances, parallel coordinates, intermediate values as PNGs next to the
    phase summary (``phase{n}_{kind}.png``); returns the paths. A plot Optuna cannot draw (e.g. importances
    from fewer than two complete trials) is logged and replaced by a PNG saying why, so the files always
    exist."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    plots: dict[str, Callable[[], Any]] = {
        "history": lambda: ovm.plot_optimization_history(study, target_name="validation AULC"),
        "importances": lambda: ovm.plot_param_importances(study, evaluator=make_evaluator(hpo)),
        "parallel": lambda: ovm.plot_parallel_coordinate(study, params=list(params)[:8] if params else None,
                                                         target_name="validation AULC"),
        "intermediate": lambda: ovm.plot_intermediate_values(study),
    }
    written = []
    for kind, draw in plots.items():
        path = Path(study_dir) / f"phase{phase}_{kind}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = (np.ravel(ax)[0] if isinstance(ax, np.ndarray) else ax).figure
            fig.set_size_inches(max(fig.get_size_inches()[0], 11 if kind == "parallel" else 8),
                                max(fig.get_size_inches()[1], 5))
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(str(path))
        except Exception as e:  # noqa: BLE001 - plots are a report extra, never a reason to fail a phase
            plt.close("all")
            log.warning("plot %s not drawn: %s: %s", kind, type(e).__name__, e)
            fig, ax = plt.subplots(figsize=(8, 2))
            ax.axis("off")
            ax.text(0.5, 0.5, f"phase {phase} {kind}: not available\n({type(e).__name__}: {e})"[:300],
                    ha="center", va="center", wrap=True)
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(str(path))
    return written


def _trial_counts(study: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        key = "stale" if t.user_attrs.get("stale") else t.state.name.lower()
        counts[key] = counts.get(key, 0) + 1
    return counts


def finish_phase(study_dir: str | Path, phase: int, out_path: str | Path, hpo: Mapping[str, Any],
                 worker_files: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Summarise a finished phase into ``out_path`` (YAML) and draw its plots.

    The summary holds the best trial (value, number, parameters incl. phase 2's fixed ones), importances,
    trial counts, the reference/incumbent trial's value, and for phase 1 the top-k parameters plus the
    narrowed space and fixed values phase 2 searches.
    """
    from optuna.trial import TrialState

    hpo = dict(hpo)
    study = load_phase_study(study_dir, phase, hpo, worker_files)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise InputError(f"phase {phase} study {study.study_name} has no complete trial ({_trial_counts(study)})",
                         path=storage_path(study_dir, hpo),
                         fix="raise hpo.phase{n}_trials, or use a gentler pruner (hpo.pruner: none)")
    best = study.best_trial
    space = space_from_config(study.user_attrs.get("space") or {})
    fixed = dict(study.user_attrs.get("fixed") or {})
    imp = importances(study, hpo)
    best_params = {**fixed, **best.params}
    doc: dict[str, Any] = {
        "phase": phase,
        "study": study.study_name,
        "storage": str(storage_path(study_dir, hpo)),
        "trials": _trial_counts(study),
        "best_value": float(best.value),
        "best_trial": best.number,
        "best_curve": best.user_attrs.get("curve"),
        "best_params": {n: _decode(n, v) for n, v in best_params.items()},
        "importances": imp,
        "objective": f"AULC of validation success at {hpo['eval_points']} points over "
                     f"{hpo['trial_timesteps']} steps (trapezoid mean)",
    }
    for t in complete:
        if t.user_attrs.get("reference"):
            doc["reference_value"] = float(t.value)
            doc["reference_trial"] = t.number
        if t.user_attrs.get("incumbent"):
            doc["incumbent_value"] = float(t.value)
    if phase == 1:
        order = list(imp) + [n for n in space if n not in imp]  # no importances: configured order
        top = order[: int(hpo.get("top_k", 5))]
        frac = float(hpo.get("phase2_narrow", 0.25))
        doc["top_k"] = top
        doc["phase2_space"] = {n: space[n].narrow(best.params[n], frac).to_config() for n in top}
        doc["phase2_fixed"] = {n: _decode(n, v) for n, v in best_params.items() if n not in top}
    # parallel coordinates: the (up to 8) most important parameters, so the axes stay readable
    doc["plots"] = save_plots(study, study_dir, phase, hpo, params=list(imp) + [n for n in space if n not in imp])
    write_text(out_path, yaml.safe_dump(doc, sort_keys=False))
    log.info("phase %d: best AULC %.4f (trial %d) %s", phase, best.value, best.number, doc["best_params"])
    return doc


def write_best_params(phase1_yaml: str | Path, phase2_yaml: str | Path, out_path: str | Path) -> dict[str, Any]:
    """``best_params.yaml``: the better of the two phases' best configurations as ``{train, env}`` overrides.

    Phase 2 searches around phase 1's best with the same objective and budget; if its best does not beat
    phase 1's (noise), phase 1's best is kept. Provenance goes into comments at the top of the file.
    """
    docs = [yaml.safe_load(Path(p).read_text()) for p in (phase1_yaml, phase2_yaml)]
    chosen = max(docs, key=lambda d: (d["best_value"], d["phase"]))
    over = params_to_overrides(chosen["best_params"])
    head = [f"# cellrl HPO best parameters: phase {chosen['phase']} study {chosen['study']}, "
            f"trial {chosen['best_trial']}, validation AULC {chosen['best_value']:.4f}",
            f"# phase 1 best {docs[0]['best_value']:.4f}, phase 2 best {docs[1]['best_value']:.4f}"]
    if "reference_value" in docs[0]:
        head.append(f"# reference configuration (phase 1 trial {docs[0]['reference_trial']}): "
                    f"{docs[0]['reference_value']:.4f}")
    head.append("# merged over the configuration's train/env sections when train.use_hpo is true")
    write_text(out_path, "\n".join(head) + "\n" + yaml.safe_dump(over, sort_keys=False))
    return over


# ------------------------------------------------------------------------------------------ comparisons
def compare_with_reference(model: Any, table: np.ndarray, env: Mapping[str, Any], train: Mapping[str, Any],
                           hpo: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]],
                           seeds: Sequence[int] = (1, 2, 3), threads: int = 1) -> dict[str, Any]:
    """Validation AULC of the reference settings vs the tuned ones at the trial budget, on fresh training
    seeds (the search used ``train.seed``, so this is free of its selection bias)."""
    env_t = {**env, **overrides.get("env", {})}
    train_t = {**train, **overrides.get("train", {})}
    out: dict[str, Any] = {"seeds": list(seeds), "trial_timesteps": int(hpo["trial_timesteps"]),
                           "eval_points": int(hpo["eval_points"]), "eval_episodes": int(hpo.get("eval_episodes", 100))}
    for label, (e, t) in {"reference": (env, train), "tuned": (env_t, train_t)}.items():
        ctx = TrialContext(model=model, table=table, env=dict(e), train=dict(t), hpo=dict(hpo), space={}, fixed={},
                           threads=threads)
        curves = [learning_curve(ctx, {}, seed=s) for s in seeds]
        scores = [aulc(c) for c in curves]
        out[label] = {"aulc": scores, "mean": float(np.mean(scores)), "std": float(np.std(scores)),
                      "curves": curves}
    out["difference"] = out["tuned"]["mean"] - out["reference"]["mean"]
    return out


def compare_files(model_path: str | Path, table_path: str | Path, out_path: str | Path,
                  overrides: Mapping[str, Mapping[str, Any]], hpo: Mapping[str, Any], env: Mapping[str, Any],
                  train: Mapping[str, Any], threads: int = 1) -> dict[str, Any]:
    """Rule hpo_best: :func:`compare_with_reference` on ``hpo.compare_seeds`` -> JSON (``{}`` if none)."""
    import torch

    from .io import write_json
    from .train import load_inputs

    torch.set_num_threads(max(1, int(threads)))
    seeds = list(hpo.get("compare_seeds") or [])
    res: dict[str, Any] = {}
    if seeds:
        model, table = load_inputs(model_path, table_path)
        res = compare_with_reference(model, table, env, train, hpo, overrides, seeds, threads=threads)
        log.info("validation AULC at %d steps: reference %.4f +- %.4f, tuned %.4f +- %.4f (seeds %s)",
                 res["trial_timesteps"], res["reference"]["mean"], res["reference"]["std"],
                 res["tuned"]["mean"], res["tuned"]["std"], seeds)
    write_json(out_path, res)
    return res


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m cellrl.hpo worker ARGS.json``: one worker outside Snakemake (tests, benchmarks, ad-hoc
    cluster jobs). ARGS.json holds run_worker's keyword arguments; ``"wait_for": path`` waits for that file
    first, so several workers can be released at the same moment."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m cellrl.hpo")
    ap.add_argument("command", choices=["worker"])
    ap.add_argument("args_json")
    ns = ap.parse_args(argv)
    kwargs = json.loads(Path(ns.args_json).read_text())
    gate = kwargs.pop("wait_for", None)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s: %(message)s")
    import optuna  # noqa: F401 - import before waiting, so released workers start together
    import torch  # noqa: F401

    from . import train  # noqa: F401

    while gate and not Path(gate).exists():
        time.sleep(0.02)
    summary = run_worker(**kwargs)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
