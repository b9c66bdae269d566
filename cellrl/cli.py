"""Command line: ``cellrl plan`` - the perturbation sequence a trained agent proposes, next to the BFS optimum.

    cellrl plan --results results/demo --start Stem --target FateA
    cellrl plan --results results/demo --run default --start cell00042 --target FateA --json
    cellrl plan --model m.npz --table table.npy --agent model.zip --start Stem --target FateA
    cellrl plan --results results/demo --expression my_cells.csv --cell sample1 --target FateA

The start is a cell name, or a cell type (then the test cell of that type closest to its centroid stands for
it), or, with --expression FILE --cell ID, a cell of your own that is not in the table: it is placed at its
nearest table cells and the plan starts from the nearest one. FILE is an .h5ad (X) or a .csv/.tsv in either
orientation (genes as rows or as columns, told apart by the dataset's gene names), raw counts or
log-normalised values (detected: all integers = counts; or --expression-type), the dataset's gene symbols (at
least half of the model's genes must be found; missing genes take the table mean). It is normalised as the
dataset was (counts scaled to the dataset's per-cell total, log1p) and compared in the PCA space of the
oracle's log-normalised input (rna/filtered.h5ad next to the model), else in the environment's z-scored
imputed expression. The placement (nearest cells, their types, distances) is printed before the plans and is
"placement" under --json; a warning says when the nearest cell is farther than 95% of table cells are from
their own nearest neighbour, or the cell farther from that PCA subspace than 95% of them (no such test in the
imputed fallback, where every single cell lies far).

Files are checked against the sha256 their stage recorded next to them (model.npz: oracle/stats.json,
table.npy: transitions/stats.json, model.zip: train_summary.json; skipped when that file is absent). The agent
is loaded without unpickling: only its weights (policy.pth, torch weights_only), the network rebuilt from
train_summary.json. --trust-pickled-agent loads it with SB3's MaskablePPO.load instead, which unpickles the
zip's data: a crafted zip runs arbitrary code. Use it only for zips you made yourself.

Exit status:
  0  the agent reaches the target
  1  the agent does not reach it, but a path exists (the BFS optimum is shown)
  2  bad input: unknown cell or type, bad option value, missing or unreadable file (model.npz, table.npy,
     actions.tsv, model.zip, train_summary.json) or one that differs from its recorded sha256; an --expression
     file that cannot be read, lacks the --cell or holds fewer than half of the model's genes; the message
     names the file or option and the fix
  3  the target is unreachable from the start (exact BFS)
  4  internal error (a bug: please report it with the traceback)
With --json every outcome prints one JSON object on stdout; errors as
{"error": "input" | "unreachable" | "internal", "message", "path", "field", "fix", "exit_code"}.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import CellrlError, InputError

EXIT_OK, EXIT_AGENT_FAILED, EXIT_INPUT, EXIT_UNREACHABLE, EXIT_INTERNAL = 0, 1, 2, 3, 4


class UnreachableError(CellrlError):
    """No sequence of allowed perturbations leads from the start cell to the target type."""


# ---------------------------------------------------------------------------------------------- inputs
def resolve_paths(results: str | Path | None, run: str, model: str | None, table: str | None,
                  agent: str | None, actions: str | None) -> dict[str, Path | None]:
    """Paths of model.npz, table.npy, actions.tsv, model.zip and train_summary.json.

    A results folder (``results/{dataset}``) supplies the defaults; explicit paths win.
    """
    r = Path(results) if results else None
    if r is not None and not r.is_dir():
        raise InputError("results folder not found", path=r, fix="give results/<dataset> of a finished run")
    paths: dict[str, Path | None] = {
        "model": Path(model) if model else (r / "oracle" / "model.npz" if r else None),
        "table": Path(table) if table else (r / "transitions" / "table.npy" if r else None),
        "actions": Path(actions) if actions else (r / "transitions" / "actions.tsv" if r else None),
        "agent": Path(agent) if agent else (r / "models" / run / "model.zip" if r else None),
    }
    agent_dir = paths["agent"].parent if paths["agent"] else None
    paths["train_summary"] = agent_dir / "train_summary.json" if agent_dir else None
    for k in ("model", "table", "agent"):
        if paths[k] is None:
            raise InputError(f"no {k} given", field=f"--{k}", fix="pass --results results/<dataset> or every path")
        if not paths[k].exists():
            raise InputError(f"{k} file not found", path=paths[k],
                             fix="check --results/--run, or run the pipeline up to this file first")
    if paths["actions"] is not None and not paths["actions"].exists():
        paths["actions"] = None
    return paths


def env_settings(train_summary: Path | None, results: str | Path | None, run: str) -> dict[str, Any]:
    """Environment settings of the run: train_summary.json's ``env`` (what the agent was trained with), else
    the dataset's entry in config/config.yaml, else the reference defaults."""
    if train_summary is not None and train_summary.exists():
        try:
            env = json.loads(train_summary.read_text()).get("env")
        except (OSError, ValueError, AttributeError) as e:
            raise InputError(f"cannot read train_summary.json ({type(e).__name__}: {e})", path=train_summary,
                             fix="rerun the train rule for this run (it writes train_summary.json)") from e
        if env:
            return dict(env)
    return _config_section(results, run, "env") or {}


