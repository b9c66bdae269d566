"""Known-recipe benchmark: do plans use the perturbations the literature (or the demo's planted truth) names?

A recipe table (``datasets.<name>.recipes``, TSV) lists, per (start type, target type), the (gene, direction)
perturbations known to drive that conversion, each with its evidence (PMID/DOI, or ``planted`` on the demo).
Every policy is scored against it per (start, target) pair:

* rollout policies (agent, BFS, greedy, random: the evaluation episodes of that pair) and
* two ranking baselines that order all actions without planning:
  ``perturbation_score`` (CellOracle's way of nominating TFs: the mean over the start type's cells of the
  simulated embedding shift projected on the start-to-target centroid direction) and ``expression_diff``
  (overexpress the regulators the target expresses more, knock out those it expresses less, ranked by the
  difference of z-scored training-cell type means).

Metrics per pair and policy (``R``: recipe actions that are in the action space, ``N``: all actions):

* ``precision@k`` / ``recall@k`` (k = 1, 3, 5): recipe actions among a plan's first k distinct actions, divided
  by the number of those actions (at most k) / by ``|R|``; averaged over the pair's plans; for a ranking, its top k;
* ``wrong_direction``: share of plan actions (ranking: of the top ``max(k)``) that perturb a recipe gene in the
  opposite direction;
* ``auc``: normalised area under the rank-recall curve (Hammelman et al., Nat Methods 2022) of a ranking of all
  actions (rollout policies: by how many of the pair's plans use each action). Normalised so that recipe actions
  on top give 1, at the bottom 0, and a random ranking 0.5 on average: ``(N - (m-1)/2 - mean rank) / (N - m)``,
  with ``m = |R|``; this equals the AUROC of recipe against other actions. Tied actions share their mean rank,
  i.e. the expected value over all tie orders (deterministic, no arbitrary order);
* ``p_value``: permutation p-value of that AUC against ``n`` random rankings of the same actions,
  ``(1 + #(perm >= obs)) / (1 + n)``, seeded.

Recipe rows whose gene is not an action of the table are counted as *not in action space*, never dropped
silently.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import InputError

log = logging.getLogger(__name__)

RECIPE_COLUMNS = ("start_type", "target_type", "gene", "direction", "evidence")
DIRECTIONS = ("KO", "OE")
KS = (1, 3, 5)
ROLLOUT_POLICIES = ("agent", "bfs", "greedy", "random")
RANKING_POLICIES = ("perturbation_score", "expression_diff")


# ---------------------------------------------------------------------------------------------- tables
def read_recipes(path: str | Path) -> pd.DataFrame:
    """Read and validate a recipe TSV (columns :data:`RECIPE_COLUMNS`; lines starting with ``#`` are comments).

    Returns the rows with ``direction`` upper-cased and duplicates removed; InputError naming the file, the column
    and the fix otherwise.
    """
    p = Path(path)
    fix = "a tab-separated file with header start_type, target_type, gene, direction (KO|OE), evidence (PMID/DOI)"
    if not p.is_file():
        raise InputError("recipe table not found", path=p, field="datasets.<name>.recipes", fix=fix)
    try:
        lines = [ln for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    except UnicodeDecodeError as e:
        raise InputError(f"recipe table is not text ({e})", path=p, fix=fix) from e
    if not lines:
        raise InputError("recipe table is empty", path=p, fix=fix)
    rows = [ln.split("\t") for ln in lines]
    header = [c.strip() for c in rows[0]]
    missing = [c for c in RECIPE_COLUMNS if c not in header]
    if missing:
        raise InputError(f"recipe table lacks columns {missing} (has {header})", path=p, fix=fix)
    bad = [i + 2 for i, r in enumerate(rows[1:]) if len(r) != len(header)]
    if bad:
        raise InputError(f"rows {bad[:5]} have another number of fields than the header ({len(header)})", path=p,
                         fix="separate fields by single tabs")
    df = pd.DataFrame(rows[1:], columns=header)[list(RECIPE_COLUMNS)].apply(lambda s: s.str.strip())
    df["direction"] = df["direction"].str.upper()
    for c in RECIPE_COLUMNS:
        empty = np.flatnonzero(df[c].eq("").to_numpy())
        if len(empty):
            raise InputError(f"empty {c!r} on data rows {(empty + 1).tolist()[:5]}", path=p, field=c, fix=fix)
    wrong = sorted(set(df.direction) - set(DIRECTIONS))
    if wrong:
        raise InputError(f"direction must be KO or OE, not {wrong}", path=p, field="direction", fix=fix)
    same = df.start_type.str.lower() == df.target_type.str.lower()
    if same.any():
        raise InputError(f"start_type equals target_type on data rows {(np.flatnonzero(same) + 1).tolist()[:5]}",
                         path=p, field="target_type", fix="a recipe converts one type into another")
    return df.drop_duplicates(["start_type", "target_type", "gene", "direction"]).reset_index(drop=True)


def check_recipe_types(recipes: pd.DataFrame, type_names: Sequence[str], source: object = "recipes") -> pd.DataFrame:
    """Map the table's type names onto the model's (case-insensitive); InputError listing the known types."""
    known = {str(t).lower(): str(t) for t in type_names}
    out = recipes.copy()
    for c in ("start_type", "target_type"):
        unknown = sorted({t for t in out[c] if t.lower() not in known})
        if unknown:
            raise InputError(f"{c} {unknown} are not cell types of this dataset; known: {sorted(known.values())}",
                             path=source, field=c, fix="use the dataset's cell-type names (obs column / regex)")
        out[c] = [known[t.lower()] for t in out[c]]
    return out


def recipes_from_truth(truth: Mapping[str, Any]) -> pd.DataFrame:
    """The demo's recipe table from its planted truth (``reprogramming``: knockout / overexpress lists)."""
    rows = [(r["start"], r["target"], g, d, "planted")
            for r in truth.get("reprogramming", [])
            for d, key in (("KO", "knockout"), ("OE", "overexpress")) for g in r.get(key, [])]
    return pd.DataFrame(rows, columns=list(RECIPE_COLUMNS))


def write_demo_recipes(truth_path: str | Path, out: str | Path) -> pd.DataFrame:
    """Rule ``demo_recipes``: ground_truth.json -> recipes.tsv (evidence ``planted``)."""
    import json

    from .io import write_table

    df = recipes_from_truth(json.loads(Path(truth_path).read_text()))
    write_table(out, df)
    log.info("demo recipes: %d rows, %d pairs", len(df), len(df.groupby(["start_type", "target_type"])))
    return df


# ---------------------------------------------------------------------------------------------- metrics
def normalised_auc(scores: np.ndarray, relevant: np.ndarray) -> float | None:
    """Normalised area under the rank-recall curve of ranking ``scores`` (high first) for the ``relevant``
    (bool) items: 1 = all on top, 0 = all at the bottom; ties share their mean rank. None if none/all relevant."""
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    n, m = len(scores), int(relevant.sum())
    if m == 0 or m == n:
        return None
    ranks = _midranks(-scores)
    return float((n - (m - 1) / 2 - ranks[relevant].mean()) / (n - m))


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` ascending, ties at their mean rank (scipy.stats.rankdata 'average')."""
    from scipy.stats import rankdata

    return rankdata(x, method="average")


def permutation_pvalue(auc: float, n_items: int, n_relevant: int, n_perm: int = 1000, seed: int = 0) -> float:
    """P(random ranking's AUC >= ``auc``) estimated as ``(1 + #(perm >= auc)) / (1 + n_perm)``."""
    rng = np.random.default_rng(seed)
    pos = rng.random((n_perm, n_items)).argsort(axis=1)[:, :n_relevant] + 1  # ranks of the relevant items
    perm = (n_items - (n_relevant - 1) / 2 - pos.mean(1)) / (n_items - n_relevant)
    return float((1 + np.count_nonzero(perm >= auc - 1e-12)) / (1 + n_perm))


def topk_metrics(order: Sequence[int], recipe: set[int], wrong: set[int], ks: Sequence[int] = KS) -> dict[str, float]:
    """precision@k, recall@k of one list of distinct actions (best first) and its wrong-direction share in the top
    max(k); precision divides by the number of actions in the top k (a plan may propose fewer than k)."""
    out: dict[str, float] = {}
    for k in ks:
        top = list(order)[:k]
        hit = sum(a in recipe for a in top)
        out[f"precision@{k}"] = hit / len(top) if top else float("nan")
        out[f"recall@{k}"] = hit / len(recipe) if recipe else float("nan")
    top = list(order)[:max(ks)]
    out["wrong_direction"] = sum(a in wrong for a in top) / len(top) if top else float("nan")
    return out


def plan_metrics(plans: Sequence[Sequence[int]], n_actions: int, recipe: set[int], wrong: set[int],
                 ks: Sequence[int] = KS) -> tuple[dict[str, float | None], np.ndarray]:
    """Mean top-k metrics over ``plans`` (each: its first k distinct actions), the wrong-direction share of all
    plan actions, and per-action usage (number of plans that use each action) for the ranking."""
    rows, wrong_share = [], []
    usage = np.zeros(n_actions, dtype=np.float64)
    for p in plans:
        distinct = list(dict.fromkeys(int(a) for a in p))
        rows.append(topk_metrics(distinct, recipe, wrong, ks))
        wrong_share.append(np.isin(np.asarray(p, dtype=np.int64), list(wrong)).mean())
        usage[distinct] += 1
    if not rows:
        return {}, usage
    out = {k: _nanmean([r[k] for r in rows]) for k in rows[0] if k != "wrong_direction"}
    out["wrong_direction"] = float(np.mean(wrong_share))
    return out, usage


def ranking_order(scores: np.ndarray) -> np.ndarray:
    """Actions by score, highest first; ties by action index (for the top-k lists)."""
    return np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------- baselines
def expression_diff_scores(z: np.ndarray, type_ids: np.ndarray, train: np.ndarray, action_genes: np.ndarray,
                           is_oe: np.ndarray, start: int, target: int) -> np.ndarray:
    """(A,) score of the linear baseline: the target-minus-start difference of training-cell type means of the
    action's gene (z-scored), signed +1 for OE and -1 for KO."""
    zs = z[train & (type_ids == start)][:, action_genes].mean(0)
    zt = z[train & (type_ids == target)][:, action_genes].mean(0)
    return np.where(is_oe, 1.0, -1.0) * (zt - zs).astype(np.float64)


def perturbation_scores(shift: np.ndarray, embedding: np.ndarray, type_ids: np.ndarray,
                        emb_centroids: np.ndarray, start: int, target: int) -> np.ndarray:
    """(A,) CellOracle-style perturbation score: mean over the start type's cells of the embedding shift
    (``shift``: (A, cells, 2)) projected on the unit start-to-target centroid direction."""
    d = emb_centroids[target] - emb_centroids[start]
    norm = np.linalg.norm(d)
    if norm == 0:
        return np.zeros(shift.shape[0])
    cells = np.flatnonzero(type_ids == start)
    return (shift[:, cells] @ (d / norm)).mean(1)


# ---------------------------------------------------------------------------------------------- benchmark
def recipe_benchmark(recipes: pd.DataFrame, episodes: pd.DataFrame, actions: pd.DataFrame, geometry: Any,
                     regulator_genes: np.ndarray, shift: np.ndarray | None = None, embedding: np.ndarray | None = None,
                     n_perm: int = 1000, seed: int = 0, ks: Sequence[int] = KS,
                     score_status: str = "computed",
                     policies: Sequence[str] = ROLLOUT_POLICIES) -> tuple[dict[str, Any], pd.DataFrame]:
    """Score every policy against ``recipes`` (validated, type names as in ``geometry``) per (start, target).

    ``episodes``: the evaluation episodes (policy, start_type, target_type, actions, success); ``actions``: the
    action table (gene, kind); ``regulator_genes``: (A,) gene column of each action's gene in ``geometry.z``;
    ``shift``: (A, cells, 2) simulated embedding shifts for the perturbation-score baseline (None: skipped, with
    ``score_status`` saying why); ``policies``: the episodes' policies to score, in this order. Returns the
    JSON-ready summary and one row per (pair, policy).
    """
    key = {(k, g.lower()): i for i, (k, g) in enumerate(zip(actions.kind, actions.gene.astype(str)))}
    genes_l = set(actions.gene.astype(str).str.lower())
    is_oe = actions.kind.to_numpy() == "OE"
    A = len(actions)
    tn = [str(t) for t in geometry.type_names]
    tid = {t: i for i, t in enumerate(tn)}
    train = np.asarray(geometry.split).astype(str) == "train"  # not tasks.split_mask: demo_recipes stays off tasks
    rows: list[dict[str, Any]] = []
    not_in = recipes[~recipes.gene.str.lower().isin(genes_l)]
    for pair_no, ((s, t), rec) in enumerate(recipes.groupby(["start_type", "target_type"], sort=True)):
        recipe = {key[(d, g.lower())] for g, d in zip(rec.gene, rec.direction) if (d, g.lower()) in key}
        wrong = {key[("OE" if d == "KO" else "KO", g.lower())] for g, d in zip(rec.gene, rec.direction)
                 if ("OE" if d == "KO" else "KO", g.lower()) in key} - recipe
        base = dict(start_type=s, target_type=t, recipe=" ".join(f"{d}:{g}" for g, d in zip(rec.gene, rec.direction)),
                    n_recipe=len(rec), n_in_action_space=len(recipe),
                    not_in_action_space=" ".join(sorted(set(rec.gene[~rec.gene.str.lower().isin(genes_l)]))))
        rng_seed = seed + pair_no  # one permutation null per pair, shared by its policies
        ep = episodes[(episodes.start_type == s) & (episodes.target_type == t)]
        for pol in policies:
            d = ep[ep.policy == pol]
            if d.empty:
                continue
            plans = [list(a) for a in d.actions if len(a)]
            row = dict(base, policy=pol, kind="plans", n_plans=len(plans), success=float(d.success.mean()))
            if recipe and plans:
                m, usage = plan_metrics(plans, A, recipe, wrong, ks)
                row.update(m)
                row.update(_auc_row(usage, recipe, n_perm, rng_seed))
            rows.append(row)
        si, ti = tid[s], tid[t]
        scores = {"expression_diff": expression_diff_scores(geometry.z, geometry.type_ids, train, regulator_genes,
                                                             is_oe, si, ti)}
        if shift is not None and embedding is not None:
            scores["perturbation_score"] = perturbation_scores(shift, embedding, geometry.type_ids,
                                                               geometry.embedding_centroids, si, ti)
        for pol in RANKING_POLICIES:
            row = dict(base, policy=pol, kind="ranking", n_plans=None, success=None)
            if pol not in scores:
                row["status"] = score_status
            elif recipe:
                row.update(topk_metrics(ranking_order(scores[pol]).tolist(), recipe, wrong, ks))
                row.update(_auc_row(scores[pol], recipe, n_perm, rng_seed))
            rows.append(row)
    df = pd.DataFrame(rows)
    metric_cols = [f"{m}@{k}" for k in ks for m in ("precision", "recall")] + ["wrong_direction", "auc"]
    for c in metric_cols + ["p_value", "status"]:
        if c not in df:
            df[c] = np.nan if c != "status" else None
    per_policy = {}
    for pol, d in df.groupby("policy", sort=False):
        ok = d[d.auc.notna()]
        per_policy[pol] = {c: _nanmean(d[c]) for c in metric_cols} | {
            "pairs_scored": int(len(ok)), "pairs_p_below_0.05": int((ok.p_value < 0.05).sum())}
    summary = {"available": True, "n_rows": int(len(recipes)),
               "n_pairs": int(len(recipes.groupby(["start_type", "target_type"]))),
               "n_not_in_action_space": int(len(not_in)),
               "not_in_action_space": sorted(set(not_in.gene)), "ks": list(ks), "permutations": int(n_perm),
               "seed": int(seed), "perturbation_score": score_status, "policies": per_policy,
               "pairs": df.astype(object).where(df.notna(), None).to_dict("records")}  # NaN -> null (strict JSON)
    return summary, df


def _auc_row(scores: np.ndarray, recipe: set[int], n_perm: int, seed: int) -> dict[str, float | None]:
    rel = np.zeros(len(scores), bool)
    rel[list(recipe)] = True
    auc = normalised_auc(scores, rel)
    p = None if auc is None else permutation_pvalue(auc, len(scores), int(rel.sum()), n_perm, seed)
    return {"auc": auc, "p_value": p}


def _nanmean(x: Any) -> float | None:
    v = pd.to_numeric(pd.Series(x), errors="coerce").to_numpy(dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else None
