"""Run the real workflow in a scratch copy of the repository, so tests never touch results/ of the checkout.

The copy holds the Snakefile, rules/, workflow_scripts/, config/, envs/, profiles/, report/ and cellrl/, and is a git
repository of its own (software.json records its commit). Jobs import the copy's cellrl (the workflow directory
comes first on their sys.path) and the code hashes of rules/common.smk read it, so a test can edit a module there
without touching the checkout. Its config/config.yaml is the checkout's config merged with an overlay such as
tests/config_test.yaml, so the copy runs exactly that configuration with plain `snakemake`.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from cellrl.config import deep_merge, validate_config

ROOT = Path(__file__).resolve().parent.parent
TEST_CONFIG = ROOT / "tests" / "config_test.yaml"
COPIED = ("Snakefile", "rules", "workflow_scripts", "config", "envs", "profiles", "report", "cellrl")


def make_copy(dest: Path, overlay: Path | Mapping[str, Any] | None = TEST_CONFIG) -> Path:
    """Copy the workflow into ``dest`` (created) with config/config.yaml = checkout config + ``overlay``."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)
    write_config(dest, full_config(overlay))
    (dest / ".gitignore").write_text("results/\nresources/demo/\n.snakemake/\n__pycache__/\n")
    if shutil.which("git"):
        git = ["git", "-c", "user.name=cellrl tests", "-c", "user.email=tests@cellrl.invalid"]
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "scratch copy for tests"]):
            subprocess.run(git + args, cwd=dest, check=True, capture_output=True)
    return dest


def full_config(overlay: Path | Mapping[str, Any] | None = TEST_CONFIG, base: Path = ROOT / "config" / "config.yaml",
                **changes: Any) -> dict[str, Any]:
    """``base`` config + overlay + ``changes`` given as dotted keys (``full_config(**{"oracle.alpha": 5})``)."""
    cfg = yaml.safe_load(Path(base).read_text())
    if overlay is not None:
        over = yaml.safe_load(Path(overlay).read_text()) if isinstance(overlay, (str, Path)) else overlay
        cfg = deep_merge(cfg, over)
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise KeyError(f"{dotted}: no such key in the configuration")
        node[leaf] = value
    validate_config(cfg, "test configuration")
    return cfg


def changed_config(workdir: Path, name: str, **changes: Any) -> Path:
    """A copy's own config/config.yaml with ``changes`` (dotted keys), written to config/changed_<name>.yaml."""
    cfg = full_config(None, base=workdir / "config" / "config.yaml", **changes)
    return write_config(workdir, cfg, f"config/changed_{name}.yaml")


def write_config(workdir: Path, cfg: Mapping[str, Any], name: str = "config/config.yaml") -> Path:
    path = workdir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 600,
              launcher: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake in ``workdir``; on failure (with ``check``) raise with the tail of its output."""
    cmd = (launcher or [sys.executable, "-m", "snakemake"]) + list(args)
    run_env = dict(os.environ, **(env or {}))
    run_env.pop("SNAKEMAKE_PROFILE", None)
    proc = subprocess.run(cmd, cwd=workdir, env=run_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"snakemake {' '.join(args)} failed with exit code {proc.returncode}:\n{out}")
    return proc


_STATS_ROW = re.compile(r"^(\w+)\s+(\d+)$")


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Jobs a dry run plans, as {rule: count} from Snakemake's job-stats table (without the target `all`)."""
    proc = snakemake(workdir, *args, "--dry-run", "--quiet", "rules")
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    if "Job stats:" not in out:
        raise AssertionError(f"no job stats in the dry-run output:\n{out[-4000:]}")
    table = out.split("Job stats:", 1)[1]
    jobs: dict[str, int] = {}
    for line in table.splitlines()[3:]:
        m = _STATS_ROW.match(line.strip())
        if not m:
            break
        if m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    jobs.pop("all", None)
    return jobs