def transition_settings(results: str | Path | None, run: str,
                        train_summary: Path | None = None) -> dict[str, Any] | None:
    """The persistent engine's settings: those the agent trained with (train_summary.json ``transitions``, written
    by the train rule in persistent mode), else the dataset's ``transitions`` settings from config/config.yaml,
    else None (the defaults)."""
    if train_summary is not None:
        from .agent_io import read_train_summary

        recorded = read_train_summary(train_summary).get("transitions")
        if isinstance(recorded, dict):
            return recorded
    return _config_section(results, run, "transitions")


def _config_section(results: str | Path | None, run: str, section: str) -> dict[str, Any] | None:
    """``section`` of the config/config.yaml settings of the dataset named by the ``results`` folder (and ``run``),
    or None when there is no such dataset or the config does not load."""
    if not results:
        return None
    try:
        from .config import dataset_config, load_config

        cfg = load_config()
        ds = Path(results).name
        if ds in cfg["datasets"]:
            return dataset_config(cfg, ds, run if run in cfg["runs"] else None)[section]
    except CellrlError:
        pass
    return None


def find_type(geometry: Any, name: str, what: str) -> int:
    """Index of a cell type by name (exact, then case-insensitive); InputError listing the types."""
    names = [str(t) for t in geometry.type_names]
    if name in names:
        return names.index(name)
    low = [n.lower() for n in names]
    if name.lower() in low:
        return low.index(name.lower())
    raise InputError(f"unknown {what} cell type {name!r}; known types: {', '.join(names)}", field=what)


def resolve_start(model: Any, geometry: Any, start: str) -> tuple[int, str]:
    """(cell index, how it was chosen) for a cell name or a cell type.

    A type stands for its representative: the test cell of that type most cosine-similar to the type's
    centroid (any cell of the type when it has no test cell).
    """
    from .tasks import split_mask

    names = np.asarray(model.cell_names).astype(str)
    hit = np.flatnonzero(names == start)
    if len(hit):
        return int(hit[0]), "cell name"
    try:
        t = find_type(geometry, start, "start")
    except InputError:
        raise InputError(f"unknown start {start!r}: neither a cell name nor a cell type; cell types: "
                         f"{', '.join(str(x) for x in geometry.type_names)}; cell names look like {names[0]!r}",
                         field="start") from None
    of_type = geometry.type_ids == t
    test = of_type & split_mask(geometry.split, "test")
    pool = np.flatnonzero(test if test.any() else of_type)
    best = pool[np.argmax(geometry.cos_sim[pool, t])]
    return int(best), f"representative of type {geometry.type_names[t]} ({'test' if test.any() else 'any'} cell " \
                      "closest to its centroid)"


# ---------------------------------------------------------------------------------------------- planning
def _steps(start: int, actions: Sequence[int], cells: Sequence[int], target: int, model: Any, geometry: Any,
           acts: Any) -> list[dict[str, Any]]:
    names = np.asarray(model.cell_names).astype(str)
    tn = np.asarray(geometry.type_names).astype(str)

    def row(step: int, a: int | None, c: int) -> dict[str, Any]:
        return {"step": step, "action": a, "gene": None if a is None else str(acts.gene[a]),
                "kind": None if a is None else str(acts.kind[a]), "cell": names[c], "cell_index": int(c),
                "cell_type": tn[geometry.type_ids[c]],
                "cos_dist": round(float(1.0 - geometry.cos_sim[c, target]), 4),
                "at_goal": bool(geometry.goal_mask[target, c])}

    return [row(0, None, start)] + [row(i + 1, int(a), int(c)) for i, (a, c) in enumerate(zip(actions, cells))]


