"""Run state, checkpoints and resume of a training run, without pickles.

A checkpoint is two files in ``<run>/checkpoints/``, written atomically at a rollout boundary (after the PPO
update, before the next rollout), where the whole training state is:

* ``ckpt_<step>.pt``: policy and optimizer state dicts and torch's RNG states, read back with
  ``torch.load(weights_only=True)`` (tensors and plain containers only; no code runs on load);
* ``ckpt_<step>.json``: everything else as JSON: the environment's episodes, curriculum and RNG, SB3's
  counters and episode buffers, the python/numpy RNGs, the run's counters and every progress row so far. It
  also records the run fingerprint, the sha256 of the ``.pt`` file and of its own state, and is written last,
  so a checkpoint counts only once both files are complete.

A checkpoint belongs to one run :func:`fingerprint`: the training stage's code version, library versions,
the table, the model's scaler and centroids, and every train and env setting. One with another fingerprint
is never resumed: it is moved to ``checkpoints/set_aside/<fingerprint>/`` with a log line. A checkpoint that
fails its checksums is discarded with a warning and the previous one is tried.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
from collections import deque
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch as th
from sb3_contrib import MaskablePPO

from .env import EnvParams, VecReprogrammingEnv
from .io import atomic_path, sha256_file
from .provenance import code_version
from .tasks import TaskGeometry

log = logging.getLogger("cellrl.checkpoints")

PROGRESS_FIELDS = ["timesteps", "wall_s", "steps_per_s", "phase", "n_targets", "max_steps", "train_success",
                   "ep_reward_mean", "ep_len_mean", "val_success", "val_mean_length", "episodes"]
#: Settings that change neither the weights nor the progress rows: tracking and checkpoint retention.
NOT_FINGERPRINTED = ("wandb", "keep_checkpoints")
SET_ASIDE_KEPT = 2          # sets of set-aside checkpoints kept (newest first)
_LIBRARIES = ("numpy", "torch", "gymnasium", "stable-baselines3", "sb3-contrib")


class RunState:
    """Counters and history of one training run, shared by the tracking callback and the checkpoints."""

    def __init__(self) -> None:
        self.last_logged = -1        # timesteps of the last progress row
        self.next_eval = 0
        self.next_ckpt = 0
        self.elapsed = 0.0           # wall seconds of previous segments (resumed runs)
        self.steps_at_start = 0
        self.t0 = time.perf_counter()
        self.last_val: dict[str, Any] = {}
        self.wandb_id: str | None = None
        self.warm_start: dict[str, Any] = {}    # what the warm start did (cellrl.warmstart), before step 0
        self.rows: list[dict[str, Any]] = []   # every progress row so far (progress.csv is rebuilt from these)

    def wall(self) -> float:
        return self.elapsed + time.perf_counter() - self.t0

    def rate(self, timesteps: int) -> float:
        """Steps per second of this process's segment of the run."""
        return (timesteps - self.steps_at_start) / max(1e-9, time.perf_counter() - self.t0)

    def to_dict(self) -> dict[str, Any]:
        return {"last_logged": self.last_logged, "next_eval": self.next_eval, "next_ckpt": self.next_ckpt,
                "elapsed": self.wall(), "last_val": self.last_val, "wandb_id": self.wandb_id,
                "warm_start": self.warm_start, "rows": self.rows}

    def load(self, d: Mapping[str, Any]) -> None:
        self.last_logged, self.next_eval, self.next_ckpt = d["last_logged"], d["next_eval"], d["next_ckpt"]
        self.elapsed, self.last_val, self.wandb_id = d["elapsed"], dict(d["last_val"]), d.get("wandb_id")
        self.rows = [dict(r) for r in d["rows"]]
        self.warm_start = dict(d.get("warm_start") or {})
        self.t0 = time.perf_counter()


