"""Persistent-mode engine throughput: env-style steps/s of cellrl.persistent.engine.PersistentEngine (issue 14).

    .venv/bin/python benchmarks/persistent_throughput.py [--seconds 20] [--envs 8,256,1024,4096] [--quick]
    python3 benchmarks/persistent_throughput.py --backend cupy --threads 1 --envs 4096,16384,65536   # on a GPU

An env-style step for N envs at once: a random valid action per env (``action_mask``), ``apply``, then ``step``
(the whole set simulated from the current cell: CellOracle's multi-gene propagation, correlation with the
sampled neighbours, transition probabilities, embedding shift, nearest cell). Each episode draws a set size in
3..5 and restarts (empty set, random cell) when its set is full, so sets grow 1 -> 5 genes as in training.
steps/s = env steps / wall seconds, after a warm-up; also CPU seconds of this process (the machine is shared
with other jobs: wall time suffers from their load, CPU time less so; the load average is recorded).
Threads: 1 (BLAS held to one thread; the single-thread number) and 2 (the engine splits a batch over two
threads; numpy, scipy's sparse products and the KD-tree release the GIL).

Problems (transitions settings from config/config.yaml; the costs depend on the network's density and the
number of regulators and genes):
* ``3000_genes``: the synthetic atlas of benchmarks/transitions.py (``demo3000``: 3,000 cells x 3,000 genes,
  108 TFs -> 216 actions, CellOracle's own kNN imputation and ``fit_GRN_for_simulation``, 5,295 edges per
  cluster; built once, ~3 min, cached under benchmarks/out/cache/);
* ``3000_genes_random``: benchmarks/env_throughput.py's random model at that size (2,500 cells, 108 regulators,
  5 targets each: a sparse network);
* ``demo``: the demo pipeline's model (results/demo/oracle/model.npz: 2,400 cells x 400 genes, 20 regulators ->
  40 actions; skipped when absent) and env_throughput's random demo-size model.

``--backend cupy`` runs the engine on the GPU (one thread: the engine splits batches over threads on numpy only);
the script then needs numpy, scipy, numba, pandas, pyyaml and CuPy alone (no torch, gymnasium or CellOracle:
``3000_genes`` is read from its cache, built beforehand on a CPU machine, and skipped with the reason when absent).

Writes benchmarks/out/persistent_throughput_<timestamp>.json and (unless ``--quick``)
benchmarks/results/persistent_throughput.json (``_gpu.json`` for ``--backend cupy``). Goals: >= 10,000 steps/s
at 3,000 genes on this 2-core CPU; >= 100,000 on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from cellrl.config import load_config  # noqa: E402
from machine import MODEL_SIZES, machine_info  # noqa: E402
from cellrl.model import OracleModel, load_model, random_model  # noqa: E402
from cellrl.persistent.engine import PersistentEngine  # noqa: E402
from cellrl.xp import blas_threads  # noqa: E402

GOALS = {"numpy": 10_000, "cupy": 100_000}  # steps/s at 3,000 genes
SET_SIZES = (3, 5)  # each episode's set size is drawn in this range (inclusive)
DEMO_MODEL = ROOT / "results" / "demo" / "oracle" / "model.npz"


def problems(quick: bool, names: list[str] | None = None) -> dict[str, OracleModel | str]:
    """The models benchmarked (see the module docstring), only ``names`` when given; a model that cannot be had
    here is its reason instead."""
    want = names or ["3000_genes", "3000_genes_random", "demo", "demo_random"]
    out: dict[str, OracleModel | str] = {}
    for name in want:
        if name == "3000_genes":
            import transitions as tb  # benchmarks/transitions.py: the synthetic 3,000-gene atlas (CellOracle fit)

            cached = tb.CACHE / "demo3000_g3000" / "model.npz"  # read where it is (a GPU machine gets it carried)
            try:
                out[name] = load_model(cached if cached.exists() else tb.build("demo3000", 3000)["model"])
            except ImportError as e:  # building needs scanpy and CellOracle
                out[name] = f"not built ({cached} absent) and cannot be built here: {e}"
        elif name == "demo":
            out[name] = load_model(DEMO_MODEL) if DEMO_MODEL.exists() else f"{DEMO_MODEL} absent (run the demo)"
        elif name in ("3000_genes_random", "demo_random"):
            g, t, r, c, qc = MODEL_SIZES[name.removesuffix("_random")]
            out[name] = random_model(n_cells=qc if quick and name == "3000_genes_random" else c, n_genes=g,
                                     n_types=t, n_regulators=r)
        else:
            raise SystemExit(f"unknown problem {name!r}: choose from 3000_genes, 3000_genes_random, demo, "
                             "demo_random")
    return out


def env_loop(engine: PersistentEngine, n_envs: int, seconds: float, seed: int = 0) -> dict[str, Any]:
    """Env-style steps of ``n_envs`` episodes for ``seconds`` (after a warm-up); see the module docstring."""
    rng = np.random.default_rng(seed)
    N, R, A = engine.n_cells, engine.n_regulators, engine.n_actions
    cells = rng.integers(0, N, n_envs)
    applied = np.zeros((n_envs, R), np.int8)
    limit = rng.integers(SET_SIZES[0], SET_SIZES[1] + 1, n_envs)

    def one() -> tuple[float, int, float]:
        nonlocal cells, applied, limit
        mask = engine.action_mask(applied)
        a = np.argmax(np.where(mask, rng.random((n_envs, A)), -1.0), axis=1)  # a random valid action
        applied = engine.apply(applied, a)
        t = time.perf_counter()
        nxt = engine.step(cells, applied)
        t_eng = time.perf_counter() - t
        stag = int((nxt == cells).sum())
        cells = nxt
        size = (applied != 0).sum(axis=1)  # genes in the simulated sets
        full = size >= limit
        if full.any():  # episode over: empty set, new random start cell
            applied[full] = 0
            cells[full] = rng.integers(0, N, int(full.sum()))
            limit[full] = rng.integers(SET_SIZES[0], SET_SIZES[1] + 1, int(full.sum()))
        return t_eng, stag, float(size.mean())

    for _ in range(3):
        one()
    steps, calls, t_eng, stag, sizes = 0, 0, 0.0, 0, []
    c0, t0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds or calls < 3:
        te, st, sz = one()
        steps += n_envs
        calls += 1
        t_eng += te
        stag += st
        sizes.append(sz)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"n_envs": n_envs, "steps": steps, "calls": calls, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "steps_per_s": round(steps / wall, 1), "steps_per_cpu_s": round(steps / cpu, 1),
            "engine_share_of_wall": round(t_eng / wall, 3), "stagnation_fraction": round(stag / steps, 4),
            "mean_set_size_simulated": round(float(np.mean(sizes)), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per (problem, n_envs, threads)")
    p.add_argument("--envs", default="8,256,1024,4096", help="comma-separated batch sizes")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--problems", default=None, help="comma-separated subset of the problems")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s each, no summary written")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="the engine's array backend")
    args = p.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    goal = GOALS[args.backend]
    settings = dict(load_config()["transitions"], backend=args.backend)
    rec: dict[str, Any] = {"benchmark": "persistent_throughput", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "quick": args.quick, "seconds_per_run": seconds, "set_sizes": list(SET_SIZES),
                           "transitions_settings": settings, "goal_steps_per_s_3000_genes": goal,
                           "machine": machine_info(1), "problems": {}, "skipped": {}}
    rec["machine"]["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    probs = problems(args.quick, args.problems.split(",") if args.problems else None)
    for name, model in probs.items():
        if isinstance(model, str):
            rec["skipped"][name] = model
            print(f"{name}: skipped: {model}", flush=True)
            continue
        t = time.perf_counter()
        eng = PersistentEngine.from_model(model, settings)
        build_s = time.perf_counter() - t
        entry: dict[str, Any] = {"cells": model.n_cells, "genes": model.n_genes, "regulators": model.n_regulators,
                                 "actions": eng.n_actions, "clusters": len(model.coefs),
                                 "coef_nnz_per_cluster": [int(W.nnz) for W in model.coefs],
                                 "neighbors_sampled": int(eng.nbr.shape[1]), "engine_build_s": round(build_s, 2),
                                 "precomputed_neighbour_differences": eng.ZD is not None, "runs": []}
        for threads in [int(x) for x in args.threads.split(",")]:
            eng.threads = threads
            for n in [int(x) for x in args.envs.split(",")]:
                with blas_threads(1):
                    r = dict(env_loop(eng, n, seconds), threads=threads,
                             load_average=[round(x, 2) for x in os.getloadavg()])
                entry["runs"].append(r)
                print(name, json.dumps(r), flush=True)
        rec["problems"][name] = entry
    rec["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    best = max((r["steps_per_s"] for r in rec["problems"].get("3000_genes", {}).get("runs", [])), default=None)
    rec["best_steps_per_s_3000_genes"] = best
    rec["goal_met_3000_genes"] = best is not None and best >= goal
    tag = "" if args.backend == "numpy" else "_gpu"
    out = HERE / "out" / f"persistent_throughput{tag}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {out}")
    if not args.quick:
        res = HERE / "results" / f"persistent_throughput{tag}.json"
        res.write_text(json.dumps(rec, indent=2) + "\n")
        print(f"wrote {res}")


if __name__ == "__main__":
    main()
