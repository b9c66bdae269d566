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


def test_report_regulators_per_action_and_recipes(tmp_path):
    """TF-list flags, per-action transition stats summarised (+ TSV next to the report), the recipe section."""
    d = tmp_path / "results" / "demo" / "benchmark" / "default"
    d.mkdir(parents=True)
    s = summary_fixture()
    s["recipes"] = {"available": True, "source": "config/recipes/x.tsv", "n_rows": 3, "n_pairs": 1,
                    "n_not_in_action_space": 1, "not_in_action_space": ["Gata6"], "ks": [1, 3, 5],
                    "permutations": 1000, "perturbation_score": "computed",
                    "policies": {"bfs": {"precision@1": 0.5, "auc": 0.91, "pairs_scored": 1,
                                         "pairs_p_below_0.05": 1}},
                    "pairs": [{"start_type": "Stem", "target_type": "FateA", "policy": "bfs", "recipe": "KO:Tf01",
                               "auc": 0.91, "p_value": 0.004}]}
    (d / "summary.json").write_text(json.dumps(s))
    per = {f"{k}:G{i}": 0.01 * i for i in range(94) for k in ("KO", "OE")}  # 188 actions
    (tmp_path / "tr.json").write_text(json.dumps({"n_actions": 188, "self_transition_fraction_per_action": per,
                                                  "mean_shift_per_action": per}))
    acts = tmp_path / "actions.tsv"
    pd.DataFrame({"gene": ["Pou5f1", "Eno1", "Pou5f1", "Eno1"], "kind": ["KO", "KO", "OE", "OE"]}).to_csv(
        acts, sep="\t", index=False)
    tfs = tmp_path / "tfs.csv"
    tfs.write_text("TF,Sources\nPOU5F1,x\nNANOG,y\n")
    html = write_report(tmp_path / "report.html", "demo", [d / "summary.json"], [], transition_stats=tmp_path /
                        "tr.json", actions=acts, regulators=tfs,
                        per_action_out=tmp_path / "transition_actions.tsv").read_text()
    assert "1 of 2 action genes are not on it: Eno1" in html
    assert html.count("OE:G93") == 2  # only in the two "highest" lists, not 188 rows per metric
    assert "KO:G5 " not in html and "transition_actions.tsv" in html
    tsv = pd.read_csv(tmp_path / "transition_actions.tsv", sep="\t")
    assert len(tsv) == 188 and set(tsv.columns) == {"action", "self_transition_fraction", "mean_shift"}
    assert tsv.set_index("action").loc["OE:G7", "mean_shift"] == 0.07
    for needle in ("Known recipes", "Gata6", "0.91", "recipe AUC: BFS"):
        assert needle in html, needle
    html2 = write_report(tmp_path / "r2.html", "demo", [d / "summary.json"], [], actions=acts).read_text()
    assert "No TF list set" in html2


def test_repel_labels_separates_close_labels():
    pts = np.array([[0.0, 0.0], [0.01, 0.0], [10.0, 10.0], [3.0, 5.0]])
    labels = ["Megakaryocytes", "GMP", "Far", "Mid"]
    out = plots.repel_labels(pts, labels, char_width=0.005, height=0.04)
    np.testing.assert_allclose(out[:, 0], pts[:, 0])  # moved along y only
    assert abs(out[0, 1] - out[1, 1]) >= 0.04 * 10 * 0.99  # overlapping boxes end one label height apart
    np.testing.assert_allclose(out[2:], pts[2:], atol=1e-6)  # far labels stay put
    np.testing.assert_allclose(plots.repel_labels(pts[:1], labels[:1]), pts[:1])


def persistent_summary_fixture() -> dict:
    def sc(s, agree=None):
        return {"success": s, "mean_success_length": 4.0, "mean_success_set_size": 2.5, "repeats_a_gene": 0,
                **({"recipe": {"agree": agree, "chance": 0.1}} if agree is not None else {})}
    return {"perturbation_model": "persistent", "no_plan_repeats_a_gene": True,
            "protocol": {"n_episodes": 600, "max_steps": 20, "max_set_size": 3, "exact_max_genes": 3,
                         "n_exact_tasks": 30, "n_exact_start_cells": 6, "exact_starts_per_type": 1,
                         "beam_width": 8, "deterministic": True, "plan_tie_break": "hub"},
            "methods": {"agent": {"exact_tasks": sc(0.7, 0.55), "all_tasks": sc(0.66), "success_vs_exact": 0.7 / 0.9,
                                  "wall_s": 1.0},
                        "exact": {"exact_tasks": sc(0.9, 0.5), "wall_s": 80.0},
                        "beam8": {"exact_tasks": sc(0.65), "all_tasks": sc(0.59), "success_vs_exact": 0.65 / 0.9},
                        "greedy": {"exact_tasks": sc(0.4), "all_tasks": sc(0.35), "success_vs_exact": 0.4 / 0.9}},
            "ground_truth": {"available": True}, "recipes": {"available": False, "reason": "no recipe table"}}


def test_report_persistent_run_beside_a_table_run(tmp_path):
    """A persistent-mode run gets its own section (agent vs exact / beam / greedy over sets, with its figure);
    the table run's section is the table mode's."""
    runs = {"default": summary_fixture(), "persistent": persistent_summary_fixture()}
    paths, dirs = [], []
    for run, s in runs.items():
        d = tmp_path / run
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(s))
        paths.append(d / "summary.json")
        dirs.append(d / "plots")
    plots.method_success(runs["persistent"]["methods"], dirs[1] / "method_success.png")
    html = write_report(tmp_path / "r.html", "demo", paths, dirs).read_text()
    table_part, pers_part = html.split("Run <code>persistent</code>")
    assert "evaluation with persistent perturbations" in pers_part and "BFS-reachable pairs" in table_part
    assert "BFS-reachable pairs" not in pers_part and "persistent" not in table_part.split("Run <code>default")[1]
    for needle in ("success (exact-search tasks)", "success / exact", "plans repeating a gene", "beam8",
                   "77.8%", "90.0%", "59.0%", "No plan repeats a gene: <b>yes</b>", "6 test cells",
                   "Persistent perturbations: success of the agent", "<code>env.plan_tie_break: hub</code>"):
        assert needle in pers_part, needle
    assert len(re.findall(r"src='data:image/png;base64,", pers_part)) == 1
    head = html.split("<h2>Summary</h2>")[1].split("Run <code>")[0]
    assert "66.0%" in head and "35.0%" in head and "55.0%" in head   # persistent agent, greedy, planted agree