def plan(model: Any, table: np.ndarray, agent: Any, start: str, target: str, env: Mapping[str, Any] | None = None,
         actions: Any = None, deterministic: bool = True, max_steps: int | None = None,
         geometry: Any = None, transitions: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Plan from ``start`` (cell name or type) to cell type ``target`` with the agent and with BFS.

    ``agent`` is a policy with ``predict`` or a function ``(geometry, n_actions) -> policy`` that loads one
    (:func:`cellrl.agent_io.load_agent`; called only once the names are resolved and a path exists, so bad input
    fails fast). Raises InputError for unknown names, UnreachableError when no path exists. Returns a JSON-ready
    dict. ``geometry``: the model's TaskGeometry for ``env``'s percentiles when already built. With
    ``env.perturbation_model: persistent`` see :func:`plan_persistent` (``transitions``: the engine's settings).
    """
    from .bfs import eval_allowed_mask, shortest_paths
    from .env import EnvParams
    from .evaluate import action_table, agent_chooser, check_agent_spaces, rollout
    from .tasks import TaskGeometry

    params = EnvParams.from_config(env)
    geo = geometry if geometry is not None else \
        TaskGeometry.from_model(model, params.goal_percentile, params.centroid_percentile)
    acts = actions if actions is not None else action_table(table.shape[1], model.regulators)
    t = find_type(geo, target, "target")
    c, how = resolve_start(model, geo, start)
    if geo.type_ids[c] == t:
        raise InputError(f"start cell {model.cell_names[c]} is already of type {geo.type_names[t]}; "
                         "choose a start of another type", field="start")
    limit = int(max_steps or params.eval_max_steps(geo.n_types))
    if params.perturbation_model == "persistent":
        return plan_persistent(model, agent, c, how, t, params, geo, acts, limit, transitions, deterministic)
    res = shortest_paths(table, geo.goal_mask[t:t + 1], eval_allowed_mask(model, table))
    d = int(res.dist[c, 0])
    out: dict[str, Any] = {
        "start": {"cell": str(model.cell_names[c]), "cell_index": c, "cell_type": str(geo.type_names[geo.type_ids[c]]),
                  "split": str(geo.split[c]), "chosen_as": how},
        "target": {"cell_type": str(geo.type_names[t]), "goal_threshold": float(geo.goal_threshold[t]),
                   "start_cos_dist": float(1.0 - geo.cos_sim[c, t])},
        "max_steps": limit, "deterministic": bool(deterministic),
    }
    if d < 0:
        raise UnreachableError(f"target {geo.type_names[t]} is unreachable from cell {model.cell_names[c]} "
                               f"(type {geo.type_names[geo.type_ids[c]]}): no sequence of allowed perturbations "
                               "in the transition table reaches a goal cell of that type (exact BFS)")
    b_acts, b_cells = res.path(table, c, 0)
    out["bfs"] = {"length": d, "within_max_steps": d <= limit,
                  "steps": _steps(c, b_acts, b_cells, t, model, geo, acts)}
    if callable(agent) and not hasattr(agent, "predict"):
        agent = agent(geo, table.shape[1])
    check_agent_spaces(agent, geo, table.shape[1])
    r = rollout(geo, table, params, np.array([c]), np.array([t]), agent_chooser(agent, deterministic),
                max_steps=limit)
    out["agent"] = {"success": bool(r["success"][0]), "length": int(r["length"][0]),
                    "steps": _steps(c, r["actions"][0], r["cells"][0], t, model, geo, acts)}
    return out


def plan_persistent(model: Any, agent: Any, c: int, how: str, t: int, params: Any, geo: Any, acts: Any, limit: int,
                    transitions: Mapping[str, Any] | None, deterministic: bool = True,
                    beam_width: int = 32) -> dict[str, Any]:
    """Persistent mode (:mod:`cellrl.persistent`): the agent's plan and a beam search's (width ``beam_width``;
    exhaustive search is too slow for a command), each with its set and the order it was built. The agent is
    used when it was trained in persistent mode (its spaces fit); otherwise ``agent_note`` says why not."""
    import pandas as pd

    from .persistent.engine import PersistentEngine
    from .persistent.env import set_labels
    from .persistent.search import beam, rollout
    from .evaluate import agent_chooser

    engine = PersistentEngine.from_model(model, transitions)
    hold = int(engine.n_actions)
    acts = pd.concat([acts, pd.DataFrame({"index": [hold], "gene": ["(set held)"], "kind": ["HOLD"],
                                          "label": ["HOLD"]})], ignore_index=True)

    def described(actions: Sequence[int], cells: Sequence[int], success: bool) -> dict[str, Any]:
        applied = np.zeros((1, engine.n_regulators), np.int8)
        order = []
        for i, a in enumerate(actions):
            if a != hold:
                applied = engine.apply(applied, [a])
                order.append({"step": i + 1, "added": str(acts.label[a])})
        return {"success": bool(success), "length": len(actions), "set": set_labels(applied[0], engine.regulators),
                "order": order, "held_steps": int(sum(a == hold for a in actions)),
                "steps": _steps(c, actions, cells, t, model, geo, acts)}

    out: dict[str, Any] = {
        "perturbation_model": "persistent", "max_set_size": int(params.max_set_size),
        "start": {"cell": str(model.cell_names[c]), "cell_index": c, "cell_type": str(geo.type_names[geo.type_ids[c]]),
                  "split": str(geo.split[c]), "chosen_as": how},
        "target": {"cell_type": str(geo.type_names[t]), "goal_threshold": float(geo.goal_threshold[t]),
                   "start_cos_dist": float(1.0 - geo.cos_sim[c, t])},
        "max_steps": limit, "deterministic": bool(deterministic),
    }
    b = beam(engine, geo, np.array([c]), np.array([t]), beam_width, limit, params.max_set_size)
    out["search"] = {"method": f"beam search (width {beam_width})", **described(b.plans[0], b.cells[0],
                                                                                 b.success[0])}
    if agent is not None and callable(agent) and not hasattr(agent, "predict"):
        try:
            agent = agent(geo, hold + 1, engine=engine)  # e.g. cellrl.agent_io.load_agent: persistent spaces
        except (InputError, TypeError) as e:
            out["agent_note"] = f"the agent was not trained in persistent mode ({e}); only the search plan is shown"
            agent = None
    if agent is not None:
        r = rollout(geo, engine, params, np.array([c]), np.array([t]), agent_chooser(agent, deterministic),
                    max_steps=limit)
        out["agent"] = described(r.plans[0], r.cells[0], r.success[0])
    return out


# ---------------------------------------------------------------------------------------------- printing
def format_plan(p: Mapping[str, Any]) -> str:
    """Human-readable plan: the agent's sequence and the BFS optimum as aligned tables."""
    s, t = p["start"], p["target"]
    lines = [f"start : {s['cell']} (type {s['cell_type']}, {s['split']} split; {s['chosen_as']})",
             f"target: {t['cell_type']} (reached when cosine distance to its centroid <= "
             f"{t['goal_threshold']:.3f} in a cell of that type; start distance {t['start_cos_dist']:.3f})", ""]

    def table(title: str, steps: Sequence[Mapping[str, Any]]) -> list[str]:
        out = [title, f"  {'step':>4}  {'gene':<14} {'KO/OE':<5}  {'cell reached':<16} {'cell type':<16} "
                      f"{'cos dist':>8}"]
        for r in steps:
            gene = r["gene"] if r["gene"] is not None else "(start)"
            kind = r["kind"] or ""
            mark = "  <- target reached" if r["at_goal"] else ""
            out.append(f"  {r['step']:>4}  {gene:<14} {kind:<5}  {r['cell']:<16} {r['cell_type']:<16} "
                       f"{r['cos_dist']:>8.3f}{mark}")
        return out

    if p.get("perturbation_model") == "persistent":
        for key in ("agent", "search"):
            r = p.get(key)
            if r is None:
                continue
            who = "agent" if key == "agent" else r["method"]
            verdict = f"reaches {t['cell_type']} in {r['length']} steps" if r["success"] else \
                f"does NOT reach {t['cell_type']} within {p['max_steps']} steps"
            lines += table(f"{who} plan (persistent perturbations): {verdict}", r["steps"])
            order = ", ".join(f"{o['added']} (step {o['step']})" for o in r["order"]) or "none"
            lines += [f"  set ({len(r['set'])} of at most {p['max_set_size']} genes): {', '.join(r['set']) or '-'}",
                      f"  built in this order: {order}; the set is held (HOLD) for {r['held_steps']} more steps", ""]
        if p.get("agent_note"):
            lines.append(f"note: {p['agent_note']}")
        return "\n".join(lines)
    a = p.get("agent")
    if a is not None:
        verdict = f"reaches {t['cell_type']} in {a['length']} steps" if a["success"] else \
            f"does NOT reach {t['cell_type']} within {p['max_steps']} steps"
        lines += table(f"agent plan ({'deterministic' if p['deterministic'] else 'sampled'}): {verdict}", a["steps"])
        lines.append("")
    b = p.get("bfs")
    if b is not None:
        note = "" if b["within_max_steps"] else f" (longer than the episode limit of {p['max_steps']})"
        lines += table(f"BFS optimal sequence: {b['length']} steps{note}", b["steps"])
    return "\n".join(lines)


class _UsageError(InputError):
    """A bad command line (argparse's own errors), reported like any bad input: exit 2, JSON under --json."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message, fix=f"see `{self.prog} --help`")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cellrl", description="cellrl command line",
                epilog="exit status of `cellrl plan`: 0 agent reaches the target, 1 it does not (a path exists), "
                       "2 bad input, 3 target unreachable, 4 internal error; see `cellrl plan --help`")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("plan", help="plan a perturbation sequence from a start cell to a target cell type",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--results", help="results folder of a dataset, e.g. results/demo")
    q.add_argument("--run", default="default", help="training run under <results>/models/ (default: default)")
    q.add_argument("--model", help="model.npz (default: <results>/oracle/model.npz)")
    q.add_argument("--table", help="table.npy (default: <results>/transitions/table.npy)")
    q.add_argument("--actions", help="actions.tsv (default: <results>/transitions/actions.tsv)")
    q.add_argument("--agent", help="MaskablePPO zip (default: <results>/models/<run>/model.zip); read without "
                                   "unpickling, the network rebuilt from the train_summary.json next to it")
    q.add_argument("--trust-pickled-agent", action="store_true",
                   help="load the agent with SB3's MaskablePPO.load, which unpickles the zip's data: a crafted zip "
                        "runs arbitrary code; only for zips you made yourself")
    # --start | --expression and --target are required; checked in main() so that one message names all missing
    start = q.add_mutually_exclusive_group()
    start.add_argument("--start", help="start cell name, or a cell type (its representative cell); this or "
                                       "--expression is required")
    start.add_argument("--expression", metavar="FILE",
                       help="start from a cell of your own: an .h5ad or .csv/.tsv (genes as rows or columns) of "
                            "counts or log-normalised values; it is placed at its nearest table cells and the "
                            "plan starts from the nearest one")
    q.add_argument("--cell", metavar="ID", help="with --expression: the cell's name in FILE (may be left out "
                                                "when FILE holds one cell)")
    q.add_argument("--expression-type", choices=("auto", "counts", "lognorm"), default="auto",
                   help="with --expression: raw counts or log-normalised values (default auto: all integers = "
                        "counts)")
    q.add_argument("--target", help="target cell type (required)")
    q.add_argument("--max-steps", type=_positive_int,
                   help="episode step limit, >= 1 (default: the evaluation limit of the run)")
    q.add_argument("--stochastic", action="store_true", help="sample the agent's actions instead of argmax")
    q.add_argument("--perturbation-model", choices=("table", "persistent"),
                   help="table (perturbations forgotten after their step) or persistent (a set that stays applied; "
                        "prints the set and the order it was built); default: the run's env.perturbation_model")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _error(kind: str, e: BaseException, code: int, as_json: bool) -> int:
    """Report an error on stderr (and as one JSON object on stdout under --json); return ``code``."""
    if as_json:
        obj = {"error": kind, "message": str(e), "path": _str(getattr(e, "path", None)),
               "field": getattr(e, "field", None), "fix": getattr(e, "fix", None), "exit_code": code}
        if getattr(e, "placement", None) is not None:  # --expression: where the user's cell was placed
            obj["placement"] = e.placement  # type: ignore[attr-defined]
        print(json.dumps(obj))
    print(f"cellrl plan: {'error: ' if kind != 'unreachable' else ''}{e}", file=sys.stderr)
    return code


def _str(x: Any) -> str | None:
    return None if x is None else str(x)


def _plan_user_cell(args: argparse.Namespace, paths: Mapping[str, Path | None], model: Any, table: np.ndarray,
                    agent: Any, env: Mapping[str, Any], acts: Any) -> dict[str, Any]:
    """``--expression FILE --cell ID``: place the cell at its nearest table cells (:mod:`cellrl.placement`), then
    plan from the nearest one exactly as ``--start <its name>``; the plan gets a ``placement`` object."""
    from .env import EnvParams
    from .placement import filtered_path, format_placement, place
    from .tasks import TaskGeometry

    params = EnvParams.from_config(env)
    geo = TaskGeometry.from_model(model, params.goal_percentile, params.centroid_percentile)
    pl = place(model, geo, args.expression, args.cell, args.expression_type, filtered=filtered_path(paths["model"]))
    for w in pl["warnings"]:
        print(f"cellrl plan: warning: {w}", file=sys.stderr)
    if not args.json:  # shown before the plans, and also when planning fails
        print(format_placement(pl) + "\n", flush=True)
    near = pl["nearest"][0]
    try:
        p = plan(model, table, agent, near["cell"], args.target, env=env, actions=acts,
                 deterministic=not args.stochastic, max_steps=args.max_steps, geometry=geo,
                 transitions=transition_settings(args.results, args.run, paths["train_summary"]))
    except UnreachableError as e:
        err: CellrlError = UnreachableError(f"{e} (the nearest table cell to {pl['cell']} of {pl['file']})")
        err.placement = pl  # type: ignore[attr-defined]
        raise err from None
    except InputError as e:
        if e.field != "start":
            raise
        err = InputError(f"your cell {pl['cell']} lies nearest to table cell {near['cell']} (distance "
                         f"{near['distance']:.3g}), which is already of type {near['cell_type']}",
                         path=pl["file"], field="--target", fix="choose a target of another type")
        err.placement = pl  # type: ignore[attr-defined]
        raise err from None
    p["start"]["chosen_as"] = f"nearest table cell to {pl['cell']} of {pl['file']} (distance {near['distance']:.3g})"
    return {"placement": pl, **p}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cellrl`` command; returns the exit status (see module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
        missing = ([] if args.start is not None or args.expression is not None else ["--start (or --expression)"]) \
            + ([] if args.target is not None else ["--target"])
        if missing:
            raise _UsageError(f"the following arguments are required: {', '.join(missing)}",
                              fix="see `cellrl plan --help`")
        if args.expression is None and (args.cell is not None or args.expression_type != "auto"):
            raise _UsageError("--cell and --expression-type apply to --expression only", field="--cell",
                              fix="pass --expression FILE --cell ID, or --start alone")
    except _UsageError as e:
        return _error("input", e, EXIT_INPUT, "--json" in argv)
    try:
        from .agent_io import load_agent
        from .tasks import load_table
        from .evaluate import action_table
        from .model import load_model

        paths = resolve_paths(args.results, args.run, args.model, args.table, args.agent, args.actions)
        model = load_model(paths["model"])
        table = load_table(paths["table"], model.n_cells, model.n_actions)
        acts = action_table(table.shape[1], model.regulators, paths["actions"])
        env = env_settings(paths["train_summary"], args.results, args.run)
        if args.perturbation_model:
            env = {**env, "perturbation_model": args.perturbation_model}
        agent = functools.partial(load_agent, paths["agent"], trust_pickled=args.trust_pickled_agent)
        if args.expression is None:
            p = plan(model, table, agent, args.start, args.target, env=env, actions=acts,
                     deterministic=not args.stochastic, max_steps=args.max_steps,
                     transitions=transition_settings(args.results, args.run, paths["train_summary"]))
        else:
            p = _plan_user_cell(args, paths, model, table, agent, env, acts)
    except UnreachableError as e:
        return _error("unreachable", e, EXIT_UNREACHABLE, args.json)
    except CellrlError as e:
        return _error("input", e, EXIT_INPUT, args.json)
    except Exception as e:  # a bug, not an input problem: keep exit 1 meaning "the agent failed"
        import traceback

        traceback.print_exc(file=sys.stderr)
        return _error("internal", e, EXIT_INTERNAL, args.json)
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    if p.get("perturbation_model") == "persistent":
        return EXIT_OK if (p.get("agent") or p["search"])["success"] else EXIT_AGENT_FAILED
    if not p["agent"]["success"]:
        print(f"cellrl plan: the agent does not reach {p['target']['cell_type']} within {p['max_steps']} steps; "
              f"the BFS optimum ({p['bfs']['length']} steps) is shown for comparison", file=sys.stderr)
        return EXIT_AGENT_FAILED
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
