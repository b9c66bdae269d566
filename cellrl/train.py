"""MaskablePPO training on the reprogramming environment: network, curriculum, exact-resume checkpoints, logs.

Public API (used by ``workflow_scripts/train.py``, ``cellrl.hpo`` and ``cellrl.evaluate``):

* :func:`load_inputs` - model.npz + table.npy with clear errors;
* :func:`make_vec_env` - the vectorised environment for a split;
* :func:`build_agent` - MaskablePPO with the reference network (:class:`ReprogrammingExtractor`);
* :func:`evaluate_success` - success rate / episode length of an agent (or a random masked policy);
* :func:`train_agent` - train (or resume) with checkpoints, evaluation, CSV/W&B logs, progress bar;
* :func:`train_files` - the rule's entry point: files in, ``model.zip`` + logs + ``train_summary.json`` out.

Outputs of a run in ``out_dir``: ``model.zip`` (SB3), ``checkpoints/`` (``ckpt_<step>.zip`` + ``.pkl`` with
the curriculum, episode, RNG and scaler state; ``latest.json`` names the newest), ``progress.csv`` (one row
per rollout: timesteps, wall time, steps/s, phase, training and validation success, rewards),
``train_summary.json``, ``wandb/`` (offline run unless ``train.wandb.mode`` says otherwise).

Exact resume: checkpoints are taken at rollout boundaries (after the PPO update, before the next rollout),
where the whole training state is: policy + optimizer (SB3 zip), the environment's episodes, curriculum and
RNG, the global python/numpy/torch RNGs and SB3's counters. Resuming restores all of it, so on CPU a run
interrupted at step k and resumed ends with the same weights as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import pickle
import random
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch as th
import yaml
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer, MaskableDictRolloutBufferSamples
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.utils import explained_variance, obs_as_tensor
from torch.nn import functional as F

from . import kernels
from .config import deep_merge
from .env import EnvParams, VecReprogrammingEnv
from .errors import InputError
from .io import atomic_path, write_json
from .model import OracleModel, load_model
from .tasks import TaskGeometry, validate_table
from .xp import blas_threads

log = logging.getLogger("cellrl.train")

#: Reference defaults (config/config.yaml ``train``); missing keys of a train config fall back to these.
TRAIN_DEFAULTS: dict[str, Any] = {
    "total_timesteps": 2_500_000, "n_envs": 8, "n_steps": 1024, "batch_size": 64, "n_epochs": 11,
    "learning_rate": 1.07e-4, "gamma": 0.9831, "gae_lambda": 0.9013, "ent_coef": 0.0054, "vf_coef": 0.4075,
    "clip_range": 0.2, "embed_dims": [512, 128], "actor_dims": [256, 64], "critic_dims": [128, 64],
    "checkpoint_every": 100_000, "keep_checkpoints": 2, "eval_every": 20_000, "eval_episodes": 200,
    "device": "auto", "seed": 77, "use_hpo": False, "wandb": {"mode": "offline", "project": "cellrl"},
}
PROGRESS_FIELDS = ["timesteps", "wall_s", "steps_per_s", "phase", "n_targets", "max_steps", "train_success",
                   "ep_reward_mean", "ep_len_mean", "val_success", "val_mean_length", "episodes"]


# ---------------------------------------------------------------------------------------------- inputs
def load_inputs(model_path: str | Path, table_path: str | Path) -> tuple[OracleModel, np.ndarray]:
    """Load ``model.npz`` and ``table.npy`` and check that they belong together.

    Returns the model and the (cells, 2 * regulators) int32 table. Raises InputError naming the file for a
    missing table, a table whose shape does not match the model, or out-of-range entries.
    """
    model = load_model(model_path)
    table_path = Path(table_path)
    if not table_path.exists():
        raise InputError("transition table not found", path=table_path,
                         fix="run the transitions rule first (snakemake results/<dataset>/transitions/table.npy)")
    try:
        table = np.load(table_path, mmap_mode=None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the transition table ({e})", path=table_path,
                         fix="re-run the transitions rule") from e
    table = validate_table(table, model.n_cells, model.n_actions, source=table_path)
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


# ---------------------------------------------------------------------------------------------- env + agent
def make_vec_env(model: OracleModel | TaskGeometry, table: np.ndarray,
                 env_cfg: Mapping[str, Any] | EnvParams | None, n_envs: int, split: str = "train",
                 seed: int | None = 0, training: bool = True, **kwargs: Any) -> VecReprogrammingEnv:
    """The vectorised environment over ``split`` (see :class:`cellrl.env.VecReprogrammingEnv`).

    ``training=True`` masks transitions into non-training cells and runs the curriculum; evaluation envs
    (``training=False``) draw any other cell type as target and allow ``max_steps`` of the final phase.
    Pass a :class:`~cellrl.tasks.TaskGeometry` instead of the model to share one between envs.
    """
    return VecReprogrammingEnv(model, table, n_envs, env_cfg, split=split, training=training, seed=seed,
                               **kwargs)


#: Batches up to this many rows (a rollout step, a PPO minibatch of 64, its unique target centroids) use the
#: native one-pass product: BLAS streams the 3,000 x 512 weight at a fraction of the bandwidth for so few
#: rows (measured in PPO training at 3,000 genes: 9.4-11.0 ms per minibatch with it, 10.4-11.8 without).
SMALL_BATCH_ROWS = 64


class _LowRankMatmul(th.autograd.Function):
    """``x @ weight.T`` whose backward hands the weight gradient's factors (grad_output, x) to the module."""

    @staticmethod
    def forward(ctx, x: th.Tensor, weight: th.Tensor, module: "LowRankLinear") -> th.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.module = module
        return module.product(x)

    @staticmethod
    def backward(ctx, grad_out: th.Tensor):
        x, weight = ctx.saved_tensors
        ctx.module.pending.append((grad_out, x))
        return (grad_out @ weight if ctx.needs_input_grad[0] else None), None, None


