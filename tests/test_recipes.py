"""Known-recipe benchmark (cellrl.recipes): metrics on hand-made rankings and plans, table validation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cellrl.errors import InputError
from cellrl.recipes import (check_recipe_types, normalised_auc, perturbation_scores, permutation_pvalue,
                            plan_metrics, read_recipes, recipe_benchmark, recipes_from_truth, topk_metrics,
                            write_demo_recipes)


def _rel(n, idx):
    r = np.zeros(n, bool)
    r[list(idx)] = True
    return r


def test_auc_perfect_reversed_and_ties():
    scores = np.arange(20, 0, -1, dtype=float)  # item 0 ranked first
    assert normalised_auc(scores, _rel(20, [0, 1, 2])) == pytest.approx(1.0)
    assert normalised_auc(scores, _rel(20, [17, 18, 19])) == pytest.approx(0.0)
    # one relevant item in the middle of 5: ranks 1..5, item at rank 3 -> (5 - 0 - 3) / 4 = 0.5
    assert normalised_auc(np.array([5, 4, 3, 2, 1.0]), _rel(5, [2])) == pytest.approx(0.5)
    # all tied: the expected value over tie orders is chance
    assert normalised_auc(np.zeros(10), _rel(10, [3, 7])) == pytest.approx(0.5)
    # relevant item tied with one other for the top: mean rank 1.5 -> (4 - 1.5) / 3
    assert normalised_auc(np.array([2, 2, 1, 0, 0.0]), _rel(5, [0])) == pytest.approx((5 - 1.5) / 4)
    assert normalised_auc(scores, _rel(20, [])) is None


def test_permutation_pvalue():
    p_top = permutation_pvalue(1.0, 40, 3, n_perm=1000, seed=1)
    assert p_top == pytest.approx(1 / 1001, abs=2e-3)  # P(random AUC = 1) = 1/C(40,3), tiny
    assert permutation_pvalue(0.0, 40, 3, n_perm=500, seed=1) == pytest.approx(1.0)
    mid = permutation_pvalue(0.5, 40, 3, n_perm=2000, seed=1)
    assert 0.4 < mid < 0.6
    assert permutation_pvalue(0.7, 40, 3, seed=3) == permutation_pvalue(0.7, 40, 3, seed=3)  # seeded


def test_topk_by_hand():
    recipe, wrong = {2, 5}, {7}
    m = topk_metrics([5, 7, 1, 2, 9, 3], recipe, wrong, ks=(1, 3, 5))
    assert m["precision@1"] == 1.0 and m["recall@1"] == 0.5
    assert m["precision@3"] == pytest.approx(1 / 3) and m["recall@3"] == 0.5
    assert m["precision@5"] == pytest.approx(2 / 5) and m["recall@5"] == 1.0
    assert m["wrong_direction"] == pytest.approx(1 / 5)
    short = topk_metrics([2], recipe, wrong)  # a one-step plan proposes one action: precision over it
    assert short["precision@5"] == 1.0 and short["recall@5"] == 0.5


def test_plan_metrics_distinct_and_wrong():
    recipe, wrong = {0}, {3}
    m, usage = plan_metrics([[0, 0, 1], [3, 1, 0, 2]], 5, recipe, wrong, ks=(1, 3))
    # plan 1 distinct [0, 1]: p@1 1, p@3 1/2; plan 2 distinct [3, 1, 0, 2]: p@1 0, p@3 1/3
    assert m["precision@1"] == pytest.approx(0.5)
    assert m["precision@3"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["wrong_direction"] == pytest.approx((0 + 1 / 4) / 2)
    assert usage.tolist() == [2, 2, 1, 1, 0]


def _tiny():
    types = np.array(["A", "B"])
    type_ids = np.repeat([0, 1], 10)
    z = np.zeros((20, 3), np.float32)
    z[10:, 0] = 2.0   # gene g0 higher in B
    z[10:, 1] = -2.0  # gene g1 lower in B
    geo = SimpleNamespace(type_names=types, type_ids=type_ids, split=np.array(["train"] * 20), z=z,
                          embedding_centroids=np.array([[0.0, 0.0], [1.0, 0.0]]))
    actions = pd.DataFrame({"gene": ["g0", "g1", "g2", "g0", "g1", "g2"], "kind": ["KO"] * 3 + ["OE"] * 3})
    return geo, actions


def test_recipe_benchmark_end_to_end():
    geo, actions = _tiny()
    recipes = pd.DataFrame({"start_type": ["A", "A", "A"], "target_type": ["B"] * 3, "gene": ["g0", "g1", "Xyz"],
                            "direction": ["OE", "KO", "OE"], "evidence": ["x"] * 3})
    ep = pd.DataFrame({"policy": ["bfs", "bfs", "random"], "start_type": ["A"] * 3, "target_type": ["B"] * 3,
                       "actions": [[3, 1], [3], [0, 4]], "success": [True, True, False]})
    shift = np.zeros((6, 20, 2))
    shift[3, :, 0] = 1.0  # OE:g0 pushes towards B; KO:g0 away
    shift[0, :, 0] = -1.0
    emb = np.zeros((20, 2))
    s, df = recipe_benchmark(recipes, ep, actions, geo, np.array([0, 1, 2, 0, 1, 2]), shift=shift, embedding=emb,
                             n_perm=200, seed=0)
    assert s["n_not_in_action_space"] == 1 and s["not_in_action_space"] == ["Xyz"]
    r = df.set_index("policy")
    assert r.loc["bfs", "n_in_action_space"] == 2
    assert r.loc["bfs", "precision@1"] == 1.0 and r.loc["bfs", "auc"] == pytest.approx(1.0)
    assert r.loc["random", "wrong_direction"] == pytest.approx(1.0)  # KO:g0 and OE:g1 are both reversed
    # unused actions tie: recipe actions share ranks 3..6 with 2 others -> mean rank 4.5 -> (6 - 0.5 - 4.5) / 4
    assert r.loc["random", "auc"] == pytest.approx(0.25)
    # linear baseline: OE:g0 and KO:g1 score +2, everything else <= 0 -> perfect
    assert r.loc["expression_diff", "auc"] == pytest.approx(1.0)
    assert r.loc["expression_diff", "recall@3"] == 1.0
    assert r.loc["expression_diff", "p_value"] < 0.1
    assert r.loc["perturbation_score", "precision@1"] == 1.0
    assert r.loc["perturbation_score", "recall@1"] == 0.5
    assert perturbation_scores(shift, emb, geo.type_ids, geo.embedding_centroids, 0, 1)[3] == pytest.approx(1.0)
    # skipped perturbation score is recorded, not dropped
    s2, df2 = recipe_benchmark(recipes, ep, actions, geo, np.array([0, 1, 2, 0, 1, 2]), n_perm=10,
                               score_status="skipped (too large)")
    assert df2.set_index("policy").loc["perturbation_score", "status"] == "skipped (too large)"


def test_read_recipes_validation(tmp_path):
    p = tmp_path / "r.tsv"
    p.write_text("# comment\nstart_type\ttarget_type\tgene\tdirection\tevidence\nA\tB\tG1\tko\tPMID:1\n"
                 "A\tB\tG1\tKO\tPMID:1\n")
    df = read_recipes(p)
    assert len(df) == 1 and df.direction[0] == "KO"
    p.write_text("start_type\ttarget_type\tgene\tevidence\nA\tB\tG1\tPMID:1\n")
    with pytest.raises(InputError, match="direction"):
        read_recipes(p)
    p.write_text("start_type\ttarget_type\tgene\tdirection\tevidence\nA\tB\tG1\tUP\tPMID:1\n")
    with pytest.raises(InputError, match="KO or OE"):
        read_recipes(p)
    p.write_text("start_type\ttarget_type\tgene\tdirection\tevidence\nA\tB\tG1\tOE\t\n")
    with pytest.raises(InputError, match="evidence"):
        read_recipes(p)
    with pytest.raises(InputError, match="not found"):
        read_recipes(tmp_path / "missing.tsv")
    ok = pd.DataFrame({"start_type": ["a"], "target_type": ["b"], "gene": ["G"], "direction": ["KO"],
                       "evidence": ["x"]})
    assert check_recipe_types(ok, ["A", "B"]).start_type[0] == "A"
    with pytest.raises(InputError, match="known"):
        check_recipe_types(ok, ["A", "C"])


def test_demo_recipes_from_truth(tmp_path):
    import json

    truth = {"reprogramming": [{"start": "Stem", "target": "FateA", "knockout": ["Tf01"], "overexpress": ["Tf02",
                                                                                                          "Tf03"]}]}
    (tmp_path / "t.json").write_text(json.dumps(truth))
    df = write_demo_recipes(tmp_path / "t.json", tmp_path / "r.tsv")
    assert df[["gene", "direction"]].values.tolist() == [["Tf01", "KO"], ["Tf02", "OE"], ["Tf03", "OE"]]
    back = read_recipes(tmp_path / "r.tsv")
    assert (back.evidence == "planted").all() and len(back) == 3
    assert recipes_from_truth({}).empty


def test_summary_is_strict_json():
    import json

    geo, actions = _tiny()
    recipes = pd.DataFrame({"start_type": ["A"], "target_type": ["B"], "gene": ["Xyz"], "direction": ["OE"],
                            "evidence": ["x"]})  # nothing in the action space: every metric is missing
    ep = pd.DataFrame({"policy": ["bfs"], "start_type": ["A"], "target_type": ["B"], "actions": [[1]],
                       "success": [True]})
    s, _ = recipe_benchmark(recipes, ep, actions, geo, np.array([0, 1, 2, 0, 1, 2]), n_perm=10)
    text = json.dumps(s, allow_nan=False)  # raises on NaN
    assert json.loads(text)["pairs"][0]["auc"] is None and s["policies"]["bfs"]["auc"] is None
