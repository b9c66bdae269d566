"""The reference network: a features extractor with one MLP per input, and MaskablePPO's policy kwargs.

``current_expression`` and ``target_expression`` each go through their own MLP (genes -> 512 -> 128,
LeakyReLU); the features are the two embeddings side by side (2 x 128). In persistent mode the applied set
(``applied``, R values in {-1, 0, +1}) is concatenated to the current cell's input: the state is (cell, set). The actor (256 -> 64) and critic
(128 -> 64) MLPs are SB3's, optimised by torch's own Adam (eps 1e-5, SB3's PPO default) in its fused form
(one kernel for all parameters: 3x faster than the per-tensor loop torch uses by default on CPU at 3,000 genes).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch as th
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor


def mlp(n_in: int, dims: Sequence[int]) -> th.nn.Sequential:
    """Linear + LeakyReLU layers of widths ``dims``."""
    layers: list[th.nn.Module] = []
    for d in dims:
        layers += [th.nn.Linear(n_in, int(d)), th.nn.LeakyReLU()]
        n_in = int(d)
    return th.nn.Sequential(*layers)


class ReprogrammingExtractor(BaseFeaturesExtractor):
    """Reference features: ``[mlp(current_expression), mlp(target_expression)]``; the mask is not an input.

    Target centroids take only as many distinct values as there are cell types, so the target MLP runs on
    the distinct rows of a batch and the result is gathered back (the same maths, far fewer FLOPs on that
    branch). Rows are grouped by a fixed random projection and the grouping is verified exactly; if it ever
    fails, the branch runs on every row.
    """

    def __init__(self, observation_space: spaces.Dict, embed_dims: Sequence[int] = (512, 128),
                 dedupe_targets: bool = True):
        g = int(observation_space["current_expression"].shape[0])
        super().__init__(observation_space, features_dim=2 * int(embed_dims[-1]))
        # persistent mode (cellrl.persistent.env): the applied set joins the current cell's input
        self.with_applied = "applied" in observation_space.spaces
        n_set = int(observation_space["applied"].shape[0]) if self.with_applied else 0
        self.current = mlp(g + n_set, embed_dims)
        self.target = mlp(g, embed_dims)
        self.dedupe_targets = dedupe_targets
        gen = th.Generator().manual_seed(12345)          # own generator: leaves the global torch RNG alone
        self.register_buffer("_hash", th.randn(g, generator=gen), persistent=False)

    def _embed_targets(self, tgt: th.Tensor) -> th.Tensor:
        if not self.dedupe_targets or tgt.shape[0] < 2:
            return self.target(tgt)
        first, inv = _distinct_rows(tgt, self._hash)
        if first is None:
            return self.target(tgt)
        return self.target(tgt.index_select(0, first)).index_select(0, inv)

    def forward(self, observations: dict[str, th.Tensor]) -> th.Tensor:
        cur = observations["current_expression"]
        if self.with_applied:
            cur = th.cat([cur, observations["applied"]], dim=1)
        cur = self.current(cur)
        tgt = self._embed_targets(observations["target_expression"])
        return th.cat([cur, tgt], dim=1)


def _distinct_rows(x: th.Tensor, direction: th.Tensor) -> tuple[th.Tensor | None, th.Tensor]:
    """(index of one row per group, group of each row) of ``x``'s distinct rows, grouped by their projection on
    ``direction``; the index is None when the rows are all distinct or the grouping is not exact."""
    keys, inv = th.unique(x @ direction.to(x.dtype), return_inverse=True)
    n = int(keys.shape[0])
    if n == x.shape[0]:
        return None, inv
    first = th.empty(n, dtype=th.long, device=x.device).scatter_(0, inv, th.arange(x.shape[0], device=x.device))
    if not th.equal(x.index_select(0, first).index_select(0, inv), x):
        return None, inv
    return first, inv


def policy_kwargs(train_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """MaskablePPO ``policy_kwargs`` of the reference network for the ``train`` settings (embed_dims,
    actor_dims, critic_dims)."""
    return dict(
        features_extractor_class=ReprogrammingExtractor,
        features_extractor_kwargs=dict(embed_dims=[int(d) for d in train_cfg["embed_dims"]]),
        net_arch=dict(pi=[int(d) for d in train_cfg["actor_dims"]], vf=[int(d) for d in train_cfg["critic_dims"]]),
        activation_fn=th.nn.LeakyReLU,
        optimizer_class=th.optim.Adam,
        optimizer_kwargs=dict(eps=1e-5, fused=True),
    )