class LowRankLinear(th.nn.Linear):
    """``nn.Linear`` whose weight gradient can be kept as its two thin factors for :class:`LowRankAdam`.

    With ``lowrank`` off (the default) it is ``nn.Linear``. With it on, batches of a few rows use the native
    one-pass product (:func:`cellrl.kernels.linear_forward`), and a training pass records (grad_output, input)
    in ``pending`` instead of writing the (out x in) gradient; :class:`LowRankAdam` turns them into the Adam
    update in one fused pass (:func:`cellrl.kernels.lowrank_adam_`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.lowrank = False
        self.lib = None                                   # the native kernels (set by LowRankAdam.attach)
        self.pending: list[tuple[th.Tensor, th.Tensor]] = []

    @staticmethod
    def _few_rows(x: th.Tensor) -> bool:
        return x.dim() == 2 and x.shape[0] <= SMALL_BATCH_ROWS and x.dtype == th.float32

    def product(self, x: th.Tensor) -> th.Tensor:
        """``x @ weight.T``: one pass over the weight for a few rows, else BLAS."""
        if self._few_rows(x):
            return kernels.linear_forward(self.lib, self.weight, x, th.get_num_threads())
        return x @ self.weight.t()

    def forward(self, x: th.Tensor) -> th.Tensor:
        training = th.is_grad_enabled() and self.weight.requires_grad
        if not self.lowrank or not (training or self._few_rows(x)):
            return F.linear(x, self.weight, self.bias)
        y = _LowRankMatmul.apply(x, self.weight, self) if training else self.product(x)
        return y + self.bias if self.bias is not None else y

    def lowrank_sq_norm(self) -> float:
        """Squared Frobenius norm of the pending gradient sum_k g_k x_k^T, from K x K Gram matrices:
        ||G^T X||^2 = sum((G G^T) * (X X^T)) (no out x in matrix is formed)."""
        if not self.pending:
            return 0.0
        g, x = self.factors()
        return float(((g @ g.t()).double() * (x @ x.t()).double()).sum())

    def factors(self) -> tuple[th.Tensor, th.Tensor]:
        """The pending gradient as one pair (G [K x out], X [K x in]): gradient = G^T X."""
        if len(self.pending) == 1:
            return self.pending[0]
        return th.cat([p[0] for p in self.pending]), th.cat([p[1] for p in self.pending])


def _mlp(n_in: int, dims: Sequence[int], first: type[th.nn.Linear] = th.nn.Linear) -> th.nn.Sequential:
    layers: list[th.nn.Module] = []
    for i, d in enumerate(dims):
        layers += [(first if i == 0 else th.nn.Linear)(n_in, int(d)), th.nn.LeakyReLU()]
        n_in = int(d)
    return th.nn.Sequential(*layers)


class LowRankAdam(th.optim.Adam):
    """torch's fused Adam, plus the same update for :class:`LowRankLinear` weights from their gradient factors.

    Dense parameters go through ``torch.optim.Adam`` (fused). A LowRankLinear weight with pending factors
    is updated by :func:`cellrl.kernels.lowrank_adam_`: gradient tile and Adam in one pass over the weight
    and its Adam state, bit-identical to ``grad = G^T X`` followed by torch's fused Adam
    (tests/test_kernels.py). ``grad_scale`` (set by the PPO gradient clipping) applies to both. The state
    (``step``, ``exp_avg``, ``exp_avg_sq``) is Adam's, so checkpoints load either way. :meth:`attach` enables
    it only on CPU float32 with the native kernel built; otherwise everything is plain Adam.
    """

    def __init__(self, params, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.lowrank_modules: list[LowRankLinear] = []
        self._lib = None

    def attach(self, modules: Iterable[LowRankLinear], enabled: bool = True) -> bool:
        """Turn on the fused path for ``modules`` when possible (off with ``enabled=False``); return whether
        it is on."""
        modules = list(modules)
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        ok = (bool(modules) and len(self.param_groups) == 1 and bool(self.param_groups[0].get("fused"))
              and not any(self.param_groups[0].get(k) for k in ("amsgrad", "maximize", "capturable",
                                                                  "differentiable"))
              and self.param_groups[0].get("weight_decay", 0) == 0
              and all(id(m.weight) in owned and m.weight.device.type == "cpu" and m.weight.dtype == th.float32
                      for m in modules))
        self._lib = kernels.load() if ok and enabled else None
        ok = self._lib is not None
        for m in modules:
            m.lowrank, m.lib = ok, self._lib
            m.pending.clear()
        self.lowrank_modules = modules if ok else []
        return ok

    def lowrank_sq_norm(self) -> float:
        return sum(m.lowrank_sq_norm() for m in self.lowrank_modules)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for m in self.lowrank_modules:
            m.pending.clear()

    @th.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)                 # dense parameters (low-rank weights have no .grad)
        group = self.param_groups[0] if self.lowrank_modules else None
        scale = getattr(self, "grad_scale", None)
        for m in self.lowrank_modules:
            if not m.pending:
                continue
            p = m.weight
            state = self.state[p]
            if len(state) == 0:
                state["step"] = th.zeros((), dtype=th.float32)
                state["exp_avg"] = th.zeros_like(p, memory_format=th.preserve_format)
                state["exp_avg_sq"] = th.zeros_like(p, memory_format=th.preserve_format)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            g, x = m.factors()
            kernels.lowrank_adam_(
                self._lib, p.data, state["exp_avg"], state["exp_avg_sq"], g, x, lr=float(group["lr"]),
                beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]), step=int(state["step"].item()),
                grad_scale=None if scale is None else float(scale),
                threads=th.get_num_threads())
            m.pending.clear()
        return loss


class ReprogrammingExtractor(BaseFeaturesExtractor):
    """Reference feature extractor: one MLP per input (genes -> 512 -> 128, LeakyReLU), concatenated.

    ``current_expression`` and ``target_expression`` each go through their own MLP with ``embed_dims``;
    features = [emb(current), emb(target)] (2 x 128 = 256). ``action_mask`` is not a network input.

    Target centroids take only as many distinct values as there are cell types, so the target MLP runs on
    the unique rows of a batch and the result is gathered back (identical maths, B/T times fewer FLOPs on
    that branch). Rows are grouped by a fixed random projection and the grouping is verified exactly; if it
    ever fails the branch runs on all rows.
    """

    def __init__(self, observation_space: spaces.Dict, embed_dims: Sequence[int] = (512, 128),
                 dedupe_targets: bool = True):
        g = int(observation_space["current_expression"].shape[0])
        super().__init__(observation_space, features_dim=2 * int(embed_dims[-1]))
        self.current = _mlp(g, embed_dims, first=LowRankLinear)
        self.target = _mlp(g, embed_dims, first=LowRankLinear)
        self.dedupe_targets = dedupe_targets
        gen = th.Generator().manual_seed(12345)          # own generator: leaves the global torch RNG alone
        self.register_buffer("_hash", th.randn(g, generator=gen), persistent=False)
        self._cache: dict[float, tuple[th.Tensor, th.Tensor]] = {}
        self._cache_version: tuple = ()

    def _unique_rows(self, tgt: th.Tensor, training: bool) -> tuple[th.Tensor, th.Tensor, th.Tensor] | None:
        """(unique rows, their hash keys, inverse index) of ``tgt``, or None to embed every row."""
        if not self.dedupe_targets or tgt.shape[0] < 2:
            return None
        h = tgt @ self._hash.to(tgt.dtype)
        uniq, inv = th.unique(h, return_inverse=True)
        if uniq.shape[0] == tgt.shape[0] and training:
            return None
        rep = th.empty(uniq.shape[0], dtype=th.long, device=tgt.device).scatter_(
            0, inv, th.arange(tgt.shape[0], device=tgt.device))
        rows = tgt.index_select(0, rep)
        if not th.equal(rows.index_select(0, inv), tgt):
            return None
        return rows, uniq, inv

    def _embed_targets(self, tgt: th.Tensor) -> th.Tensor:
        training = th.is_grad_enabled()
        if training:
            self._cache.clear()           # the weights are about to change (see _cached_embedding)
        u = self._unique_rows(tgt, training)
        if u is None:
            return self.target(tgt)
        rows, uniq, inv = u
        if training:
            return self.target(rows).index_select(0, inv)
        return self._cached_embedding(rows, uniq).index_select(0, inv)

    def lowrank_layers(self) -> list[LowRankLinear]:
        return [m for m in (self.current[0], self.target[0]) if isinstance(m, LowRankLinear)]

    def _cached_embedding(self, rows: th.Tensor, keys: th.Tensor) -> th.Tensor:
        """Inference only: embeddings of target rows, remembered while the target MLP's weights are unchanged.

        During a rollout the weights are fixed and the same few centroids recur every step, so each is
        embedded once per rollout instead of once per step. The cache empties on every forward pass with
        gradients (training: an optimizer step follows; fused Adam does not bump version counters) and
        whenever the parameters' version counters change (``load_state_dict`` and other in-place copies). Rows are embedded one
        at a time, so a cached value is the same whichever batch first needed it (exact resume relies on it).
        """
        version = tuple((p.data_ptr(), p._version) for p in self.target.parameters())
        if version != self._cache_version:
            self._cache.clear()
            self._cache_version = version
        out: list[th.Tensor | None] = []
        for i, k in enumerate(keys.tolist()):
            hit = self._cache.get(k)
            out.append(hit[1] if hit is not None and th.equal(hit[0], rows[i]) else None)
        for i, o in enumerate(out):
            if o is None:   # one row at a time: the cached value must not depend on the batch it came in
                emb = self.target(rows[i:i + 1])[0]
                self._cache[float(keys[i])] = (rows[i].clone(), emb)
                out[i] = emb
        return th.stack(out)

    def forward(self, observations: dict[str, th.Tensor]) -> th.Tensor:
        cur = self.current(observations["current_expression"])
        tgt = self._embed_targets(observations["target_expression"])
        return th.cat([cur, tgt], dim=1)


class _RolloutBuffer(MaskableDictRolloutBuffer):
    """SB3's buffer, with minibatches turned into tensors without a second copy (fancy indexing already made
    fresh arrays; SB3 copies them again with ``th.tensor``)."""

    def _get_samples(self, batch_inds: np.ndarray, env=None) -> MaskableDictRolloutBufferSamples:
        t = lambda a: th.as_tensor(a, device=self.device)  # noqa: E731
        return MaskableDictRolloutBufferSamples(
            observations={key: t(obs[batch_inds]) for key, obs in self.observations.items()},
            actions=t(self.actions[batch_inds]), old_values=t(self.values[batch_inds].flatten()),
            old_log_prob=t(self.log_probs[batch_inds].flatten()),
            advantages=t(self.advantages[batch_inds].flatten()), returns=t(self.returns[batch_inds].flatten()),
            action_masks=t(self.action_masks[batch_inds].reshape(-1, self.mask_dims)))


@contextlib.contextmanager
def _lean_section() -> Iterator[None]:
    """Rollouts and updates: skip torch.distributions' argument validation (it re-checks every masked
    Categorical's logits; values unchanged) and hold NumPy's BLAS to one thread (the env's small products do
    not need more, and BLAS threads competing with torch's for 2 cores slowed a rollout 10x)."""
    before = th.distributions.Distribution._validate_args
    th.distributions.Distribution.set_default_validate_args(False)
    try:
        with blas_threads(1):
            yield
    finally:
        th.distributions.Distribution.set_default_validate_args(before)


class CellrlMaskablePPO(MaskablePPO):
    """MaskablePPO with the same updates and less waste per step and per minibatch.

    Differences from ``sb3_contrib.MaskablePPO`` (2.x), none of which changes the maths:

    * gradient clipping is folded into the fused Adam kernel: the total norm is computed as SB3 does and,
      when it exceeds ``max_grad_norm``, Adam divides the gradients by ``1 / clip_coef`` inside its single
      pass over memory (SB3 multiplies every gradient by the coefficient in a separate pass first; the two
      agree to float rounding). Without a fused optimizer it falls back to SB3's ``clip_grad_norm_``;
    * the per-minibatch statistics are kept as tensors and reduced once per update (SB3 syncs with
      ``.item()`` four times per minibatch);
    * value bootstrapping of time-limit truncations runs one batched forward for all truncated envs of a
      step instead of one forward per env, and the action masks come straight from the vectorised env;
    * on CPU the two genes x 512 layers are updated from their gradient factors by a native fused kernel
      (:class:`LowRankAdam`; bit-identical Adam for the same gradient), minibatches are not copied twice and
      torch.distributions' argument checks are skipped.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("rollout_buffer_class", _RolloutBuffer)
        super().__init__(*args, **kwargs)

    def collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps: int, use_masking: bool = True
                         ) -> bool:
        with _lean_section():
            return self._collect_rollouts(env, callback, rollout_buffer, n_rollout_steps, use_masking)

    def _collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps: int, use_masking: bool) -> bool:
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        n_steps = 0
        rollout_buffer.reset()
        if use_masking and not is_masking_supported(env):
            raise ValueError("Environment does not support action masking. Consider using ActionMasker wrapper")
        direct_masks = isinstance(env, VecReprogrammingEnv)
        callback.on_rollout_start()
        dones = None
        new_obs = self._last_obs
        while n_steps < n_rollout_steps:
            with th.no_grad():
                obs_tensor = obs_as_tensor(self._last_obs, self.device)
                action_masks = None
                if use_masking:
                    action_masks = env.action_masks().copy() if direct_masks else get_action_masks(env)
                actions, values, log_probs = self.policy(obs_tensor, action_masks=action_masks)
            actions = actions.cpu().numpy()
            new_obs, rewards, dones, infos = env.step(actions)
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            n_steps += 1
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.reshape(-1, 1)
            trunc = [i for i in np.flatnonzero(dones) if infos[i].get("terminal_observation") is not None
                     and infos[i].get("TimeLimit.truncated", False)]
            if trunc:
                term = {k: np.stack([infos[i]["terminal_observation"][k] for i in trunc])
                        for k in infos[trunc[0]]["terminal_observation"]}
                with th.no_grad():
                    tv = self.policy.predict_values(obs_as_tensor(term, self.device)).flatten().cpu().numpy()
                rewards = rewards.astype(np.float32, copy=True)
                rewards[trunc] += self.gamma * tv
            rollout_buffer.add(self._last_obs, actions, rewards, self._last_episode_starts, values, log_probs,
                               action_masks=action_masks)
            self._last_obs = new_obs
            self._last_episode_starts = dones
        with th.no_grad():
            values = self.policy.predict_values(obs_as_tensor(new_obs, self.device))
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        callback.on_rollout_end()
        return True

    def _evaluate_actions(self, obs: Mapping[str, th.Tensor], actions: th.Tensor, masks: th.Tensor | None
                          ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """``policy.evaluate_actions`` for a discrete masked policy without building distribution objects: the
        same operations as sb3-contrib's MaskableCategorical (normalise, mask to -1e8, normalise again, gather;
        entropy of the masked probabilities), minus ~10 small ops of bookkeeping per minibatch."""
        pol = self.policy
        if masks is None or not isinstance(self.action_space, spaces.Discrete) or not pol.share_features_extractor:
            return pol.evaluate_actions(obs, actions, action_masks=masks)
        latent_pi, latent_vf = pol.mlp_extractor(pol.extract_features(obs))
        logits = pol.action_net(latent_pi)
        logits = logits - logits.logsumexp(dim=-1, keepdim=True)
        masks = masks.to(th.bool).reshape(logits.shape)
        logits = th.where(masks, logits, th.tensor(-1e8, dtype=logits.dtype, device=logits.device))
        logits = logits - logits.logsumexp(dim=-1, keepdim=True)
        log_prob = logits.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        p_log_p = th.where(masks, logits * F.softmax(logits, dim=-1), th.tensor(0.0, device=logits.device))
        return pol.value_net(latent_vf), log_prob, -p_log_p.sum(-1)

    def _setup_model(self) -> None:
        super()._setup_model()
        self._lowrank = False
        opt, fe = self.policy.optimizer, self.policy.features_extractor
        if isinstance(opt, LowRankAdam) and isinstance(fe, ReprogrammingExtractor):
            self._lowrank = opt.attach(fe.lowrank_layers())

    def _clip_and_step(self) -> None:
        opt = self.policy.optimizer
        params = [p for p in self.policy.parameters() if p.grad is not None]
        fused = all(g.get("fused") for g in opt.param_groups)
        if not fused:
            th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
            opt.step()
            return
        norm = th.nn.utils.get_total_norm([p.grad for p in params])
        if self._lowrank:                 # the first layers' gradients exist only as factors
            norm = (norm.double() ** 2 + opt.lowrank_sq_norm()).sqrt().to(norm.dtype)
        coef = self.max_grad_norm / (norm + 1e-6)
        if coef < 1.0:
            opt.grad_scale = 1.0 / coef
            opt.found_inf = self._no_inf
        try:
            opt.step()
        finally:
            opt.grad_scale = None
            opt.found_inf = None

    def train(self) -> None:
        with _lean_section():
            self._train()

    def _train(self) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)
        self._no_inf = th.zeros((), device=self.device)
        stats: dict[str, list[th.Tensor]] = {"entropy": [], "pg": [], "value": [], "clip": []}
        continue_training = True
        approx_kl_divs: list[float] = []
        for epoch in range(self.n_epochs):
            kl_epoch: list[th.Tensor] = []
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                actions = rollout_data.actions
                if isinstance(self.action_space, spaces.Discrete):
                    actions = rollout_data.actions.long().flatten()
                values, log_prob, entropy = self._evaluate_actions(
                    rollout_data.observations, actions, rollout_data.action_masks)
                values = values.flatten()
                advantages = rollout_data.advantages
                if self.normalize_advantage:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
                ratio = th.exp(log_prob - rollout_data.old_log_prob)
                policy_loss_1 = advantages * ratio
                policy_loss_2 = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
                policy_loss = -th.min(policy_loss_1, policy_loss_2).mean()
                if self.clip_range_vf is None:
                    values_pred = values
                else:
                    values_pred = rollout_data.old_values + th.clamp(
                        values - rollout_data.old_values, -clip_range_vf, clip_range_vf)
                value_loss = F.mse_loss(rollout_data.returns, values_pred)
                entropy_loss = -th.mean(-log_prob) if entropy is None else -th.mean(entropy)
                loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
                with th.no_grad():
                    stats["pg"].append(policy_loss.detach())
                    stats["clip"].append(th.mean((th.abs(ratio - 1) > clip_range).float()))
                    stats["value"].append(value_loss.detach())
                    stats["entropy"].append(entropy_loss.detach())
                    log_ratio = log_prob - rollout_data.old_log_prob
                    kl = th.mean((th.exp(log_ratio) - 1) - log_ratio)
                    kl_epoch.append(kl)
                if self.target_kl is not None and float(kl) > 1.5 * self.target_kl:
                    continue_training = False
                    break
                self.policy.optimizer.zero_grad()
                loss.backward()
                self._clip_and_step()
            approx_kl_divs = [float(x) for x in kl_epoch]
            self._n_updates += 1
            if not continue_training:
                break
        explained_var = explained_variance(self.rollout_buffer.values.flatten(),
                                           self.rollout_buffer.returns.flatten())
        mean = {k: float(th.stack(v).mean()) if v else float("nan") for k, v in stats.items()}
        self.logger.record("train/entropy_loss", mean["entropy"])
        self.logger.record("train/policy_gradient_loss", mean["pg"])
        self.logger.record("train/value_loss", mean["value"])
        self.logger.record("train/approx_kl", float(np.mean(approx_kl_divs)) if approx_kl_divs else float("nan"))
        self.logger.record("train/clip_fraction", mean["clip"])
        self.logger.record("train/loss", float(loss.detach()))
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if self.clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)


def train_config(train_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """``train_cfg`` merged over :data:`TRAIN_DEFAULTS`."""
    return deep_merge(TRAIN_DEFAULTS, train_cfg or {})


def build_agent(vec_env: VecReprogrammingEnv, train_cfg: Mapping[str, Any] | None,
                seed: int | None = None, device: str | None = None, verbose: int = 0) -> "CellrlMaskablePPO":
    """MaskablePPO (:class:`CellrlMaskablePPO`) with the reference network and the hyperparameters of ``train_cfg``.

    Network: :class:`ReprogrammingExtractor` (``embed_dims``), actor MLP ``actor_dims``, critic MLP
    ``critic_dims``, LeakyReLU; Adam (eps 1e-5, SB3's PPO default; fused kernel, same update; the two
    genes x 512 first layers are updated from their gradient factors by :class:`LowRankAdam` on CPU).
    ``seed`` defaults to ``train_cfg["seed"]``; ``device`` to ``train_cfg["device"]`` ("auto": CUDA if any).
    """
    cfg = train_config(train_cfg)
    dev = resolve_device(device or cfg["device"])
    policy_kwargs = dict(
        features_extractor_class=ReprogrammingExtractor,
        features_extractor_kwargs=dict(embed_dims=list(cfg["embed_dims"])),
        net_arch=dict(pi=list(cfg["actor_dims"]), vf=list(cfg["critic_dims"])),
        activation_fn=th.nn.LeakyReLU,
        optimizer_class=LowRankAdam,
        optimizer_kwargs=dict(eps=1e-5, fused=True),
    )
    return CellrlMaskablePPO(
        "MultiInputPolicy", vec_env, learning_rate=cfg["learning_rate"], n_steps=int(cfg["n_steps"]),
        batch_size=int(cfg["batch_size"]), n_epochs=int(cfg["n_epochs"]), gamma=cfg["gamma"],
        gae_lambda=cfg["gae_lambda"], ent_coef=cfg["ent_coef"], vf_coef=cfg["vf_coef"],
        clip_range=cfg["clip_range"], policy_kwargs=policy_kwargs, seed=cfg["seed"] if seed is None else seed,
        device=dev, verbose=verbose,
    )


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_success(agent: MaskablePPO | None, model: OracleModel | TaskGeometry, table: np.ndarray,
                     env_cfg: Mapping[str, Any] | EnvParams | None, split: str = "val", n_episodes: int = 200,
                     seed: int = 0, deterministic: bool = True, n_envs: int = 64,
                     tasks: tuple[np.ndarray, np.ndarray] | None = None,
                     return_episodes: bool = False) -> dict[str, Any]:
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
    env = VecReprogrammingEnv(geo, table, n_envs, params, split=split, training=False, seed=seed)
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


# ---------------------------------------------------------------------------------------------- callbacks
class _RunState:
    """Counters shared by the callbacks and saved in checkpoints."""

    def __init__(self) -> None:
        self.last_logged = -1        # timesteps of the last progress row
        self.next_eval = 0
        self.next_ckpt = 0
        self.elapsed = 0.0           # wall seconds of previous segments (resumed runs)
        self.steps_at_start = 0
        self.t0 = time.perf_counter()
        self.last_val: dict[str, Any] = {}
        self.wandb_id: str | None = None

    def wall(self) -> float:
        return self.elapsed + time.perf_counter() - self.t0

    def to_dict(self) -> dict[str, Any]:
        return {"last_logged": self.last_logged, "next_eval": self.next_eval, "next_ckpt": self.next_ckpt,
                "elapsed": self.wall(), "last_val": self.last_val, "wandb_id": self.wandb_id}

    def load(self, d: Mapping[str, Any]) -> None:
        self.last_logged, self.next_eval, self.next_ckpt = d["last_logged"], d["next_eval"], d["next_ckpt"]
        self.elapsed, self.last_val, self.wandb_id = d["elapsed"], dict(d["last_val"]), d.get("wandb_id")
        self.t0 = time.perf_counter()


class TrackingCallback(BaseCallback):
    """At each rollout boundary: evaluate when due, append a progress row (CSV + W&B), checkpoint when due.

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
    """One training run's files and schedules (progress CSV, evaluation, checkpoints, W&B, progress bar)."""

    def __init__(self, out_dir: Path | None, cfg: Mapping[str, Any], params: EnvParams, geo: TaskGeometry,
                 table: np.ndarray, env: VecReprogrammingEnv, progress: bool, total: int):
        self.out_dir = out_dir
        self.cfg = cfg
        self.params = params
        self.geo = geo
        self.table = table
        self.env = env
        self.state = _RunState()
        self.total = total
        self.pbar = None
        self.wandb_run = None
        self.progress = progress
        self._tick = 0
        self.val_split = "val" if (geo.split == "val").any() else "train"
        self.fingerprint = run_fingerprint(params, cfg, geo, table)

    # -- schedule ---------------------------------------------------------------------------------------
    def boundary(self, agent: MaskablePPO, final: bool = False) -> None:
        ts = int(agent.num_timesteps)
        s = self.state
        if ts <= s.last_logged:
            return
        val = {}
        if ts >= s.next_eval or final:
            val = evaluate_success(agent, self.geo, self.table, self.params, split=self.val_split,
                                   n_episodes=int(self.cfg["eval_episodes"]), seed=int(self.cfg["seed"]))
            s.last_val = {"timesteps": ts, **val}
            while s.next_eval <= ts:
                s.next_eval += int(self.cfg["eval_every"])
        self.log_row(agent, ts, val)
        s.last_logged = ts
        if self.out_dir is not None and (ts >= s.next_ckpt or final) and ts > 0:
            while s.next_ckpt <= ts:
                s.next_ckpt += int(self.cfg["checkpoint_every"])
            save_checkpoint(self.out_dir / "checkpoints", agent, self.env, s, self.geo,
                            keep=int(self.cfg.get("keep_checkpoints", 2)), fingerprint=self.fingerprint)
        elif ts == 0:
            s.next_ckpt = int(self.cfg["checkpoint_every"])

    def tick(self, agent: MaskablePPO) -> None:
        self._tick += 1
        if self.pbar is not None and self._tick % 64 == 0:
            self._update_pbar(agent)

    def _update_pbar(self, agent: MaskablePPO) -> None:
        ts = int(agent.num_timesteps)
        rate = (ts - self.state.steps_at_start) / max(1e-9, time.perf_counter() - self.state.t0)
        post = {"steps/s": f"{rate:.0f}", "succ": f"{self.env.success_rate:.2f}", "phase": self.env.phase}
        if self.state.last_val:
            post["val"] = f"{self.state.last_val['success_rate']:.2f}"
        self.pbar.set_postfix(post, refresh=False)
        self.pbar.update(max(0, min(ts, self.total) - self.pbar.n))   # redraws at most every mininterval

    # -- logging -----------------------------------------------------------------------------------------
    def log_row(self, agent: MaskablePPO, ts: int, val: Mapping[str, Any]) -> None:
        b = self.env.batch
        eps = list(agent.ep_info_buffer or [])
        wall = self.state.wall()
        row = {
            "timesteps": ts, "wall_s": round(wall, 3),
            "steps_per_s": round((ts - self.state.steps_at_start) / max(1e-9, time.perf_counter() - self.state.t0), 1),
            "phase": b.phase, "n_targets": b.n_targets, "max_steps": b.max_steps,
            "train_success": b.success_rate,
            "ep_reward_mean": float(np.mean([e["r"] for e in eps])) if eps else float("nan"),
            "ep_len_mean": float(np.mean([e["l"] for e in eps])) if eps else float("nan"),
            "val_success": val.get("success_rate", float("nan")),
            "val_mean_length": val.get("mean_length", float("nan")),
            "episodes": b.episodes,
        }
        if val:
            log.info("step %d: val success %.3f (len %.1f), train success %.3f, phase %d, %.0f steps/s",
                     ts, row["val_success"], row["val_mean_length"], row["train_success"], row["phase"],
                     row["steps_per_s"])
        elif self.progress and self.pbar is None:   # no terminal: one log line per rollout instead of a bar
            log.info("step %d/%d: train success %.3f, phase %d, %.0f steps/s", ts, self.total,
                     row["train_success"], row["phase"], row["steps_per_s"])
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
        if self.pbar is not None:
            self._update_pbar(agent)

    def open(self, resumed: bool) -> None:
        if self.progress and hasattr(sys.stderr, "isatty") and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.pbar = tqdm(total=self.total, unit="step", dynamic_ncols=True, desc="train",
                             initial=min(self.state.steps_at_start, self.total), mininterval=0.5)
        mode = (self.cfg.get("wandb") or {}).get("mode", "offline")
        if self.out_dir is not None and mode != "disabled":
            self.wandb_run = _wandb_init(self.out_dir, self.cfg, self.params, mode, self.state)

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as e:  # pragma: no cover - tracking must never fail a run
                log.warning("wandb finish failed: %s", e)
            self.wandb_run = None


