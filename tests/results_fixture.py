"""A tiny results folder (results/{dataset} layout) for evaluation, report and CLI tests.

random_model + a transition table whose moves stay near the cell in the embedding (so paths are several
steps long) + an untrained MaskablePPO saved to zip + a fake training log and a demo-style ground truth.
Type ``T3`` is made unreachable from the other types (every move into it is turned into a self-loop, which the
test mask removes), so the unreachable-target paths are exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

UNREACHABLE_TYPE = "T3"
ENV = {"max_steps": 12, "curriculum": {"enabled": False}}
TINY_TRAIN = {"n_steps": 16, "batch_size": 16, "n_epochs": 1, "embed_dims": [16, 8], "actor_dims": [16],
              "critic_dims": [16], "device": "cpu", "seed": 0}


def build_results(root: Path, train_steps: int = 0) -> dict[str, Path]:
    from scipy.spatial import cKDTree

    from cellrl.io import sha256_file
    from cellrl.model import random_model
    from cellrl.train import build_agent, make_vec_env

    m = random_model(n_cells=300, n_genes=40, n_types=4, n_regulators=6, seed=0)
    rng = np.random.default_rng(1)
    _, nn = cKDTree(m.embedding).query(m.embedding, 15)
    table = nn[np.arange(m.n_cells)[:, None], rng.integers(0, 15, (m.n_cells, m.n_actions))].astype(np.int32)
    t3 = m.cell_types == UNREACHABLE_TYPE
    into = t3[table] & ~t3[:, None]
    table[into] = np.broadcast_to(np.arange(m.n_cells)[:, None], table.shape)[into]

    res = root / "results" / "tiny"
    paths = {"results": res, "model": res / "oracle" / "model.npz", "table": res / "transitions" / "table.npy",
             "actions": res / "transitions" / "actions.tsv", "agent": res / "models" / "default" / "model.zip",
             "progress": res / "models" / "default" / "progress.csv",
             "train_summary": res / "models" / "default" / "train_summary.json", "truth": root / "ground_truth.json"}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    m.save(paths["model"])
    np.save(paths["table"], table)
    regs = [str(r) for r in m.regulators]
    R = len(regs)
    pd.DataFrame({"index": np.arange(2 * R), "gene": regs + regs, "kind": ["KO"] * R + ["OE"] * R,
                  "value": np.concatenate([m.ko_values, m.oe_values])}).to_csv(paths["actions"], sep="\t",
                                                                                index=False)
    env = make_vec_env(m, table, ENV, 2, seed=0)
    agent = build_agent(env, TINY_TRAIN)
    if train_steps:
        agent.learn(train_steps)
    agent.save(paths["agent"])
    # as train_files records them: the settings that rebuild the network and the zip's sha256
    paths["train_summary"].write_text(json.dumps({"env": ENV, "train": TINY_TRAIN, "timesteps": train_steps,
                                                  "model_zip_sha256": sha256_file(paths["agent"])}))
    pd.DataFrame({"timesteps": [16, 32, 48, 64], "train_success": [0.1, 0.2, 0.25, 0.3],
                  "val_success": [np.nan, 0.15, np.nan, 0.3], "ep_reward_mean": [-10, -9, -8.5, -8],
                  "phase": [0, 0, 1, 1]}).to_csv(paths["progress"], index=False)
    # demo-style ground truth: each type is defined by two of the regulators ("masters")
    types = [str(t) for t in m.cluster_names]
    masters = regs[:4]
    state = {t: {g: int(g in (masters[i], masters[(i + 1) % 4])) for g in masters} for i, t in enumerate(types)}
    reprog = [{"start": a, "target": b, "knockout": [g for g in masters if state[a][g] and not state[b][g]],
               "overexpress": [g for g in masters if state[b][g] and not state[a][g]]}
              for a in types for b in types if a != b]
    paths["truth"].write_text(json.dumps({"cell_types": types, "master_tfs": masters, "master_state": state,
                                          "reprogramming": reprog}))
    return paths
