"""Warm start from exact shortest paths (issue 17): PPO from scratch vs behaviour cloning (BC) vs BC + PPO.

    .venv/bin/python benchmarks/warm_start.py [--results results/demo] [--seeds 77,1,2]
        [--budgets 0,25000,50000,100000] [--variants loops,ppo,bc_ppo] [--quick]

Needs the demo's ``oracle/model.npz`` and ``transitions/table.npy`` under ``--results``
(``snakemake results/demo/transitions/table.npy``). Settings: ``config/config.yaml``'s ``train`` merged with the
demo's overrides (the ``make demo`` schedule: 100k steps, lr 5e-4, n_steps 256, n_epochs 5) and its ``env``.

Variants (``--variants``):

* ``loops``: PPO from scratch, ``warm_start: none``, ``env.mask_revisits: false`` (the pipeline before issue 17);
* ``ppo``: PPO from scratch, no loops (``env.mask_revisits: true``);
* ``bc_ppo``: ``warm_start: bfs`` then PPO, no loops; its budget-0 point is BC alone;
* ``bc_ppo_lr<scale>`` (``--scales``, first two seeds): the same with ``warm_start_ppo_lr_scale: <scale>``.

Each (variant, seed) trains once with :func:`cellrl.train.train_agent` for the largest budget; at the first
rollout boundary at or after each budget a callback runs the test protocol (:func:`cellrl.evaluate.evaluate`,
the agent on every test cell x other cell type, the evaluation env with the variant's ``env``) and restores the
global RNGs afterwards, so the measurement does not change the run. The demo has one curriculum phase and a
constant learning rate, so the policy at step k of the run is that of a k-step run (a learning curve at equal
env steps). Reported per point: test success on BFS-reachable pairs (within the step limit), overall success,
the mean and median length ratio agent / BFS over the pairs the agent solves; per run the warm start's record
(samples, epochs, BC accuracy, seconds) and the training wall time. Means over seeds in ``summary``.

Writes benchmarks/out/warm_start_<timestamp>.json (full record) and, unless ``--quick``,
benchmarks/results/warm_start.json (the committed summary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from stable_baselines3.common.callbacks import BaseCallback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cellrl import checkpoints as ckpts  # noqa: E402
from cellrl.config import deep_merge  # noqa: E402
from cellrl.evaluate import evaluate  # noqa: E402
from cellrl.io import sha256_array  # noqa: E402
from cellrl.train import load_inputs, train_agent  # noqa: E402

VARIANTS = {
    "loops": ({"warm_start": "none"}, {"mask_revisits": False}),
    "ppo": ({"warm_start": "none"}, {"mask_revisits": True}),
    "bc_ppo": ({"warm_start": "bfs"}, {"mask_revisits": True}),
}


def demo_settings() -> tuple[dict[str, Any], dict[str, Any]]:
    """(train, env) of the demo dataset as config/config.yaml sets them."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    over = cfg["datasets"]["demo"].get("overrides", {})
    train = deep_merge(cfg["train"], over.get("train", {}))
    env = deep_merge(cfg["env"], over.get("env", {}))
    train.update(device="cpu", wandb={"mode": "disabled"})
    return train, env


def test_point(model: Any, table: np.ndarray, agent: Any, env: dict[str, Any], steps: int) -> dict[str, Any]:
    """The test protocol for the agent alone; global RNGs restored afterwards."""
    rng_js, rng_t = ckpts._global_rng()
    t0 = time.perf_counter()
    try:
        ev = evaluate(model, table, agent, env=env, n_episodes=None, seed=0, policies=("agent",))
    finally:
        ckpts._set_global_rng(rng_js, rng_t)
    a = ev.summary["policies"]["agent"]
    return {"timesteps": int(steps), "success_reachable": a["success_reachable"], "success": a["success"],
            "length_ratio": a["length_ratio_vs_bfs"], "length_ratio_median": a["length_ratio_vs_bfs_median"],
            "pairs_solved": int(ev.summary["length_ratio_pairs"]), "episodes": a["episodes"],
            "bfs_reachable": ev.summary["bfs_reachable_within_max_steps_frac"],
            "mean_length": a["mean_length"], "eval_s": round(time.perf_counter() - t0, 2)}


class Curve(BaseCallback):
    """Test protocol at the first rollout boundary at or after each budget (and at the end)."""

    def __init__(self, model: Any, table: np.ndarray, env: dict[str, Any], budgets: list[int], tag: str):
        super().__init__()
        self.m, self.table, self.env, self.tag = model, table, env, tag
        self.todo = sorted(budgets)
        self.points: list[dict[str, Any]] = []

    def _measure(self) -> None:
        ts = int(self.model.num_timesteps)
        while self.todo and self.todo[0] <= ts:
            self.todo.pop(0)
            if self.points and self.points[-1]["timesteps"] == ts:
                continue
            p = test_point(self.m, self.table, self.model, self.env, ts)
            self.points.append(p)
            print(f"  {self.tag} step {ts}: success on reachable {p['success_reachable']:.3f}, length ratio "
                  f"{p['length_ratio']:.3f} (median {p['length_ratio_median']:.3f})", flush=True)

    def _on_rollout_start(self) -> None:
        self._measure()

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        self.todo = [min(b, int(self.model.num_timesteps)) for b in self.todo]
        self._measure()