def _wandb_init(out_dir: Path, cfg: Mapping[str, Any], params: EnvParams, mode: str, state: _RunState):
    """Start (or resume) a W&B run in ``out_dir/wandb``; offline mode needs no account or network."""
    os.environ["WANDB_DIR"] = str(out_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import dataclasses

        import wandb

        state.wandb_id = state.wandb_id or f"cellrl-{int(time.time())}-{os.getpid()}"
        return wandb.init(project=(cfg.get("wandb") or {}).get("project", "cellrl"), mode=mode,
                          dir=str(out_dir), id=state.wandb_id, resume="allow", reinit=True,
                          config={"train": dict(cfg), "env": dataclasses.asdict(params)})
    except Exception as e:  # tracking must never fail a training run
        log.warning("W&B disabled (%s); progress.csv still records the run", e)
        return None


# ---------------------------------------------------------------------------------------------- checkpoints
#: Settings that do not change the trained weights: a checkpoint made under other values still resumes.
_NOT_FINGERPRINTED = ("total_timesteps", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_episodes",
                      "wandb", "use_hpo", "device")


def run_fingerprint(params: EnvParams, cfg: Mapping[str, Any], geo: TaskGeometry, table: np.ndarray) -> str:
    """Hash of everything that determines the trained weights: env + train settings, scaler and table."""
    import dataclasses
    import hashlib

    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(params), sort_keys=True, default=str).encode())
    h.update(json.dumps({k: v for k, v in cfg.items() if k not in _NOT_FINGERPRINTED}, sort_keys=True,
                        default=str).encode())
    for a in (geo.mean, geo.std, np.ascontiguousarray(table)):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": th.get_rng_state()}
    if th.cuda.is_available():
        st["cuda"] = th.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    th.set_rng_state(st["torch"])
    if "cuda" in st and th.cuda.is_available():
        th.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(ckpt_dir: Path, agent: MaskablePPO, env: VecReprogrammingEnv, run_state: _RunState,
                    geo: TaskGeometry, keep: int = 2, fingerprint: str = "") -> Path:
    """Write ``ckpt_<step>.zip`` (policy + optimizer) and ``ckpt_<step>.pkl`` (the rest); update latest.json."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ts = int(agent.num_timesteps)
    stem = f"ckpt_{ts:010d}"
    with atomic_path(ckpt_dir / f"{stem}.zip") as tmp:
        agent.save(tmp)
    extra = {
        "timesteps": ts, "env": env.get_state(), "rng": _rng_state(), "run": run_state.to_dict(),
        "scaler": geo.state(), "last_episode_starts": np.array(agent._last_episode_starts, copy=True),
        "episode_num": agent._episode_num, "ep_info_buffer": list(agent.ep_info_buffer or []),
        "ep_success_buffer": list(agent.ep_success_buffer or []), "n_updates": agent._n_updates,
        "action_space_rng": agent.action_space.np_random.bit_generator.state
        if getattr(agent.action_space, "_np_random", None) is not None else None,
    }
    with atomic_path(ckpt_dir / f"{stem}.pkl") as tmp:
        tmp.write_bytes(pickle.dumps(extra))
    write_json(ckpt_dir / "latest.json", {"timesteps": ts, "zip": f"{stem}.zip", "state": f"{stem}.pkl",
                                          "fingerprint": fingerprint})
    old = sorted(ckpt_dir.glob("ckpt_*.zip"))[:-keep] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
        p.with_suffix(".pkl").unlink(missing_ok=True)
    return ckpt_dir / f"{stem}.zip"


def latest_checkpoint(out_dir: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint of a run directory as ``{"timesteps", "zip", "state"}`` paths, or None."""
    p = Path(out_dir) / "checkpoints" / "latest.json"
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    zp, sp = p.parent / d["zip"], p.parent / d["state"]
    if not (zp.exists() and sp.exists()):
        return None
    return {"timesteps": int(d["timesteps"]), "zip": zp, "state": sp, "fingerprint": d.get("fingerprint", "")}


