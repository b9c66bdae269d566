"""Reprogramming environment: walk a cell through the transition table towards a target cell type.

One episode: a start cell (from a split) and a target cell type (any other type; under the curriculum the
nearest ones first). Each action is a perturbation (0..R-1 knock out regulator r, R..2R-1 overexpress it);
the next cell is ``table[cell, action]``. Observation (a Dict):

* ``current_expression`` (G,) float32: the current cell's expression, z-scored with the training-cell scaler;
* ``target_expression`` (G,) float32: the target type's centroid in the same space;
* ``action_mask`` (A,) int8 (MultiBinary): allowed actions (``cellrl.tasks.allowed_mask``; with
  ``mask_revisits`` also no action whose next cell was already visited in the episode).

Reward: ``step_penalty + distance_reward_scale * (gamma * cos(next, target) - cos(current, target))``
(potential-based shaping) plus ``goal_bonus`` when the next cell is a goal cell (episode terminates).
An episode is truncated at ``max_steps`` or when the cell has no allowed action left. A masked action
leaves the cell where it is (MaskablePPO never picks one; random agents and ``check_env`` may).

No loops (``mask_revisits``, default on): each episode records the cells it has visited (start included) and
the mask also excludes every action whose next cell is one of them, so no episode ever revisits a cell (a
cell whose every move leads back into its own path is a dead end: the episode is truncated). Shortest paths
never revisit a cell, so BFS distances are unchanged by it.

Two front-ends share one array core (:class:`EpisodeBatch`), so their maths is identical:

* :class:`VecReprogrammingEnv`: an SB3 ``VecEnv`` that steps N episodes with array operations (table
  lookup, reward, goal test and the observation gather for all N in one call) and auto-resets like
  ``DummyVecEnv``. It exposes ``action_masks()`` for MaskablePPO. Observations are written into two
  preallocated buffers used in turn (no allocation per step): an observation returned by ``step``/``reset``
  stays valid until the second following call (SB3 copies it into its rollout buffer before then).
* :class:`ReprogrammingEnv`: a plain ``gymnasium.Env`` (registered as ``cellrl/Reprogramming-v0``) with one
  episode, returning fresh arrays; ``reset(options={"start_cell": c, "target_type": t})`` fixes a task.

Curriculum (training only): per start type, the targets ordered by embedding-centroid distance
(:meth:`cellrl.tasks.TaskGeometry.umap_centroid_order`); phase k (0-based) allows the nearest
``(k + 1) * targets_per_phase`` and ``max_steps + k * step_increase_per_phase`` steps. The phase advances
when the success rate over the last ``window`` episodes of the phase reaches ``success_threshold`` (the first
phase also lasts at least ``first_phase_steps`` environment steps). All of its state is part of
:meth:`EpisodeBatch.get_state`, so checkpoints resume exactly.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv

from .errors import InputError
from .model import SPLITS, OracleModel
from .tasks import TaskGeometry, allowed_mask, validate_table

ENV_ID = "cellrl/Reprogramming-v0"
#: ``env.perturbation_model``: table (memoryless transition table) or persistent (cellrl.persistent).
PERTURBATION_MODELS = ("table", "persistent")
#: Persistent mode: which of a task's shortest plans exact search keeps (cellrl.persistent.search.exact).
PLAN_TIE_BREAKS = ("similarity", "hub")


# ---------------------------------------------------------------------------------------------- parameters
@dataclass
class CurriculumParams:
    """Curriculum settings (config ``env.curriculum``)."""

    enabled: bool = True
    targets_per_phase: int = 6
    first_phase_steps: int = 100_000
    success_threshold: float = 0.7
    step_increase_per_phase: int = 4
    window: int = 100


@dataclass
class EnvParams:
    """Environment settings (config ``env``); see config/README.md."""

    max_steps: int = 20
    step_penalty: float = -1.0
    goal_bonus: float = 0.0
    distance_reward_scale: float = 5.0
    gamma: float = 0.9831
    goal_percentile: float = 25.0
    centroid_percentile: float = 95.0
    mask_revisits: bool = True
    perturbation_model: str = "table"
    max_set_size: int = 3
    plan_tie_break: str = "hub"
    curriculum: CurriculumParams = field(default_factory=CurriculumParams)

    def __post_init__(self) -> None:
        if self.perturbation_model not in PERTURBATION_MODELS:
            raise InputError(f"env.perturbation_model must be one of {PERTURBATION_MODELS}, got "
                             f"{self.perturbation_model!r}", field="env.perturbation_model")
        if self.plan_tie_break not in PLAN_TIE_BREAKS:
            raise InputError(f"env.plan_tie_break must be one of {PLAN_TIE_BREAKS}, got {self.plan_tie_break!r}",
                             field="env.plan_tie_break")

    @classmethod
    def from_config(cls, env_cfg: Mapping[str, Any] | "EnvParams" | None) -> "EnvParams":
        """Build from the ``env`` config section (missing keys take the reference defaults)."""
        if isinstance(env_cfg, EnvParams):
            return env_cfg
        cfg = dict(env_cfg or {})
        cur = dict(cfg.pop("curriculum", None) or {})
        known = set(cls.__dataclass_fields__) - {"curriculum"}
        unknown = set(cfg) - known
        unknown_c = set(cur) - set(CurriculumParams.__dataclass_fields__)
        if unknown or unknown_c:
            raise InputError(f"unknown env settings: {sorted(unknown | {f'curriculum.{k}' for k in unknown_c})}",
                             field="env")
        return cls(**cfg, curriculum=CurriculumParams(**cur))

    def n_phases(self, n_types: int) -> int:
        """Number of curriculum phases for ``n_types`` cell types (1 when the curriculum is off)."""
        if not self.curriculum.enabled or n_types <= 1:
            return 1
        return max(1, math.ceil((n_types - 1) / self.curriculum.targets_per_phase))

    def phase_max_steps(self, phase: int) -> int:
        """Episode length limit in (0-based) curriculum phase ``phase``."""
        return int(self.max_steps + phase * self.curriculum.step_increase_per_phase)

    def eval_max_steps(self, n_types: int) -> int:
        """Episode length limit for evaluation: that of the final curriculum phase (all targets)."""
        return self.phase_max_steps(self.n_phases(n_types) - 1)


# ---------------------------------------------------------------------------------------------- array core
class EpisodeBatch:
    """N episodes over one transition table, stepped with array operations (no observations; see the envs).

    State arrays (length N): ``cell`` current cell, ``target`` target type, ``t`` steps taken, ``limit``
    step limit, ``ret`` return so far, ``start`` start cell, ``task_id`` index into the task queue (-1 for
    sampled tasks); ``path`` (N, max limit + 1) the cells visited so far (column k: the cell after k steps,
    -1 beyond ``t``) and ``mask`` (N, A) bool the allowed actions of every episode's current cell (the
    static mask of :func:`cellrl.tasks.allowed_mask`, less the moves back into ``path`` with
    ``params.mask_revisits``). ``mask`` is derived state: rebuilt whenever ``cell`` or ``path`` change.
    """

    def __init__(self, geometry: TaskGeometry, table: np.ndarray, n: int, params: EnvParams,
                 split: str = "train", training: bool = True, curriculum: bool | None = None,
                 max_steps: int | None = None, seed: int | None = None):
        self.table = validate_table(table, geometry.n_cells, table.shape[1] if np.ndim(table) == 2 else -1)
        allowed = allowed_mask(self.table, geometry.split, bool(training))
        self.allowed = allowed                                    # (C, A) bool, the static mask
        self.allowed_i8 = allowed.view(np.int8)                   # same memory, for the observation
        self.mask_revisits = bool(params.mask_revisits)
        self._init_episodes(geometry, int(self.table.shape[1]), allowed.any(1), n, params, split, training,
                            curriculum, max_steps, seed)

    def _init_episodes(self, geometry: TaskGeometry, n_actions: int, has_action: np.ndarray, n: int,
                       params: EnvParams, split: str, training: bool, curriculum: bool | None,
                       max_steps: int | None, seed: int | None) -> None:
        """Task pool, curriculum and episode state; shared with :mod:`cellrl.persistent.env`."""
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; use one of {SPLITS}", field="split")
        self.geo = geometry
        self.n = int(n)
        self.params = params
        self.split = split
        self.training = bool(training)
        self.n_actions = int(n_actions)
        self.has_action = has_action
        in_split = geometry.split == split
        # Training episodes start only where some action is allowed; evaluation uses every cell of the split.
        pool = in_split & self.has_action if self.training else in_split
        self.start_pool = np.flatnonzero(pool).astype(np.int64)
        if len(self.start_pool) == 0:
            raise InputError(f"no usable start cells in split {split!r}", field="split",
                             fix="check the split stage and the transition table (every action a self-loop?)")
        if geometry.n_types < 2:
            raise InputError("need at least two cell types", field="cell_type")
        self.target_order = geometry.target_order()               # (T, T-1)
        self.cos_sim = geometry.cos_sim
        self.goal_mask = geometry.goal_mask
        self.start_type = geometry.type_ids
        self.curriculum_on = params.curriculum.enabled if curriculum is None else bool(curriculum)
        self.curriculum_on = self.curriculum_on and self.training
        self.n_phases = params.n_phases(geometry.n_types) if self.curriculum_on else 1
        self.fixed_max_steps = max_steps
        # episode state
        self.cell = np.zeros(n, np.int64)
        self.target = np.zeros(n, np.int64)
        self.start = np.zeros(n, np.int64)
        self.t = np.zeros(n, np.int64)
        self.limit = np.zeros(n, np.int64)
        self.ret = np.zeros(n, np.float64)
        self.task_id = np.full(n, -1, np.int64)
        # curriculum / counters
        self.phase = 0
        self.phase_start_step = 0
        self.total_steps = 0
        self.episodes = 0
        self.successes = 0
        self.window: deque[bool] = deque(maxlen=params.curriculum.window)
        self.recent: deque[bool] = deque(maxlen=100)             # for progress reports, all phases
        self.tasks = np.zeros((0, 2), np.int64)                  # queued (start cell, target type)
        self.task_ptr = 0
        self.rng = np.random.default_rng(seed)
        self.path = np.full((n, self.max_steps + 1), -1, np.int64)
        self.mask = np.zeros((n, self.n_actions), bool)

    # -- task sampling ---------------------------------------------------------------------------------
    @property
    def max_steps(self) -> int:
        """Step limit of new episodes."""
        if self.fixed_max_steps is not None:
            return int(self.fixed_max_steps)
        if self.curriculum_on:
            return self.params.phase_max_steps(self.phase)
        return self.params.eval_max_steps(self.geo.n_types) if not self.training else self.params.max_steps

    @property
    def n_targets(self) -> int:
        """How many of each start type's nearest targets new episodes may draw."""
        all_t = self.geo.n_types - 1
        if not self.curriculum_on:
            return all_t
        return min(all_t, (self.phase + 1) * self.params.curriculum.targets_per_phase)

    def set_tasks(self, starts: np.ndarray, targets: np.ndarray) -> None:
        """Queue fixed tasks: the next resets take (starts[i], targets[i]) in order, then sample again."""
        starts = np.asarray(starts, np.int64)
        targets = np.asarray(targets, np.int64)
        if starts.shape != targets.shape or starts.ndim != 1:
            raise InputError("starts and targets must be 1-D arrays of equal length", field="tasks")
        if len(starts) and (starts.min() < 0 or starts.max() >= self.geo.n_cells):
            raise InputError("start cell index out of range", field="tasks")
        if len(targets) and (targets.min() < 0 or targets.max() >= self.geo.n_types):
            raise InputError("target type index out of range", field="tasks")
        if np.any(self.geo.type_ids[starts] == targets):
            raise InputError("a task's target type equals its start cell's type", field="tasks")
        self.tasks = np.stack([starts, targets], 1)
        self.task_ptr = 0

    def sample_tasks(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``k`` (start cell, target type) pairs drawn with this batch's RNG and curriculum."""
        start = self.start_pool[self.rng.integers(0, len(self.start_pool), k)]
        m = self.n_targets
        j = self.rng.integers(0, m, k)
        target = self.target_order[self.start_type[start], j]
        return start, target

    def reset_envs(self, idx: np.ndarray) -> None:
        """Start new episodes in envs ``idx`` (queued tasks first, then sampled ones)."""
        k = len(idx)
        if k == 0:
            return
        start = np.empty(k, np.int64)
        target = np.empty(k, np.int64)
        tid = np.full(k, -1, np.int64)
        q = min(k, len(self.tasks) - self.task_ptr)
        if q > 0:
            start[:q], target[:q] = self.tasks[self.task_ptr:self.task_ptr + q].T
            tid[:q] = np.arange(self.task_ptr, self.task_ptr + q)
            self.task_ptr += q
        if q < k:
            start[q:], target[q:] = self.sample_tasks(k - q)
        self.cell[idx] = start
        self.start[idx] = start
        self.target[idx] = target
        self.task_id[idx] = tid
        self.t[idx] = 0
        self.ret[idx] = 0.0
        self.limit[idx] = self.max_steps
        if self.path.shape[1] < self.max_steps + 1:               # a later curriculum phase: longer episodes
            grow = np.full((self.n, self.max_steps + 1 - self.path.shape[1]), -1, np.int64)
            self.path = np.concatenate([self.path, grow], 1)
        self.path[idx] = -1
        self.path[idx, 0] = start
        self.mask[idx] = self.masks_of(idx)

    def masks_of(self, idx: np.ndarray | None = None) -> np.ndarray:
        """(k, A) bool: allowed actions of episodes ``idx`` (all when None) in their current cell; with
        ``mask_revisits`` no action leads back into the episode's path."""
        cells = self.cell if idx is None else self.cell[idx]
        m = self.allowed[cells]
        if self.mask_revisits and len(cells):
            path = self.path if idx is None else self.path[idx]
            path = path[:, :int((self.t if idx is None else self.t[idx]).max()) + 1]
            nxt = self.table[cells]                                # (k, A); -1 entries are never allowed
            m &= ~(nxt[:, :, None] == path[:, None, :]).any(2)
        return m

    # -- stepping ----------------------------------------------------------------------------------------
    @staticmethod
    def reward(p: EnvParams, cos_cur: np.ndarray, cos_next: np.ndarray, success: np.ndarray | bool) -> np.ndarray:
        """The step reward (module docstring) from the cosines of the current and next cell to the target."""
        reward = p.step_penalty + p.distance_reward_scale * (
            p.gamma * np.asarray(cos_next).astype(np.float64) - cos_cur)
        if p.goal_bonus:
            reward = reward + p.goal_bonus * success
        return reward

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Apply ``actions`` (N,) to every episode; return (reward, success, truncated, invalid)."""
        a = np.asarray(actions, dtype=np.int64).reshape(self.n)
        cur = self.cell
        if a.min() < 0 or a.max() >= self.n_actions:
            raise InputError(f"actions must lie in [0, {self.n_actions}); got {a.min()}..{a.max()}",
                             field="action")
        rows = np.arange(self.n)
        ok = self.mask[rows, a]
        nxt = np.where(ok, self.table[cur, a], cur)
        return self._advance(cur, nxt, ok)

    def _advance(self, cur: np.ndarray, nxt: np.ndarray,
                 ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Move every env from ``cur`` to ``nxt``: reward, goal test, path, masks and truncation (shared by the
        table and persistent modes). Returns ``(reward, success, truncated, invalid)``."""
        rows = np.arange(self.n)
        tg = self.target
        success = self.goal_mask[tg, nxt]
        reward = self.reward(self.params, self.cos_sim[cur, tg], self.cos_sim[nxt, tg], success)
        self.cell = nxt
        self.t += 1
        self.ret += reward
        self.path[rows, np.minimum(self.t, self.path.shape[1] - 1)] = nxt
        self.mask = self.masks_of()
        truncated = ~success & ((self.t >= self.limit) | ~self.mask.any(1))
        self.total_steps += self.n
        return reward, success, truncated, ~ok

    def record_outcomes(self, success: np.ndarray) -> None:
        """Count finished episodes (their success flags) and advance the curriculum when due."""
        s = success.tolist()
        self.episodes += len(s)
        self.successes += int(sum(s))
        self.recent.extend(s)
        if not self.curriculum_on:
            return
        self.window.extend(s)
        self.maybe_advance()

    def maybe_advance(self) -> bool:
        """Advance the curriculum phase if the rule says so; return True when it did."""
        c = self.params.curriculum
        if self.phase >= self.n_phases - 1 or len(self.window) < self.window.maxlen:
            return False
        if self.phase == 0 and self.total_steps - self.phase_start_step < c.first_phase_steps:
            return False
        if sum(self.window) / len(self.window) < c.success_threshold:
            return False
        self.phase += 1
        self.phase_start_step = self.total_steps
        self.window.clear()
        return True

    def sample_masked_actions(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """A uniformly random allowed action per env (0 where none is allowed), vectorised: the k-th allowed
        action (in index order) with k = floor(u x count), one uniform draw per env."""
        rng = rng if rng is not None else self.rng
        cnt = self.mask.sum(1)
        k = np.minimum((rng.random(self.n) * cnt).astype(np.int64), np.maximum(cnt - 1, 0))
        pick = (np.cumsum(self.mask, 1) > k[:, None]).argmax(1)
        return np.where(cnt > 0, pick, 0)

    @property
    def success_rate(self) -> float:
        """Success rate over the last (up to) 100 finished episodes (nan before the first)."""
        return float(np.mean(self.recent)) if self.recent else float("nan")

    # -- checkpoint state ----------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly: episodes, curriculum, counters, task queue, RNG."""
        return {
            "cell": self.cell.copy(), "target": self.target.copy(), "start": self.start.copy(), "t": self.t.copy(),
            "limit": self.limit.copy(), "ret": self.ret.copy(), "task_id": self.task_id.copy(),
            "path": self.path.copy(), "phase": self.phase, "phase_start_step": self.phase_start_step,
            "total_steps": self.total_steps, "episodes": self.episodes, "successes": self.successes,
            "window": list(self.window), "recent": list(self.recent), "tasks": self.tasks.copy(),
            "task_ptr": self.task_ptr,
            "rng": self.rng.bit_generator.state,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_state` output."""
        if len(state["cell"]) != self.n:
            raise InputError(f"checkpoint holds {len(state['cell'])} envs, this env has {self.n}",
                             field="train.n_envs", fix="resume with the same n_envs")
        for k in ("cell", "target", "start", "t", "limit", "ret", "task_id"):
            setattr(self, k, np.array(state[k], dtype=getattr(self, k).dtype))
        self.path = np.array(state["path"], np.int64).reshape(self.n, -1)
        self.phase = int(state["phase"])
        self.phase_start_step = int(state["phase_start_step"])
        self.total_steps = int(state["total_steps"])
        self.episodes = int(state["episodes"])
        self.successes = int(state["successes"])
        self.window = deque(state["window"], maxlen=self.params.curriculum.window)
        self.recent = deque(state["recent"], maxlen=100)
        self.tasks = np.array(state["tasks"], np.int64).reshape(-1, 2)
        self.task_ptr = int(state["task_ptr"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.mask = self.masks_of()


def _obs_space(geo: TaskGeometry, n_actions: int) -> spaces.Dict:
    """Dict space; the Box bounds enclose every cell's and centroid's z-scores (finite, as checkers prefer)."""
    lo = float(np.floor(min(geo.z.min(), geo.centroids.min()))) - 1.0
    hi = float(np.ceil(max(geo.z.max(), geo.centroids.max()))) + 1.0
    g = geo.n_genes
    return spaces.Dict({
        "current_expression": spaces.Box(lo, hi, (g,), np.float32),
        "target_expression": spaces.Box(lo, hi, (g,), np.float32),
        "action_mask": spaces.MultiBinary(n_actions),
    })


def _as_geometry(model: OracleModel | TaskGeometry, params: EnvParams) -> TaskGeometry:
    if isinstance(model, TaskGeometry):
        return model
    return TaskGeometry.from_model(model, params.goal_percentile, params.centroid_percentile)


# ---------------------------------------------------------------------------------------------- VecEnv
class VecReprogrammingEnv(VecEnv):
    """N reprogramming episodes stepped together with array operations (an SB3 ``VecEnv``).

    Args:
        model: an :class:`~cellrl.model.OracleModel` or a precomputed :class:`~cellrl.tasks.TaskGeometry`
            (share one geometry between envs to save memory and time).
        table: (cells, actions) int32 transition table.
        n_envs: number of parallel episodes N.
        env_cfg: the ``env`` config section (dict) or :class:`EnvParams`.
        split: start cells come from this split ("train" for training, "val"/"test" for evaluation).
        training: mask actions that lead into non-training cells, use the curriculum (if enabled).
        curriculum: force the curriculum on/off (default: ``env_cfg.curriculum.enabled`` when training).
        max_steps: fixed step limit (default: the curriculum's, or the final phase's when not training).
        seed: RNG seed of task sampling (``seed()`` re-seeds at the next ``reset()``).
    """

    def __init__(self, model: OracleModel | TaskGeometry, table: np.ndarray, n_envs: int,
                 env_cfg: Mapping[str, Any] | EnvParams | None = None, split: str = "train",
                 training: bool = True, curriculum: bool | None = None, max_steps: int | None = None,
                 seed: int | None = None):
        params = EnvParams.from_config(env_cfg)
        self.geometry = _as_geometry(model, params)
        self.params = params
        self.batch = EpisodeBatch(self.geometry, table, n_envs, params, split=split, training=training,
                                  curriculum=curriculum, max_steps=max_steps, seed=seed)
        self._init_vec(_obs_space(self.geometry, self.batch.n_actions), seed)

    def _init_vec(self, space: spaces.Dict, seed: int | None) -> None:
        """The VecEnv side once ``self.batch`` exists: spaces, and two observation buffers of ``space``'s keys used
        in turn (``_buf_target`` records which target each buffer row shows)."""
        n = self.batch.n
        self.render_mode = None
        VecEnv.__init__(self, n, space, spaces.Discrete(self.batch.n_actions))
        self._bufs = [{k: np.zeros((n, *sp.shape), np.int8 if k == "action_mask" else np.float32)
                       for k, sp in space.spaces.items()} for _ in range(2)]
        self._buf_target = [np.full(n, -1, np.int64) for _ in range(2)]
        self._which = 0
        self._actions: np.ndarray | None = None
        self._pending_seed: int | None = seed

    # -- SB3 VecEnv API -----------------------------------------------------------------------------------
    def reset(self) -> dict[str, np.ndarray]:
        """Start N new episodes (applies a seed given to ``seed()``); return the observation."""
        if self._pending_seed is not None:
            self.batch.rng = np.random.default_rng(self._pending_seed)
            self._pending_seed = None
        self._reset_seeds()
        self.batch.reset_envs(np.arange(self.num_envs))
        buf = self._next_buffer()
        self._fill(buf, None)
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return buf

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seed task sampling; takes effect at the next ``reset()`` (like SB3's VecEnvs)."""
        self._pending_seed = seed
        return [seed] * self.num_envs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        """One step of all N episodes; finished ones are reset (their last observation in the info)."""
        b = self.batch
        reward, success, truncated, invalid = b.step(self._actions)
        done = success | truncated
        buf = self._next_buffer()
        self._fill(buf, None)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if done.any():
            idx = np.flatnonzero(done)
            term = {k: v[idx] for k, v in buf.items()}          # one copy per key for all finished envs
            succ = success[idx]
            b.record_outcomes(succ)
            for j, i in enumerate(idx.tolist()):
                infos[i] = {
                    "terminal_observation": {k: v[j] for k, v in term.items()},
                    "TimeLimit.truncated": bool(truncated[i]),
                    "is_success": bool(succ[j]),
                    "episode": {"r": float(b.ret[i]), "l": int(b.t[i]), "t": 0.0},
                    "start_cell": int(b.start[i]), "target_type": int(b.target[i]),
                    "final_cell": int(b.cell[i]), "task_id": int(b.task_id[i]),
                }
            b.reset_envs(idx)
            self._fill(buf, idx)
        if invalid.any():
            for i in np.flatnonzero(invalid).tolist():
                infos[i]["invalid_action"] = True
        return buf, reward.astype(np.float32), done, infos

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        n = len(list(self._get_indices(indices)))
        return [getattr(self, attr_name)] * n

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        idx = list(self._get_indices(indices))
        if method_name == "action_masks":
            m = self.action_masks()
            return [m[i] for i in idx]
        res = getattr(self, method_name)(*method_args, **method_kwargs)
        return [res] * len(idx)

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False] * len(list(self._get_indices(indices)))

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

    # -- cellrl API -----------------------------------------------------------------------------------------
    def action_masks(self) -> np.ndarray:
        """(N, A) bool: allowed actions of every env's current cell (a view, valid until the next step)."""
        return self._bufs[self._which]["action_mask"].view(bool)

    def current_obs(self) -> dict[str, np.ndarray]:
        """The latest observation (rebuilt from the episode state, e.g. after ``set_state``)."""
        buf = self._bufs[self._which]
        self._buf_target[self._which][:] = -1
        self._fill(buf, None)
        return buf

    def sample_masked_actions(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """A uniformly random allowed action per env (see :meth:`EpisodeBatch.sample_masked_actions`)."""
        return self.batch.sample_masked_actions(rng)

    def set_tasks(self, starts: np.ndarray, targets: np.ndarray) -> None:
        """Queue fixed (start cell, target type) tasks for the coming resets (see ``info["task_id"]``)."""
        self.batch.set_tasks(starts, targets)

    def get_state(self) -> dict[str, Any]:
        """Checkpoint state (episodes, curriculum, RNG; the observation is rebuilt from it)."""
        return {"batch": self.batch.get_state(), "pending_seed": self._pending_seed}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_state` output."""
        self.batch.set_state(state["batch"])
        self._pending_seed = state.get("pending_seed")
        self.current_obs()

    @property
    def phase(self) -> int:
        """Current (0-based) curriculum phase."""
        return self.batch.phase

    @property
    def success_rate(self) -> float:
        """Success rate of the last 100 finished episodes."""
        return self.batch.success_rate

    # -- internals -------------------------------------------------------------------------------------------
    def _next_buffer(self) -> dict[str, np.ndarray]:
        self._which ^= 1
        return self._bufs[self._which]

    def _fill(self, buf: dict[str, np.ndarray], idx: np.ndarray | None) -> None:
        """Write the observation of envs ``idx`` (all when None) into ``buf``."""
        b, geo = self.batch, self.geometry
        bt = self._buf_target[self._which]
        if idx is None:
            np.take(geo.z, b.cell, axis=0, out=buf["current_expression"])
            buf["action_mask"][:] = b.mask.view(np.int8)
            stale = np.flatnonzero(bt != b.target)
        else:
            buf["current_expression"][idx] = geo.z[b.cell[idx]]
            buf["action_mask"][idx] = b.mask[idx].view(np.int8)
            stale = idx
        if len(stale):
            buf["target_expression"][stale] = geo.centroids[b.target[stale]]
            bt[stale] = b.target[stale]


# ---------------------------------------------------------------------------------------------- gymnasium env
class ReprogrammingEnv(gym.Env):
    """One reprogramming episode as a ``gymnasium.Env`` (same core as :class:`VecReprogrammingEnv`).

    ``reset(seed=..., options={"start_cell": c, "target_type": t})``: ``target_type`` may be an index or a
    type name; without options the task is sampled (curriculum included when training).
    """

    metadata = {"render_modes": []}

    def __init__(self, model: OracleModel | TaskGeometry, table: np.ndarray,
                 env_cfg: Mapping[str, Any] | EnvParams | None = None, split: str = "train",
                 training: bool = True, curriculum: bool | None = None, max_steps: int | None = None,
                 render_mode: str | None = None):
        params = EnvParams.from_config(env_cfg)
        self.geometry = _as_geometry(model, params)
        self.params = params
        self.batch = EpisodeBatch(self.geometry, table, 1, params, split=split, training=training,
                                  curriculum=curriculum, max_steps=max_steps, seed=None)
        self.observation_space = _obs_space(self.geometry, self.batch.n_actions)
        self.action_space = spaces.Discrete(self.batch.n_actions)
        self.render_mode = render_mode

    def _obs(self) -> dict[str, np.ndarray]:
        c, t = int(self.batch.cell[0]), int(self.batch.target[0])
        return {"current_expression": self.geometry.z[c].copy(),
                "target_expression": self.geometry.centroids[t].copy(),
                "action_mask": self.batch.mask[0].view(np.int8).copy()}

    def _info(self) -> dict[str, Any]:
        b = self.batch
        return {"cell": int(b.cell[0]), "target_type": int(b.target[0]), "start_cell": int(b.start[0]),
                "phase": b.phase}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        b = self.batch
        if seed is not None:
            b.rng = np.random.default_rng(seed)
        if options and "start_cell" in options:
            tgt = options["target_type"]
            if isinstance(tgt, str):
                tgt = self.geometry.type_index(tgt)
            b.set_tasks(np.array([options["start_cell"]]), np.array([tgt]))
        b.reset_envs(np.array([0]))
        return self._obs(), self._info()

    def step(self, action):
        b = self.batch
        reward, success, truncated, invalid = b.step(np.array([int(action)]))
        done = bool(success[0] or truncated[0])
        info = self._info()
        if invalid[0]:
            info["invalid_action"] = True
        if done:
            b.record_outcomes(success)
            info["is_success"] = bool(success[0])
        return self._obs(), float(reward[0]), bool(success[0]), bool(truncated[0]), info

    def action_masks(self) -> np.ndarray:
        """(A,) bool: allowed actions in the current cell (MaskablePPO's ``ActionMasker`` protocol)."""
        return self.batch.mask[0].copy()


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="cellrl.env:ReprogrammingEnv")
