"""Real data with the default models (issue 13): success per policy and the known-recipe metrics, per dataset.

Run the pipeline on each dataset first (a short training schedule is enough to compare policies), e.g.:

    snakemake results/mesc/report.html --cores 2 --configfile config/examples/mesc.yaml
    snakemake results/paul15_subset/report.html --cores 2 --configfile config/examples/paul15_subset.yaml
    .venv/bin/python benchmarks/real_data.py [--datasets mesc paul15_subset]

Reads ``results/<dataset>/benchmark/default/summary.json``, ``transitions/stats.json`` and the training summary and writes
benchmarks/results/real_data.json: the next-cell model, training steps, each policy's success (all test pairs and
BFS-reachable ones), the agent/BFS length ratio, and per curated recipe pair each policy's and baseline's
area under the rank-recall curve with its permutation p-value. Prints the tables the README shows.

Where a persistent run was evaluated too (``results/<dataset>/benchmark/persistent/summary.json``, e.g. with
``--configfile config/examples/<dataset>.yaml config/examples/demo_persistent.yaml``), its agent, exact, beam
and greedy success (exact search's tasks, the tasks exact search solves, and all test tasks) is added under
``persistent``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine_info  # noqa: E402

POLICIES = ("agent", "bfs", "greedy", "random", "perturbation_score", "expression_diff")


def collect(results: Path) -> dict[str, Any]:
    """One dataset's numbers from its evaluate and transitions outputs."""
    s = json.loads((results / "benchmark" / "default" / "summary.json").read_text())
    t = json.loads((results / "transitions" / "stats.json").read_text())
    tr = results / "models" / "default" / "train_summary.json"
    warm = (json.loads(tr.read_text()).get("warm_start") or {}).get("method") if tr.exists() else None
    pol = {k: {"success": v.get("success"), "success_bfs_reachable": v.get("success_reachable")}
           for k, v in s["policies"].items()}
    rec = s.get("recipes") or {}
    pairs: dict[str, dict[str, Any]] = {}
    for p in rec.get("pairs", []):
        key = f"{p['start_type']} -> {p['target_type']}"
        pairs.setdefault(key, {"recipe": p["recipe"]})[p["policy"]] = {"auc": p["auc"], "p_value": p["p_value"]}
    return {"next_cell": t["settings"].get("next_cell"), "timesteps": s["training"].get("timesteps"),
            "warm_start": warm,
            "bfs_reachable_frac": s.get("bfs_reachable_frac"), "length_ratio_agent_bfs": s.get("length_ratio_agent_bfs"),
            "policies": pol, "agent_minus_greedy_reachable": (pol["agent"]["success_bfs_reachable"] or 0)
            - (pol["greedy"]["success_bfs_reachable"] or 0),
            "recipe_policies": {k: {m: v.get(m) for m in ("auc", "precision@3", "recall@5", "wrong_direction",
                                                          "pairs_p_below_0.05")}
                                for k, v in (rec.get("policies") or {}).items()},
            "recipe_pairs": pairs}


def collect_persistent(results: Path) -> dict[str, Any] | None:
    """The persistent run's success per method (None when that run was not evaluated)."""
    f = results / "benchmark" / "persistent" / "summary.json"
    if not f.exists():
        return None
    s = json.loads(f.read_text())
    every = s["protocol"].get("n_exact_tasks") == s["protocol"].get("n_episodes")  # exact ran on all: one scope
    methods = {k: {"success_exact_tasks": (v.get("exact_tasks") or {}).get("success"),
                   "success_all_tasks": (v.get("exact_tasks" if every else "all_tasks") or {}).get("success"),
                   "success_vs_exact": v.get("success_vs_exact")} for k, v in s["methods"].items()}
    # exact search is the ground truth, so a method's success over exact's on the exact tasks (success_vs_exact)
    # is its success on the tasks exact solves: the persistent analogue of BFS-reachable pairs
    exact_success = methods.get("exact", {}).get("success_exact_tasks")
    for k, v in methods.items():
        v["success_exact_reachable"] = (1.0 if exact_success else None) if k == "exact" else v["success_vs_exact"]
    agent, greedy = methods.get("agent"), methods.get("greedy")
    gap = (agent["success_exact_reachable"] - greedy["success_exact_reachable"]
           if agent and greedy and agent["success_exact_reachable"] is not None
           and greedy["success_exact_reachable"] is not None else None)
    return {"timesteps": s["training"].get("timesteps"), "n_exact_tasks": s["protocol"].get("n_exact_tasks"),
            "n_tasks": s["protocol"].get("n_episodes"), "max_set_size": s["protocol"].get("max_set_size"),
            "n_exact_reachable_tasks": round((exact_success or 0.0) * (s["protocol"].get("n_exact_tasks") or 0)),
            "methods": methods,
            "agent_minus_greedy_all_tasks": (agent["success_all_tasks"] - greedy["success_all_tasks"])
            if agent and greedy else None,
            "agent_minus_greedy_exact_reachable": gap}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mesc", "paul15_subset"])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "real_data.json")
    a = ap.parse_args(argv)
    missing = [d for d in a.datasets if not (a.results / d / "benchmark" / "default" / "summary.json").exists()]
    if missing:
        print(f"no evaluation for {missing} under {a.results}: run the pipeline first (see the docstring)",
              file=sys.stderr)
        return 2
    out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(1),
           "datasets": {d: {**collect(a.results / d), "persistent": collect_persistent(a.results / d)}
                        for d in a.datasets}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    for d, r in out["datasets"].items():
        p = r["policies"]
        print(f"\n{d} ({r['next_cell']}, {r['timesteps']} steps, warm start {r['warm_start']}): success on "
              f"BFS-reachable pairs " + ", ".join(f"{k} {v['success_bfs_reachable']:.3f}" for k, v in p.items()
                                                  if v["success_bfs_reachable"] is not None)
              + f"; agent - greedy {r['agent_minus_greedy_reachable']:+.3f}; length ratio "
              f"{r['length_ratio_agent_bfs']:.2f}")
        q = r["persistent"]
        if q:
            print(f"persistent run ({q['timesteps']} steps, sets <= {q['max_set_size']}): success on all {q['n_tasks']} "
                  "tasks " + ", ".join(f"{k} {v['success_all_tasks']:.3f}" for k, v in q["methods"].items()
                                       if v["success_all_tasks"] is not None)
                  + f"; on exact search's {q['n_exact_tasks']} tasks " + ", ".join(
                      f"{k} {v['success_exact_tasks']:.3f}" for k, v in q["methods"].items())
                  + f"; agent - greedy (all tasks) {q['agent_minus_greedy_all_tasks']:+.3f}")
            if q["agent_minus_greedy_exact_reachable"] is not None:
                print(f"  on the {q['n_exact_reachable_tasks']} tasks exact search solves (reachable by a set of <= "
                      f"{q['max_set_size']}): " + ", ".join(
                          f"{k} {v['success_exact_reachable']:.3f}" for k, v in q["methods"].items()
                          if v["success_exact_reachable"] is not None)
                      + f"; agent - greedy {q['agent_minus_greedy_exact_reachable']:+.3f}")
        print("| pair | recipe | " + " | ".join(POLICIES) + " |")
        print("|---|---|" + "---|" * len(POLICIES))
        for key, row in r["recipe_pairs"].items():
            cells = [f"{row[k]['auc']:.2f} (p {row[k]['p_value']:.2f})" if k in row and row[k]["auc"] is not None
                     else "-" for k in POLICIES]
            print(f"| {key} | {row['recipe']} | " + " | ".join(cells) + " |")
    print(f"\nwritten {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
