"""Warm start from exact shortest paths (issue 17): PPO from scratch vs behaviour cloning (BC) vs BC + PPO.

    .venv/bin/python benchmarks/warm_start.py [--dataset demo] [--configfile OVERLAY.yaml] [--results results/demo]
        [--seeds 77,1,2] [--budgets 0,25000,50000,100000] [--variants loops,ppo,bc_ppo,dagger] [--quick]

Needs the dataset's ``oracle/model.npz`` and ``transitions/table.npy`` under ``--results`` (default
``results/<dataset>``; ``snakemake results/demo/transitions/table.npy``). Settings: ``config/config.yaml`` (with
``--configfile`` overlays, e.g. ``config/examples/mesc.yaml``) ``train`` and ``env`` merged with the dataset's
overrides (the demo: the ``make demo`` schedule, 100k steps, lr 5e-4, n_steps 256, n_epochs 5).

Variants (``--variants``):

* ``loops``: PPO from scratch, ``warm_start: none``, ``env.mask_revisits: false`` (the pipeline before issue 17);
* ``ppo``: PPO from scratch, no loops (``env.mask_revisits: true``);
* ``bc_ppo``: ``warm_start: bfs`` then PPO, no loops; its budget-0 point is BC alone;
* ``dagger``: ``warm_start: dagger`` (BC + DAgger rounds) then PPO, no loops; its first point is the warm start
  alone, at the environment steps of the DAgger rollouts (which the run's budget pays for);
* ``bc_ppo_lr<scale>`` (``--scales``, first two seeds): the same with ``warm_start_ppo_lr_scale: <scale>``.

Each (variant, seed) trains once with :func:`cellrl.train.train_agent` for the largest budget; at the first
rollout boundary at or after each budget a callback runs the test protocol (:func:`cellrl.evaluate.evaluate`,
the agent on every test cell x other cell type, the evaluation env with the variant's ``env``) and restores the
global RNGs afterwards, so the measurement does not change the run. The demo has one curriculum phase and a
constant learning rate, so the policy at step k of the run is that of a k-step run (a learning curve at equal
env steps). Reported per point: test success on BFS-reachable pairs (within the step limit), overall success,
the mean and median length ratio agent / BFS over the pairs the agent solves, and the same on the VALIDATION
pairs (``val_*``; make choices on these, report test); ``env_steps``: PPO steps + the warm start's environment
steps. Per run the warm start's record (samples, epochs, BC accuracy, seconds) and the training wall time.
Means over seeds in ``summary``.

Writes benchmarks/out/warm_start_<timestamp>.json (full record) and, unless ``--quick``,
benchmarks/results/warm_start[_<dataset>].json (the committed summary) and a self-contained HTML next to it
(learning curves of success on BFS-reachable test pairs and length ratio against environment steps per variant,
and the final numbers). ``--html-only FILE.json`` rewrites the HTML of a saved record.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from stable_baselines3.common.callbacks import BaseCallback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import machine_with_load  # noqa: E402
from cellrl import checkpoints as ckpts  # noqa: E402
from cellrl.config import deep_merge  # noqa: E402
from cellrl.evaluate import evaluate  # noqa: E402
from cellrl.env import EnvParams  # noqa: E402
from cellrl.io import sha256_array  # noqa: E402
from cellrl.train import load_inputs, path_quality, train_agent  # noqa: E402

VARIANTS = {
    "loops": ({"warm_start": "none"}, {"mask_revisits": False}),
    "ppo": ({"warm_start": "none"}, {"mask_revisits": True}),
    "bc_ppo": ({"warm_start": "bfs"}, {"mask_revisits": True}),
    "dagger": ({"warm_start": "dagger"}, {"mask_revisits": True}),
}
LABELS = {"loops": "PPO, loops allowed", "ppo": "PPO (none), no loops", "bc_ppo": "BC + PPO",
          "dagger": "BC + DAgger + PPO"}


def dataset_settings(dataset: str = "demo", overlays: list[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train, env) of ``dataset`` as config/config.yaml (+ ``overlays``) sets them."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for o in overlays:
        cfg = deep_merge(cfg, yaml.safe_load(Path(o).read_text()))
    if dataset not in cfg.get("datasets", {}):
        raise SystemExit(f"dataset {dataset!r} is not configured; pass its overlay with --configfile")
    over = cfg["datasets"][dataset].get("overrides", {})
    train = deep_merge(cfg["train"], over.get("train", {}))
    env = deep_merge(cfg["env"], over.get("env", {}))
    train.update(device="cpu", wandb={"mode": "disabled"})
    return train, env


def test_point(model: Any, table: np.ndarray, agent: Any, env: dict[str, Any], steps: int) -> dict[str, Any]:
    """The test protocol for the agent alone, and the same measures on every validation pair; global RNGs
    restored afterwards."""
    rng_js, rng_t = ckpts._global_rng()
    t0 = time.perf_counter()
    try:
        ev = evaluate(model, table, agent, env=env, n_episodes=None, seed=0, policies=("agent",))
        val = path_quality(agent, ev.geometry, table, EnvParams.from_config(env), "val", n_episodes=10 ** 9)
    finally:
        ckpts._set_global_rng(rng_js, rng_t)
    a = ev.summary["policies"]["agent"]
    return {"timesteps": int(steps), "success_reachable": a["success_reachable"], "success": a["success"],
            "val_success_reachable": val["success_reachable"], "val_length_ratio": val["length_ratio"],
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--configfile", action="append", default=[], help="config overlay (e.g. config/examples/mesc.yaml)")
    ap.add_argument("--results", default=None, help="default: results/<dataset>")
    ap.add_argument("--seeds", default="77,1,2")
    ap.add_argument("--budgets", default="0,25000,50000,100000")
    ap.add_argument("--variants", default="loops,ppo,bc_ppo,dagger")
    ap.add_argument("--scales", default="",
                    help="also bc_ppo with these warm_start_ppo_lr_scale values (first two seeds), e.g. 1.0,0.3,0.1")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a train setting for every variant (e.g. --set learning_rate=1e-4); with any "
                         "--set no committed summary is written")
    ap.add_argument("--quick", action="store_true",
                    help="one seed, budgets 0 and 10000, no --scales; no committed summary")
    ap.add_argument("--html-only", default=None, metavar="RECORD.json", help="rewrite the HTML of a saved record")
    ap.add_argument("--merge", default=None, metavar="RECORD.json",
                    help="keep this earlier record's runs of the variants not run now (same table required)")
    args = ap.parse_args(argv)
    if args.html_only:
        record = json.loads(Path(args.html_only).read_text())
        print(write_html(record, Path(args.html_only).with_suffix(".html")))
        return record
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.quick:
        seeds, budgets, args.scales = seeds[:1], [0, 10_000], ""
    res = Path(args.results or ROOT / "results" / args.dataset)
    model, table = load_inputs(res / "oracle" / "model.npz", res / "transitions" / "table.npy")
    train_base, env_base = dataset_settings(args.dataset, args.configfile)
    train_base["total_timesteps"] = max(budgets)
    sets = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)}
    train_base.update(sets)
    record: dict[str, Any] = {"machine": machine_with_load(), "dataset": args.dataset, "results": str(res),
                              "table_shape": list(table.shape), "table_sha256": sha256_array(table),
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
            agent, summary = train_agent(model, table, env, train, callbacks=[curve], progress=False, threads=1)
            if not curve.points:         # the warm start's rollouts took the whole budget: no PPO step, no callback
                curve.points.append(test_point(model, table, agent, env, int(agent.num_timesteps)))
            ws = summary.get("warm_start") or {}
            for p in curve.points:       # x: environment steps, the warm start's rollouts included
                p["env_steps"] = p["timesteps"] + int(ws.get("env_steps", 0))
            record["runs"].append({"variant": variant, "seed": seed, "points": curve.points, "warm_start": ws,
                                   "train_wall_s": summary["wall_s"], "timesteps": summary["timesteps"],
                                   "env_steps": summary.get("env_steps", summary["timesteps"]),
                                   "final_val_success": summary["final_val_success"],
                                   "wall_s_with_evals": round(time.perf_counter() - t0, 1)})
    if args.merge:
        old = json.loads(Path(args.merge).read_text())
        if old["table_sha256"] != record["table_sha256"] or old["budgets"] != budgets:
            raise SystemExit(f"--merge {args.merge}: another table or other budgets; rerun those variants instead")
        ran = {r["variant"] for r in record["runs"]}
        kept = [r for r in old["runs"] if r["variant"] not in ran]
        record["runs"] = kept + record["runs"]
        record["merged"] = {"from": str(args.merge), "variants": sorted({r["variant"] for r in kept}),
                            "machine": old.get("machine"), "wall_s": old.get("wall_s")}
    record["wall_s"] = round(time.perf_counter() - t_all, 1)
    record["summary"] = summarise(record["runs"])
    print(json.dumps(record["summary"], indent=1))
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    stem = "warm_start" if args.dataset == "demo" else f"warm_start_{args.dataset}"
    (out / f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(record, indent=1))
    if not (args.quick or sets):
        (ROOT / "benchmarks" / "results" / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(write_html(record, ROOT / "benchmarks" / "results" / f"{stem}.html"))
    else:
        print(write_html(record, out / f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}.html"))
    return record


MEASURES = ("success_reachable", "length_ratio", "length_ratio_median", "val_success_reachable", "val_length_ratio")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant and budget point: mean (min, max) over seeds of each of :data:`MEASURES` and the env steps."""
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        by_step: dict[int, list[dict[str, Any]]] = {}
        for r in rs:
            for i, p in enumerate(r["points"]):
                by_step.setdefault(i, []).append(p)
        pts = []
        for i, ps in sorted(by_step.items()):
            row = {"timesteps": int(np.mean([p["timesteps"] for p in ps])),
                   "env_steps": int(np.mean([p.get("env_steps", p["timesteps"]) for p in ps])), "seeds": len(ps)}
            for k in MEASURES:
                v = [p[k] for p in ps if p.get(k) is not None]
                row[k] = round(float(np.mean(v)), 4) if v else None
                row[k + "_range"] = [round(min(v), 4), round(max(v), 4)] if v else None
            pts.append(row)
        ws = [r["warm_start"] for r in rs if r.get("warm_start") and r["warm_start"].get("method") != "none"]
        out[variant] = {"points": pts, "train_wall_s_mean": round(float(np.mean([r["train_wall_s"] for r in rs])), 1),
                        "warm_start_seconds_mean": round(float(np.mean([w["seconds"] for w in ws])), 1) if ws else None,
                        "warm_start_env_steps_mean": int(np.mean([w.get("env_steps", 0) for w in ws])) if ws else 0,
                        "bc_accuracy_mean": round(float(np.mean([w["accuracy"] for w in ws])), 4) if ws else None}
    return out