def fingerprint(params: EnvParams, cfg: Mapping[str, Any], geo: TaskGeometry, table: np.ndarray,
                code: str | None = None) -> str:
    """Hash of everything that determines a run's weights and progress rows: the training stage's code
    version (``code``; default: :func:`cellrl.provenance.code_version` of this package), library versions,
    every env and train setting (except :data:`NOT_FINGERPRINTED`), the scaler, centroids and table."""
    h = hashlib.sha256()
    ident = {"code": code or code_version("train"), "env": dataclasses.asdict(params),
             "train": {k: v for k, v in cfg.items() if k not in NOT_FINGERPRINTED},
             "libraries": {name: _version(name) for name in _LIBRARIES}}
    h.update(json.dumps(ident, sort_keys=True, default=str).encode())
    for a in (geo.mean, geo.std, geo.centroids, table):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


# ---------------------------------------------------------------------------------------------- JSON state
def _plain(o: Any) -> Any:
    """JSON-ready copy: arrays and tuples become lists, numpy scalars Python numbers."""
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, deque)):
        return [_plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return o


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _global_rng() -> tuple[dict[str, Any], dict[str, th.Tensor]]:
    """(JSON part, tensor part) of the python, numpy and torch RNG states."""
    v, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": th.get_rng_state()}
    if th.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(th.cuda.get_rng_state_all())})
    return {"python": [v, list(mt), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}, tensors


def _set_global_rng(js: Mapping[str, Any], tensors: Mapping[str, th.Tensor]) -> None:
    v, mt, gauss = js["python"]
    random.setstate((v, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    th.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(th.cuda.device_count()) if f"cuda{i}" in tensors]
    if cuda and th.cuda.is_available():
        th.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------- save / load
def save_checkpoint(ckpt_dir: Path, agent: MaskablePPO, env: VecReprogrammingEnv, run_state: RunState,
                    fingerprint: str, keep: int = 2) -> Path:
    """Write ``ckpt_<step>.pt`` then ``ckpt_<step>.json`` (see the module docstring); keep the newest ``keep``."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ts = int(agent.num_timesteps)
    stem = ckpt_dir / f"ckpt_{ts:010d}"
    rng_js, rng_tensors = _global_rng()
    with atomic_path(stem.with_suffix(".pt")) as tmp:
        th.save({"policy": agent.policy.state_dict(), "optimizer": agent.policy.optimizer.state_dict(),
                 "rng": rng_tensors}, tmp)
    space_rng = getattr(agent.action_space, "_np_random", None)
    state = _plain({
        "timesteps": ts, "env": env.get_state(), "rng": rng_js, "run": run_state.to_dict(),
        "last_episode_starts": np.asarray(agent._last_episode_starts, dtype=bool),
        "episode_num": agent._episode_num, "n_updates": agent._n_updates,
        "ep_info_buffer": list(agent.ep_info_buffer or []), "ep_success_buffer": list(agent.ep_success_buffer or []),
        "action_space_rng": space_rng.bit_generator.state if space_rng is not None else None,
    })
    doc = {"fingerprint": fingerprint, "timesteps": ts, "weights_sha256": sha256_file(stem.with_suffix(".pt")),
           "state_sha256": _digest(state), "state": state}
    with atomic_path(stem.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(doc))
    for old in _checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        _remove(old)
    return stem.with_suffix(".json")


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """``ckpt_*.json`` files of a directory, oldest first."""
    return sorted(ckpt_dir.glob("ckpt_*.json"))


def _remove(json_path: Path) -> None:
    json_path.with_suffix(".pt").unlink(missing_ok=True)
    json_path.unlink(missing_ok=True)


def _read(json_path: Path) -> dict[str, Any]:
    """A checkpoint's JSON document, verified against its checksums (ValueError naming the file if not)."""
    try:
        doc = json.loads(json_path.read_text())
        state = doc["state"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{json_path}: unreadable checkpoint state ({type(e).__name__}: {e})") from e
    if _digest(state) != doc.get("state_sha256"):
        raise ValueError(f"{json_path}: checkpoint state does not match its sha256")
    pt = json_path.with_suffix(".pt")
    if not pt.exists() or sha256_file(pt) != doc.get("weights_sha256"):
        raise ValueError(f"{pt}: checkpoint weights missing or not matching their sha256")
    return doc


def resumable_checkpoint(out_dir: str | Path, fingerprint: str, resume: bool = True) -> dict[str, Any] | None:
    """The newest valid checkpoint of ``out_dir/checkpoints`` made under ``fingerprint``, or None.

    Checkpoints of other fingerprints (every checkpoint when not ``resume``) are set aside (``checkpoints/set_aside/<fingerprint>/``, the newest
    :data:`SET_ASIDE_KEPT` sets kept); corrupt ones are removed with a warning and the previous one is tried.
    """
    ckpt_dir = Path(out_dir) / "checkpoints"
    found = None
    for path in reversed(_checkpoints(ckpt_dir)):
        try:
            doc = _read(path)
        except ValueError as e:
            log.warning("discarding a corrupt checkpoint: %s; trying the previous one", e)
            _remove(path)
            continue
        if doc.get("fingerprint") != fingerprint or not resume:
            _set_aside(ckpt_dir, path, str(doc.get("fingerprint")), fingerprint, resume)
            continue
        if found is None:
            found = {"timesteps": int(doc["timesteps"]), "path": path, "doc": doc}
    return found


def _set_aside(ckpt_dir: Path, path: Path, other: str, this: str, resume: bool) -> None:
    dest = ckpt_dir / "set_aside" / (other or "unknown")
    dest.mkdir(parents=True, exist_ok=True)
    why = ("resume is off" if resume is False and other == this else
           f"made under other code, settings or inputs (fingerprint {other}, this run {this})")
    log.warning("checkpoint %s not resumed, %s: set aside in %s", path.name, why, dest)
    for p in (path.with_suffix(".pt"), path):
        if p.exists():
            p.replace(dest / p.name)
    sets = sorted((d for d in (ckpt_dir / "set_aside").iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
    for d in sets[:-SET_ASIDE_KEPT]:
        shutil.rmtree(d, ignore_errors=True)


def latest_checkpoint(out_dir: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint file of a run directory as ``{"timesteps", "path", "fingerprint"}`` (unverified)."""
    paths = _checkpoints(Path(out_dir) / "checkpoints")
    if not paths:
        return None
    doc = json.loads(paths[-1].read_text())
    return {"timesteps": int(doc["timesteps"]), "path": paths[-1], "fingerprint": doc.get("fingerprint")}


def restore(ckpt: Mapping[str, Any], agent: MaskablePPO, env: VecReprogrammingEnv, run_state: RunState) -> None:
    """Put a freshly built ``agent`` (same settings) and ``env`` in the state of ``ckpt`` (from
    :func:`resumable_checkpoint`). The global RNGs are restored last: nothing may draw after this."""
    state = ckpt["doc"]["state"]
    weights = th.load(Path(ckpt["path"]).with_suffix(".pt"), map_location=agent.device, weights_only=True)
    agent.policy.load_state_dict(weights["policy"])
    agent.policy.optimizer.load_state_dict(weights["optimizer"])
    agent.num_timesteps = int(state["timesteps"])
    env.set_state(state["env"])
    agent._last_obs = env.current_obs()
    agent._last_episode_starts = np.asarray(state["last_episode_starts"], dtype=bool)
    agent._episode_num = int(state["episode_num"])
    agent._n_updates = int(state["n_updates"])
    agent.ep_info_buffer = deque(state["ep_info_buffer"], maxlen=agent._stats_window_size)
    agent.ep_success_buffer = deque(state["ep_success_buffer"], maxlen=agent._stats_window_size)
    if state.get("action_space_rng") is not None:
        agent.action_space.np_random.bit_generator.state = state["action_space_rng"]
    run_state.load(state["run"])
    _set_global_rng(state["rng"], weights["rng"])