def _restore(ckpt: Mapping[str, Any], env: VecReprogrammingEnv, geo: TaskGeometry, device: str,
             run_state: _RunState) -> MaskablePPO:
    extra = pickle.loads(Path(ckpt["state"]).read_bytes())
    sc = extra["scaler"]
    if sc["mean"].shape != geo.mean.shape or not (np.allclose(sc["mean"], geo.mean)
                                                   and np.allclose(sc["std"], geo.std)):
        raise InputError("checkpoint was made with another model (scaler differs)", path=ckpt["zip"],
                         fix="delete the run's checkpoints/ or train into a new out_dir")
    agent = CellrlMaskablePPO.load(ckpt["zip"], env=env, device=device, force_reset=False)
    env.set_state(extra["env"])                       # after load: load() re-seeds the env
    agent._last_obs = env.current_obs()
    agent._last_episode_starts = extra["last_episode_starts"]
    agent._episode_num = extra["episode_num"]
    agent._n_updates = extra["n_updates"]
    agent.ep_info_buffer = deque(extra["ep_info_buffer"], maxlen=agent._stats_window_size)
    agent.ep_success_buffer = deque(extra["ep_success_buffer"], maxlen=agent._stats_window_size)
    if extra.get("action_space_rng") is not None:
        agent.action_space.np_random.bit_generator.state = extra["action_space_rng"]
    run_state.load(extra["run"])
    _set_rng_state(extra["rng"])                      # last: nothing may draw random numbers after this
    return agent


