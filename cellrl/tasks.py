"""Task geometry of the reprogramming problem: scaled expression, target centroids, goal sets, action masks.

Everything the environment, BFS and evaluation need to agree on lives here, computed once per model with
array operations (no per-cell Python loops):

* a StandardScaler fitted on the TRAINING cells only (``mean``, ``std``), and ``z`` = the z-scored imputed
  expression of every cell (float32, cells x genes);
* one centroid per cell type in z-space: the mean of the training cells of that type that lie within the
  ``centroid_percentile`` of cosine distance to the type mean (outliers dropped);
* a goal set per type: cells of that type whose cosine distance to the centroid is at most the
  ``goal_percentile`` of the training cells' distances (``goal_threshold``);
* the curriculum order: for each start type, the other types ordered by the distance between their
  embedding (UMAP) centroids;
* the action mask: an action is allowed iff it moves the cell (next != self) and, during training, the next
  cell is a training cell (so no training episode ever visits a validation or test cell).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import sha256_array, verify_artifact
from .model import OracleModel


def _unit_rows(a: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    a = np.asarray(a, dtype=np.float32)
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(n > 0, n, 1.0).astype(np.float32)


@dataclass
class TaskGeometry:
    """Scaled expression, centroids, goal sets and curriculum order of one model (see module docstring).

    Shapes: ``C`` cells, ``G`` genes, ``T`` cell types.
    """

    mean: np.ndarray            # (G,) f64, scaler mean over training cells
    std: np.ndarray             # (G,) f64, scaler SD over training cells (1 where the SD is 0)
    z: np.ndarray               # (C, G) f32, z-scored expression of every cell
    type_names: np.ndarray      # (T,) str
    type_ids: np.ndarray        # (C,) int64, index into type_names
    split: np.ndarray           # (C,) str, train | val | test
    centroids: np.ndarray       # (T, G) f32, target centroids in z-space
    goal_threshold: np.ndarray  # (T,) f64, max cosine distance to the centroid that counts as reached
    cos_sim: np.ndarray         # (C, T) f32, cosine similarity of every cell to every centroid
    goal_mask: np.ndarray       # (T, C) bool, cell c is a goal cell for target type t
    embedding_centroids: np.ndarray  # (T, 2) f64, mean embedding of the training cells of each type
    goal_percentile: float = 25.0
    centroid_percentile: float = 95.0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: OracleModel, goal_percentile: float = 25,
                   centroid_percentile: float = 95) -> "TaskGeometry":
        """Compute the geometry of ``model``; raise InputError if a cell type has no training cell."""
        if not (0 <= goal_percentile <= 100 and 0 <= centroid_percentile <= 100):
            raise InputError("percentiles must lie in [0, 100]", field="env.goal_percentile/centroid_percentile")
        X = np.asarray(model.X, dtype=np.float64)
        split = np.asarray(model.split).astype(str)
        train = split == "train"
        if not train.any():
            raise InputError("the model has no training cells", field="split",
                             fix="check the split stage (split.train must be > 0)")
        type_names = np.asarray(model.cluster_names).astype(str)
        type_ids = np.asarray(model.cluster_ids, dtype=np.int64)
        n_types = len(type_names)
        counts = np.bincount(type_ids[train], minlength=n_types)
        if (counts == 0).any():
            missing = type_names[counts == 0].tolist()
            raise InputError(f"cell types without training cells: {missing}", field="split",
                             fix="every cell type needs training cells; lower split.val/test or merge tiny types")

        mean = X[train].mean(0)
        std = X[train].std(0)
        std = np.where(std > 0, std, 1.0)
        z = ((X - mean) / std).astype(np.float32)
        zu = _unit_rows(z)

        # Type means of the training cells (one matmul with a one-hot matrix), then the outlier cut.
        tr_ids = type_ids[train]
        onehot = np.zeros((n_types, int(train.sum())), dtype=np.float32)
        onehot[tr_ids, np.arange(len(tr_ids))] = 1.0
        ztr = z[train]
        type_mean = (onehot @ ztr) / counts[:, None]
        d_mean = 1.0 - np.einsum("ij,ij->i", zu[train], _unit_rows(type_mean)[tr_ids])
        cut = _group_percentile(d_mean, tr_ids, n_types, centroid_percentile)
        keep = d_mean <= cut[tr_ids] + 1e-7
        w = onehot * keep[None, :]
        centroids = ((w @ ztr) / np.maximum(w.sum(1, keepdims=True), 1.0)).astype(np.float32)

        cos_sim = zu @ _unit_rows(centroids).T                   # (C, T)
        d_train = 1.0 - cos_sim[train, tr_ids]
        threshold = _group_percentile(d_train, tr_ids, n_types, goal_percentile)
        goal_mask = ((type_ids[None, :] == np.arange(n_types)[:, None])
                     & ((1.0 - cos_sim.T) <= threshold[:, None] + 1e-7))

        emb = np.asarray(model.embedding, dtype=np.float64)
        emb_c = (onehot.astype(np.float64) @ emb[train]) / counts[:, None]
        return cls(mean=mean, std=std, z=z, type_names=type_names, type_ids=type_ids, split=split,
                   centroids=centroids, goal_threshold=threshold.astype(np.float64),
                   cos_sim=cos_sim.astype(np.float32), goal_mask=goal_mask, embedding_centroids=emb_c,
                   goal_percentile=float(goal_percentile), centroid_percentile=float(centroid_percentile))

    # ------------------------------------------------------------------ queries
    @property
    def n_cells(self) -> int:
        return int(self.z.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.z.shape[1])

    @property
    def n_types(self) -> int:
        return int(len(self.type_names))

    def in_split(self, name: str) -> np.ndarray:
        """(C,) bool: the cells of split ``name`` (train | val | test)."""
        return split_mask(self.split, name)

    def type_index(self, name: str) -> int:
        """Index of cell type ``name``; InputError listing the known types when unknown."""
        hits = np.flatnonzero(self.type_names == str(name))
        if len(hits) == 0:
            raise InputError(f"unknown target cell type {name!r}; known types: {self.type_names.tolist()}",
                             field="target")
        return int(hits[0])

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Scale raw (imputed) expression rows with the training-cell scaler -> float32 z."""
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def umap_centroid_order(self, start_type: int) -> np.ndarray:
        """Other cell types ordered by embedding-centroid distance from ``start_type`` (nearest first).

        Ties break by type index (stable sort), so the order is deterministic.
        """
        d = np.linalg.norm(self.embedding_centroids - self.embedding_centroids[start_type], axis=1)
        order = np.argsort(d, kind="stable")
        return order[order != start_type].astype(np.int64)

    def target_order(self) -> np.ndarray:
        """(T, T-1) int64: row s = ``umap_centroid_order(s)``."""
        return np.stack([self.umap_centroid_order(s) for s in range(self.n_types)]) if self.n_types > 1 \
            else np.zeros((self.n_types, 0), dtype=np.int64)

    def is_goal(self, cells: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Vectorised goal test: cell ``cells[i]`` has reached target type ``targets[i]``."""
        return self.goal_mask[targets, cells]

    def state(self) -> dict:
        """The scaler state (for checkpoints and provenance)."""
        return {"mean": self.mean.copy(), "std": self.std.copy(), "goal_threshold": self.goal_threshold.copy(),
                "goal_percentile": self.goal_percentile, "centroid_percentile": self.centroid_percentile}


def split_mask(split: np.ndarray, name: str) -> np.ndarray:
    """(C,) bool: the cells whose split label is ``name`` (labels as str, bytes or objects)."""
    return np.asarray(split).astype(str) == name


def _group_percentile(values: np.ndarray, groups: np.ndarray, n_groups: int, q: float) -> np.ndarray:
    """Percentile ``q`` (numpy's linear interpolation) of ``values`` within each group, vectorised.

    Sorts once by (group, value) and interpolates at each group's fractional rank.
    """
    order = np.lexsort((values, groups))
    v = values[order].astype(np.float64)
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = (counts - 1) * (q / 100.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, counts - 1)
    frac = pos - lo
    out = np.full(n_groups, np.nan)
    ok = counts > 0
    vlo = v[(starts + lo)[ok]]
    vhi = v[(starts + hi)[ok]]
    out[ok] = vlo + (vhi - vlo) * frac[ok]
    return out


def validate_table(table: np.ndarray, n_cells: int, n_actions: int, source: object = "table") -> np.ndarray:
    """Check a transition table against the model; return it as a C-contiguous int32 array."""
    table = np.asarray(table)
    if table.ndim != 2:
        raise InputError(f"transition table must be 2-D (cells x actions), got shape {table.shape}", path=source)
    if table.shape != (n_cells, n_actions):
        raise InputError(f"transition table shape {table.shape} does not match the model "
                         f"({n_cells} cells x {n_actions} actions = 2 x {n_actions // 2} regulators)",
                         path=source, fix="re-run the transitions rule for this model")
    if not np.issubdtype(table.dtype, np.integer):
        raise InputError(f"transition table must hold integer cell indices, got {table.dtype}", path=source)
    if table.size and (table.max() >= n_cells or table.min() < -1):
        raise InputError("transition table holds cell indices out of range", path=source,
                         fix="re-run the transitions rule for this model")
    return np.ascontiguousarray(table, dtype=np.int32)


def check_table(table: np.ndarray, allowed: np.ndarray | None = None) -> None:
    """Raise InputError unless ``table`` is a 2-D integer cells x actions table of cell indices (-1: none)."""
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.integer):
        raise InputError(f"transition table must be a 2-D integer array, got {table.dtype} {table.shape}",
                         fix="rebuild it with the transitions rule")
    n = table.shape[0]
    if table.shape[1] == 0:
        raise InputError(f"transition table has {n} cells but 0 actions (the model has no active regulator)",
                         fix="refit the oracle so that it keeps regulators (rule fit_oracle), then rebuild the table")
    if table.size and (int(table.min()) < -1 or int(table.max()) >= n):
        raise InputError(f"transition table holds cell indices outside [0, {n}) (-1 = no transition)",
                         fix="the table and model.npz must come from the same run; rebuild the table")
    if allowed is not None and allowed.shape != table.shape:
        raise InputError(f"mask shape {allowed.shape} differs from table shape {table.shape}")


def load_table(path: str | Path, n_cells: int | None = None, n_actions: int | None = None) -> np.ndarray:
    """Load ``table.npy``; raise InputError naming the file when missing, inconsistent with the model or not
    matching the ``table_sha256`` recorded in the transitions rule's ``stats.json`` next to it (when present)."""
    path = Path(path)
    if not path.exists():
        raise InputError("transition table not found", path=path, fix="run the transitions rule first")
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the transition table ({e})", path=path,
                         fix="rebuild it with the transitions rule") from e
    if n_cells is None:
        check_table(table)
        out = table
    else:
        out = validate_table(table, n_cells, n_actions if n_actions is not None else table.shape[1], source=path)
    verify_artifact(path, "table", actual=sha256_array(table))
    return out


def allowed_mask(table: np.ndarray, split: np.ndarray, training: bool) -> np.ndarray:
    """(cells x actions) bool: action a is allowed in cell c.

    Allowed iff ``table[c, a] != c`` (the perturbation moves the cell; negative entries mean "no
    transition" and are never allowed) and, when ``training``, the next cell is a training cell.
    """
    table = np.asarray(table)
    cells = np.arange(table.shape[0])[:, None]
    ok = (table != cells) & (table >= 0)
    if training:
        is_train = split_mask(split, "train")
        ok &= is_train[np.clip(table, 0, None)]
    return ok
