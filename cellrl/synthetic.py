"""Synthetic differentiation atlas with a planted gene regulatory network (the offline demo dataset).

The generator builds, from one seed:

* a **lineage tree** of ``n_cell_types`` cell types (a root "Stem" type, progenitors, terminal fates);
* **master TFs** (``Tf01``..) whose on/off combination (the type's *code*) defines each type: leaving the root
  switches the stem master off and the branch's master on; deeper fates keep their parent's masters and add
  their own. Masters of sibling branches cross-repress each other (planted negative edges);
* **other TFs** driven by one or two masters, and **target genes** (``Gene0001``..) driven by one to three
  TFs: every master activates a block of marker genes (and represses a few), other TFs act with either sign.
  Some genes are unregulated (housekeeping-like);
* **cells** at every type and, a fraction ``frac_transit`` of them, along the tree edges (differentiation
  trajectories) with a position ``t`` in [0, 1]; transit cells are labelled by the nearer end type;
* **negative-binomial UMI counts** from a log-linear model

      log mu[c, g] = log s_c + b_g + sum_r W[r, g] * a_r[c]

  where ``a_r`` is regulator r's activity (its own log fold change over baseline: a master's activity follows
  the cell's position in the tree plus a per-cell fluctuation that cross-repression passes on to competing
  masters; another TF's activity is ``sum_m W[m, r] a_m`` plus its own per-cell variation), ``s_c`` a
  log-normal size factor and ``b_g`` a gene baseline. Within-type TF variation is large enough to survive
  CellOracle's kNN imputation, so TFs are not collinear inside a type: ridge regression on log-normalised
  expression ranks planted edges well above decoys, and overexpressing a type's master moves neighbouring
  types' cells towards it (knocking out a type's own master moves its cells towards the parent type).

Transit cells are spread over the trajectories in proportion to their length (masters that change), so the
embedding shows one connected tree.

Outputs (``write_demo_dataset``): counts as h5ad (CSR, integer-valued float32, ``obs["cell_type"]``), the
base GRN in CellOracle's TFinfo format (planted edges plus ``decoy_edges_per_tf`` random decoys per TF), and
the ground truth as JSON (types, codes, planted and decoy edges, and for every ordered pair of types which
masters to knock out and which to overexpress).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ConfigError
from .io import write_atomic, write_h5ad, write_json

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = dict(n_cells=2400, n_genes=400, n_master_tfs=6, n_other_tfs=14, n_cell_types=6,
                                frac_transit=0.3, decoy_edges_per_tf=20, seed=7)

# Model constants (log scale = natural log of expected UMIs at size factor 1).
MASTER_ON = 2.6          # activity of a master that is "on" (~13-fold over off)
MASTER_NOISE = 0.5       # per-cell SD of master activity (persistent: it drives the targets too)
TF_NOISE = 0.8           # per-cell SD of other TFs' own activity beyond their masters' drive; large
                         # enough to survive kNN imputation, so that TFs are not collinear within a type
GENE_NOISE = 0.1         # per-cell SD of target log-expression beyond its regulators
SIZE_SD = 0.3            # log-normal SD of cell size factors
LOG_DEPTH = 0.0          # log of the mean size factor (sequencing depth)
CHUNK_CELLS = 4096


def _type_tree(n_types: int) -> tuple[list[str], list[int]]:
    """Names and parent index (-1 for the root) of a balanced lineage tree: Stem -> Prog* -> Fate*."""
    parents = [-1] + [(k - 1) // 2 for k in range(1, n_types)]
    depth = [0] * n_types
    for k in range(1, n_types):
        depth[k] = depth[parents[k]] + 1
    names, n_prog, n_fate = [], 0, 0
    for k in range(n_types):
        if depth[k] == 0:
            names.append("Stem")
        elif depth[k] == 1 and any(parents[j] == k for j in range(n_types)):
            n_prog += 1
            names.append(f"Prog{chr(64 + n_prog)}")
        else:
            n_fate += 1
            names.append(f"Fate{chr(64 + n_fate)}")
    return names, parents


def _type_codes(parents: list[int], n_masters: int) -> tuple[np.ndarray, list[list[int]]]:
    """On/off master code per type (types x masters, bool) and each type's own (identity) masters.

    Master m belongs to type m mod n_types (so every type owns one master; extra masters become second
    identity masters of the first types). Depth-1 types switch the root's masters off; deeper types keep their parent's masters.
    Codes must be unique; otherwise a ConfigError asks for more master TFs.
    """
    n_types = len(parents)
    own: list[list[int]] = [[] for _ in range(n_types)]
    for m in range(n_masters):
        own[m % n_types].append(m)
    codes = np.zeros((n_types, n_masters), dtype=bool)
    for k in range(n_types):
        if parents[k] >= 0 and parents[parents[k]] >= 0:  # depth >= 2: inherit
            codes[k] = codes[parents[k]]
        codes[k, own[k]] = True
    if len({c.tobytes() for c in codes}) < n_types:
        raise ConfigError(f"demo_data: n_master_tfs={n_masters} cannot give {n_types} cell types distinct "
                          f"master codes; set n_master_tfs >= n_cell_types")
    return codes, own


def generate_atlas(n_cells: int = 2400, n_genes: int = 400, n_master_tfs: int = 6, n_other_tfs: int = 14,
                   n_cell_types: int = 6, frac_transit: float = 0.3, decoy_edges_per_tf: int = 20,
                   seed: int = 7):
    """Generate the synthetic atlas.

    Returns ``(adata, tfinfo, truth)``: an AnnData of raw UMI counts (cells x genes, CSR float32 holding
    integers; ``obs`` columns ``cell_type``, ``trajectory``, ``t``; ``var`` columns ``is_tf``, ``is_master``),
    the base GRN as a CellOracle TFinfo DataFrame (``peak_id``, ``gene_short_name``, one 0/1 int column per
    TF), and the ground-truth dict (JSON-serialisable). Deterministic given ``seed``.
    """
    import anndata as ad

    n_tfs = n_master_tfs + n_other_tfs
    if n_cell_types < 2:
        raise ConfigError("demo_data.n_cell_types must be >= 2")
    if n_master_tfs < n_cell_types:
        raise ConfigError(f"demo_data: n_master_tfs ({n_master_tfs}) must be >= n_cell_types ({n_cell_types}): "
                          "every type owns a master TF")
    if n_genes < n_tfs + 10:
        raise ConfigError(f"demo_data.n_genes ({n_genes}) must exceed the number of TFs ({n_tfs}) by >= 10")
    if n_cells < 10 * n_cell_types:
        raise ConfigError(f"demo_data.n_cells ({n_cells}) must be >= 10 per cell type ({10 * n_cell_types})")
    rng = np.random.default_rng(seed)
    t0 = time.time()

    # ---- genes -------------------------------------------------------------------------------------------
    width = max(2, len(str(n_tfs)))
    tf_names = [f"Tf{i + 1:0{width}d}" for i in range(n_tfs)]
    n_targets = n_genes - n_tfs
    gwidth = max(4, len(str(n_targets)))
    gene_names = tf_names + [f"Gene{i + 1:0{gwidth}d}" for i in range(n_targets)]
    masters = np.arange(n_master_tfs)
    others = np.arange(n_master_tfs, n_tfs)
    targets = np.arange(n_tfs, n_genes)

    # ---- types, codes, trajectories ---------------------------------------------------------------------
    type_names, parents = _type_tree(n_cell_types)
    codes, own = _type_codes(parents, n_master_tfs)
    tree_edges = [(parents[k], k) for k in range(1, n_cell_types)]

    # ---- planted network: W[r, g] (regulator r -> gene g), natural-log effect per unit activity -----------
    W = np.zeros((n_tfs, n_genes))
    edges: list[tuple[int, int, float, str]] = []

    def plant(r: int, g: int, w: float, kind: str) -> None:
        W[r, g] = w
        edges.append((r, g, w, kind))

    # masters cross-repress: siblings, and depth-1 branches vs the root's masters
    children: dict[int, list[int]] = {}
    for p, c in tree_edges:
        children.setdefault(p, []).append(c)
    for p, kids in children.items():
        groups = [own[c] for c in kids] + ([own[p]] if parents[p] < 0 else [])
        for i, gi in enumerate(groups):
            for j, gj in enumerate(groups):
                if i != j:
                    for a in gi:
                        for b in gj:
                            plant(a, b, -float(rng.uniform(0.5, 0.8)), "master_cross_repression")
    # other TFs: driven by one or two masters
    for r in others:
        for m in rng.choice(masters, size=1 + int(rng.random() < 0.4), replace=False):
            plant(int(m), int(r), float(rng.choice([1, 1, -1]) * rng.uniform(0.5, 0.9)), "master_to_tf")
    # targets: ~45% markers of a master, ~35% driven by other TFs, ~20% unregulated; some get extra regulators
    perm = rng.permutation(targets)
    n_mark = int(round(0.45 * n_targets))
    n_tf_driven = int(round(0.35 * n_targets)) if n_other_tfs else 0
    marker_genes, tf_genes = perm[:n_mark], perm[n_mark:n_mark + n_tf_driven]
    for i, g in enumerate(marker_genes):
        m = masters[i % n_master_tfs]
        sign = -1.0 if rng.random() < 0.12 else 1.0
        plant(int(m), int(g), sign * float(rng.uniform(0.6, 1.0)), "master_to_target")
    for i, g in enumerate(tf_genes):
        r = others[i % n_other_tfs]
        plant(int(r), int(g), float(rng.choice([1, -1]) * rng.uniform(0.5, 1.0)), "tf_to_target")
    for g in np.concatenate([marker_genes, tf_genes]):
        if rng.random() < 0.3:
            cand = [r for r in range(n_tfs) if W[r, g] == 0]
            r = int(rng.choice(cand))
            plant(r, int(g), float(rng.choice([1, -1]) * rng.uniform(0.4, 0.8)), "secondary")

    # ---- cells: positions in the tree ---------------------------------------------------------------------
    n_transit = int(round(frac_transit * n_cells)) if tree_edges else 0
    n_at_types = n_cells - n_transit
    props = rng.dirichlet(np.full(n_cell_types, 8.0))
    at_counts = np.maximum(5, np.floor(props * n_at_types)).astype(int)
    at_counts[np.argmax(at_counts)] += n_at_types - at_counts.sum()
    # transit cells per trajectory in proportion to its length (number of masters that change along it)
    edge_len = np.array([np.sum(codes[p] != codes[c]) for p, c in tree_edges], dtype=float)
    edge_of = (rng.choice(len(tree_edges), n_transit, p=edge_len / edge_len.sum()) if n_transit
               else np.zeros(0, int))
    t_of = rng.random(n_transit)
    state = np.zeros((n_cells, n_master_tfs))       # master state in [0, 1]
    labels = np.empty(n_cells, dtype=object)
    traj = np.empty(n_cells, dtype=object)
    tpos = np.zeros(n_cells)
    i = 0
    for k, cnt in enumerate(at_counts):
        state[i:i + cnt] = codes[k]
        labels[i:i + cnt] = type_names[k]
        traj[i:i + cnt] = type_names[k]
        i += cnt
    for e, t in zip(edge_of, t_of):
        p, c = tree_edges[e]
        state[i] = (1 - t) * codes[p] + t * codes[c]  # masters change gradually along the path
        labels[i] = type_names[p] if t < 0.5 else type_names[c]
        traj[i] = f"{type_names[p]}->{type_names[c]}"
        tpos[i] = t
        i += 1
    order = rng.permutation(n_cells)
    state, labels, traj, tpos = state[order], labels[order], traj[order], tpos[order]

    # ---- activities and expression ---------------------------------------------------------------------
    act = np.zeros((n_cells, n_tfs))
    # masters: the cell's position in the tree plus a per-cell fluctuation that the cross-repression passes on
    # (one linear step), so a master's deviation lowers its competitors within a type as well as across types
    eps = rng.normal(0, MASTER_NOISE, (n_cells, n_master_tfs))
    act[:, masters] = MASTER_ON * state + eps + eps @ W[np.ix_(masters, masters)]
    if n_other_tfs:
        act[:, others] = act[:, masters] @ W[np.ix_(masters, others)] + rng.normal(0, TF_NOISE,
                                                                                      (n_cells, n_other_tfs))
    base = np.empty(n_genes)
    base[masters] = np.log(0.6)
    base[others] = rng.normal(np.log(1.5), 0.4, n_other_tfs)
    base[targets] = rng.normal(np.log(1.0), 0.8, n_targets)
    # genes mainly repressed start higher so that repression is visible
    neg = (W[:, targets] < 0).sum(0) > (W[:, targets] > 0).sum(0)
    base[targets[neg]] += 1.0
    theta = np.exp(rng.normal(np.log(6.0), 0.4, n_genes))     # NB inverse dispersion per gene
    log_size = rng.normal(LOG_DEPTH, SIZE_SD, n_cells)
    Wt = W[:, targets]

    blocks = []
    theta32 = theta.astype(np.float32)
    for start in range(0, n_cells, CHUNK_CELLS):
        sl = slice(start, min(start + CHUNK_CELLS, n_cells))
        m = sl.stop - sl.start
        logmu = np.empty((m, n_genes), dtype=np.float32)
        logmu[:, :n_tfs] = base[:n_tfs] + act[sl]
        logmu[:, n_tfs:] = base[targets] + act[sl] @ Wt
        logmu[:, n_tfs:] += GENE_NOISE * rng.standard_normal((m, n_targets), dtype=np.float32)
        logmu += log_size[sl, None].astype(np.float32)
        np.minimum(logmu, 12.0, out=logmu)
        mu = np.exp(logmu, out=logmu)
        lam = rng.standard_gamma(np.broadcast_to(theta32, mu.shape), dtype=np.float32)  # Gamma(theta, 1)
        lam *= mu / theta32                                                            # -> mean mu
        counts = rng.poisson(lam).astype(np.float32)
        blocks.append(sp.csr_matrix(counts))
    X = sp.vstack(blocks, format="csr")

    cell_names = [f"cell{j + 1:0{max(5, len(str(n_cells)))}d}" for j in range(n_cells)]
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels.astype(str), categories=type_names),
                        "trajectory": traj.astype(str), "t": tpos}, index=cell_names)
    var = pd.DataFrame({"is_tf": np.arange(n_genes) < n_tfs, "is_master": np.arange(n_genes) < n_master_tfs},
                       index=gene_names)
    settings = dict(n_cells=n_cells, n_genes=n_genes, n_master_tfs=n_master_tfs, n_other_tfs=n_other_tfs,
                    n_cell_types=n_cell_types, frac_transit=frac_transit, decoy_edges_per_tf=decoy_edges_per_tf,
                    seed=seed)
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["cellrl"] = {"source": "cellrl.synthetic", "settings": settings}

    # ---- base GRN: planted + decoys (TFinfo) -----------------------------------------------------------
    tfinfo_mask = W != 0
    decoys: list[tuple[int, int]] = []
    for r in range(n_tfs):
        free = np.flatnonzero(~tfinfo_mask[r])
        free = free[free != r]
        pick = rng.choice(free, size=min(decoy_edges_per_tf, len(free)), replace=False)
        for g in np.sort(pick):
            tfinfo_mask[r, g] = True
            decoys.append((r, int(g)))
    rows = np.flatnonzero(tfinfo_mask.any(0))
    tfinfo = pd.DataFrame(tfinfo_mask[:, rows].T.astype(np.int64), columns=tf_names)
    tfinfo.insert(0, "gene_short_name", [gene_names[g] for g in rows])
    tfinfo.insert(0, "peak_id", [f"chrS_{1_000_000 + 10_000 * g}_{1_000_000 + 10_000 * g + 1000}" for g in rows])

    # ---- ground truth -----------------------------------------------------------------------------------
    master_names = [tf_names[m] for m in masters]
    reprog = []
    for a in range(n_cell_types):
        for b in range(n_cell_types):
            if a == b:
                continue
            ko = [master_names[m] for m in masters if codes[a, m] and not codes[b, m]]
            oe = [master_names[m] for m in masters if codes[b, m] and not codes[a, m]]
            reprog.append({"start": type_names[a], "target": type_names[b], "knockout": ko, "overexpress": oe,
                           "n_changes": len(ko) + len(oe)})
    truth = {
        "settings": settings,
        "cell_types": type_names,
        "lineage_tree": [{"parent": type_names[p], "child": type_names[c]} for p, c in tree_edges],
        "master_tfs": master_names,
        "other_tfs": [tf_names[r] for r in others],
        "type_masters": {type_names[k]: [master_names[m] for m in own[k]] for k in range(n_cell_types)},
        "master_state": {type_names[k]: {master_names[m]: int(codes[k, m]) for m in masters}
                         for k in range(n_cell_types)},
        "planted_edges": [{"tf": tf_names[r], "target": gene_names[g], "sign": int(np.sign(w)),
                           "weight": round(float(w), 4), "kind": kind} for r, g, w, kind in edges],
        "decoy_edges": [{"tf": tf_names[r], "target": gene_names[g]} for r, g in decoys],
        "reprogramming": reprog,
        "cells_per_type": {n: int(c) for n, c in obs["cell_type"].value_counts().items()},
        "model": {"master_on": MASTER_ON, "master_noise": MASTER_NOISE, "tf_noise": TF_NOISE,
                  "gene_noise": GENE_NOISE, "size_sd": SIZE_SD,
                  "equation": "log mu[c,g] = log s_c + b_g + sum_r W[r,g] a_r[c]; counts ~ NB(mu, theta_g)"},
    }
    log.info("synthetic atlas: %d cells x %d genes (%d TFs, %d masters), %d types, %d planted + %d decoy edges, "
             "%.1f%% zeros, %.1f s", n_cells, n_genes, n_tfs, n_master_tfs, n_cell_types, len(edges), len(decoys),
             100 * (1 - X.nnz / (n_cells * n_genes)), time.time() - t0)
    return adata, tfinfo, truth


def write_demo_dataset(counts_path: str | Path, tfinfo_path: str | Path, truth_path: str | Path,
                       **settings: Any) -> None:
    """Generate the atlas (``settings`` as in ``generate_atlas``; config section ``demo_data``) and write
    counts (.h5ad), the TFinfo base GRN (.parquet, or TSV for other suffixes) and the truth (.json) atomically."""
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"demo_data: unknown settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    adata, tfinfo, truth = generate_atlas(**{**DEFAULTS, **settings})
    write_h5ad(counts_path, adata)
    if str(tfinfo_path).endswith(".parquet"):
        write_atomic(tfinfo_path, lambda p: tfinfo.to_parquet(p, index=False))
    else:
        write_atomic(tfinfo_path, lambda p: tfinfo.to_csv(p, sep="\t", index=False))
    write_json(truth_path, truth)
    log.info("wrote %s, %s, %s", counts_path, tfinfo_path, truth_path)


def load_truth(path: str | Path) -> dict[str, Any]:
    """Read a ground-truth JSON written by ``write_demo_dataset``."""
    return json.loads(Path(path).read_text())
