"""Self-contained HTML report per dataset, and the software-environment record it cites.

``write_report`` gathers the evaluation summaries of every run (tables), their plots (PNG embedded as base64,
so the one file can be mailed or archived), the oracle and transition-table statistics and the software
versions into ``results/{dataset}/report.html``. Nothing is fetched from the network when it is opened.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .config import ROOT
from .io import write_json, write_text

log = logging.getLogger(__name__)

PACKAGES = ("numpy", "pandas", "scipy", "scanpy", "anndata", "celloracle", "torch", "stable-baselines3",
            "sb3-contrib", "gymnasium", "optuna", "snakemake", "matplotlib", "pyarrow", "cupy-cuda12x", "cupy")

# Plot file stems written by cellrl.evaluate, in report order, with their captions.
PLOT_CAPTIONS: dict[str, str] = {
    "umap_paths": "Embedding coloured by cell type. Red arrows: the agent's path from a test cell to a target "
                  "type; black dashed arrows: one BFS-optimal path for the same start and target.",
    "success_by_target": "Success rate per target type for the agent, the greedy one-step policy, the random "
                         "masked policy, and the fraction of test pairs for which BFS finds any path "
                         "(the ceiling).",
    "length_hist": "Path lengths of successful episodes: agent (and greedy) against the BFS optimum.",
    "learning_curve": "Training log: evaluation success rate and mean episode reward against environment "
                      "steps; dotted lines mark curriculum phase changes.",
    "action_usage": "Which regulators the agent perturbs in all its test episodes, knockout vs overexpression.",
    "action_usage_bfs": "The same for the BFS-optimal plans (what the simulator rewards).",
    "method_success": "Persistent perturbations: success of the agent and of exact, beam and greedy search over "
                      "sets, on the exact-search tasks and on all test tasks (exact search runs on its subset).",
    "recipe_metrics": "Known-recipe benchmark. Left: mean over (start, target) pairs of the share of recipe "
                      "perturbations among a plan's (or ranking's) first k distinct actions, and of the recipe "
                      "recovered in the first 5. Right: normalised area under the rank-recall curve per pair "
                      "(1: recipe actions ranked first, 0.5: chance); filled points have permutation p < 0.05.",
}

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{border-bottom:2px solid #1f77b4;padding-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0 1.2em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right} th{background:#f0f4f8}
td.l,th.l{text-align:left} tr:nth-child(even) td{background:#fafafa}
.good{color:#2ca02c;font-weight:600} .bad{color:#d62728;font-weight:600}
figure{margin:1em 0 2em 0} figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.88em;color:#555;max-width:900px} .note{font-size:.88em;color:#555;max-width:950px}
code{background:#f4f4f4;padding:0 3px}
"""


# ---------------------------------------------------------------------------------------------- software
def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_state(root: str | Path = ROOT) -> dict[str, Any]:
    """Commit and dirty flag of the repository at ``root`` (``None`` values when git or the repo is absent)."""
    def run(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status),
            "branch": run("rev-parse", "--abbrev-ref", "HEAD")}


def software_env() -> dict[str, Any]:
    """Python, platform, key package versions (``None``: not installed), GPU visibility and git state."""
    from .xp import cupy_available

    pk = {p: _version(p) for p in PACKAGES}
    if pk.get("cupy-cuda12x") is None:
        pk.pop("cupy-cuda12x")
    torch_cuda = None
    try:
        import torch

        torch_cuda = bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch is a dependency
        pass
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "packages": pk, "cellrl": _version("cellrl"), "torch_cuda": torch_cuda, "cupy_gpu": cupy_available(),
            "git": git_state(), "time": _dt.datetime.now().isoformat(timespec="seconds")}


def write_software_env(out: str | Path) -> dict[str, Any]:
    """Rule ``software_env``: write :func:`software_env` as JSON to ``out``."""
    info = software_env()
    write_json(out, info)
    log.info("software: python %s, git %s%s", info["python"], info["git"]["commit"],
             " (dirty)" if info["git"]["dirty"] else "")
    return info