def machine() -> dict[str, Any]:
    import torch as th

    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu_model": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": th.__version__, "torch_threads": 1, "loadavg": os.getloadavg()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(ROOT / "results" / "demo"))
    ap.add_argument("--seeds", default="77,1,2")
    ap.add_argument("--budgets", default="0,25000,50000,100000")
    ap.add_argument("--variants", default="loops,ppo,bc_ppo")
    ap.add_argument("--scales", default="1.0,0.3,0.1",
                    help="also bc_ppo with these warm_start_ppo_lr_scale values (first two seeds; '' for none)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a train setting for every variant (e.g. --set learning_rate=1e-4); with any "
                         "--set no committed summary is written")
    ap.add_argument("--quick", action="store_true",
                    help="one seed, budgets 0 and 10000, no --scales; no committed summary")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.quick:
        seeds, budgets, args.scales = seeds[:1], [0, 10_000], ""
    res = Path(args.results)
    model, table = load_inputs(res / "oracle" / "model.npz", res / "transitions" / "table.npy")
    train_base, env_base = demo_settings()
    train_base["total_timesteps"] = max(budgets)
    sets = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)}
    train_base.update(sets)
    record: dict[str, Any] = {"machine": machine(), "results": str(res), "table_shape": list(table.shape),
                              "table_sha256": sha256_array(table),
                              "budgets": budgets, "seeds": seeds, "train": train_base, "env": env_base, "runs": []}
    t_all = time.perf_counter()
    jobs = [(v, *VARIANTS[v], seeds) for v in args.variants.split(",")]
    if "bc_ppo" in args.variants.split(","):
        jobs += [(f"bc_ppo_lr{sc}", {"warm_start": "bfs", "warm_start_ppo_lr_scale": float(sc)},
                  {"mask_revisits": True}, seeds[:2]) for sc in args.scales.split(",") if sc]
    for variant, tr_over, env_over, variant_seeds in jobs:
        for seed in variant_seeds:
            train = {**train_base, **tr_over, "seed": seed}
            env = {**env_base, **env_over}
            tag = f"{variant}/seed {seed}"
            print(f"{tag}: training {train['total_timesteps']} steps", flush=True)
            curve = Curve(model, table, env, budgets, tag)
            t0 = time.perf_counter()
            _, summary = train_agent(model, table, env, train, callbacks=[curve], progress=False, threads=1)
            record["runs"].append({"variant": variant, "seed": seed, "points": curve.points,
                                   "warm_start": summary.get("warm_start"),
                                   "train_wall_s": summary["wall_s"], "timesteps": summary["timesteps"],
                                   "final_val_success": summary["final_val_success"],
                                   "wall_s_with_evals": round(time.perf_counter() - t0, 1)})
    record["wall_s"] = round(time.perf_counter() - t_all, 1)
    record["summary"] = summarise(record["runs"])
    print(json.dumps(record["summary"], indent=1))
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"warm_start_{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(record, indent=1))
    if not (args.quick or sets):
        (ROOT / "benchmarks" / "results" / "warm_start.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant and budget point: mean (min, max) over seeds of success on reachable pairs and length ratio."""
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        by_step: dict[int, list[dict[str, Any]]] = {}
        for r in rs:
            for i, p in enumerate(r["points"]):
                by_step.setdefault(i, []).append(p)
        pts = []
        for i, ps in sorted(by_step.items()):
            row = {"timesteps": int(np.mean([p["timesteps"] for p in ps])), "seeds": len(ps)}
            for k in ("success_reachable", "length_ratio", "length_ratio_median"):
                v = [p[k] for p in ps if p[k] is not None]
                row[k] = round(float(np.mean(v)), 4) if v else None
                row[k + "_range"] = [round(min(v), 4), round(max(v), 4)] if v else None
            pts.append(row)
        ws = [r["warm_start"] for r in rs if r.get("warm_start") and r["warm_start"].get("method") == "bfs"]
        out[variant] = {"points": pts, "train_wall_s_mean": round(float(np.mean([r["train_wall_s"] for r in rs])), 1),
                        "warm_start_seconds_mean": round(float(np.mean([w["seconds"] for w in ws])), 1) if ws else None,
                        "bc_accuracy_mean": round(float(np.mean([w["accuracy"] for w in ws])), 4) if ws else None}
    return out


if __name__ == "__main__":
    main()
