"""Portable oracle model (``results/{dataset}/oracle/model.npz``): everything downstream needs, no celloracle.

Contract (arrays in the npz):

====================  =====================  ==================================================================
key                   shape / dtype          meaning
====================  =====================  ==================================================================
X                     (cells, genes) f64     imputed expression (CellOracle layer ``imputed_count``)
embedding             (cells, 2) f64         2-D embedding used for transitions (``oracle.embedding``)
cell_names            (cells,) str
gene_names            (genes,) str
cell_types            (cells,) str           cluster label per cell (CellOracle ``cluster_column_name``)
cluster_names         (clusters,) str        sorted unique cell types; ``cluster_ids`` index into it
cluster_ids           (cells,) int32
coef_data_{k}, coef_indices_{k}, coef_indptr_{k}
                      CSR of (genes, genes)  coef matrix of cluster k: row = regulator, column = target
regulators            (R,) str               active regulators (non-zero outgoing coefs in some cluster)
regulator_idx         (R,) int64             their gene indices
ko_values             (R,) f64               knockout value (0)
oe_values             (R,) f64               overexpression value (oracle.oe_value: max, or mean + oe_sd*SD after IQR cut; >= 0)
split                 (cells,) str           train | val | test
meta                  () str                 JSON: parameters used, dataset name, versions
====================  =====================  ==================================================================
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .errors import InputError
from .io import save_npz, verify_artifact

SPLITS = ("train", "val", "test")


@dataclass
class OracleModel:
    """In-memory form of ``model.npz``. See the module docstring for the contract."""

    X: np.ndarray
    embedding: np.ndarray
    cell_names: np.ndarray
    gene_names: np.ndarray
    cell_types: np.ndarray
    cluster_names: np.ndarray
    cluster_ids: np.ndarray
    coefs: list[sp.csr_matrix]
    regulators: np.ndarray
    regulator_idx: np.ndarray
    ko_values: np.ndarray
    oe_values: np.ndarray
    split: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_regulators(self) -> int:
        return int(len(self.regulators))

    @property
    def n_actions(self) -> int:
        """Actions 0..R-1 knock out regulator r, R..2R-1 overexpress it."""
        return 2 * self.n_regulators

    def split_mask(self, name: str) -> np.ndarray:
        """Boolean mask of cells in split ``name``."""
        return self.split == name

    def validate(self, source: object = "model") -> None:
        """Raise InputError if shapes or values are inconsistent."""
        n, g = self.X.shape
        checks = {
            "embedding": self.embedding.shape == (n, 2),
            "cell_names": self.cell_names.shape == (n,),
            "gene_names": self.gene_names.shape == (g,),
            "cell_types": self.cell_types.shape == (n,),
            "cluster_ids": self.cluster_ids.shape == (n,),
            "split": self.split.shape == (n,),
            "coefs": len(self.coefs) == len(self.cluster_names) and all(c.shape == (g, g) for c in self.coefs),
            "regulator_idx": self.regulator_idx.shape == self.regulators.shape
            and (len(self.regulator_idx) == 0 or int(self.regulator_idx.max()) < g),
            "oe_values": self.oe_values.shape == self.regulators.shape,
            "ko_values": self.ko_values.shape == self.regulators.shape,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"inconsistent model arrays: {bad}", path=source,
                             fix="re-run the fit_oracle rule to rebuild model.npz")
        if not np.isin(self.split, SPLITS).all():
            raise InputError(f"split must be one of {SPLITS}", path=source, field="split")

    def save(self, path: str | Path) -> Path:
        """Write ``model.npz`` atomically."""
        self.validate(path)
        arrays: dict[str, np.ndarray] = dict(
            X=np.asarray(self.X, dtype=np.float64),
            embedding=np.asarray(self.embedding, dtype=np.float64),
            cell_names=self.cell_names.astype(str),
            gene_names=self.gene_names.astype(str),
            cell_types=self.cell_types.astype(str),
            cluster_names=self.cluster_names.astype(str),
            cluster_ids=self.cluster_ids.astype(np.int32),
            regulators=self.regulators.astype(str),
            regulator_idx=self.regulator_idx.astype(np.int64),
            ko_values=self.ko_values.astype(np.float64),
            oe_values=self.oe_values.astype(np.float64),
            split=self.split.astype(str),
            meta=np.array(json.dumps(self.meta)),
        )
        for k, c in enumerate(self.coefs):
            c = sp.csr_matrix(c)
            arrays[f"coef_data_{k}"] = c.data.astype(np.float64)
            arrays[f"coef_indices_{k}"] = c.indices.astype(np.int32)
            arrays[f"coef_indptr_{k}"] = c.indptr.astype(np.int64)
        return save_npz(path, **arrays)


def load_model(path: str | Path, require_regulators: bool = True) -> OracleModel:
    """Load ``model.npz``; raise InputError naming the file when missing, malformed, (``require_regulators``)
    without any active regulator, i.e. no action for transitions, BFS, training or planning, or not matching the
    ``model_sha256`` that fit_oracle recorded in the ``stats.json`` next to it (checked when that file exists)."""
    path = Path(path)
    if not path.exists():
        raise InputError("model file not found", path=path, fix="run `snakemake <results>/oracle/model.npz` first")
    try:
        z = np.load(path, allow_pickle=False)
        g = z["gene_names"].shape[0]
        names = z["cluster_names"]
        coefs = [sp.csr_matrix((z[f"coef_data_{k}"], z[f"coef_indices_{k}"], z[f"coef_indptr_{k}"]), shape=(g, g))
                 for k in range(len(names))]
        m = OracleModel(
            X=z["X"], embedding=z["embedding"], cell_names=z["cell_names"], gene_names=z["gene_names"],
            cell_types=z["cell_types"], cluster_names=names, cluster_ids=z["cluster_ids"], coefs=coefs,
            regulators=z["regulators"], regulator_idx=z["regulator_idx"], ko_values=z["ko_values"],
            oe_values=z["oe_values"], split=z["split"], meta=json.loads(str(z["meta"])),
        )
    except KeyError as e:
        raise InputError(f"model.npz lacks array {e}", path=path, fix="rebuild it with the fit_oracle rule") from e
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated or not an npz
        raise InputError(f"cannot read model.npz ({type(e).__name__}: {e})", path=path,
                         fix="rebuild it with the fit_oracle rule") from e
    m.validate(path)
    if require_regulators and m.n_regulators == 0:
        raise InputError("the model has 0 active regulators, so there is no action to simulate or plan with",
                         path=path, field="regulators",
                         fix="refit with looser oracle.p_cutoff / larger oracle.top_n_links or a base GRN whose TFs "
                             "are expressed (fit_oracle now refuses such a fit), then rerun fit_oracle")
    verify_artifact(path, "model")
    return m


def random_model(n_cells: int = 300, n_genes: int = 40, n_types: int = 4, n_regulators: int = 6,
                 seed: int = 0) -> OracleModel:
    """A small random but well-formed model for unit tests of downstream stages (not biology)."""
    rng = np.random.default_rng(seed)
    types = np.array([f"T{i}" for i in range(n_types)])
    ids = rng.integers(0, n_types, n_cells).astype(np.int32)
    centers = rng.normal(0, 3, (n_types, 2))
    emb = centers[ids] + rng.normal(0, 0.7, (n_cells, 2))
    gene_centers = rng.gamma(2.0, 1.0, (n_types, n_genes))
    X = np.clip(gene_centers[ids] + rng.normal(0, 0.3, (n_cells, n_genes)), 0, None)
    reg_idx = np.sort(rng.choice(n_genes, n_regulators, replace=False)).astype(np.int64)
    coefs = []
    for _ in range(n_types):
        c = np.zeros((n_genes, n_genes))
        for r in reg_idx:
            tg = rng.choice(n_genes, 5, replace=False)
            c[r, tg] = rng.normal(0, 0.3, 5)
        np.fill_diagonal(c, 0)
        coefs.append(sp.csr_matrix(c))
    split = rng.choice(np.array(SPLITS), n_cells, p=[0.8, 0.1, 0.1])
    return OracleModel(
        X=X, embedding=emb, cell_names=np.array([f"c{i}" for i in range(n_cells)]),
        gene_names=np.array([f"g{j}" for j in range(n_genes)]), cell_types=types[ids], cluster_names=types,
        cluster_ids=ids, coefs=coefs, regulators=np.array([f"g{j}" for j in reg_idx]), regulator_idx=reg_idx,
        ko_values=np.zeros(n_regulators), oe_values=X[:, reg_idx].mean(0) + 1.5 * X[:, reg_idx].std(0),
        split=split, meta={"dataset": "random", "seed": seed},
    )
