"""profiles/slurm against a fake SLURM: what the sbatch calls ask for, and that the pipeline completes.

`snakemake --profile profiles/slurm` (the real snakemake-executor-plugin-slurm, polling shortened) builds the tiny
demo up to the transition table in a scratch copy, with tests/fake_slurm (sbatch, sacct, srun, ...) first on
PATH; the fakes record their arguments and run each job locally. See tests/workflow_copy.py.
"""

from __future__ import annotations

import json

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from workflow_copy import ROOT, SLURM_ENV, SLURM_TARGET, TinyRun, tiny_run

PROFILE = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())


@pytest.fixture(scope="module")
def run() -> TinyRun:
    return tiny_run()


def _opt(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


def _rule(argv: list[str]) -> str:
    """The rule of an sbatch call, from the plugin's --comment "rule_<rule>[_wildcards_<values>]"."""
    m = re.fullmatch(r"rule_(\w+?)(?:_wildcards_.*)?", _opt(argv, "--comment") or "")
    assert m, f"sbatch call without the plugin's rule comment: {argv}"
    return m.group(1)


def _expected(rule: str, key: str):
    return PROFILE["set-resources"].get(rule, {}).get(key, PROFILE["default-resources"].get(key))


def _gpu_rules() -> set[str]:
    res = PROFILE["set-resources"]
    return {r for r in res if res[r].get("gpu") or "gpu" in str(res[r].get("gres", ""))}


def test_profile_declares_gpu_and_memory_where_the_pipeline_needs_them():
    assert {"transitions", "train", "hpo_worker"} <= _gpu_rules()
    assert _expected("fit_oracle", "mem_mb") > PROFILE["default-resources"]["mem_mb"]
    assert PROFILE["executor"] == "slurm"
    assert {"runtime", "mem_mb", "slurm_account", "slurm_partition"} <= set(PROFILE["default-resources"])


@pytest.mark.slow
def test_every_planned_job_was_submitted_once_and_completed(run: TinyRun):
    sbatch = run.slurm_calls("sbatch")
    submitted = [_rule(a) for a in sbatch]
    # the dry run before cannot know the per-cluster links jobs: oracle_prepare (a checkpoint) lists the clusters
    assert sorted(r for r in submitted if r != "oracle_links") == sorted(
        r for r, n in run.slurm_planned.items() for _ in range(n) if r != "oracle_links")
    assert submitted.count("oracle_links") == len(_clusters(run)) >= 2
    assert "transitions" in submitted and "fit_oracle" in submitted
    jobs = sorted((run.slurm_state / "jobs").glob("*.rc"))
    assert len(jobs) == len(sbatch) and all(f.read_text().strip() == "0" for f in jobs)
    assert run.slurm_calls("sacct"), "the plugin never asked sacct for job states"
    assert "steps (100%) done" in run.slurm_output
    table = np.load(run.workdir / SLURM_TARGET, mmap_mode="r")
    assert table.ndim == 2 and table.shape[0] > 0


@pytest.mark.slow
def test_gpu_request_only_for_gpu_rules(run: TinyRun):
    gpu_rules = _gpu_rules()
    for argv in run.slurm_calls("sbatch"):
        rule = _rule(argv)
        asks_gpu = any(a.startswith(("--gpus", "--gres")) or a == "-G" for a in argv)
        assert asks_gpu == (rule in gpu_rules), f"{rule}: GPU request {asks_gpu}: {argv}"
        if rule in gpu_rules:
            assert _opt(argv, "--gpus") == "1"
            assert _opt(argv, "-p") == SLURM_ENV["CELLRL_SLURM_GPU_PARTITION"]
        else:
            assert _opt(argv, "-p") == SLURM_ENV["CELLRL_SLURM_PARTITION"]


@pytest.mark.slow
def test_runtime_memory_account_and_cpus_from_profile(run: TinyRun):
    for argv in run.slurm_calls("sbatch"):
        rule = _rule(argv)
        assert _opt(argv, "-t") == str(_expected(rule, "runtime")), (rule, argv)
        assert _opt(argv, "--mem") == str(_expected(rule, "mem_mb")), (rule, argv)
        assert _opt(argv, "-A") == SLURM_ENV["CELLRL_SLURM_ACCOUNT"], (rule, argv)
        assert int(_opt(argv, "--cpus-per-task")) >= 1, (rule, argv)
        assert _opt(argv, "-D") == str(run.workdir)


@pytest.mark.slow
def test_jobs_ran_through_the_plugin_jobstep(run: TinyRun):
    """Inside each job the plugin's jobstep executor starts the rule with srun, as on a real cluster."""
    srun = run.slurm_calls("srun")
    assert len(srun) == len(run.slurm_calls("sbatch"))
    for argv in srun:
        assert "-n1" in argv and any(a.startswith("--cpus-per-task=") for a in argv)
    logs = list(Path(run.workdir, "results", "demo", "logs").glob("*.log"))
    assert {p.stem for p in logs} >= {"ingest", "filter", "fit_oracle", "transitions"}


def _clusters(run: TinyRun) -> dict:
    return json.loads((run.workdir / "results/demo/oracle/clusters.json").read_text())["slugs"]


def _job_times(run: TinyRun) -> list[tuple[str, float, float]]:
    """(rule, start, end) of every sbatch job, in submission order (fake job ids are consecutive)."""
    jobs = run.slurm_state / "jobs"
    ids = sorted(int(p.name.split(".")[0]) for p in jobs.glob("*.rc"))
    return [(_rule(argv), float((jobs / f"{i}.rc.start").read_text()), float((jobs / f"{i}.rc.end").read_text()))
            for argv, i in zip(run.slurm_calls("sbatch"), ids)]


@pytest.mark.slow
def test_cluster_links_jobs_run_side_by_side(run: TinyRun):
    """GRN fitting spreads over the cluster: every cell type's get_links is its own job, all submitted at once
    after oracle_prepare (each starts before any of them ends), and the gather starts after the last one."""
    times = _job_times(run)
    links = [(s, e) for r, s, e in times if r == "oracle_links"]
    assert len(links) == len(_clusters(run))
    assert max(s for s, _ in links) < min(e for _, e in links), links
    prepare_end = max(e for r, _, e in times if r == "oracle_prepare")
    gather_start = min(s for r, s, _ in times if r == "fit_oracle")
    assert prepare_end <= min(s for s, _ in links) and gather_start >= max(e for _, e in links)
    assert _expected("oracle_links", "mem_mb") <= _expected("oracle_prepare", "mem_mb")