# ---------------------------------------------------------------------------------------------- HTML helpers
def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # NaN
            return "&ndash;"
        return f"{100 * v:.1f}%" if pct else (f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}")
    if isinstance(v, int):
        return f"{v:,}"
    return _e(v)


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
               pct: Iterable[str] = (), left: Iterable[str] = (), headers: Mapping[str, str] | None = None) -> str:
    """A table from a list of dicts; columns in ``pct`` are shown as percentages, ``left`` left-aligned."""
    if not rows:
        return "<p class='note'>(no rows)</p>"
    columns = list(columns or rows[0].keys())
    pct, left, headers = set(pct), set(left), dict(headers or {})
    out = ["<table><tr>"]
    out += [f"<th class='{'l' if c in left else ''}'>{_e(headers.get(c, c))}</th>" for c in columns]
    out.append("</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td class='{'l' if c in left else ''}'>{_fmt(r.get(c), c in pct)}</td>"
                                    for c in columns) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _flatten(d: Any, prefix: str = "", max_list: int = 12) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(d, Mapping):
        for k, v in d.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k), max_list)
    elif isinstance(d, list) and d and all(isinstance(x, Mapping) for x in d):
        out.append((prefix, f"[{len(d)} records]"))
    elif isinstance(d, list):
        s = ", ".join(str(x) for x in d[:max_list]) + (f", ... ({len(d)} items)" if len(d) > max_list else "")
        out.append((prefix, s))
    else:
        out.append((prefix, d))
    return out


def kv_table(d: Mapping[str, Any] | None) -> str:
    """Two-column table of a (nested) JSON object."""
    if not d:
        return "<p class='note'>(not available)</p>"
    return html_table([{"key": k, "value": v} for k, v in _flatten(d)], ["key", "value"], left=["key", "value"])


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{_e(path.stem)}' src='data:image/png;base64,{data}'/>"
            f"<figcaption><b>{_e(path.stem)}</b>: {_e(caption)}</figcaption></figure>")


def _read_json(path: str | Path | None) -> dict[str, Any]:
    if path is None or not Path(path).exists():
        return {}
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        log.warning("cannot parse %s: %s", path, e)
        return {"error": f"cannot parse {path}: {e}"}


# ---------------------------------------------------------------------------------------------- per-action stats
def per_action_table(stats: Mapping[str, Any]) -> "Any":
    """One row per action from the ``<metric>_per_action`` dicts of the transitions' stats.json (columns
    ``action`` and one per metric); empty when there are none."""
    import pandas as pd

    cols = {k[: -len("_per_action")]: v for k, v in stats.items() if k.endswith("_per_action") and isinstance(v, Mapping)}
    if not cols:
        return pd.DataFrame(columns=["action"])
    df = pd.DataFrame(cols)
    df.index.name = "action"
    return df.reset_index()


def _per_action_summary(df: "Any", link: str | None) -> str:
    """Min / median / max of each per-action metric with its five highest actions, instead of one row each."""
    if df.empty:
        return ""
    rows = []
    for c in df.columns[1:]:
        v = df[c].astype(float)
        top = df.assign(v=v).sort_values("v", ascending=False, kind="stable").head(5)
        rows.append({"metric": c, "actions": int(v.notna().sum()), "min": float(v.min()),
                     "median": float(v.median()), "max": float(v.max()),
                     "highest": ", ".join(f"{a} ({x:.3g})" for a, x in zip(top.action, top.v))})
    note = (f" Every action's values: <a href='{_e(link)}'>{_e(link)}</a> (next to this report)." if link else "")
    return ("<h3>Per action</h3><p class='note'>Per-action statistics of the transition table, summarised." + note
            + "</p>" + html_table(rows, ["metric", "actions", "min", "median", "max", "highest"],
                                  left=["metric", "highest"]))


