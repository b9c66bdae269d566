"""Next-cell models against the demo's planted truth (issue 13): one transition table per ``transitions.next_cell``.

For each model: the table (cellrl.transitions.compute_table on the dataset's model.npz, the dataset's transitions
settings), then the evaluate rule's protocol without an agent (BFS, greedy, random on the test cells;
cellrl.evaluate.evaluate) and, where the dataset has one (the demo), the planted-truth check: ``bfs_agreement``
(share of BFS plans that follow the planted recipe), ``mean_planted_rank`` (planted actions' percentile by
one-step gain; ``mean_planted_best_rank``, complementary: the best planted action's percentile per start cell).
Also reachability (share of test pairs with a path; a start type x target type matrix of the
share of test cells that reach the target type) and the self-transition fraction.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/next_cell_models.py [--dataset demo] [--models celloracle,pca]
        [--configfile config/examples/mesc.yaml] [--threads 2]
        [--pipeline-summary results/demo/benchmark/default/summary.json]

Needs results/{dataset}/oracle/model.npz (the pipeline's fit_oracle output). ``--oe-value`` (default: the
dataset's ``oracle.oe_value``): where the model was written with another rule, its overexpression values are
recomputed from its imputed expression with :func:`cellrl.oracle.oe_values` (what fit_oracle writes with that
setting; nothing else in model.npz depends on it). Writes the dataset's entry of
benchmarks/results/next_cell_models.json (``<dataset>@oe_<value>`` when not the configured rule; other entries
are kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from cellrl.config import dataset_config, load_config
from cellrl.evaluate import action_table, evaluate
from cellrl.model import load_model
from cellrl.oracle import oe_values
from cellrl.transitions import NEXT_CELL_MODELS, compute_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def type_reachability(dist: np.ndarray, type_ids: np.ndarray, names: np.ndarray, cells: np.ndarray) -> dict:
    """{start type: {target type: share of its ``cells`` with a path to the target type}} (BFS distances)."""
    out: dict[str, dict[str, float]] = {}
    for s, sn in enumerate(names):
        cs = cells[type_ids[cells] == s]
        out[str(sn)] = {str(tn): (float((dist[cs, t] >= 0).mean()) if len(cs) else None)
                        for t, tn in enumerate(names) if t != s}
    return out


def measure(model: Any, settings: dict, env: dict, evaluate_cfg: dict, truth: dict | None, threads: int) -> dict:
    """Table, BFS / greedy / random protocol and planted-truth metrics of one next-cell model."""
    t0 = time.perf_counter()
    table, _, stats = compute_table(model, settings, threads=threads, progress=False)
    t_table = time.perf_counter() - t0
    acts = action_table(table.shape[1], model.regulators)
    ev = evaluate(model, table, None, env=env, actions=acts, n_episodes=evaluate_cfg.get("n_episodes", 2000),
                  seed=evaluate_cfg.get("seed", 0), truth=truth, policies=("greedy", "random", "bfs"),
                  transition_settings=settings)
    s, geo = ev.summary, ev.geometry
    test = np.flatnonzero(model.split_mask("test"))
    reach = type_reachability(ev.bfs.dist, np.asarray(geo.type_ids), geo.type_names, test)
    pairs = [v for row in reach.values() for v in row.values() if v is not None]
    gt = s["ground_truth"]
    rec = {
        "table_s": round(t_table, 2), "table_sha256": stats["table_sha256"],
        "self_transition_fraction": stats["self_transition_fraction"],
        "pca_components": stats.get("pca_components"),
        "bfs_reachable_frac": s["bfs_reachable_frac"],
        "bfs_reachable_within_max_steps_frac": s["bfs_reachable_within_max_steps_frac"],
        "bfs_mean_length": s["bfs_mean_length"],
        "greedy_success": s["policies"]["greedy"]["success"], "random_success": s["policies"]["random"]["success"],
        "type_pairs_unreachable_frac": float(np.mean([v == 0 for v in pairs])) if pairs else None,
        "type_reachability": reach,
    }
    if gt.get("available"):
        rec.update({k: gt[k] for k in ("bfs_agreement", "bfs_pairs_agree", "chance_agreement", "mean_planted_rank",
                                       "mean_planted_best_rank", "mean_grn_toward", "mean_shift_toward", "bfs_plans")})
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--configfile", default=None, help="overlay YAML (e.g. config/examples/mesc.yaml)")
    ap.add_argument("--models", default=",".join(NEXT_CELL_MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--oe-value", default=None, help="oracle.oe_value to measure (default: the dataset's)")
    ap.add_argument("--out", default=str(HERE / "results" / "next_cell_models.json"))
    ap.add_argument("--pipeline-summary", default=None,
                    help="the evaluate rule's summary.json of a pipeline run with the configured next_cell (trained "
                         "agent): its agent numbers are recorded next to that model")
    a = ap.parse_args()
    os.chdir(ROOT)
    extra = None
    if a.configfile:
        import yaml

        extra = yaml.safe_load(Path(a.configfile).read_text())
    cfg = load_config(ROOT / "config" / "config.yaml", extra)
    dcfg = dataset_config(cfg, a.dataset, "default")
    model = load_model(ROOT / "results" / a.dataset / "oracle" / "model.npz")
    configured = dcfg["oracle"].get("oe_value", "reference")
    oe_value = a.oe_value or configured
    written = model.meta.get("oe_value", "reference")  # models written before oracle.oe_value: the reference rule
    if oe_value != written:
        o = dcfg["oracle"]
        model = dataclasses.replace(model, oe_values=oe_values(model.X[:, model.regulator_idx], o["oe_sd"],
                                                               o["oe_iqr"], oe_value))
    truth_path = ROOT / "resources" / "demo" / "ground_truth.json"
    demo = str(cfg["datasets"][a.dataset]["rna"]["path"]).startswith("resources/demo/")
    truth = json.loads(truth_path.read_text()) if demo and truth_path.exists() else None
    base = {k: v for k, v in dcfg["transitions"].items() if k not in ("backend", "chunk_cells")}
    rows = {}
    for m in a.models.split(","):
        t0 = time.perf_counter()
        rows[m] = measure(model, dict(base, next_cell=m), dcfg["env"], dcfg.get("evaluate", {}), truth, a.threads)
        r = rows[m]
        print(f"{a.dataset} {m:10s} self {r['self_transition_fraction']:.3f} reachable {r['bfs_reachable_frac']:.3f} "
              f"unreachable type pairs {r['type_pairs_unreachable_frac']:.3f} greedy {r['greedy_success']:.3f} "
              + (f"BFS agreement {r['bfs_agreement']:.3f} planted rank {r['mean_planted_rank']:.3f} "
                 if "bfs_agreement" in r else "")
              + f"({time.perf_counter() - t0:.1f} s)", flush=True)
    if a.pipeline_summary:
        ps = json.loads(Path(a.pipeline_summary).read_text())
        gt = ps.get("ground_truth", {})
        default = dcfg["transitions"].get("next_cell", "celloracle")
        if default in rows:
            rows[default]["pipeline"] = {
                "summary": a.pipeline_summary, "agent_success": ps["policies"].get("agent", {}).get("success"),
                "length_ratio_agent_bfs": ps.get("length_ratio_agent_bfs"),
                **{k: gt.get(k) for k in ("agent_agreement", "agent_pairs_agree", "bfs_agreement", "mean_planted_rank")}}
    out = Path(a.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    key = a.dataset if oe_value == configured else f"{a.dataset}@oe_{oe_value}"
    record[key] = {"oe_value": oe_value, "oe_values_recomputed": oe_value != written,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu_model": cpu_model(),
                   "cores": len(os.sched_getaffinity(0)), "threads": a.threads,
                   "note": "shared machine (timings distorted by other jobs)",
                   "transitions": {k: v for k, v in base.items() if k != "next_cell"},
                   "n_cells": model.n_cells, "n_actions": model.n_actions, "models": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
