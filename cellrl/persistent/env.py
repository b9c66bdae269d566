"""Persistent-perturbation environment: the state is (cell, applied set); every perturbation stays applied.

``env.perturbation_model: persistent``. Same tasks, goal, reward, curriculum and front-ends as
:mod:`cellrl.env` (the array core is :class:`cellrl.env.EpisodeBatch`, whose task, curriculum and reward code
is reused), but the next cell is not a table lookup: each step adds the action's gene to the episode's
applied set (KO clamps it to 0, OE to CellOracle's value) and the engine (:mod:`cellrl.persistent.engine`)
simulates the WHOLE set from the current cell, for all N episodes in one batched call.

Masks (decided here, and why):

* an action on a gene already in the set (KO or OE) is masked (``engine.action_mask``): no plan repeats a gene,
  so the set grows every step, the state never repeats and no revisit mask is needed;
* stagnations (next cell == current cell) are allowed: the set changed, so it is a new state. Masking them
  would take A engine calls per step (a look-ahead over every action) instead of one;
* leakage (training only): a move whose next cell is a validation/test cell is *refused*: the cell and the
  set stay as they were, the step costs the step penalty, and that action is masked until the state changes.
  The table env masks such moves in advance; here that would again take A engine calls per step, while a
  refusal needs none and still guarantees that no training episode enters a held-out cell.

Observation: the table env's (``current_expression``, ``target_expression``, ``action_mask``) plus
``applied`` (R,) float32: -1 knocked out, +1 overexpressed, 0 not in the set (regulator order of the engine).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv

from ..env import EnvParams, EpisodeBatch, ReprogrammingEnv, VecReprogrammingEnv, _as_geometry, _obs_space
from ..errors import InputError
from ..model import OracleModel
from ..tasks import TaskGeometry

PERSISTENT_ENV_ID = "cellrl/PersistentReprogramming-v0"


class Engine(Protocol):
    """What the environment and the searches need from :class:`cellrl.persistent.engine.PersistentEngine`."""

    n_cells: int
    n_regulators: int
    n_actions: int

    def apply(self, applied: np.ndarray, actions: np.ndarray) -> np.ndarray: ...
    def action_mask(self, applied: np.ndarray) -> np.ndarray: ...
    def step(self, cells: np.ndarray, applied: np.ndarray) -> np.ndarray: ...


def applied_obs(applied: np.ndarray) -> np.ndarray:
    """(N, R) int8 applied sets (0 none, 1 KO, 2 OE) -> float32 observation (-1 KO, +1 OE, 0 none)."""
    a = np.asarray(applied)
    return ((a == 2).astype(np.float32) - (a == 1).astype(np.float32))


def set_labels(applied_row: np.ndarray, regulators: np.ndarray) -> list[str]:
    """``["KO:g", "OE:h", ...]`` of one applied set (regulator order)."""
    r = np.flatnonzero(applied_row)
    return [f"{'KO' if applied_row[i] == 1 else 'OE'}:{regulators[i]}" for i in r]


def check_engine(engine: Engine, geometry: TaskGeometry) -> None:
    """Raise InputError when the engine and the task geometry describe different cells or actions."""
    if int(engine.n_cells) != geometry.n_cells:
        raise InputError(f"the persistent engine has {engine.n_cells} cells, the model {geometry.n_cells}",
                         field="env.perturbation_model", fix="build the engine from the same model.npz")
    if int(engine.n_actions) != 2 * int(engine.n_regulators):
        raise InputError(f"engine actions {engine.n_actions} != 2 x {engine.n_regulators} regulators",
                         field="env.perturbation_model")


# ---------------------------------------------------------------------------------------------- array core
class PersistentBatch(EpisodeBatch):
    """N persistent-mode episodes stepped with array operations (see the module docstring).

    Extra state (length N): ``applied`` (N, R) int8 the applied sets, ``refused`` (N, A) bool actions refused
    in the current state (training leakage), ``plan`` (N, max limit) the actions in the order they were
    applied (-1 for refused moves and beyond ``t``). ``path`` and ``mask`` as in :class:`EpisodeBatch`.
    """

    def __init__(self, geometry: TaskGeometry, engine: Engine, n: int, params: EnvParams,
                 split: str = "train", training: bool = True, curriculum: bool | None = None,
                 max_steps: int | None = None, seed: int | None = None):
        check_engine(engine, geometry)
        self.engine = engine
        self.mask_revisits = False                 # the set grows every step: states never repeat
        self.is_train = np.asarray(geometry.split).astype(str) == "train"
        self.applied = np.zeros((n, engine.n_regulators), np.int8)
        self.refused = np.zeros((n, engine.n_actions), bool)
        self._init_episodes(geometry, int(engine.n_actions), np.ones(geometry.n_cells, bool), n, params, split,
                            training, curriculum, max_steps, seed)
        self.plan = np.full((n, self.max_steps), -1, np.int64)

    def reset_envs(self, idx: np.ndarray) -> None:
        """Start new episodes in envs ``idx`` with empty sets."""
        if len(idx) == 0:
            return
        self.applied[idx] = 0
        self.refused[idx] = False
        if self.plan.shape[1] < self.max_steps:
            self.plan = np.concatenate([self.plan, np.full((self.n, self.max_steps - self.plan.shape[1]), -1,
                                                           np.int64)], 1)
        self.plan[idx] = -1
        super().reset_envs(idx)

    def masks_of(self, idx: np.ndarray | None = None) -> np.ndarray:
        """(k, A) bool: actions on genes outside the set, less this state's refused moves."""
        sel = slice(None) if idx is None else idx
        return np.asarray(self.engine.action_mask(self.applied[sel]), bool) & ~self.refused[sel]

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Apply ``actions`` (N,): add each gene to its set, simulate the set from the current cell (one
        batched engine call); return (reward, success, truncated, invalid). Invalid (masked) actions and
        refused moves leave cell and set unchanged."""
        a = np.asarray(actions, dtype=np.int64).reshape(self.n)
        if a.min() < 0 or a.max() >= self.n_actions:
            raise InputError(f"actions must lie in [0, {self.n_actions}); got {a.min()}..{a.max()}",
                             field="action")
        rows = np.arange(self.n)
        cur = self.cell
        ok = self.mask[rows, a]
        nxt = cur.copy()
        new = self.applied.copy()
        k = np.flatnonzero(ok)
        if len(k):
            new[k] = self.engine.apply(self.applied[k], a[k])
            nxt[k] = np.asarray(self.engine.step(cur[k], new[k]), np.int64)
        moved = ok.copy()
        if self.training:                          # refuse moves into held-out cells (module docstring)
            leak = ok & ~self.is_train[nxt]
            self.refused[rows[leak], a[leak]] = True
            moved &= ~leak
        nxt = np.where(moved, nxt, cur)
        self.applied = np.where(moved[:, None], new, self.applied)
        self.refused[moved] = False
        tg = self.target
        success = self.goal_mask[tg, nxt]
        reward = self.reward(self.params, self.cos_sim[cur, tg], self.cos_sim[nxt, tg], success)
        self.plan[rows, np.minimum(self.t, self.plan.shape[1] - 1)] = np.where(moved, a, -1)
        self.cell = nxt
        self.t += 1
        self.ret += reward
        self.path[rows, np.minimum(self.t, self.path.shape[1] - 1)] = nxt
        self.mask = self.masks_of()
        truncated = ~success & ((self.t >= self.limit) | ~self.mask.any(1))
        self.total_steps += self.n
        return reward, success, truncated, ~ok

    def applied_obs(self, idx: np.ndarray | None = None) -> np.ndarray:
        """(k, R) float32 observation of the applied sets of envs ``idx`` (all when None)."""
        return applied_obs(self.applied if idx is None else self.applied[idx])

    def get_state(self) -> dict[str, Any]:
        """:meth:`EpisodeBatch.get_state` plus the applied sets, refused moves and plans."""
        return {**super().get_state(), "applied": self.applied.copy(), "refused": self.refused.copy(),
                "plan": self.plan.copy()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_state` output."""
        n = len(state["cell"])
        self.applied = np.array(state["applied"], np.int8).reshape(n, -1)
        self.refused = np.array(state["refused"], bool).reshape(n, -1)
        self.plan = np.array(state["plan"], np.int64).reshape(n, -1)
        super().set_state(state)


