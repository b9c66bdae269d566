"""Held-out check of ``env.plan_tie_break`` on the demo (issue 14): exact search's planted-recipe agreement under
each tie-break on test tasks that were NOT used to choose the hub score.

    .venv/bin/python benchmarks/persistent_tie_break.py [--results results/demo] [--n-starts 20] [--quick]

The hub score was chosen on the 60 tasks of ``benchmarks/persistent_demo.py --n-starts 2`` (2 test cells per
type); this runs exact search (sets of <= env.max_set_size genes) on the tasks of up to ``--n-starts`` test cells
per type minus those 60, once per tie-break, and scores them as persistent_demo.py does. Writes
benchmarks/out/persistent_tie_break_<timestamp>.json and, unless ``--quick``, benchmarks/results/persistent_tie_break.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
import persistent_demo as pdm  # noqa: E402
from machine import machine_with_load  # noqa: E402
from cellrl.env import PLAN_TIE_BREAKS, EnvParams  # noqa: E402
from cellrl.evaluate import eval_tasks  # noqa: E402
from cellrl.io import write_json  # noqa: E402
from cellrl.persistent.engine import PersistentEngine  # noqa: E402
from cellrl.persistent.evaluate import plan_frame, score_plans, task_subset  # noqa: E402
from cellrl.persistent.search import exact  # noqa: E402
from cellrl.tasks import TaskGeometry  # noqa: E402

PROBED_STARTS = 2  # test cells per type of the tasks the hub score was chosen on (persistent_demo.py --n-starts 2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "results" / "demo"))
    ap.add_argument("--truth", default=str(ROOT / "resources" / "demo" / "ground_truth.json"))
    ap.add_argument("--n-starts", type=int, default=20, help="test cells per type (the first 2 are left out)")
    ap.add_argument("--quick", action="store_true", help="do not overwrite benchmarks/results/")
    a = ap.parse_args(argv)
    res_dir, s = Path(a.results), pdm.demo_settings()
    truth = json.loads(Path(a.truth).read_text())
    model, table = pdm.load_inputs(res_dir / "oracle" / "model.npz", res_dir / "transitions" / "table.npy")
    params = EnvParams.from_config(s["env"])
    geo = TaskGeometry.from_model(model, params.goal_percentile, params.centroid_percentile)
    max_steps = params.eval_max_steps(geo.n_types)
    starts, targets, _ = eval_tasks(geo, None, seed=0)
    held = task_subset(geo, starts, a.n_starts) & ~task_subset(geo, starts, PROBED_STARTS)
    acts = pdm.action_table(table.shape[1], model.regulators, res_dir / "transitions" / "actions.tsv")
    allowed = pdm.eval_allowed_mask(model, table)
    engine = PersistentEngine.from_model(model, s["transitions"])
    out = {"machine": machine_with_load(), "command": " ".join(["benchmarks/persistent_tie_break.py", *sys.argv[1:]]),
           "n_tasks": int(held.sum()), "n_start_cells": int(len(np.unique(starts[held]))), "max_genes":
           int(params.max_set_size), "max_steps": int(max_steps), "tie_breaks": {}}
    print(f"{out['n_tasks']} held-out tasks from {out['n_start_cells']} test cells", flush=True)
    for tb in PLAN_TIE_BREAKS:
        r = exact(engine, geo, starts[held], targets[held], params.max_set_size, max_steps, tie_break=tb)
        f = plan_frame("exact", r.starts, r.targets, r.success, r.plans, geo)
        sc = score_plans(f, np.ones(len(f), bool), engine.n_actions,
                         lambda f: pdm.planted_agreement(truth, f, geo, acts, table, allowed))["exact_tasks"]
        out["tie_breaks"][tb] = {"success": sc["success"], "agree": sc["recipe"]["agree"],
                                 "mean_success_length": sc.get("mean_success_length"), "wall_s": round(r.wall_s, 1)}
        print(tb, {k: round(v, 3) if isinstance(v, float) else v for k, v in out["tie_breaks"][tb].items()}, flush=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    for p in [ROOT / "benchmarks" / "out" / f"persistent_tie_break_{stamp}.json"] + (
            [] if a.quick else [ROOT / "benchmarks" / "results" / "persistent_tie_break.json"]):
        write_json(p, out)
        print("wrote", p)
    return out


if __name__ == "__main__":
    main()
