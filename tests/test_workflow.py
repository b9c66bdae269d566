"""The Snakemake workflow as users drive it: lint, rerun only what changed, force or stop at a stage.

One tiny demo run (tests/config_test.yaml) in a scratch copy of the repository, shared by the whole session
(tests/workflow_copy.py), then many cheap dry runs (`snakemake -n`) whose planned jobs are compared with the
rule graph: a change to a stage's settings or library code must plan that stage and its descendants and nothing
else.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow_copy import (ROOT, TinyRun, changed_config, descendants, make_copy, planned_jobs, rule_graph, snakemake,
                           tiny_run)


@pytest.fixture(scope="module")
def run() -> TinyRun:
    return tiny_run()


@pytest.fixture(scope="module")
def graph(run: TinyRun) -> dict[str, set[str]]:
    return rule_graph(run.workdir)


def test_lint_clean():
    """`snakemake --lint` on the checkout's workflow reports nothing (exit code 0, no lints)."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    lints = [line.strip() for line in out.splitlines() if line.startswith(("Lints for", "    * "))]
    assert proc.returncode == 0 and not lints, "\n".join(lints) or out[-4000:]


def test_dry_run_plans_every_stage_of_a_fresh_clone(tmp_path: Path):
    jobs = planned_jobs(make_copy(tmp_path / "wf"))
    assert {"demo_data", "ingest", "filter", "split", "base_grn", "fit_oracle", "transitions", "train", "bfs",
            "evaluate", "report", "software_env"} <= set(jobs)


@pytest.mark.slow
def test_full_run_completes_and_records_software(run: TinyRun):
    res = run.workdir / "results" / "demo"
    assert (res / "report.html").stat().st_size > 0
    software = json.loads((res / "software.json").read_text())
    assert {"numpy", "celloracle", "torch", "stable-baselines3", "snakemake"} <= set(software["packages"])
    if shutil.which("git"):
        assert len(software["git"]["commit"] or "") == 40, software["git"]


@pytest.mark.slow
def test_nothing_to_do_after_a_full_run(run: TinyRun):
    assert planned_jobs(run.workdir) == {}


def _plan_with(run: TinyRun, name: str, **changes) -> dict[str, int]:
    path = changed_config(run.workdir, name, **changes)
    return planned_jobs(run.workdir, "--configfile", str(path))


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, stage, not_planned",
    [
        ({"oracle.knn_k_fraction": 0.04}, "oracle_prepare", {"demo_data", "ingest", "filter", "split", "base_grn"}),
        ({"oracle.alpha": 5}, "oracle_links", {"demo_data", "ingest", "filter", "split", "base_grn", "oracle_prepare"}),
        ({"oracle.p_cutoff": 0.01}, "fit_oracle", {"oracle_prepare", "oracle_links"}),
        ({"filter.n_top_genes": 90}, "filter", {"demo_data", "ingest", "base_grn"}),
        ({"train.ent_coef": 0.02}, "train", {"fit_oracle", "transitions", "bfs"}),
        ({"transitions.sigma_corr": 0.1}, "transitions", {"fit_oracle", "split"}),
    ],
    ids=["oracle.knn_k_fraction", "oracle.alpha", "oracle.p_cutoff", "filter.n_top_genes", "train.ent_coef",
         "transitions.sigma_corr"],
)
def test_config_change_plans_the_stage_and_its_descendants_only(run, graph, change, stage, not_planned):
    jobs = _plan_with(run, stage, **change)
    expected = descendants(graph, stage)
    if "oracle_prepare" in expected:  # a checkpoint that reruns: its per-cluster jobs are planned once it has run
        expected -= {"oracle_links"}
    assert set(jobs) == expected, jobs
    assert not (set(jobs) & not_planned)
    clusters = len(json.loads((run.workdir / "results/demo/oracle/clusters.json").read_text())["slugs"])
    assert all(n == (clusters if rule == "oracle_links" else 1) for rule, n in jobs.items()), jobs


@pytest.mark.slow
def test_run_override_plans_only_that_runs_training(run, graph):
    """`runs: {default: {overrides: {train: ...}}}` is a training change for that run only."""
    path = changed_config(run.workdir, "run", **{"runs.default.overrides": {"train": {"seed": 5}}})
    assert set(planned_jobs(run.workdir, "--configfile", str(path))) == descendants(graph, "train")


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, stages",
    [("transitions/runner", ["transitions"]), ("tasks", ["train", "bfs"])],
)
def test_library_edit_plans_the_stages_that_run_it(run, graph, module, stages):
    """Editing cellrl/<module>.py reruns the stages whose code hash covers it (rules/common.smk: code_version)
    and their descendants; nothing upstream."""
    path = run.workdir / "cellrl" / f"{module}.py"
    backup = path.with_suffix(".bak")
    shutil.copy2(path, backup)
    try:
        path.write_text(path.read_text() + "\n# edited by tests/test_workflow.py\n")
        expected = set().union(*(descendants(graph, s) for s in stages))
        assert set(planned_jobs(run.workdir)) == expected
    finally:
        shutil.copy2(backup, path)
        backup.unlink()