def persistent_obs_space(geo: TaskGeometry, n_actions: int, n_regulators: int) -> spaces.Dict:
    """The table env's observation space plus ``applied`` (R,) in [-1, 1]."""
    space = _obs_space(geo, n_actions)
    return spaces.Dict({**space.spaces, "applied": spaces.Box(-1.0, 1.0, (n_regulators,), np.float32)})


# ---------------------------------------------------------------------------------------------- VecEnv
class VecPersistentEnv(VecReprogrammingEnv):
    """N persistent-mode episodes as an SB3 ``VecEnv`` (same API as :class:`cellrl.env.VecReprogrammingEnv`,
    whose stepping, auto-reset and buffers it reuses); ``engine`` replaces the table."""

    def __init__(self, model: OracleModel | TaskGeometry, engine: Engine, n_envs: int,
                 env_cfg: Mapping[str, Any] | EnvParams | None = None, split: str = "train",
                 training: bool = True, curriculum: bool | None = None, max_steps: int | None = None,
                 seed: int | None = None):
        params = EnvParams.from_config(env_cfg)
        self.geometry = _as_geometry(model, params)
        self.params = params
        self.engine = engine
        self.batch = PersistentBatch(self.geometry, engine, n_envs, params, split=split, training=training,
                                     curriculum=curriculum, max_steps=max_steps, seed=seed)
        space = persistent_obs_space(self.geometry, self.batch.n_actions, int(engine.n_regulators))
        self.render_mode = None
        VecEnv.__init__(self, n_envs, space, spaces.Discrete(self.batch.n_actions))
        self._bufs = [{k: np.zeros((n_envs, *s.shape), np.int8 if k == "action_mask" else np.float32)
                       for k, s in space.spaces.items()} for _ in range(2)]
        self._buf_target = [np.full(n_envs, -1, np.int64) for _ in range(2)]
        self._which = 0
        self._actions: np.ndarray | None = None
        self._pending_seed: int | None = seed

    def _fill(self, buf: dict[str, np.ndarray], idx: np.ndarray | None) -> None:
        super()._fill(buf, idx)
        if idx is None:
            buf["applied"][:] = self.batch.applied_obs()
        else:
            buf["applied"][idx] = self.batch.applied_obs(idx)


