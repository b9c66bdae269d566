"""Evaluation figures (matplotlib, Agg backend, PNG). Each function draws one figure and returns its path.

* :func:`umap_paths` - embedding coloured by cell type, example agent paths vs BFS paths as arrows.
* :func:`success_by_target` - success rate per target type: agent, greedy, random, BFS-reachable.
* :func:`length_hist` - path lengths of successful agent episodes vs the BFS optimum.
* :func:`learning_curve` - success rate (and reward) against timesteps from the training log.
* :func:`action_usage` - which genes the agent perturbs, knockout vs overexpression.
* :func:`recipe_metrics` - the known-recipe benchmark: precision@k and rank-recall AUC per policy.
* :func:`warm_start_curves` - success and length ratio against environment steps per warm-start variant.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

log = logging.getLogger(__name__)

POLICY_COLORS = {"agent": "#1f77b4", "greedy": "#ff7f0e", "random": "#7f7f7f", "bfs": "#2ca02c"}


def _save(fig: "plt.Figure", out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def _type_colors(type_names: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab20" if len(type_names) > 10 else "tab10")
    return {str(t): cmap(i % cmap.N) for i, t in enumerate(type_names)}


def repel_labels(points: np.ndarray, labels: Sequence[str], char_width: float = 0.0047, height: float = 0.04,
                 n_iter: int = 300) -> np.ndarray:
    """Label positions (T, 2) at ``points`` moved vertically until no two label boxes overlap.

    Units are fractions of the points' x and y ranges (about the axes box): a label is ``char_width`` per character
    wide (plus padding) and ``height`` tall; overlapping pairs are pushed apart symmetrically along y."""
    P = np.asarray(points, dtype=np.float64)
    if len(P) < 2:
        return P.copy()
    lo = P.min(0)
    span = np.where(P.max(0) - lo > 0, P.max(0) - lo, 1.0)
    Q = (P - lo) / span
    half_w = char_width * (np.array([len(str(t)) for t in labels]) + 2) / 2
    order = np.argsort(np.argsort(Q[:, 1], kind="stable"))  # ties: a fixed up/down order
    off = ~np.eye(len(Q), dtype=bool)
    for _ in range(n_iter):
        dx = np.abs(Q[:, None, 0] - Q[None, :, 0])
        dy = Q[:, None, 1] - Q[None, :, 1]
        hit = off & (dx < half_w[:, None] + half_w[None, :]) & (np.abs(dy) < height)
        if not hit.any():
            break
        sign = np.where(dy != 0, np.sign(dy), np.sign(order[:, None] - order[None, :]))
        Q[:, 1] += 0.5 * (np.where(hit, (height - np.abs(dy)) * sign, 0.0)).sum(1) + 1e-4 * hit.any(1) * (order - order.mean())
    return Q * span + lo


def umap_paths(embedding: np.ndarray, cell_types: np.ndarray, type_names: Sequence[str],
               examples: Iterable[dict], out: str | Path, title: str = "") -> Path:
    """Scatter of the embedding by cell type with example paths.

    ``examples``: dicts with ``start`` (cell index), ``agent`` and ``bfs`` (cells visited after each step),
    ``label`` (legend text, e.g. "A -> B").
    """
    fig, ax = plt.subplots(figsize=(8, 7))
    colors = _type_colors(type_names)
    ct = np.asarray(cell_types).astype(str)
    present = [str(t) for t in type_names if (ct == str(t)).any()]
    for t in type_names:
        m = ct == str(t)
        ax.scatter(embedding[m, 0], embedding[m, 1], s=4, color=colors[str(t)], alpha=0.35, label=str(t),
                   rasterized=True)
    # type labels at their medians, pushed apart where types lie close (a line points back to the median)
    med = np.array([np.median(embedding[ct == t], axis=0) for t in present]).reshape(-1, 2)
    for t, xy, lab in zip(present, med, repel_labels(med, present)):
        moved = np.linalg.norm(lab - xy) > 1e-9
        ax.annotate(t, xy, xytext=lab, textcoords="data", fontsize=9, weight="bold", ha="center", va="center",
                    arrowprops=dict(arrowstyle="-", color="grey", lw=0.6) if moved else None,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec=colors[t], alpha=0.8, lw=1.2))
    for k, ex in enumerate(examples):
        for key, style, off in (("agent", dict(color="#d62728", lw=1.6), 0.0),
                                ("bfs", dict(color="black", lw=1.2, ls="--"), 0.0)):
            cells = [int(ex["start"])] + [int(c) for c in ex.get(key) or []]
            if len(cells) < 2:
                continue
            pts = embedding[cells] + off
            for i in range(len(pts) - 1):
                ax.annotate("", xy=pts[i + 1], xytext=pts[i],
                            arrowprops=dict(arrowstyle="-|>", shrinkA=0, shrinkB=0, mutation_scale=9,
                                            alpha=0.85, **style))
        s = embedding[int(ex["start"])]
        ax.plot(*s, marker="o", ms=7, mfc="white", mec="black", zorder=5)
        ax.annotate(ex.get("label", ""), s, xytext=(5, 5 - 11 * (k % 2)), textcoords="offset points", fontsize=7,
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", alpha=0.7, lw=0))
    ax.plot([], [], color="#d62728", lw=1.6, label="agent path")
    ax.plot([], [], color="black", lw=1.2, ls="--", label="BFS optimal path")
    ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xlabel("embedding 1")
    ax.set_ylabel("embedding 2")
    ax.set_title(title or "Cell types with example agent (red) and BFS (black, dashed) paths")
    return _save(fig, out)


def success_by_target(per_target: pd.DataFrame, out: str | Path) -> Path:
    """Grouped bars per target type. ``per_target`` columns: target_type, agent, greedy, random, bfs (rates)."""
    cols = [c for c in ("agent", "greedy", "random", "bfs") if c in per_target.columns]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(per_target) + 2), 4.2))
    x = np.arange(len(per_target))
    w = 0.8 / max(1, len(cols))
    for i, c in enumerate(cols):
        label = "BFS-reachable" if c == "bfs" else c
        ax.bar(x + (i - (len(cols) - 1) / 2) * w, per_target[c].to_numpy(dtype=float), w, label=label,
               color=POLICY_COLORS.get(c))
    ax.set_xticks(x)
    ax.set_xticklabels(per_target["target_type"].astype(str), rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.set_title("Success by target cell type")
    ax.legend(fontsize=8, ncol=len(cols))
    return _save(fig, out)


def method_success(methods: dict, out: str | Path) -> Path:
    """Persistent mode: success of each method (agent, exact, beam, greedy) on the exact-search tasks and on all
    test tasks (exact search runs on its subset only). ``methods``: summary.json's ``methods``."""
    names = list(methods)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names) + 2), 4))
    x = np.arange(len(names))
    for i, (scope, color) in enumerate((("exact_tasks", "#2ca02c"), ("all_tasks", "#1f77b4"))):
        vals = [(methods[n].get(scope) or {}).get("success", np.nan) for n in names]
        ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, color=color,
               label="exact-search tasks" if scope == "exact_tasks" else "all test tasks")
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.set_title("Persistent perturbations: agent vs search over sets")
    ax.legend(fontsize=8)
    return _save(fig, out)