@pytest.mark.slow
def test_library_code_trigger_is_content_not_mtime(run):
    """Touching a module (new modification time, same content) reruns nothing: the code hash is of content."""
    (run.workdir / "cellrl" / "transitions" / "runner.py").touch()
    assert planned_jobs(run.workdir) == {}


@pytest.mark.slow
def test_workflow_script_edit_reruns_its_rule(run, graph):
    """Snakemake's own code trigger: a changed workflow script reruns its rule (and descendants)."""
    path = run.workdir / "workflow_scripts" / "transitions.py"
    backup = path.with_suffix(".bak")
    shutil.copy2(path, backup)
    try:
        path.write_text(path.read_text() + "\n# edited by tests/test_workflow.py\n")
        assert set(planned_jobs(run.workdir)) == descendants(graph, "transitions")
    finally:
        shutil.copy2(backup, path)  # content and modification time
        backup.unlink()
    assert planned_jobs(run.workdir) == {}


@pytest.mark.slow
def test_forcerun_and_stopping_at_a_stage(run, graph):
    """README: `--forcerun transitions` reruns it and its descendants; naming the stage's output as the target
    stops there."""
    assert set(planned_jobs(run.workdir, "--forcerun", "transitions")) == descendants(graph, "transitions")
    table = "results/demo/transitions/table.npy"
    assert planned_jobs(run.workdir, table, "--forcerun", "transitions") == {"transitions": 1}