def _truncate_progress(path: Path, upto: int) -> None:
    """Drop progress rows written after the checkpoint we resume from."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(float(r["timesteps"])) <= upto]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=PROGRESS_FIELDS)
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------------------------------------- training
def train_agent(model: OracleModel | TaskGeometry, table: np.ndarray, env_cfg: Mapping[str, Any] | None,
                train_cfg: Mapping[str, Any] | None, out_dir: str | Path | None = None,
                callbacks: Iterable[BaseCallback] = (), resume: bool = False, progress: bool = True,
                threads: int | None = None) -> tuple[MaskablePPO, dict[str, Any]]:
    """Train MaskablePPO (or continue the latest checkpoint in ``out_dir`` when ``resume``).

    ``callbacks`` run after cellrl's own tracking callback (a callback returning False from ``_on_step``
    stops training early, e.g. an Optuna pruner). Writes the outputs listed in the module docstring when
    ``out_dir`` is given (``model.zip`` only at the end). Returns the agent and the summary dict (also
    ``train_summary.json``): timesteps, wall_s, steps_per_s, final validation success, random baseline.
    """
    cfg = train_config(train_cfg)
    params = EnvParams.from_config(env_cfg)
    threads = set_torch_threads(threads)
    device = resolve_device(cfg["device"])
    geo = model if isinstance(model, TaskGeometry) else TaskGeometry.from_model(
        model, params.goal_percentile, params.centroid_percentile)
    total = int(cfg["total_timesteps"])
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    env = make_vec_env(geo, table, params, int(cfg["n_envs"]), split="train", seed=int(cfg["seed"]),
                       training=True)
    ckpt = latest_checkpoint(out) if (resume and out is not None) else None
    run = _Run(out, cfg, params, geo, table, env, progress, total)
    if ckpt is not None and ckpt["fingerprint"] != run.fingerprint:
        log.warning("checkpoint %s was made with other settings, model or table: starting afresh", ckpt["zip"])
        ckpt = None
    if ckpt is None and out is not None and (out / "checkpoints").exists():
        import shutil

        shutil.rmtree(out / "checkpoints")
    if ckpt is not None:
        log.info("resuming from %s (step %d)", ckpt["zip"], ckpt["timesteps"])
        _truncate_progress(out / "progress.csv", ckpt["timesteps"])
        agent = _restore(ckpt, env, geo, device, run.state)
        run.state.steps_at_start = int(agent.num_timesteps)
    else:
        if out is not None:
            for stale in [out / "progress.csv", out / "train_summary.json"]:
                stale.unlink(missing_ok=True)
        agent = build_agent(env, cfg, device=device)
    run.open(resumed=ckpt is not None)
    try:
        remaining = total - int(agent.num_timesteps)
        if remaining > 0:
            agent.learn(remaining, callback=CallbackList([TrackingCallback(run), *callbacks]),
                        reset_num_timesteps=ckpt is None, progress_bar=False)
        else:
            run.boundary(agent, final=True)
    finally:
        run.close()
    wall = run.state.wall()
    seg_steps = int(agent.num_timesteps) - run.state.steps_at_start
    seg_wall = time.perf_counter() - run.state.t0
    final = run.state.last_val if run.state.last_val.get("timesteps") == int(agent.num_timesteps) else \
        {"timesteps": int(agent.num_timesteps), **evaluate_success(
            agent, geo, table, params, split=run.val_split, n_episodes=int(cfg["eval_episodes"]),
            seed=int(cfg["seed"]))}
    rand = evaluate_success(None, geo, table, params, split=run.val_split, n_episodes=int(cfg["eval_episodes"]),
                            seed=int(cfg["seed"]))
    summary = {
        "timesteps": int(agent.num_timesteps), "wall_s": round(wall, 2),
        "steps_per_s": round(seg_steps / max(seg_wall, 1e-9), 1),
        "final_val_success": final["success_rate"], "final_val_mean_length": final["mean_length"],
        "random_val_success": rand["success_rate"], "val_split": run.val_split,
        "val_episodes": int(cfg["eval_episodes"]), "eval_max_steps": final.get("max_steps"),
        "curriculum_phase": env.phase, "curriculum_phases": env.batch.n_phases,
        "device": device, "torch_threads": threads, "resumed_from": ckpt["timesteps"] if ckpt else None,
        "n_params": int(sum(p.numel() for p in agent.policy.parameters())),
        "n_cells": geo.n_cells, "n_genes": geo.n_genes, "n_actions": int(table.shape[1]),
        "seed": int(cfg["seed"]),
    }
    if out is not None:
        with atomic_path(out / "model.zip") as tmp:
            agent.save(tmp)
        write_json(out / "train_summary.json", summary)
    log.info("trained %d steps in %.0f s (%.0f steps/s); val success %.3f (random masked %.3f)",
             summary["timesteps"], wall, summary["steps_per_s"], summary["final_val_success"],
             summary["random_val_success"])
    return agent, summary


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
                resume: bool = True, progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Rule ``train``: files in, ``out_dir/{model.zip, train_summary.json, progress.csv, checkpoints/}`` out.

    ``hpo_params``: best_params.yaml of the HPO stage, merged over ``env``/``train``. With ``resume`` (the
    default) an interrupted run in ``out_dir`` continues from its latest checkpoint.
    """
    model, table = load_inputs(model_path, table_path)
    env_cfg, train_cfg = merge_hpo_params(env, train, hpo_params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, summary = train_agent(model, table, env_cfg, train_cfg, out_dir=out, resume=resume, progress=progress,
                             threads=threads)
    write_json(out / "train_summary.json", {**summary, "inputs": {"model": str(model_path),
                                                                  "table": str(table_path),
                                                                  "hpo_params": str(hpo_params) if hpo_params else None},
                                            "env": env_cfg, "train": train_cfg})
    return summary