def length_hist(agent_lengths: np.ndarray, bfs_lengths: np.ndarray, out: str | Path,
                other: dict[str, np.ndarray] | None = None) -> Path:
    """Side-by-side bars per path length: successful agent (and baseline) episodes vs BFS optimal lengths."""
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {"BFS optimum": (np.asarray(bfs_lengths, dtype=int), POLICY_COLORS["bfs"]),
              "agent": (np.asarray(agent_lengths, dtype=int), POLICY_COLORS["agent"])}
    for k, v in (other or {}).items():
        series[k] = (np.asarray(v, dtype=int), POLICY_COLORS.get(k))
    hi = max([int(v.max()) for v, _ in series.values() if len(v)] + [1])
    x = np.arange(1, hi + 1)
    w = 0.8 / len(series)
    for i, (k, (v, c)) in enumerate(series.items()):
        counts = np.bincount(v[v >= 1], minlength=hi + 1)[1:hi + 1] if len(v) else np.zeros(hi)
        label = f"{k} (n={len(v)}, mean {v.mean():.1f})" if len(v) else f"{k} (none)"
        ax.bar(x + (i - (len(series) - 1) / 2) * w, counts, w, label=label, color=c)
    ax.set_xlabel("path length (perturbations)")
    ax.set_ylabel("successful episodes")
    ax.set_title("Path lengths of successful episodes")
    ax.legend(fontsize=8)
    return _save(fig, out)