def write_html(record: dict[str, Any], path: Path) -> Path:
    """A self-contained HTML page: the learning-curve figure and the final numbers of every variant."""
    import tempfile

    from cellrl.io import write_text
    from cellrl.plots import warm_start_curves
    from cellrl.report import CSS, _img, html_table

    summ = record["summary"]
    labels = {v: LABELS.get(v, v.replace("bc_ppo_lr", "BC + PPO at lr x ")) for v in summ}
    with tempfile.TemporaryDirectory() as tmp:
        fig = _img(warm_start_curves(summ, Path(tmp) / "warm_start_curves.png", labels),
                   "mean over seeds (bars: min-max); x: environment steps, the warm start's rollouts included "
                   "(BC takes none, DAgger's rollouts are paid from the same budget)")
    rows = []
    for v, d in summ.items():
        first, last = d["points"][0], d["points"][-1]
        rows.append({"variant": labels[v], "seeds": last["seeds"], "env_steps": last["env_steps"],
                     "start": first["success_reachable"], "start_ratio": first["length_ratio"],
                     "success_reachable": last["success_reachable"], "length_ratio": last["length_ratio"],
                     "length_ratio_median": last["length_ratio_median"],
                     "val_success_reachable": last.get("val_success_reachable"),
                     "val_length_ratio": last.get("val_length_ratio"),
                     "ws_steps": d.get("warm_start_env_steps_mean", 0), "ws_s": d.get("warm_start_seconds_mean"),
                     "train_s": int(round(d["train_wall_s_mean"]))})
    m = record.get("machine", {})
    text = "\n".join([
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>cellrl warm start benchmark</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Warm start: none, BC, BC + PPO, DAgger at equal environment steps "
        f"(<code>{record.get('dataset', 'demo')}</code>)</h1>",
        f"<p class='note'>benchmarks/warm_start.py; table {record['table_shape']} (sha256 "
        f"{record['table_sha256'][:12]}), seeds {record['seeds']}, budget {max(record['budgets']):,} environment "
        f"steps; test protocol on every test pair (deterministic agent); validation columns: every validation pair. "
        f"'PPO, loops allowed' runs without <code>env.mask_revisits</code>, the others with it. CPU "
        f"{m.get('cpu_model', '')}, {m.get('cores')} cores (shared; timings distorted).</p>",
        "<h2>Learning curves</h2>", fig,
        "<h2>Final numbers</h2>",
        html_table(rows, pct=["start", "success_reachable", "val_success_reachable"], left=["variant"],
                   headers={"env_steps": "env steps", "start": "test success (reachable), first point",
                            "start_ratio": "length / BFS, first point",
                            "success_reachable": "test success (reachable)", "length_ratio": "length / BFS (test)",
                            "length_ratio_median": "median", "val_success_reachable": "val success (reachable)",
                            "val_length_ratio": "length / BFS (val)", "ws_steps": "warm-start env steps",
                            "ws_s": "warm start s", "train_s": "training s"}),
        "</body></html>"])
    write_text(path, text)
    return path


if __name__ == "__main__":
    main()