def test_conda_env_pins_match_constraints(repo_root):
    """envs/cellrl.yaml (used with --sdm conda) pins the same versions as constraints.txt (used by make setup)."""
    import re

    import yaml

    pins = {}
    for line in (repo_root / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    env = yaml.safe_load((repo_root / "envs" / "cellrl.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert len(pip) > 100
    for spec in pip:
        name, version = spec.split("==")
        assert pins.get(name.lower().replace("_", "-")) == version, spec
    conda = {d.split("=")[0]: d for d in env["dependencies"] if isinstance(d, str)}
    assert conda["numpy"] == f"numpy={pins['numpy']}"


# --- reruns of a finished training run (kept last: they rerun train and its descendants, then leave the run
# finished again, so the tests above see a complete workflow) ---------------------------------------------------

MODEL = "results/demo/models/default"


def _weights(zip_path: Path) -> dict:
    import io
    import zipfile

    import torch as th

    with zipfile.ZipFile(zip_path) as z:
        return th.load(io.BytesIO(z.read("policy.pth")), weights_only=True)


def _same_weights(a: dict, b: dict) -> bool:
    import torch as th

    return a.keys() == b.keys() and all(th.equal(a[k], b[k]) for k in a)


def _progress_rows(path: Path, skip=("wall_s", "steps_per_s")) -> list[dict]:
    import csv

    with open(path) as fh:
        return [{k: v for k, v in r.items() if k not in skip} for r in csv.DictReader(fh)]


def _train_log(run: TinyRun) -> str:
    return (run.workdir / "results" / "demo" / "logs" / "train_default.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("force", ["train", "transitions"], ids=["forcerun-train", "identical-table"])
def test_rerun_of_a_finished_run_reproduces_it(run, graph, force):
    """`--forcerun train`, or an upstream rerun that writes an identical table: train reruns (Snakemake deleted
    its outputs first), resumes from the final checkpoint and writes the same weights and progress rows."""
    out = run.workdir / MODEL
    before = (_weights(out / "model.zip"), (out / "progress.csv").read_text(),
              json.loads((out / "train_summary.json").read_text()))
    table = run.workdir / "results/demo/transitions/table.npy"
    table_bytes = table.read_bytes()
    proc = snakemake(run.workdir, "--cores", "2", "--forcerun", force)
    assert "rule train" in proc.stdout + proc.stderr
    assert table.read_bytes() == table_bytes
    assert "resuming from" in _train_log(run)
    assert _same_weights(_weights(out / "model.zip"), before[0])
    assert (out / "progress.csv").read_text() == before[1]
    after = json.loads((out / "train_summary.json").read_text())
    assert after["resumed_from"] == after["timesteps"] == before[2]["timesteps"]
    assert after["final_val_success"] == before[2]["final_val_success"]
    assert planned_jobs(run.workdir) == {}


@pytest.mark.slow
def test_reward_code_edit_trains_afresh(run):
    """An edit of the reward code (cellrl/env.py) reruns train, which sets the old checkpoints aside and trains
    from step 0 under the new code; reverting the edit trains afresh again (never a resume across code)."""
    out = run.workdir / MODEL
    env_py = run.workdir / "cellrl" / "env.py"
    original = env_py.read_text()
    marker = "        reward = p.step_penalty + "
    edited = original.replace(marker, "        reward = 1.0 * p.step_penalty + ", 1)  # same values, new code
    assert edited != original, "the reward code was not found in cellrl/env.py"
    rows_before = _progress_rows(out / "progress.csv")
    try:
        env_py.write_text(edited)
        snakemake(run.workdir, "--cores", "2", MODEL + "/model.zip")
        log = _train_log(run)
        assert "set aside" in log and "resuming from" not in log
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["resumed_from"] is None
        assert len(_progress_rows(out / "progress.csv")) == len(rows_before)
        assert len(list((out / "checkpoints" / "set_aside").iterdir())) >= 1
    finally:
        env_py.write_text(original)
    snakemake(run.workdir, "--cores", "2")
    assert "resuming from" not in _train_log(run)
    assert _progress_rows(out / "progress.csv") == rows_before     # same code, same weights and rows again
    assert planned_jobs(run.workdir) == {}


@pytest.mark.slow
def test_kill_9_mid_training_then_rerun(run, tmp_path):
    """kill -9 of the whole Snakemake process group mid-training, `--unlock`, rerun: the run resumes from its
    last checkpoint, keeps every progress row and ends bit-identical to an uninterrupted run."""
    import os
    import signal
    import subprocess
    import time

    from cellrl.config import dataset_config
    from cellrl.train import train_files

    killed = "results/demo/models/killtest"
    train = {"total_timesteps": 16384, "checkpoint_every": 2048, "eval_every": 4096}
    path = changed_config(run.workdir, "kill", runs={"default": {"overrides": {}},
                                                     "killtest": {"overrides": {"train": train}}})
    target = [f"{killed}/model.zip", "--configfile", str(path), "--cores", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", *target], cwd=run.workdir, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = run.workdir / killed / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpt_dir.glob("ckpt_*.json")) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run.workdir / killed / "model.zip").exists(), "training finished before the kill"
    first = sorted(ckpt_dir.glob("ckpt_*.json"))
    assert first, "no checkpoint was written before the deadline"
    snakemake(run.workdir, "--unlock", *target)
    snakemake(run.workdir, "--rerun-incomplete", *target)
    log = (run.workdir / "results/demo/logs/train_killtest.log").read_text()
    assert "resuming from" in log
    cfg = yaml.safe_load(path.read_text())
    settings = dataset_config(cfg, "demo", "killtest")
    ref = tmp_path / "uninterrupted"
    res = run.workdir / "results" / "demo"
    train_files(res / "oracle/model.npz", res / "transitions/table.npy", ref, env=settings["env"],
                train=settings["train"], progress=False, threads=1)
    assert _same_weights(_weights(run.workdir / killed / "model.zip"), _weights(ref / "model.zip"))
    rows = _progress_rows(run.workdir / killed / "progress.csv")
    assert rows == _progress_rows(ref / "progress.csv") and int(rows[-1]["timesteps"]) >= 16384



@pytest.mark.slow
def test_persistent_run_trains_and_evaluates(run):
    """config/examples/demo_persistent.yaml (budget shrunk to the tiny demo) adds a persistent run: the train rule
    trains on sets (exact-plan warm start), the evaluate rule scores it against exact, beam and greedy search and
    no plan repeats a gene; the table run's outputs are untouched."""
    from cellrl.config import deep_merge

    overlay = deep_merge(yaml.safe_load((ROOT / "config" / "examples" / "demo_persistent.yaml").read_text()),
                         {"runs": {"persistent": {"overrides": {"train": {"total_timesteps": 1024,
                                                                          "warm_start_starts_per_type": 1,
                                                                          "warm_start_epochs": 5}}}}})
    path = run.workdir / "config" / "persistent_overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    res = run.workdir / "results" / "demo"
    before = (res / "benchmark" / "default" / "summary.json").stat().st_mtime_ns
    out = snakemake(run.workdir, "results/demo/benchmark/persistent/summary.json", "--profile", "profiles/local",
                    "--cores", "1", "--configfile", str(path), timeout=600)  # targets first: --configfile takes many
    assert "rule train:" in out.stdout + out.stderr or "localrule train:" in out.stdout + out.stderr
    train = json.loads((res / "models" / "persistent" / "train_summary.json").read_text())
    assert train["perturbation_model"] == "persistent" and train["warm_start"]["method"] == "exact"
    s = json.loads((res / "benchmark" / "persistent" / "summary.json").read_text())
    assert s["perturbation_model"] == "persistent" and set(s["methods"]) == {"agent", "exact", "beam8", "greedy"}
    assert s["protocol"]["n_exact_start_cells"] == s["protocol"]["n_types"] and s["no_plan_repeats_a_gene"]
    assert s["methods"]["exact"]["exact_tasks"]["success"] >= s["methods"]["agent"]["exact_tasks"]["success"]
    assert s["ground_truth"]["available"] and "agree" in s["methods"]["exact"]["exact_tasks"]["recipe"]
    assert (res / "benchmark" / "default" / "summary.json").stat().st_mtime_ns == before
    # the persistent run's evaluate neither needs nor waits for the BFS table; the table run's does
    for target, wants_bfs in (("persistent", False), ("default", True)):
        dry = snakemake(run.workdir, "-n", f"results/demo/benchmark/{target}/summary.json", "--forcerun", "bfs",
                        "--cores", "1", "--configfile", str(path))
        assert ("rule bfs:" in dry.stdout + dry.stderr) is wants_bfs, target