def read_progress(path: str | Path | None) -> pd.DataFrame:
    """Read a training log robustly: returns columns ``timesteps`` and any of ``success``, ``reward``, ``phase``.

    Accepts SB3's ``progress.csv`` (``time/total_timesteps``, ``eval/success_rate``, ``rollout/ep_rew_mean``) or
    simpler logs (``timesteps``, ``success_rate``...); rows without a success value are dropped. Empty frame if
    the file is missing, empty or has no recognisable columns.
    """
    if path is None or not Path(path).exists() or Path(path).stat().st_size == 0:
        return pd.DataFrame(columns=["timesteps"])
    try:
        df = pd.read_csv(path)
    except Exception as e:  # malformed log: the report still renders, with a note
        log.warning("cannot read training log %s: %s", path, e)
        return pd.DataFrame(columns=["timesteps"])
    cols = {c.lower(): c for c in df.columns}

    def pick(*cands: str, contains: str | None = None, exclude: tuple[str, ...] = ()) -> str | None:
        for c in cands:
            if c in cols:
                return cols[c]
        if contains:
            for lc, c in cols.items():
                if contains in lc and not any(e in lc for e in exclude):
                    return c
        return None

    t = pick("time/total_timesteps", "total_timesteps", "timesteps", "timestep", "step", "num_timesteps",
             contains="timestep")
    if t is None:
        return pd.DataFrame(columns=["timesteps"])
    out = pd.DataFrame({"timesteps": pd.to_numeric(df[t], errors="coerce")})
    s = pick("eval/success_rate", "success_rate", "success", contains="success", exclude=("train",))
    s = s or pick(contains="success")
    r = pick("rollout/ep_rew_mean", "eval/mean_reward", "reward", contains="rew")
    p = pick("curriculum/phase", "phase", contains="phase")
    tr = pick("train_success", "rollout/success_rate", contains="train_succ")
    tr = tr if tr != s else None
    for name, c in (("success", s), ("train_success", tr), ("reward", r), ("phase", p)):
        if c is not None:
            out[name] = pd.to_numeric(df[c], errors="coerce")
    return out.dropna(subset=["timesteps"]).sort_values("timesteps").reset_index(drop=True)


