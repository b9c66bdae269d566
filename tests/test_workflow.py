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

from workflow_copy import ROOT, TinyRun, changed_config, descendants, make_copy, planned_jobs, rule_graph, tiny_run


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
        ({"oracle.alpha": 5}, "fit_oracle", {"demo_data", "ingest", "filter", "split", "base_grn"}),
        ({"filter.n_top_genes": 90}, "filter", {"demo_data", "ingest", "base_grn"}),
        ({"train.ent_coef": 0.02}, "train", {"fit_oracle", "transitions", "bfs"}),
        ({"transitions.sigma_corr": 0.1}, "transitions", {"fit_oracle", "split"}),
    ],
    ids=["oracle.alpha", "filter.n_top_genes", "train.ent_coef", "transitions.sigma_corr"],
)
def test_config_change_plans_the_stage_and_its_descendants_only(run, graph, change, stage, not_planned):
    jobs = _plan_with(run, stage, **change)
    assert set(jobs) == descendants(graph, stage), jobs
    assert not (set(jobs) & not_planned)
    assert all(n == 1 for n in jobs.values())


@pytest.mark.slow
def test_run_override_plans_only_that_runs_training(run, graph):
    """`runs: {default: {overrides: {train: ...}}}` is a training change for that run only."""
    path = changed_config(run.workdir, "run", **{"runs.default.overrides": {"train": {"seed": 5}}})
    assert set(planned_jobs(run.workdir, "--configfile", str(path))) == descendants(graph, "train")


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, stages",
    [("transitions", ["transitions"]), ("tasks", ["train", "bfs"])],
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
    (run.workdir / "cellrl" / "transitions.py").touch()
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
