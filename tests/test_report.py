"""Report: software record and the self-contained HTML (tables, embedded figures, robustness to gaps)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd

from cellrl import plots
from cellrl.report import html_table, kv_table, software_env, write_report, write_software_env


def summary_fixture() -> dict:
    pol = {p: dict(episodes=100, success=s, success_reachable=s / 0.9, mean_length=l, median_length=l,
                   length_ratio_vs_bfs=l / 4, activation_frac=0.4, stagnations_mean=0.5)
           for p, s, l in (("agent", 0.8, 6.0), ("greedy", 0.3, 3.0), ("random", 0.1, 9.0), ("bfs", 0.9, 4.0))}
    return {"protocol": {"n_episodes": 100, "max_steps": 20, "deterministic": True, "sampled": False},
            "policies": pol, "bfs_reachable_frac": 0.95, "bfs_reachable_within_max_steps_frac": 0.9,
            "length_ratio_agent_bfs": 1.5,
            "per_target": [{"target_type": "FateA", "episodes": 50, "bfs": 1.0, "agent": 0.9, "greedy": 0.4,
                            "random": 0.1}, {"target_type": "Fate<B>", "episodes": 50, "bfs": 0.8, "agent": 0.7,
                                             "greedy": 0.2, "random": 0.1}],
            "ground_truth": {"available": True, "bfs_agreement": 0.75, "agent_agreement": 0.5,
                             "bfs_pairs_agree": 0.8, "agent_pairs_agree": 0.5, "verdicts": {"ok": 1},
                             "pairs": [{"start": "Stem", "target": "FateA", "planted": "KO:Tf01 OE:Tf02",
                                        "n_bfs": 5, "bfs_agree": 0.8, "bfs_recall": 0.5, "n_agent": 5,
                                        "agent_success": 1.0, "agent_agree": 0.6, "agent_recall": 0.5,
                                        "planted_rank": 0.9, "verdict": "ok"}]},
            "training": {"timesteps": 1000, "final_success_rate": 0.7}}


def test_software_env(tmp_path):
    info = software_env()
    assert info["python"].count(".") == 2
    for p in ("numpy", "pandas", "scanpy", "anndata", "celloracle", "torch", "stable-baselines3", "sb3-contrib",
              "gymnasium", "optuna", "snakemake"):
        assert info["packages"][p], p
    assert "cupy" in info["packages"]  # None when not installed
    assert set(info["git"]) == {"commit", "dirty", "branch"}
    out = write_software_env(tmp_path / "software.json")
    assert json.loads((tmp_path / "software.json").read_text())["packages"] == out["packages"]


def test_report_is_self_contained(tmp_path):
    d = tmp_path / "results" / "demo" / "benchmark" / "default"
    plots_dir = d / "plots"
    rng = np.random.default_rng(0)
    plots.length_hist(rng.integers(1, 9, 50), rng.integers(1, 6, 50), plots_dir / "length_hist.png")
    plots.success_by_target(pd.DataFrame(summary_fixture()["per_target"]), plots_dir / "success_by_target.png")
    plots.action_usage([[0, 1, 3], [3, 3]], ["Tf01", "Tf02"], plots_dir / "action_usage.png")
    (d / "summary.json").write_text(json.dumps(summary_fixture()))
    (tmp_path / "oracle.json").write_text(json.dumps({"n_cells": 2400, "links": {"n_edges": 1234},
                                                      "regulators": ["Tf01", "Tf02"]}))
    sw = tmp_path / "software.json"
    write_software_env(sw)
    out = write_report(tmp_path / "report.html", "demo", [d / "summary.json"], [plots_dir],
                       oracle_stats=tmp_path / "oracle.json", transition_stats=tmp_path / "missing.json",
                       software=sw)
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert len(re.findall(r"src='data:image/png;base64,", html)) == 3
    assert "http://" not in html and "https://" not in html  # nothing fetched when opened
    for needle in ("Run <code>default</code>", "80.0%", "length / BFS", "Ground truth", "KO:Tf01 OE:Tf02",
                   "Fate&lt;B&gt;", "links.n_edges", "(not available)", "stable-baselines3"):
        assert needle in html, needle
    assert html.index("success_by_target") < html.index("length_hist")  # report order, not file order


def test_report_tolerates_missing_parts(tmp_path):
    s = tmp_path / "run1" / "summary.json"
    s.parent.mkdir()
    s.write_text(json.dumps({"policies": {}}))
    html = write_report(tmp_path / "r.html", "x", [s], [tmp_path / "nope"]).read_text()
    assert "run1" in html and "(not available)" in html


def test_tables_escape_and_format():
    t = html_table([{"a": "<b>", "b": 0.5, "c": None, "d": float("nan"), "e": 12345}], pct=["b"])
    assert "&lt;b&gt;" in t and "50.0%" in t and t.count("&ndash;") == 2 and "12,345" in t
    assert "[2 records]" in kv_table({"x": [{"a": 1}, {"a": 2}]})