def rule_graph(workdir: Path, *args: str) -> dict[str, set[str]]:
    """The rule graph of the workflow as {rule: set of rules that consume its output directly}."""
    out = snakemake(workdir, *args, "--rulegraph").stdout
    names = dict(re.findall(r'^\s*(\d+)\[label = "([^"]+)"', out, flags=re.M))
    children: dict[str, set[str]] = {n: set() for n in names.values()}
    for a, b in re.findall(r"^\s*(\d+) -> (\d+)", out, flags=re.M):
        children[names[a]].add(names[b])
    return children


def descendants(graph: Mapping[str, set[str]], rule: str) -> set[str]:
    """``rule`` and every rule downstream of it, without the target `all`."""
    seen, todo = set(), [rule]
    while todo:
        r = todo.pop()
        if r not in seen:
            seen.add(r)
            todo.extend(graph.get(r, ()))
    return seen - {"all"}


# --- the one end-to-end run shared by tests/test_slurm_profile.py and tests/test_workflow.py -----------------

FAKE_SLURM = ROOT / "tests" / "fake_slurm"
SLURM_TARGET = "results/demo/transitions/table.npy"
SLURM_ENV = {  # what a user exports on a cluster (see profiles/slurm/config.yaml)
    "CELLRL_SLURM_ACCOUNT": "cellrl_test",
    "CELLRL_SLURM_PARTITION": "cpu_q",
    "CELLRL_SLURM_GPU_PARTITION": "gpu_q",
    "FAKE_SLURM_ACCOUNTS": "cellrl_test other_account",
}


@dataclasses.dataclass
class TinyRun:
    """The tiny demo (tests/config_test.yaml) built in a scratch copy: first up to the transition table with
    ``--profile profiles/slurm`` against the fake SLURM of tests/fake_slurm, then to the end with
    ``--profile profiles/local``."""

    workdir: Path
    slurm_state: Path           # FAKE_SLURM_DIR: calls.jsonl and jobs/
    slurm_planned: dict         # {rule: count} a dry run planned for SLURM_TARGET before the SLURM run
    slurm_output: str
    local_output: str
    seconds: dict

    def slurm_calls(self, cmd: str) -> list[list[str]]:
        lines = (self.slurm_state / "calls.jsonl").read_text().splitlines()
        return [c["argv"] for c in map(json.loads, lines) if c["cmd"] == cmd]


_TINY: dict[str, Any] = {}


def tiny_run() -> TinyRun:
    """Build the tiny demo once per test session (the first caller pays, about 2-3 min); later callers, and
    callers after a failure, get the same result or the same error."""
    if "run" not in _TINY:
        try:
            _TINY["run"] = _build_tiny_run()
        except BaseException as e:  # noqa: BLE001 - re-raised to every caller
            _TINY["run"] = e
    if isinstance(_TINY["run"], BaseException):
        raise _TINY["run"]
    return _TINY["run"]


def _build_tiny_run() -> TinyRun:
    base = Path(tempfile.mkdtemp(prefix="cellrl-tiny-"))
    if not os.environ.get("CELLRL_KEEP_TEST_RUN"):  # set it to inspect the run after the tests
        atexit.register(shutil.rmtree, base, ignore_errors=True)
    workdir = make_copy(base / "workflow")
    state = base / "fake_slurm_state"
    env = dict(SLURM_ENV, FAKE_SLURM_DIR=str(state),
               PATH=os.pathsep.join([str(FAKE_SLURM), str(Path(sys.executable).parent), os.environ["PATH"]]))
    planned = planned_jobs(workdir, SLURM_TARGET)
    seconds = {}
    t0 = time.time()
    slurm = snakemake(workdir, SLURM_TARGET, "--profile", "profiles/slurm", env=env, timeout=900,
                      launcher=[sys.executable, str(FAKE_SLURM / "snakemake_fast_poll.py")])
    seconds["slurm"] = time.time() - t0
    t0 = time.time()
    local = snakemake(workdir, "--profile", "profiles/local", "--cores", str(min(4, os.cpu_count() or 1)),
                      timeout=900)
    seconds["local"] = time.time() - t0
    (base / "seconds.json").write_text(json.dumps(seconds))
    return TinyRun(workdir, state, planned, slurm.stdout + slurm.stderr, local.stdout + local.stderr, seconds)