# ---------------------------------------------------------------------------------------------- gymnasium env
class PersistentReprogrammingEnv(ReprogrammingEnv):
    """One persistent-mode episode as a ``gymnasium.Env`` (``reset`` options as in
    :class:`cellrl.env.ReprogrammingEnv`); the info also holds ``plan`` (actions applied, in order)."""

    def __init__(self, model: OracleModel | TaskGeometry, engine: Engine,
                 env_cfg: Mapping[str, Any] | EnvParams | None = None, split: str = "train",
                 training: bool = True, curriculum: bool | None = None, max_steps: int | None = None,
                 render_mode: str | None = None):
        params = EnvParams.from_config(env_cfg)
        self.geometry = _as_geometry(model, params)
        self.params = params
        self.engine = engine
        self.batch = PersistentBatch(self.geometry, engine, 1, params, split=split, training=training,
                                     curriculum=curriculum, max_steps=max_steps, seed=None)
        self.observation_space = persistent_obs_space(self.geometry, self.batch.n_actions,
                                                      int(engine.n_regulators))
        self.action_space = spaces.Discrete(self.batch.n_actions)
        self.render_mode = render_mode

    def _obs(self) -> dict[str, np.ndarray]:
        return {**super()._obs(), "applied": self.batch.applied_obs()[0]}

    def _info(self) -> dict[str, Any]:
        b = self.batch
        plan = b.plan[0, :int(b.t[0])]
        return {**super()._info(), "plan": plan[plan >= 0].tolist()}


if PERSISTENT_ENV_ID not in gym.registry:
    gym.register(id=PERSISTENT_ENV_ID, entry_point="cellrl.persistent.env:PersistentReprogrammingEnv")