def learning_curve(progress: str | Path | pd.DataFrame | None, out: str | Path) -> Path:
    """Success rate (left axis) and mean episode reward (right axis) against timesteps."""
    df = progress if isinstance(progress, pd.DataFrame) else read_progress(progress)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = False
    if "train_success" in df and df["train_success"].notna().any():
        d = df.dropna(subset=["train_success"])
        ax.plot(d["timesteps"], d["train_success"], color="#17becf", lw=1.2, ls="--",
                label="training episodes (curriculum)")
        ax.set_ylim(-0.02, 1.02)
        drawn = True
    if "success" in df and df["success"].notna().any():
        d = df.dropna(subset=["success"])
        ax.plot(d["timesteps"], d["success"], marker="o", ms=3, color=POLICY_COLORS["agent"],
                label="evaluation (held-out cells, all targets)")
        ax.set_ylim(-0.02, 1.02)
        drawn = True
    if drawn:
        ax.legend(fontsize=7, loc="upper left")
    ax.set_ylabel("success rate")
    ax.set_xlabel("timesteps")
    if "reward" in df and df["reward"].notna().any():
        ax2 = ax.twinx()
        d = df.dropna(subset=["reward"])
        ax2.plot(d["timesteps"], d["reward"], color="#9467bd", alpha=0.6, lw=1, label="mean episode reward")
        ax2.set_ylabel("mean episode reward", color="#9467bd")
        drawn = True
    if "phase" in df and df["phase"].notna().any():
        changes = df["timesteps"][df["phase"].diff().fillna(0) > 0]
        for x in changes:
            ax.axvline(x, color="grey", lw=0.6, ls=":")
    if not drawn:
        ax.text(0.5, 0.5, "no training log with success or reward columns", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_title("Learning curve (dotted: curriculum phase changes)")
    return _save(fig, out)


def action_usage(actions: Iterable[Sequence[int]], regulators: Sequence[str], out: str | Path,
                 top: int = 25, title: str = "") -> Path:
    """Horizontal stacked bars: how often each regulator is knocked out / overexpressed."""
    R = len(regulators)
    counts = np.zeros(2 * R, dtype=np.int64)
    for seq in actions:
        if seq is not None and len(seq):
            counts += np.bincount(np.asarray(seq, dtype=np.int64), minlength=2 * R)[:2 * R]
    ko, oe = counts[:R], counts[R:]
    order = np.argsort(-(ko + oe), kind="stable")[:top]
    order = order[(ko + oe)[order] > 0][::-1]
    fig, ax = plt.subplots(figsize=(6.5, max(2.5, 0.28 * len(order) + 1.2)))
    y = np.arange(len(order))
    ax.barh(y, ko[order], color="#d62728", label="knockout (KO)")
    ax.barh(y, oe[order], left=ko[order], color="#2ca02c", label="overexpression (OE)")
    ax.set_yticks(y)
    ax.set_yticklabels([str(regulators[i]) for i in order], fontsize=8)
    ax.set_xlabel("times used")
    total = counts.sum()
    frac = oe.sum() / total if total else float("nan")
    ax.set_title(title or f"Agent action usage (OE fraction {frac:.2f})")
    ax.legend(fontsize=8, loc="lower right")
    if not len(order):
        ax.text(0.5, 0.5, "no actions taken", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, out)


RECIPE_POLICY_ORDER = ("agent", "bfs", "greedy", "random", "perturbation_score", "expression_diff")


def recipe_metrics(df: pd.DataFrame, out: str | Path) -> Path:
    """Known-recipe benchmark: mean precision@k / recall@5 per policy (left) and the normalised rank-recall AUC of
    every (start, target) pair per policy (right; filled: permutation p < 0.05, dashed line: chance 0.5).

    ``df``: one row per (pair, policy) with columns policy, precision@k, recall@5, auc, p_value."""
    pols = [p for p in RECIPE_POLICY_ORDER if p in set(df.policy)] + sorted(set(df.policy) - set(RECIPE_POLICY_ORDER))
    metrics = [c for c in ("precision@1", "precision@3", "precision@5", "recall@5") if c in df.columns]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    x = np.arange(len(pols))
    w = 0.8 / max(1, len(metrics))
    cmap = plt.get_cmap("Blues")
    for i, m in enumerate(metrics):
        vals = [pd.to_numeric(df[df.policy == p][m], errors="coerce").mean() for p in pols]
        ax.bar(x + (i - (len(metrics) - 1) / 2) * w, vals, w, label=m, color=cmap(0.35 + 0.6 * i / max(1, len(metrics))))
    ax.set_xticks(x)
    ax.set_xticklabels(pols, rotation=25, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean over (start, target) pairs")
    ax.set_title("Recipe actions among the first k (distinct) actions")
    ax.legend(fontsize=8, ncol=2)
    rng = np.random.default_rng(0)  # horizontal jitter only
    for i, p in enumerate(pols):
        d = df[df.policy == p]
        auc = pd.to_numeric(d.auc, errors="coerce").to_numpy(float)
        sig = pd.to_numeric(d.p_value, errors="coerce").to_numpy(float) < 0.05
        ok = ~np.isnan(auc)
        if not ok.any():
            ax2.text(i, 0.5, "n/a", ha="center", va="center", fontsize=8, color="grey")
            continue
        jx = i + rng.uniform(-0.18, 0.18, ok.sum())
        c = POLICY_COLORS.get(p, "#9467bd")
        ax2.scatter(jx[sig[ok]], auc[ok][sig[ok]], s=18, color=c, zorder=3)
        ax2.scatter(jx[~sig[ok]], auc[ok][~sig[ok]], s=18, facecolors="none", edgecolors=c, zorder=3)
        ax2.hlines(auc[ok].mean(), i - 0.3, i + 0.3, color="black", lw=1.5)
    ax2.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax2.set_xticks(x)
    ax2.set_xticklabels(pols, rotation=25, ha="right")
    ax2.set_ylim(-0.03, 1.03)
    ax2.set_ylabel("normalised rank-recall AUC")
    ax2.set_title("AUC per pair (filled: p < 0.05; bar: mean)")
    return _save(fig, out)


def warm_start_curves(summary: dict, out: str | Path, labels: dict | None = None) -> Path:
    """Two panels against environment steps, one line per variant (``benchmarks/warm_start.py`` summary: per
    variant ``points`` with ``env_steps``, ``success_reachable`` and ``length_ratio``, each with a ``_range``):
    test success on BFS-reachable pairs and the mean length ratio agent / BFS; bars: min-max over seeds."""
    labels = labels or {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (variant, d) in enumerate(summary.items()):
        pts = d["points"]
        x = np.array([p.get("env_steps", p["timesteps"]) for p in pts], float)
        for ax, key in zip(axes, ("success_reachable", "length_ratio")):
            y = np.array([np.nan if p[key] is None else p[key] for p in pts], float)
            rng = np.array([p.get(key + "_range") or [np.nan, np.nan] for p in pts], float).reshape(-1, 2)
            ax.errorbar(x, y, yerr=np.abs(np.stack([y - rng[:, 0], rng[:, 1] - y])), marker="o", ms=4, capsize=3,
                        color=plt.get_cmap("tab10")(i), label=labels.get(variant, variant))
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("test success (BFS-reachable pairs)")
    axes[1].axhline(1.0, color="grey", lw=0.6, ls=":")
    axes[1].set_ylabel("length / BFS (solved pairs)")
    for ax in axes:
        ax.set_xlabel("environment steps")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Warm start: learning curves at equal environment steps")
    return _save(fig, out)