def regulator_check(action_genes: Sequence[str], tf_list: Sequence[str] | None,
                    list_path: object = None) -> dict[str, Any]:
    """Which action genes are not on the TF list (case-insensitive); ``tf_list`` None: no list set."""
    genes = sorted(set(map(str, action_genes)))
    if tf_list is None:
        return {"list": None, "n_action_genes": len(genes), "not_on_list": None}
    listed = {t.lower() for t in tf_list}
    return {"list": str(list_path) if list_path is not None else None, "n_listed": len(listed),
            "n_action_genes": len(genes), "not_on_list": [g for g in genes if g.lower() not in listed]}


def _regulator_section(chk: Mapping[str, Any] | None) -> str:
    if not chk:
        return ""
    head = "<h2>Regulators (action genes)</h2>"
    if chk.get("not_on_list") is None:
        return (head + f"<p class='note'>No TF list set (<code>oracle.regulators</code>): the "
                f"{_fmt(chk.get('n_action_genes'))} action genes are the base GRN's regulators that CellOracle kept "
                "active; a motif-derived base GRN can make non-TFs regulators.</p>")
    bad = chk["not_on_list"]
    msg = (f"<span class='good'>all {_fmt(chk['n_action_genes'])} action genes are on it</span>" if not bad else
           f"<span class='bad'>{len(bad)} of {_fmt(chk['n_action_genes'])} action genes are not on it: "
           f"{_e(', '.join(bad))}</span>")
    return head + (f"<p>TF list <code>{_e(chk['list'])}</code> ({_fmt(chk.get('n_listed'))} symbols): {msg}.</p>")


