"""The reference system's scale end to end (issue 16): wall time and peak RSS of every stage of a pipeline run.

Run the pipeline first (one command, see config/examples/seed_scale.yaml), then collect Snakemake's benchmark files:

    snakemake results/seed_scale/report.html --profile profiles/local --configfile config/examples/seed_scale.yaml
    .venv/bin/python benchmarks/seed_scale.py [--results results/seed_scale] [--logs results/benchmarks]

Reads ``<results>/benchmarks/**/*.tsv`` (one per job: ``s`` wall seconds, ``max_rss`` MB) plus the atlas jobs under
``--logs``, the training summary (steps/s -> time per 100k steps and the projection to 2.5M steps) and the
evaluation summary (success, length ratio, BFS path lengths, planted-recipe agreement) when they exist, and writes
benchmarks/results/seed_scale.json with the machine it ran on. Stages that have not run are listed as missing, so
a partial run is reported as partial.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine_info  # noqa: E402

STAGES = ("synthetic_data", "synthetic_recipes", "ingest", "filter", "split", "base_grn", "oracle_prepare", "oracle_links", "fit_oracle",
          "transitions", "train", "bfs", "evaluate", "report")
REFERENCE = {"steps": 2_500_000, "hours": [12, 24], "optimal_steps": [8, 12]}


def stage_rows(results: Path, logs: Path) -> pd.DataFrame:
    """One row per job: stage, job (file stem), wall seconds, peak RSS (MB), CPU seconds (Snakemake's cpu_time: the
    work done, which a machine shared with other jobs does not inflate the way it inflates wall time)."""
    rows = []
    for f in sorted(list((results / "benchmarks").rglob("*.tsv")) + list(logs.glob("synthetic_*.tsv"))):
        b = pd.read_csv(f, sep="\t")
        stage = f.parent.name if f.parent.name != "benchmarks" else f.stem.split("_default")[0]
        stage = next((s for s in STAGES if f.stem.startswith(s) or stage == s), stage)
        rows.append(dict(stage=stage, job=f.stem, wall_s=float(b["s"].iloc[0]), max_rss_mb=float(b["max_rss"].iloc[0]),
                         cpu_s=float(b["cpu_time"].iloc[0])))
    return pd.DataFrame(rows, columns=["stage", "job", "wall_s", "max_rss_mb", "cpu_s"])


def summarise(results: Path, logs: Path) -> dict[str, Any]:
    jobs = stage_rows(results, logs)
    per_stage = {}
    for stage, g in jobs.groupby("stage", sort=False):
        per_stage[stage] = dict(jobs=int(len(g)), wall_s_sum=round(float(g.wall_s.sum()), 1),
                                wall_s_max=round(float(g.wall_s.max()), 1), cpu_s_sum=round(float(g.cpu_s.sum()), 1),
                                max_rss_gb=round(float(g.max_rss_mb.max()) / 1024, 2))
    out: dict[str, Any] = {"results": str(results), "stages": per_stage,
                           "missing": [s for s in STAGES if s not in per_stage],
                           "total_wall_h_serial": round(float(jobs.wall_s.sum()) / 3600, 2),
                           "peak_rss_gb": round(float(jobs.max_rss_mb.max()) / 1024, 2) if len(jobs) else None}
    if per_stage:
        out["dominant_stage"] = max(per_stage, key=lambda s: per_stage[s]["wall_s_sum"])
    train = results / "models" / "default" / "train_summary.json"
    if train.exists():
        t = json.loads(train.read_text())
        sps = float(t["steps_per_s"])
        out["train"] = dict(timesteps=t["timesteps"], steps_per_s=sps, s_per_100k=round(1e5 / sps, 1),
                            projected_h_2_5M=round(REFERENCE["steps"] / sps / 3600, 2), device=t.get("device"))
    summ = results / "benchmark" / "default" / "summary.json"
    if summ.exists():
        s = json.loads(summ.read_text())
        out["evaluate"] = {k: s.get(k) for k in ("bfs_reachable_frac", "bfs_mean_length", "length_ratio_agent_bfs",
                                                 "length_ratio_agent_bfs_median")}
        out["evaluate"]["agent_success"] = (s.get("policies", {}).get("agent") or {}).get("success")
        gt = s.get("ground_truth") or {}
        out["evaluate"]["planted_recipe_agreement"] = {k: gt.get(k) for k in ("bfs_agreement", "agent_agreement")}
        bfs = results / "benchmark" / "bfs.parquet"
        if bfs.exists():
            lengths = pd.read_parquet(bfs, columns=["length"]).length
            out["evaluate"]["bfs_length_histogram"] = {int(k): int(v) for k, v in
                                                       lengths[lengths >= 0].value_counts().sort_index().items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("results/seed_scale"))
    ap.add_argument("--logs", type=Path, default=Path("results/benchmarks"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "seed_scale.json")
    a = ap.parse_args(argv)
    if not (a.results / "benchmarks").is_dir():
        print(f"no benchmark files under {a.results}/benchmarks: run the pipeline first (see the docstring)",
              file=sys.stderr)
        return 2
    out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(1), "reference": REFERENCE,
           **summarise(a.results, a.logs)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(pd.DataFrame(out["stages"]).T.to_string())
    print(f"missing stages: {out['missing']}; peak RSS {out['peak_rss_gb']} GB; written {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
