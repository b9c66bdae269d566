"""What a table is computed for: the ``transitions:`` settings and the action list (KO / OE of each regulator)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError, InputError
from ..model import OracleModel


ACTION_KINDS = ("ko", "oe", "both")
NEXT_CELL_MODELS = ("celloracle", "pca", "pca_step", "pca_direction", "pca_step_direction", "prob_max")  # see cellrl.transitions.next_cell


# --------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TransitionSettings:
    """The ``transitions:`` config section (see config/README.md)."""

    n_propagation: int = 3
    n_neighbors: int = 200
    sampled_fraction: float = 0.3
    sigma_corr: float = 0.05
    knn_random: bool = True
    seed: int = 0
    backend: str = "auto"
    chunk_cells: int | None = None
    actions: str = "both"
    next_cell: str = "celloracle"
    n_pcs: int | None = None
    step_gain: float = 4.0  # pca_step(_direction): the simulated displacement is taken step_gain times

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "TransitionSettings":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"transitions: unknown setting(s) {unknown}; known: {sorted(names)}")
        s = cls(**d)
        s.check()
        return s

    def check(self) -> None:
        if not 1 <= int(self.n_propagation) <= 5:
            raise ConfigError("transitions.n_propagation must be 1..5 (CellOracle's N_PROP_MIN..N_PROP_MAX)")
        if self.n_neighbors < 1:
            raise ConfigError("transitions.n_neighbors must be >= 1")
        if not 0 < self.sampled_fraction <= 1:
            raise ConfigError("transitions.sampled_fraction must be in (0, 1]")
        if self.sigma_corr <= 0:
            raise ConfigError("transitions.sigma_corr must be > 0")
        if self.actions not in ACTION_KINDS:
            raise ConfigError(f"transitions.actions must be one of {ACTION_KINDS}, got {self.actions!r}")
        if self.backend not in ("auto", "numpy", "cupy"):
            raise ConfigError(f"transitions.backend must be auto, numpy or cupy, got {self.backend!r}")
        if self.next_cell not in NEXT_CELL_MODELS:
            raise ConfigError(f"transitions.next_cell must be one of {NEXT_CELL_MODELS}, got {self.next_cell!r}")
        if self.n_pcs is not None and self.n_pcs < 1:
            raise ConfigError("transitions.n_pcs must be >= 1 or null")
        if not (np.isfinite(self.step_gain) and self.step_gain > 0):
            raise ConfigError("transitions.step_gain must be a finite number > 0")
        if self.chunk_cells is not None and self.chunk_cells < 1:
            raise ConfigError("transitions.chunk_cells must be >= 1 or null")

    def result_keys(self) -> dict[str, Any]:
        """Settings that change the table (backend and chunking do not change the maths; ``step_gain`` only under
        ``pca_step`` and ``pca_step_direction``, so the other models' chunk keys are unchanged)."""
        keys = {k: getattr(self, k) for k in ("n_propagation", "n_neighbors", "sampled_fraction", "sigma_corr",
                                              "knn_random", "seed", "actions", "next_cell", "n_pcs")}
        if self.next_cell in ("pca_step", "pca_step_direction"):
            keys["step_gain"] = float(self.step_gain)
        return keys


# ---------------------------------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class Actions:
    """Action list: ``gene_idx[a]`` is set to ``values[a]`` in every cell. KO actions first, then OE."""

    gene_idx: np.ndarray  # (A,) int64
    values: np.ndarray  # (A,) float64
    kinds: np.ndarray  # (A,) "KO" | "OE"
    genes: np.ndarray  # (A,) str

    def __len__(self) -> int:
        return int(len(self.gene_idx))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"index": np.arange(len(self)), "gene": self.genes, "kind": self.kinds,
                             "value": self.values})


def build_actions(model: OracleModel, which: str = "both") -> Actions:
    """Actions of a model: 0..R-1 knock out regulator r, R..2R-1 overexpress it (``which`` = ko | oe | both)."""
    if which not in ACTION_KINDS:
        raise ConfigError(f"transitions.actions must be one of {ACTION_KINDS}, got {which!r}")
    R = model.n_regulators
    parts = []
    if which in ("ko", "both"):
        parts.append((model.regulator_idx, model.ko_values, np.full(R, "KO")))
    if which in ("oe", "both"):
        parts.append((model.regulator_idx, model.oe_values, np.full(R, "OE")))
    gi = np.concatenate([p[0] for p in parts]).astype(np.int64)
    vals = np.concatenate([p[1] for p in parts]).astype(np.float64)
    if (vals < 0).any() or not np.isfinite(vals).all():
        raise InputError("perturbation values must be finite and >= 0 (CellOracle refuses negative values)",
                         field="ko_values/oe_values", fix="rebuild model.npz with the fit_oracle rule")
    return Actions(gene_idx=gi, values=vals, kinds=np.concatenate([p[2] for p in parts]),
                   genes=model.gene_names[gi].astype(str))
