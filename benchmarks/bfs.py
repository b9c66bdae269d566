"""BFS benchmark speed: all test pairs for 30,000 cells x 216 actions (issue 5: under a minute).

Random tables of the reference size: ``uniform`` (next cell anywhere: short paths, many frontier cells) and
``local`` (next cell within a window of the current one: long paths, like moves on an embedding). Each run
covers what rule ``bfs`` does: reverse CSR, one multi-source BFS + next-hop table per target type, and the
path reconstruction for every (test cell, other type) pair.

    .venv/bin/python benchmarks/bfs.py [--cells 30000] [--actions 216] [--types 20]

Writes benchmarks/out/bfs_<timestamp>.json (full record) and benchmarks/results/bfs.json (committed summary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from cellrl.bfs import reverse_graph, self_transition_mask, shortest_paths

HERE = Path(__file__).resolve().parent


def make_table(kind: str, n: int, a: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, n, (n, a)).astype(np.int32)
    window = max(2, n // 100)
    return ((np.arange(n)[:, None] + rng.integers(-window, window + 1, (n, a))) % n).astype(np.int32)


def run(kind: str, n: int, a: int, n_types: int, test_frac: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    table = make_table(kind, n, a, rng)
    types = np.sort(rng.integers(0, n_types, n))  # contiguous blocks of cells per type, as on an embedding
    goal = np.zeros((n_types, n), bool)
    for t in range(n_types):
        idx = np.flatnonzero(types == t)
        goal[t, rng.choice(idx, max(1, len(idx) // 4), replace=False)] = True  # 25th percentile goal sets
    test = np.flatnonzero(rng.random(n) < test_frac)

    t0 = time.perf_counter()
    allowed = self_transition_mask(table)
    reverse_graph(table, allowed)
    t_csr = time.perf_counter() - t0

    t0 = time.perf_counter()
    res = shortest_paths(table, goal, allowed)
    t_bfs = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_pairs = lengths = 0
    for c in test:
        for t in range(n_types):
            if types[c] == t:
                continue
            n_pairs += 1
            if res.dist[c, t] >= 0:
                lengths += len(res.path(table, int(c), t)[0])
    t_paths = time.perf_counter() - t0
    d = res.dist[test]
    return dict(kind=kind, cells=n, actions=a, types=n_types, test_cells=int(len(test)), test_pairs=n_pairs,
                reverse_csr_s=round(t_csr, 3), bfs_all_targets_s=round(t_bfs, 3),
                path_reconstruction_s=round(t_paths, 3), total_s=round(t_bfs + t_paths, 3),
                per_target_s=round(t_bfs / n_types, 4), max_depth=int(res.dist.max()),
                mean_test_length=round(float(d[d > 0].mean()), 2), unreachable_frac=float((d < 0).mean()),
                reconstructed_steps=int(lengths))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=30000)
    p.add_argument("--actions", type=int, default=216)
    p.add_argument("--types", type=int, default=20)
    p.add_argument("--test-frac", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    runs = [run(k, args.cells, args.actions, args.types, args.test_frac, args.seed) for k in ("uniform", "local")]
    for r in runs:
        print(f"{r['kind']:8s} {r['cells']} cells x {r['actions']} actions, {r['types']} targets, "
              f"{r['test_pairs']} test pairs: BFS {r['bfs_all_targets_s']:.2f} s + paths "
              f"{r['path_reconstruction_s']:.2f} s = {r['total_s']:.2f} s (depth {r['max_depth']})")
    record = dict(benchmark="bfs", time=time.strftime("%Y-%m-%dT%H:%M:%S"), machine=platform.node(),
                  cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                  load_avg_1min=round(os.getloadavg()[0], 2), numpy=np.__version__, args=vars(args), runs=runs,
                  limit_s=60)
    out = HERE / "out" / f"bfs_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    summary = HERE / "results" / "bfs.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} and {summary}")


if __name__ == "__main__":
    main()
