"""Persistent-perturbation environment: the state is (cell, applied set); every perturbation stays applied.

``env.perturbation_model: persistent``. Same tasks, goal, reward, curriculum and front-ends as
:mod:`cellrl.env` (the array core is :class:`cellrl.env.EpisodeBatch`, whose task, curriculum and reward code
is reused), but the next cell is not a table lookup: the engine (:mod:`cellrl.persistent.engine`) simulates the
WHOLE applied set from the current cell, for all N episodes in one batched call. Actions:

* ``0..R-1`` knock out regulator r, ``R..2R-1`` overexpress it: the gene joins the set (KO clamps it to 0, OE to
  CellOracle's value), then the whole set is simulated from the current cell;
* ``2R`` (HOLD, :func:`hold_action`): add nothing, simulate the current set again from the current cell (the set stays
  applied while the cell moves on). Without it every step would have to add a gene, and since one simulated
  step moves a cell about one neighbourhood in the embedding, reaching another type would need as many genes
  as steps (on the demo ~7): a recipe is a small set held for several steps.

Masks (decided here, and why):

* an action on a gene already in the set (KO or OE) is masked (``engine.action_mask``), and so is every gene
  once the set holds ``env.max_set_size`` genes: no plan repeats a gene;
* HOLD is masked with an empty set and when its next cell was already visited since the set last changed
  (that includes a stagnation, next cell == current cell): holding is deterministic, so that would be a loop.
  Its next cell is computed for every env after each step (one extra batched engine call of N rows);
* stagnations of gene actions are allowed: the set changed, so it is a new state. Masking them would take A
  engine calls per step (a look-ahead over every action) instead of one;
* leakage (training only): no training episode enters a validation/test cell. A move (gene action or HOLD)
  whose next cell is held out enters that cell's training proxy instead, its nearest training cell of the same
  goal status (:func:`training_proxy`): the perturbation keeps its effect and the agent never sees a held-out
  cell. Refusing such moves (the previous rule) hid every recipe whose simulated cell is held out: the demo's
  planted ProgB -> ProgA set lands 99% of its ProgB training cells on one test cell, so the agent never learnt it.

Observation: the table env's (``current_expression``, ``target_expression``, ``action_mask``) plus
``applied`` (R,) float32: -1 knocked out, +1 overexpressed, 0 not in the set (regulator order of the engine).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import gymnasium as gym
import numpy as np
from gymnasium import spaces

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


def hold_action(engine: Engine) -> int:
    """Index of the HOLD action (after the engine's 2R perturbations)."""
    return int(engine.n_actions)


def set_sizes(applied: np.ndarray) -> np.ndarray:
    """(N,) number of genes in each applied set."""
    return np.count_nonzero(np.asarray(applied), axis=1)


def training_proxy(geo: TaskGeometry) -> np.ndarray:
    """(C,) int64 the cell a training move that lands on cell c enters: c itself for a training cell, else the
    nearest training cell that is a goal cell of the same target types as c (``goal_mask``; the nearest of all
    when none is), in the z-scored expression space the agent observes (Euclidean, exact; first index on ties).
    Same goal status: a move ends an episode in training exactly when it would at test time. Used by the
    training env and the exact warm start's plans (module docstring: leakage). Computed once per geometry and
    kept on it (the env, the warm start's search, replay and DAgger all ask; ~10 s at 30,000 cells x 3,000 genes)."""
    from ..transitions.next_cell import NearestCell

    cached = geo.__dict__.get("_training_proxy")
    if cached is not None:
        return cached
    is_train = geo.in_split("train")
    proxy = np.arange(len(is_train), dtype=np.int64)
    goal = np.asarray(geo.goal_mask, bool).T                     # (C, T) goal membership of every cell
    _, kind = np.unique(goal, axis=0, return_inverse=True)
    kind = kind.reshape(-1)
    for k in np.unique(kind[~is_train]):
        out = np.flatnonzero(~is_train & (kind == k))
        train = np.flatnonzero(is_train & (kind == k))
        train = train if len(train) else np.flatnonzero(is_train)
        proxy[out] = train[NearestCell(geo.z[train])(geo.z[out])]
    geo.__dict__["_training_proxy"] = proxy
    return proxy


def simulate(engine: Engine, cells: np.ndarray, applied: np.ndarray, chunk: int = 32_768) -> np.ndarray:
    """(N,) next cells of (cell, set) rows through ``engine.step`` in chunks of ``chunk`` rows."""
    cells = np.asarray(cells, np.int64)
    out = np.empty(len(cells), np.int64)
    for s in range(0, len(cells), chunk):
        out[s:s + chunk] = np.asarray(engine.step(cells[s:s + chunk], applied[s:s + chunk]), np.int64)
    return out


def successors(engine: Engine, cells: np.ndarray, applied: np.ndarray, max_set_size: int,
               chunk: int = 32_768) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every move of every state (the env's rules, module docstring): (parent index, action, new set, next
    cell). Gene actions for sets below ``max_set_size`` (stagnations included); HOLD for non-empty sets unless
    it stagnates. The searches of :mod:`cellrl.persistent.search` expand states with it."""
    applied = np.asarray(applied, np.int8)
    cells = np.asarray(cells, np.int64)
    size = set_sizes(applied)
    m = np.asarray(engine.action_mask(applied), bool) & (size < int(max_set_size))[:, None]
    p, a = np.nonzero(m)
    new = np.asarray(engine.apply(applied[p], a), np.int8) if len(p) else np.zeros((0, applied.shape[1]), np.int8)
    nxt = simulate(engine, cells[p], new, chunk)
    hp = np.flatnonzero(size > 0)
    hn = simulate(engine, cells[hp], applied[hp], chunk)
    moves = hn != cells[hp]
    hp, hn = hp[moves], hn[moves]
    parent = np.concatenate([p, hp]).astype(np.int64)
    action = np.concatenate([a, np.full(len(hp), hold_action(engine))]).astype(np.int64)
    return parent, action, np.concatenate([new, applied[hp]]), np.concatenate([nxt, hn])


# ---------------------------------------------------------------------------------------------- array core
class PersistentBatch(EpisodeBatch):
    """N persistent-mode episodes stepped with array operations (see the module docstring).

    Extra state (length N): ``applied`` (N, R) int8 the applied sets, ``set_since`` the step at which the set
    last changed, ``plan`` (N, max limit) the actions in order (HOLD included; -1 for invalid actions and beyond
    ``t``). Derived (rebuilt with ``mask``): ``hold_next`` (N,) the next cell of HOLD. ``path`` as in
    :class:`EpisodeBatch`.
    """

    def __init__(self, geometry: TaskGeometry, engine: Engine, n: int, params: EnvParams,
                 split: str = "train", training: bool = True, curriculum: bool | None = None,
                 max_steps: int | None = None, seed: int | None = None):
        check_engine(engine, geometry)
        if int(params.max_set_size) < 1:
            raise InputError(f"env.max_set_size must be >= 1, got {params.max_set_size}", field="env.max_set_size")
        self.engine = engine
        self.hold = hold_action(engine)
        self.max_set_size = int(params.max_set_size)
        self.mask_revisits = False                 # HOLD has its own loop rule; gene actions change the state
        # training: every move enters the training proxy of its next cell (module docstring: leakage)
        self.proxy = training_proxy(geometry) if training else None
        self.applied = np.zeros((n, engine.n_regulators), np.int8)
        self.set_since = np.zeros(n, np.int64)
        self.hold_next = np.zeros(n, np.int64)
        self._init_episodes(geometry, self.hold + 1, np.ones(geometry.n_cells, bool), n, params, split,
                            training, curriculum, max_steps, seed)
        self.plan = np.full((n, self.max_steps), -1, np.int64)

    def reset_envs(self, idx: np.ndarray) -> None:
        """Start new episodes in envs ``idx`` with empty sets."""
        if len(idx) == 0:
            return
        self.applied[idx] = 0
        self.set_since[idx] = 0
        if self.plan.shape[1] < self.max_steps:
            self.plan = np.concatenate([self.plan, np.full((self.n, self.max_steps - self.plan.shape[1]), -1,
                                                           np.int64)], 1)
        self.plan[idx] = -1
        super().reset_envs(idx)

    def masks_of(self, idx: np.ndarray | None = None) -> np.ndarray:
        """(k, A + 1) bool allowed actions of envs ``idx`` (all when None); recomputes their ``hold_next``."""
        sel = np.arange(self.n) if idx is None else np.asarray(idx, np.int64)
        ap, cells = self.applied[sel], self.cell[sel]
        size = set_sizes(ap)
        genes = np.asarray(self.engine.action_mask(ap), bool) & (size < self.max_set_size)[:, None]
        hn = cells.copy()
        h = np.flatnonzero(size > 0)
        if len(h):
            hn[h] = simulate(self.engine, cells[h], ap[h])
        if self.proxy is not None:
            hn = self.proxy[hn]
        self.hold_next[sel] = hn
        # HOLD's next cell must not be one visited since the set last changed (current cell included)
        cols = np.arange(self.path.shape[1])
        run = (cols >= self.set_since[sel][:, None]) & (cols <= self.t[sel][:, None])
        hold = (size > 0) & ~((self.path[sel] == hn[:, None]) & run).any(1)
        return np.concatenate([genes, hold[:, None]], 1)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Apply ``actions`` (N,): gene actions join the set and the set is simulated from the current cell (one
        batched engine call; in training, the next cell's training proxy); HOLD moves to ``hold_next``. Returns
        (reward, success, truncated, invalid). Invalid (masked) actions leave cell and set unchanged."""
        a = np.asarray(actions, dtype=np.int64).reshape(self.n)
        if a.min() < 0 or a.max() >= self.n_actions:
            raise InputError(f"actions must lie in [0, {self.n_actions}); got {a.min()}..{a.max()}",
                             field="action")
        rows = np.arange(self.n)
        cur = self.cell
        ok = self.mask[rows, a]
        is_gene = ok & (a != self.hold)
        nxt = np.where(ok & (a == self.hold), self.hold_next, cur)
        new = self.applied.copy()
        k = np.flatnonzero(is_gene)
        if len(k):
            new[k] = self.engine.apply(self.applied[k], a[k])
            nxt[k] = simulate(self.engine, cur[k], new[k])
            if self.proxy is not None:
                nxt[k] = self.proxy[nxt[k]]
        self.applied = np.where(ok[:, None], new, self.applied)
        self.set_since = np.where(is_gene, self.t + 1, self.set_since)
        self.plan[rows, np.minimum(self.t, self.plan.shape[1] - 1)] = np.where(ok, a, -1)
        return self._advance(cur, nxt, ok)

    def applied_obs(self, idx: np.ndarray | None = None) -> np.ndarray:
        """(k, R) float32 observation of the applied sets of envs ``idx`` (all when None)."""
        return applied_obs(self.applied if idx is None else self.applied[idx])

    def get_state(self) -> dict[str, Any]:
        """:meth:`EpisodeBatch.get_state` plus the applied sets and plans."""
        return {**super().get_state(), "applied": self.applied.copy(), "set_since": self.set_since.copy(),
                "plan": self.plan.copy()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_state` output."""
        n = len(state["cell"])
        self.applied = np.array(state["applied"], np.int8).reshape(n, -1)
        self.set_since = np.array(state["set_since"], np.int64).reshape(n)
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
        self._init_vec(persistent_obs_space(self.geometry, self.batch.n_actions, int(engine.n_regulators)), seed)

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