def _recipe_section(r: Mapping[str, Any]) -> str:
    """The known-recipe benchmark of one run (summary.json ``recipes``)."""
    if not r.get("available"):
        return f"<h3>Known recipes</h3><p class='note'>{_e(r.get('reason', 'not computed'))}.</p>" if r else ""
    ks = r.get("ks", [1, 3, 5])
    metric_cols = [f"{m}@{k}" for k in ks for m in ("precision", "recall")] + ["wrong_direction", "auc"]
    pol_rows = [{"policy": p, **m} for p, m in (r.get("policies") or {}).items()]
    parts = ["<h3>Known recipes</h3>",
             f"<p class='note'>Table <code>{_e(r.get('source'))}</code>: {_fmt(r.get('n_rows'))} rows over "
             f"{_fmt(r.get('n_pairs'))} (start, target) pairs; {_fmt(r.get('n_not_in_action_space'))} rows name "
             f"a gene that is not an action (not in action space: {_e(', '.join(r.get('not_in_action_space') or []) or 'none')}). "
             "<i>precision@k</i> / <i>recall@k</i>: recipe (gene, direction) among a plan's first k distinct "
             "actions, over the actions shown / over the recipe (mean over the pair's plans; ranking baselines: "
             "their top k). <i>wrong direction</i>: share of plan actions (rankings: of the top "
             f"{max(ks)}) that perturb a recipe gene the other way. <i>AUC</i>: normalised area under the "
             "rank-recall curve (Hammelman et al., Nat Methods 2022) of all actions ranked by how many of the "
             "pair's plans use them (baselines: by score); 1 = recipe first, 0.5 = chance; ties share their mean "
             f"rank. <i>p</i>: share of {_fmt(r.get('permutations'))} random rankings with AUC &ge; the observed "
             "(seeded). Baselines: <i>perturbation_score</i>: CellOracle's single-step score (mean embedding "
             f"shift of the start type's cells projected on the start-to-target direction; "
             f"{_e(r.get('perturbation_score'))}); <i>expression_diff</i>: OE the regulators the target expresses "
             "more, KO those it expresses less, by the difference of z-scored type means.</p>",
             html_table(pol_rows, ["policy", *metric_cols, "pairs_scored", "pairs_p_below_0.05"],
                        left=["policy"], headers={"pairs_p_below_0.05": "pairs with p < 0.05",
                                                  "wrong_direction": "wrong direction"})]
    pairs = [p for p in r.get("pairs") or []]
    if pairs:
        parts.append("<details><summary>Per pair and policy</summary>" + html_table(
            pairs, ["start_type", "target_type", "policy", "recipe", "n_in_action_space", "n_plans", "success",
                    *metric_cols, "p_value"],
            pct=["success"], left=["start_type", "target_type", "policy", "recipe"],
            headers={"n_in_action_space": "recipe actions", "n_plans": "plans"}) + "</details>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- sections
POLICY_COLUMNS = ["policy", "episodes", "success", "success_reachable", "mean_length", "median_length",
                  "length_ratio_vs_bfs", "activation_frac", "stagnations_mean"]
POLICY_HEADERS = {"success": "success (all test pairs)", "success_reachable": "success (BFS-reachable pairs)",
                  "mean_length": "mean length (successes)", "median_length": "median length",
                  "length_ratio_vs_bfs": "length / BFS (pairs both solve)", "activation_frac": "OE fraction",
                  "stagnations_mean": "stagnations / episode"}


def _warm_start_section(train: Mapping[str, Any] | None) -> str:
    """Warm start (``train_summary.json`` ``warm_start``): what it did, and validation quality before/after PPO."""
    ws = (train or {}).get("warm_start") or {}
    if not ws:
        return ""
    rows = [{"stage": stage, **ws[key]} for stage, key in (("warm start only (before PPO)", "val_before_ppo"),
                                                           ("after PPO", "val_after_ppo")) if ws.get(key)]
    what = {"none": "none (PPO from random weights)", "bfs": "behaviour cloning of BFS next hops (training graph)",
            "dagger": "behaviour cloning + DAgger rounds on the agent's own training-graph states",
            "exact": "behaviour cloning of exact-search plans over sets from training cells (persistent mode)"}
    note = (f"<p class='note'>Warm start: {_e(what.get(ws.get('method'), ws.get('method')))}"
            + (f"; {_fmt(ws.get('samples'))} samples, {_fmt(ws.get('epochs'))} epochs, accuracy "
               f"{_fmt(ws.get('accuracy'), True)}, {_fmt(ws.get('env_steps'))} environment steps, "
               f"{_fmt(ws.get('seconds'))} s" if ws.get("method") != "none" else "")
            + ". Validation pairs, deterministic agent; length ratio: mean agent / BFS length over solved pairs.</p>")
    return "<h3>Warm start</h3>" + note + html_table(
        rows, ["stage", "episodes", "success", "success_reachable", "length_ratio"],
        pct=["success", "success_reachable"], left=["stage"],
        headers={"success": "success (validation pairs)", "success_reachable": "success (BFS-reachable)",
                 "length_ratio": "length / BFS"})


def _run_head(run: str, s: Mapping[str, Any], what: str = "evaluation") -> list[str]:
    """A run section's title and the commit it was evaluated at."""
    parts = [f"<h2>Run <code>{_e(run)}</code>: {what}</h2>"]
    git = s.get("git") or {}
    if git.get("commit"):
        parts.append(f"<p class='note'>Evaluated at commit <code>{_e(git['commit'][:12])}</code>"
                     f"{' (with uncommitted changes)' if git.get('dirty') else ''}.</p>")
    return parts


def _run_tail(s: Mapping[str, Any], plot_dir: Path | None) -> list[str]:
    """A run section's known recipes, training log, warm start and figures."""
    parts = [_recipe_section(s.get("recipes") or {})]
    train = s.get("training") or {}
    if train:
        parts.append("<h3>Training log</h3>" + kv_table(train))
    parts.append(_warm_start_section(s.get("train_summary")))
    if plot_dir is not None and plot_dir.is_dir():
        pngs = {p.stem: p for p in sorted(plot_dir.glob("*.png"))}
        order = [k for k in PLOT_CAPTIONS if k in pngs] + [k for k in pngs if k not in PLOT_CAPTIONS]
        if order:
            parts.append(f"<h3>Figures</h3>")
        for k in order:
            parts.append(_img(pngs[k], PLOT_CAPTIONS.get(k, "")))
    return parts


_TIE_BREAK_TEXT = {  # env.plan_tie_break, as the report says it (summaries from before the setting: similarity)
    "hub": "one whose strongest action pulls a high-reach regulator towards the target (<code>env.plan_tie_break: hub</code>)",
    "similarity": "one ending nearest the target (<code>env.plan_tie_break: similarity</code>)"}
PERSISTENT_COLUMNS = ["method", "exact_success", "all_success", "success_vs_exact", "mean_success_length",
                      "mean_success_set_size", "repeats_a_gene", "agree", "chance", "wall_s"]
PERSISTENT_HEADERS = {"exact_success": "success (exact-search tasks)", "all_success": "success (all test tasks)",
                      "success_vs_exact": "success / exact", "mean_success_length": "mean length (successes)",
                      "mean_success_set_size": "mean set size (successes)",
                      "repeats_a_gene": "plans repeating a gene", "agree": "planted recipe: agree",
                      "chance": "chance", "wall_s": "wall s"}


def persistent_rows(s: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per method of a persistent-mode summary (``methods``): success on the exact-search tasks and
    on all tasks, plan length, set size, plans repeating a gene, planted-recipe agreement on the exact tasks."""
    rows = []
    for name, m in (s.get("methods") or {}).items():
        ex, al = m.get("exact_tasks") or {}, m.get("all_tasks") or {}
        sc = al or ex
        rec = ex.get("recipe") or {}
        rows.append({"method": name, "exact_success": ex.get("success"), "all_success": al.get("success"),
                     "success_vs_exact": m.get("success_vs_exact"),
                     "mean_success_length": sc.get("mean_success_length"),
                     "mean_success_set_size": sc.get("mean_success_set_size"),
                     "repeats_a_gene": sc.get("repeats_a_gene"),
                     "agree": rec.get("agree"), "chance": rec.get("chance"), "wall_s": m.get("wall_s")})
    return rows


def _persistent_section(run: str, s: Mapping[str, Any], plot_dir: Path | None) -> str:
    """A persistent-mode run (summary.json of cellrl.persistent.evaluate): the agent against exact, beam and
    greedy search over sets."""
    parts = _run_head(run, s, "evaluation with persistent perturbations")
    p = s.get("protocol", {})
    parts.append(
        "<p class='note'>Persistent perturbations (<code>env.perturbation_model: persistent</code>): a plan is a "
        f"set of knockouts and overexpressions (at most {_fmt(p.get('max_set_size'))} genes) that stay applied; "
        "each step simulates the whole set from the current cell; HOLD adds nothing. Test protocol: start from "
        f"test cells, target = every other cell type; {_fmt(p.get('n_episodes'))} tasks, at most "
        f"{_fmt(p.get('max_steps'))} steps. <i>exact</i>: every set of up to {_fmt(p.get('exact_max_genes'))} genes "
        f"in every order (the optimum; exponential, so run on the {_fmt(p.get('n_exact_tasks'))} tasks of "
        f"{_fmt(p.get('n_exact_start_cells'))} test cells, {_fmt(p.get('exact_starts_per_type'))} per start type; "
        f"of equally short plans it keeps the {_TIE_BREAK_TEXT.get(p.get('plan_tie_break') or 'similarity', p.get('plan_tie_break'))}); "
        f"<i>beam</i>: beam search over sets, width {_fmt(p.get('beam_width'))}; <i>greedy</i>: the one-step best "
        "move; <i>agent</i>: the trained policy, "
        f"{'deterministic' if p.get('deterministic') else 'stochastic'}. <i>success / exact</i>: success on the "
        "exact-search tasks over exact search's. <i>planted recipe</i> (synthetic data): share of successful "
        "plans on the exact-search tasks whose set holds a planted action and no master TF in the wrong "
        f"direction. No plan repeats a gene: <b>{'yes' if s.get('no_plan_repeats_a_gene') else 'NO'}</b>.</p>")
    parts.append(html_table(persistent_rows(s), PERSISTENT_COLUMNS,
                            pct=["exact_success", "all_success", "success_vs_exact", "agree", "chance"],
                            left=["method"], headers=PERSISTENT_HEADERS))
    return "\n".join(parts + _run_tail(s, plot_dir))


def _run_section(run: str, s: Mapping[str, Any], plot_dir: Path | None) -> str:
    if s.get("perturbation_model") == "persistent":
        return _persistent_section(run, s, plot_dir)
    parts = _run_head(run, s)
    proto = s.get("protocol", {})
    parts.append(
        "<p class='note'>Test protocol: start from test cells, target = every other cell type"
        f"{' (a seeded sample of ' + _fmt(proto.get('n_episodes')) + ' pairs)' if proto.get('sampled') else ''}; "
        f"{_fmt(proto.get('n_episodes'))} episodes per policy, at most {_fmt(proto.get('max_steps'))} steps, agent "
        f"{'deterministic' if proto.get('deterministic') else 'stochastic'}. A pair is BFS-reachable when some "
        f"sequence of allowed perturbations reaches the target at all; "
        f"{_fmt(s.get('bfs_reachable_frac'), True)} of the pairs are, "
        f"{_fmt(s.get('bfs_reachable_within_max_steps_frac'), True)} within the step limit.</p>")
    rows = [{"policy": k, **v} for k, v in s.get("policies", {}).items()]
    parts.append(html_table(rows, POLICY_COLUMNS, pct=["success", "success_reachable", "activation_frac"],
                            left=["policy"], headers=POLICY_HEADERS))
    per = s.get("per_target", [])
    if per:
        parts.append("<h3>Per target cell type</h3>")
        cols = [c for c in ("target_type", "episodes", "bfs", "agent", "greedy", "random", "bfs_mean_length",
                            "agent_mean_length") if c in per[0]]
        parts.append(html_table(per, cols, pct=["bfs", "agent", "greedy", "random"], left=["target_type"],
                                headers={"bfs": "BFS-reachable", "bfs_mean_length": "BFS mean length",
                                         "agent_mean_length": "agent mean length"}))
    gt = s.get("ground_truth") or {}
    if gt.get("available"):
        parts.append("<h3>Ground truth: planted regulators</h3>")
        parts.append(
            "<p class='note'>The demo generator planted master TFs whose on/off code defines each cell type. "
            "For a (start, target) pair the planted recipe is: knock out the start type's masters that the target "
            "lacks, overexpress the target's masters that the start lacks. A plan <i>agrees</i> when it uses at least "
            "one planted action and no master TF in the wrong direction (KO of a master the target needs, OE of a "
            "master the target lacks; <i>wrong</i>: share of plans that do). <i>recall</i>: share of the planted "
            "actions a plan contains. <i>chance</i>: agreement of random action sequences of the same lengths. "
            "Where the signal is lost, three measurements on the start type's test cells locate it: "
            "<i>GRN</i>: share of (cell, planted action) whose simulated expression change points towards the "
            "target centroid; <i>shift</i>: share whose embedding shift points towards the target's embedding "
            "centroid; <i>table rank</i>: where the planted actions rank among all allowed actions by how much "
            "closer to the target the next cell in the table lies (1 = best, 0.5 = like a random action). "
            "<i>verdict</i> names the first stage that breaks the chain (oracle &rarr; simulator &rarr; table "
            "&rarr; agent).</p>")
        parts.append(f"<p><b>BFS plans agree: {_fmt(gt.get('bfs_agreement'), True)}</b> of test plans "
                     f"(chance {_fmt(gt.get('chance_agreement'), True)}; "
                     f"{_fmt(gt.get('bfs_pairs_agree'), True)} of type pairs with a majority); "
                     f"<b>agent plans agree: {_fmt(gt.get('agent_agreement'), True)}</b> of successful agent episodes "
                     f"({_fmt(gt.get('agent_pairs_agree'), True)} of type pairs). Mean over pairs: GRN "
                     f"{_fmt(gt.get('mean_grn_toward'), True)}, shift {_fmt(gt.get('mean_shift_toward'), True)}, "
                     f"table rank {_fmt(gt.get('mean_planted_rank'))}. Verdicts: "
                     f"{_e('; '.join(f'{k}: {v}' for k, v in (gt.get('verdicts') or {}).items()))}.</p>")
        cols = ["start", "target", "planted", "n_bfs", "bfs_agree", "bfs_chance", "bfs_recall", "bfs_wrong",
                "n_agent", "agent_success", "agent_agree", "agent_recall", "grn_toward", "shift_toward",
                "planted_rank", "verdict"]
        parts.append(html_table(gt.get("pairs", []), cols,
                                pct=["bfs_agree", "bfs_chance", "bfs_recall", "bfs_wrong", "agent_success",
                                     "agent_agree", "agent_recall", "grn_toward", "shift_toward"],
                                left=["start", "target", "planted", "verdict"],
                                headers={"n_bfs": "BFS plans", "bfs_agree": "BFS agree", "bfs_chance": "chance",
                                         "bfs_recall": "BFS recall", "bfs_wrong": "BFS wrong",
                                         "n_agent": "agent episodes", "agent_success": "agent success",
                                         "agent_agree": "agent agree", "agent_recall": "agent recall",
                                         "grn_toward": "GRN", "shift_toward": "shift",
                                         "planted_rank": "table rank"}))
    return "\n".join(parts + _run_tail(s, plot_dir))


def render_report(dataset: str, runs: Sequence[tuple[str, Mapping[str, Any], Path | None]],
                  oracle_stats: Mapping[str, Any], transition_stats: Mapping[str, Any],
                  software: Mapping[str, Any], regulators: Mapping[str, Any] | None = None,
                  per_action_link: str | None = None) -> str:
    """The report as one HTML string (see :func:`write_report`). ``regulators``: :func:`regulator_check`;
    ``per_action_link``: file name of the per-action TSV written next to the report."""
    git = software.get("git") or {}
    commit = (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
    head = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cellrl report: {_e(dataset)}</title>",
            f"<style>{CSS}</style></head><body>",
            f"<h1>cellrl report: <code>{_e(dataset)}</code></h1>",
            f"<p class='note'>Generated {_e(_dt.datetime.now().isoformat(timespec='seconds'))} from commit "
            f"<code>{_e(commit)}</code>. Pipeline: filtered scRNA &rarr; CellOracle oracle &rarr; (cell, "
            "perturbation) &rarr; next-cell table &rarr; MaskablePPO agent, benchmarked against exact BFS shortest "
            "paths on the same table and two baselines (greedy one-step, random masked).</p>"]
    # headline table across runs
    rows = []
    for run, s, _ in runs:
        pol = s.get("policies", {})
        gt = s.get("ground_truth") or {}
        if s.get("perturbation_model") == "persistent":  # agent and greedy over sets, on all test tasks
            pol = {k: {"success": (m.get("all_tasks") or m.get("exact_tasks") or {}).get("success")}
                   for k, m in (s.get("methods") or {}).items()}
            agree = (((s.get("methods") or {}).get("agent") or {}).get("exact_tasks") or {}).get("recipe") or {}
            gt = {"agent_agreement": agree.get("agree")}
        rows.append({"run": run, "agent": pol.get("agent", {}).get("success"),
                     "agent_reachable": pol.get("agent", {}).get("success_reachable"),
                     "greedy": pol.get("greedy", {}).get("success"), "random": pol.get("random", {}).get("success"),
                     "bfs": s.get("bfs_reachable_frac"), "ratio": s.get("length_ratio_agent_bfs"),
                     "gt_bfs": gt.get("bfs_agreement"), "gt_agent": gt.get("agent_agreement"),
                     **{f"rec_{p}": ((s.get("recipes") or {}).get("policies") or {}).get(p, {}).get("auc")
                        for p in ("bfs", "agent")}})
    head.append("<h2>Summary</h2>")
    head.append(html_table(rows, ["run", "agent", "agent_reachable", "greedy", "random", "bfs", "ratio", "gt_bfs",
                                  "gt_agent", "rec_bfs", "rec_agent"],
                           pct=["agent", "agent_reachable", "greedy", "random", "bfs", "gt_bfs", "gt_agent"],
                           left=["run"],
                           headers={"agent": "agent success", "agent_reachable": "agent success (reachable)",
                                    "greedy": "greedy success", "random": "random success",
                                    "bfs": "BFS-reachable", "ratio": "agent length / BFS",
                                    "gt_bfs": "ground truth: BFS agree", "gt_agent": "ground truth: agent agree",
                                    "rec_bfs": "recipe AUC: BFS", "rec_agent": "recipe AUC: agent"}))
    body = [_run_section(run, s, d) for run, s, d in runs]
    per_action = per_action_table(transition_stats)
    tstats = {k: v for k, v in transition_stats.items() if not k.endswith("_per_action")}
    tail = [_regulator_section(regulators), "<h2>Oracle (CellOracle fit)</h2>", kv_table(oracle_stats),
            "<h2>Transition table</h2>", kv_table(tstats), _per_action_summary(per_action, per_action_link),
            "<h2>Software</h2>", kv_table(software), "</body></html>"]
    return "\n".join(head + body + tail)


def write_report(out: str | Path, dataset: str, summaries: Sequence[str | Path], plot_dirs: Sequence[str | Path],
                 oracle_stats: str | Path | None = None, transition_stats: str | Path | None = None,
                 software: str | Path | None = None, actions: str | Path | None = None,
                 regulators: str | Path | None = None, per_action_out: str | Path | None = None,
                 train_summaries: Sequence[str | Path] = ()) -> Path:
    """Rule ``report``: one self-contained HTML file (tables + base64-embedded PNGs) for ``dataset``.

    ``summaries`` and ``plot_dirs`` are parallel lists, one entry per run (``.../benchmark/{run}/summary.json``
    and ``.../benchmark/{run}/plots``); the run name is the summary's parent folder name. ``actions``
    (transitions/actions.tsv) and ``regulators`` (the oracle.regulators TF list, None: not set) give the
    regulator check; ``per_action_out``: a TSV of the transition table's per-action statistics, linked from the
    report (which shows their summary only). ``train_summaries`` (optional, parallel to ``summaries``): each
    run's ``train_summary.json`` (its warm start section).
    """
    import pandas as pd

    from .grn import read_tf_list

    dirs = list(plot_dirs) + [None] * (len(summaries) - len(plot_dirs))
    trains = list(train_summaries) + [None] * (len(summaries) - len(train_summaries))
    runs = [(Path(s).parent.name, {**_read_json(s), "train_summary": _read_json(t)}, Path(d) if d else None)
            for s, d, t in zip(summaries, dirs, trains)]
    tstats = _read_json(transition_stats)
    chk = None
    if actions is not None and Path(actions).exists():
        genes = pd.read_csv(actions, sep="\t")["gene"].astype(str)
        chk = regulator_check(genes, read_tf_list(regulators) if regulators else None, regulators)
    link = None
    if per_action_out is not None:
        from .io import write_table

        write_table(per_action_out, per_action_table(tstats))
        link = Path(per_action_out).name if Path(per_action_out).parent == Path(out).parent else str(per_action_out)
    text = render_report(dataset, runs, _read_json(oracle_stats), tstats, _read_json(software), chk, link)
    write_text(out, text)
    log.info("report: %s (%.1f kB, %d runs)", out, len(text) / 1024, len(runs))
    return Path(out)
