"""HPO throughput: trials per hour with 1 vs 2 parallel workers on one shared Optuna study (issue 6).

Each setting runs the same number of phase-1 trials (pruner off, so every trial costs the same budget) on a
fresh study, with worker processes started by ``python -m cellrl.hpo worker`` exactly as the hpo_worker rule
runs them (one torch thread each), released together once their imports are done. Wall time runs from the
release to the last worker's exit, so it includes study creation, the lock around asking for trials, the
storage writes and every evaluation, but not Python start-up.

Inputs: ``--inputs synthetic`` (default) is a random model (1,000 cells x 200 genes, 10 regulators) with a
transition table of moves to embedding neighbours; ``--inputs results/demo`` uses a pipeline's
``oracle/model.npz`` and ``transitions/table.npy``.

    .venv/bin/python benchmarks/hpo_workers.py [--trials 8] [--timesteps 4096] [--storage sqlite|journal]

Writes benchmarks/out/hpo_workers_<timestamp>.json (full record) and benchmarks/results/hpo_workers.json
(committed summary). The machine may be shared: the load average before and after each setting is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

ENV = {"max_steps": 10, "curriculum": {"enabled": False}}
TRAIN = {"n_envs": 4, "n_steps": 256, "batch_size": 64, "n_epochs": 4, "embed_dims": [128, 64],
         "actor_dims": [64], "critic_dims": [64], "device": "cpu", "seed": 0}
# parameters that do not change what a trial costs (no n_steps / n_epochs / widths), so both settings run
# equally expensive trials
SPACE = {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}, "gamma": {"low": 0.95, "high": 0.999},
         "ent_coef": {"low": 1e-4, "high": 0.05, "log": True}, "distance_reward_scale": {"low": 1.0, "high": 10.0}}


def synthetic_inputs(d: Path) -> tuple[Path, Path]:
    from scipy.spatial import cKDTree

    from cellrl.io import save_npy
    from cellrl.model import random_model

    m = random_model(n_cells=1000, n_genes=200, n_types=5, n_regulators=10, seed=0)
    rng = np.random.default_rng(1)
    _, nn = cKDTree(m.embedding).query(m.embedding, 20)
    table = nn[np.arange(m.n_cells)[:, None], rng.integers(1, 20, (m.n_cells, m.n_actions))].astype(np.int32)
    m.save(d / "model.npz")
    save_npy(d / "table.npy", table)
    return d / "model.npz", d / "table.npy"


def run_setting(n_workers: int, model: Path, table: Path, work: Path, hpo: dict, env: dict, train: dict,
                tag: str) -> dict:
    from cellrl.hpo import load_phase_study

    study_dir = work / f"w{n_workers}_{tag}"
    gate = work / f"go{n_workers}_{tag}"
    procs, logs = [], []
    for w in range(n_workers):
        args = work / f"w{n_workers}_{w}.json"
        args.write_text(json.dumps({"model_path": str(model), "table_path": str(table), "study_dir": str(study_dir),
                                    "phase": 1, "worker": w, "hpo": hpo, "env": env, "train": train,
                                    "threads": 1, "wait_for": str(gate)}))
        logs.append(work / f"w{n_workers}_{w}.log")
        procs.append(subprocess.Popen([sys.executable, "-m", "cellrl.hpo", "worker", str(args)],
                                      stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT, cwd=ROOT))
    time.sleep(15)  # imports (torch, SB3, optuna) finish before the gate opens
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    gate.touch()
    cpu = 0.0
    for p, lg in zip(procs, logs):
        _, status, usage = os.wait4(p.pid, 0)  # the worker's own CPU time (user + system)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise RuntimeError(f"worker failed:\n{lg.read_text()[-3000:]}")
        cpu += usage.ru_utime + usage.ru_stime
    wall = time.perf_counter() - t0
    trials = load_phase_study(study_dir, 1, hpo).get_trials(deepcopy=False)
    secs = [t.user_attrs["seconds"] for t in trials]
    per_worker = {w: sum(t.user_attrs["worker"] == w for t in trials) for w in range(n_workers)}
    return {"workers": n_workers, "trials": len(trials), "wall_s": round(wall, 2),
            "trials_per_hour": round(len(trials) / wall * 3600, 1),
            "mean_trial_s": round(float(np.mean(secs)), 2), "trials_per_worker": per_worker,
            "worker_cpu_s": round(cpu, 1), "cpu_s_per_trial_incl_imports": round(cpu / len(trials), 2),
            "states": sorted({t.state.name for t in trials}),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--timesteps", type=int, default=4096)
    ap.add_argument("--eval-points", type=int, default=4)
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--storage", choices=["sqlite", "journal"], default="sqlite")
    ap.add_argument("--inputs", default="synthetic", help="synthetic, or a results/<dataset> folder")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="alternate the settings this many times; best kept")
    a = ap.parse_args()

    hpo = {"storage": a.storage, "phase1_trials": a.trials, "trial_timesteps": a.timesteps,
           "eval_points": a.eval_points, "eval_episodes": a.eval_episodes, "pruner": "none",
           "sampler_startup_trials": a.trials, "enqueue_reference": False, "seed": 0, "search_space": SPACE}
    with tempfile.TemporaryDirectory(prefix="hpo_bench_") as tmp:
        work = Path(tmp)
        if a.inputs == "synthetic":
            model, table = synthetic_inputs(work)
            env, train = ENV, TRAIN
        else:
            from cellrl.config import dataset_config, load_config

            model, table = Path(a.inputs) / "oracle" / "model.npz", Path(a.inputs) / "transitions" / "table.npy"
            cfg = dataset_config(load_config(), Path(a.inputs).name)
            env, train = cfg["env"], {**cfg["train"], "device": "cpu"}
        runs = [run_setting(n, model, table, work, hpo, env, train, tag=str(rep))
                for rep in range(a.repeats) for n in a.workers]
    # neighbours on a shared machine only ever slow a run down: keep each setting's fastest repeat
    best = {n: max((r for r in runs if r["workers"] == n), key=lambda r: r["trials_per_hour"]) for n in a.workers}
    base = best[a.workers[0]]["trials_per_hour"]
    for r in runs:
        r["speedup"] = round(r["trials_per_hour"] / base, 2)
    record = {
        "benchmark": "hpo_workers", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "python": platform.python_version()},
        "inputs": a.inputs, "storage": a.storage, "trials": a.trials, "trial_timesteps": a.timesteps,
        "eval_points": a.eval_points, "eval_episodes": a.eval_episodes, "env": env, "train": train,
        "repeats": a.repeats, "runs": runs,
        "best": {str(n): {k: best[n][k] for k in ("trials_per_hour", "speedup", "wall_s", "mean_trial_s")}
                 for n in a.workers},
        "note": "torch 1 thread per worker; wall from release (after imports) to the last worker's exit; "
                "the machine may be shared with other jobs (see loadavg)",
    }
    out = HERE / "out" / f"hpo_workers_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "hpo_workers.json").write_text(json.dumps(record, indent=2) + "\n")
    for r in runs:
        print(f"{r['workers']} worker(s): {r['trials']} trials in {r['wall_s']:.1f} s = {r['trials_per_hour']:.0f} "
              f"trials/h (x{r['speedup']}), mean trial {r['mean_trial_s']:.1f} s, "
              f"CPU {r['cpu_s_per_trial_incl_imports']:.1f} s/trial, load {r['loadavg_before'][0]:.1f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
