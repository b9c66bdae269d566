"""Loading a trained agent (``models/{run}/model.zip``) without unpickling anything.

An SB3 zip holds ``data`` (JSON whose class, space and schedule entries are cloudpickle blobs: loading them runs
whatever code they name), ``policy.pth`` (the policy's state dict) and the optimizer's state. :func:`load_policy`
reads only ``policy.pth``, with ``torch.load(weights_only=True)`` (tensors and plain containers; no code runs),
and rebuilds the network from JSON: the ``train`` settings recorded in ``train_summary.json`` (embed_dims,
actor_dims, critic_dims; :func:`cellrl.network.policy_kwargs`) and the spaces of the model and table
(:func:`agent_spaces`, as the environment builds them). ``data`` is never read.

:func:`load_agent` is what ``cellrl plan`` and the evaluate stage call: it checks the zip against the
``model_zip_sha256`` of the ``train_summary.json`` next to it, then loads it safely. SB3's own
``MaskablePPO.load`` (which unpickles ``data``) runs only with ``trust_pickled=True`` (``cellrl plan
--trust-pickled-agent``), only for zips you made yourself; nothing in the pipeline uses it.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import InputError
from .io import rerun_fix, verify_artifact

log = logging.getLogger("cellrl.agent_io")  # torch, gymnasium and SB3 are imported where used: importing is cheap

_CURRENT_W = "features_extractor.current.0.weight"  # (embed_dims[0], genes)
_ACTION_W = "action_net.weight"                     # (actions, actor_dims[-1])


class PolicyAgent:
    """A policy loaded by :func:`load_policy`, with the part of MaskablePPO's interface that evaluation and
    planning use: ``predict``, ``observation_space``, ``action_space``, ``policy``."""

    def __init__(self, policy: Any):
        self.policy = policy
        self.observation_space = policy.observation_space
        self.action_space = policy.action_space

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None, deterministic: bool = False,
                action_masks: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        """As ``MaskablePPO.predict`` (which delegates to the same policy method)."""
        return self.policy.predict(observation, state, episode_start, deterministic, action_masks=action_masks)


def agent_spaces(geometry: Any, n_actions: int) -> tuple[Any, Any]:
    """(observation space, action space) of the environment over ``geometry`` with ``n_actions`` actions."""
    from gymnasium import spaces

    from .env import _obs_space

    return _obs_space(geometry, int(n_actions)), spaces.Discrete(int(n_actions))


def load_policy(zip_path: str | Path, train_cfg: Mapping[str, Any] | None, observation_space: Any,
                action_space: Any, device: str = "cpu") -> PolicyAgent:
    """The policy of an SB3 zip rebuilt from ``policy.pth`` alone (see the module docstring); ``train_cfg``
    missing keys fall back to :data:`cellrl.train.TRAIN_DEFAULTS`. InputError naming the file when the zip or
    its weights cannot be read, or do not fit the spaces or the network of ``train_cfg``."""
    import torch as th
    from gymnasium import spaces
    from sb3_contrib.common.maskable.policies import (MaskableActorCriticPolicy,
                                                      MaskableMultiInputActorCriticPolicy)

    from .network import policy_kwargs
    from .train import train_config

    zip_path = Path(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as z:
            raw = z.read("policy.pth")
        state = th.load(io.BytesIO(raw), map_location=device, weights_only=True)
    except Exception as e:  # not a zip, no policy.pth, or weights that need unpickling of code
        raise InputError(f"cannot read the agent's weights (policy.pth) ({type(e).__name__}: {e})", path=zip_path,
                         fix=rerun_fix(zip_path, "train")) from e
    if not isinstance(state, Mapping) or not all(isinstance(v, th.Tensor) for v in state.values()):
        raise InputError("policy.pth is not a state dict of tensors", path=zip_path, fix=rerun_fix(zip_path, "train"))
    cfg = train_config(train_cfg)
    cls = MaskableMultiInputActorCriticPolicy if isinstance(observation_space, spaces.Dict) \
        else MaskableActorCriticPolicy
    policy = cls(observation_space, action_space, lr_schedule=lambda _: 0.0, **policy_kwargs(cfg))
    _check_shapes(state, policy.state_dict(), zip_path)
    policy.load_state_dict(state)
    policy.to(device)
    policy.set_training_mode(False)
    return PolicyAgent(policy)


def _check_shapes(state: Mapping[str, Any], expected: Mapping[str, Any], path: Path) -> None:
    """InputError saying what differs when the weights do not fit the rebuilt network."""
    same = "the agent, model.npz and table.npy must come from the same dataset"
    if _ACTION_W in state and _ACTION_W in expected and state[_ACTION_W].shape[0] != expected[_ACTION_W].shape[0]:
        raise InputError(f"the agent has {state[_ACTION_W].shape[0]} actions, the transition table "
                         f"{expected[_ACTION_W].shape[0]}", path=path, fix=same)
    if _CURRENT_W in state and _CURRENT_W in expected and state[_CURRENT_W].shape[1] != expected[_CURRENT_W].shape[1]:
        raise InputError(f"the agent expects {state[_CURRENT_W].shape[1]} genes, the model has "
                         f"{expected[_CURRENT_W].shape[1]}", path=path, fix=same)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or bad:
        what = (f"shape {tuple(state[bad[0]].shape)} of {bad[0]}, expected {tuple(expected[bad[0]].shape)}" if bad
                else f"weights missing {missing[:3]}, unexpected {extra[:3]}")
        raise InputError(f"the agent's weights do not fit the network of its train settings ({what})", path=path,
                         field="train_summary.json train.embed_dims/actor_dims/critic_dims",
                         fix="keep the run's train_summary.json next to model.zip (its `train` settings describe the "
                             "network), or retrain with the train rule")


def read_train_summary(path: str | Path) -> dict[str, Any]:
    """``train_summary.json`` as a dict ({} when absent); InputError naming the file when unreadable."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read train_summary.json ({type(e).__name__}: {e})", path=path,
                         fix="rerun the train rule for this run (it writes train_summary.json)") from e
    if not isinstance(doc, dict):
        raise InputError("train_summary.json is not a JSON object", path=path,
                         fix="rerun the train rule for this run (it writes train_summary.json)")
    return doc


def perturbation_model_of(summary: Mapping[str, Any]) -> str:
    """The perturbation model an agent was trained with, from its train_summary.json (table when unrecorded)."""
    return str(summary.get("perturbation_model") or (summary.get("env") or {}).get("perturbation_model") or "table")


def check_perturbation_model(summary: Mapping[str, Any], wanted: str, path: str | Path) -> None:
    """InputError naming ``env.perturbation_model`` when the agent of ``path`` was trained in another mode than
    ``wanted`` (its observations and actions differ: a persistent agent also sees the applied set and can HOLD)."""
    trained = perturbation_model_of(summary)
    if trained != wanted:
        raise InputError(f"the agent was trained with env.perturbation_model: {trained}, but is used with "
                         f"{wanted}", path=path, field="env.perturbation_model",
                         fix=f"set env.perturbation_model: {trained} where the agent is used (the same dataset/run "
                             f"overrides it was trained with), or retrain it with {wanted}")


def load_agent(path: str | Path, geometry: Any, n_actions: int, trust_pickled: bool = False,
               device: str = "cpu", engine: Any = None) -> Any:
    """The agent of ``path`` (a MaskablePPO zip) for a model's ``geometry`` and a table of ``n_actions`` actions;
    with ``engine`` (:class:`cellrl.persistent.engine.PersistentEngine`) the persistent-mode agent, whose
    ``n_actions`` include HOLD.

    Checks the zip against ``model_zip_sha256`` of the ``train_summary.json`` next to it (skipped with a log line
    when there is none) and the perturbation model it records (:func:`check_perturbation_model`), then loads it
    with :func:`load_policy` and that summary's ``train`` settings. With
    ``trust_pickled`` it uses SB3's ``MaskablePPO.load`` instead, which unpickles the zip's ``data``: arbitrary
    code execution for a crafted zip, so only for zips you made yourself. InputError naming the file on failure.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("agent not found", path=path, fix="train it first (rule train -> models/{run}/model.zip)")
    verify_artifact(path, "agent")
    summary_path = path.parent / "train_summary.json"
    summary = read_train_summary(summary_path)
    check_perturbation_model(summary, "table" if engine is None else "persistent", path)
    if trust_pickled:
        from sb3_contrib import MaskablePPO

        log.warning("loading %s with MaskablePPO.load (--trust-pickled-agent): its pickled data runs as code", path)
        try:
            return MaskablePPO.load(path, device=device)
        except Exception as e:  # corrupt zip, incompatible versions
            raise InputError(f"cannot load the agent ({type(e).__name__}: {e})", path=path,
                             fix="retrain with the installed stable-baselines3/sb3-contrib versions") from e
    train_cfg = summary.get("train")
    if not isinstance(train_cfg, Mapping):
        log.info("%s: no train settings in %s; rebuilding the network with the default train settings", path,
                 summary_path)
        train_cfg = None
    if engine is None:
        obs_space, act_space = agent_spaces(geometry, n_actions)
    else:
        from gymnasium import spaces

        from .persistent.env import persistent_obs_space

        obs_space = persistent_obs_space(geometry, int(n_actions), engine.n_regulators)
        act_space = spaces.Discrete(int(n_actions))
    return load_policy(path, train_cfg, obs_space, act_space, device=device)
