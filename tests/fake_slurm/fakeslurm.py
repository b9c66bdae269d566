"""A fake SLURM for tests: sbatch, sacct, srun, squeue, scontrol, sinfo, scancel, sshare and sacctmgr.

Each command appends its argument list to ``$FAKE_SLURM_DIR/calls.jsonl`` (one JSON object per call:
``{"cmd": ..., "argv": [...]}``). ``sbatch`` runs the ``--wrap`` command in the background in the
``-D`` directory, as a job would, with its output in the ``--output`` file (``%j`` -> job id);
``sacct`` reports each job of a ``--name`` as ``<id>|RUNNING`` until it exits, then ``COMPLETED`` or
``FAILED`` (the ``--parsable2 --format=JobIdRaw,State`` form snakemake-executor-plugin-slurm parses);
each job records its start and end time (``jobs/<id>.rc.start`` / ``.rc.end``, epoch seconds);
``srun`` drops its options and runs the command in its place; ``scancel`` kills a job's process group.
The accounts known to ``sshare`` come from ``$FAKE_SLURM_ACCOUNTS`` (space separated).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def _state() -> Path:
    d = os.environ.get("FAKE_SLURM_DIR")
    if not d:
        sys.exit("fake slurm: FAKE_SLURM_DIR is not set")
    p = Path(d)
    (p / "jobs").mkdir(parents=True, exist_ok=True)
    return p


def _record(state: Path, cmd: str, argv: list[str]) -> None:
    with open(state / "calls.jsonl", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps({"cmd": cmd, "argv": argv, "cwd": os.getcwd()}) + "\n")


def _opt(argv: list[str], *names: str) -> str | None:
    """Value of an option given as `--name value`, `--name=value`, `-X value` or `-Xvalue`."""
    for i, a in enumerate(argv):
        for n in names:
            if a == n and i + 1 < len(argv):
                return argv[i + 1]
            if n.startswith("--") and a.startswith(n + "="):
                return a[len(n) + 1:]
            if not n.startswith("--") and a.startswith(n) and len(a) > len(n):
                return a[len(n):]
    return None


def _next_jobid(state: Path) -> int:
    with open(state / "jobid.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        last = int(fh.read().strip() or 1000)
        fh.seek(0)
        fh.truncate()
        fh.write(str(last + 1))
    return last + 1


def sbatch(state: Path, argv: list[str]) -> int:
    wrap = _opt(argv, "--wrap")
    if wrap is None:
        print("sbatch: fake sbatch only supports --wrap", file=sys.stderr)
        return 1
    jobid = _next_jobid(state)
    name = _opt(argv, "--job-name", "-J") or "sbatch"
    workdir = _opt(argv, "-D", "--chdir") or os.getcwd()
    out = (_opt(argv, "--output", "-o") or f"slurm-{jobid}.out").replace("%j", str(jobid))
    out_path = Path(workdir, out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    job = state / "jobs" / str(jobid)
    (job.with_suffix(".name")).write_text(name)
    env = dict(os.environ, SLURM_JOB_ID=str(jobid), SLURM_JOB_NAME=name, FAKE_SLURM_WRAP=wrap,
               FAKE_SLURM_RC=str(job.with_suffix(".rc")))
    gpus = _opt(argv, "--gpus", "-G")
    if gpus:
        env["SLURM_GPUS"] = gpus
    cpus = _opt(argv, "--cpus-per-task", "-c")
    if cpus:
        env["SLURM_CPUS_PER_TASK"] = cpus
    with open(out_path, "w") as log:
        proc = subprocess.Popen(
            ["bash", "-c", 'date +%s.%N > "$FAKE_SLURM_RC.start"; eval "$FAKE_SLURM_WRAP"; rc=$?; '
                           'date +%s.%N > "$FAKE_SLURM_RC.end"; echo $rc > "$FAKE_SLURM_RC.tmp"; '
                           'mv "$FAKE_SLURM_RC.tmp" "$FAKE_SLURM_RC"'],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    job.with_suffix(".pid").write_text(str(proc.pid))
    print(jobid)  # --parsable
    return 0


def _job_state(job: Path) -> str:
    rc = job.with_suffix(".rc")
    if rc.exists():
        return "COMPLETED" if rc.read_text().strip() == "0" else "FAILED"
    if job.with_suffix(".cancelled").exists():
        return "CANCELLED"
    return "RUNNING"


def sacct(state: Path, argv: list[str]) -> int:
    fmt = _opt(argv, "--format", "-o") or ""
    if "State" not in fmt:  # e.g. the account guess `sacct -nu USER -o Account%256`: no history
        return 0
    name = _opt(argv, "--name")
    for f in sorted((state / "jobs").glob("*.name")):
        if name is None or f.read_text() == name:
            job = f.with_suffix("")
            print(f"{job.name}|{_job_state(job)}")
    return 0


def srun(state: Path, argv: list[str]) -> int:
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1
    if i == len(argv):
        print("srun: no command", file=sys.stderr)
        return 1
    os.execvp(argv[i], argv[i:])  # the calling shell has already split the job's command line
    return 1


def scancel(state: Path, argv: list[str]) -> int:
    for a in argv:
        job = state / "jobs" / a
        pid = job.with_suffix(".pid")
        if a.isdigit() and pid.exists():
            job.with_suffix(".cancelled").touch()
            try:
                os.killpg(int(pid.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
    return 0


def sinfo(state: Path, argv: list[str]) -> int:
    print("PARTITION\nfake*")
    return 0


def sshare(state: Path, argv: list[str]) -> int:
    for acct in os.environ.get("FAKE_SLURM_ACCOUNTS", "").split():
        print(acct)
    return 0


def quiet(state: Path, argv: list[str]) -> int:
    return 0


COMMANDS = {"sbatch": sbatch, "sacct": sacct, "srun": srun, "scancel": scancel, "sinfo": sinfo,
            "sshare": sshare, "sacctmgr": sshare, "squeue": quiet, "scontrol": quiet}


def main(cmd: str) -> None:
    state = _state()
    _record(state, cmd, sys.argv[1:])
    sys.exit(COMMANDS[cmd](state, sys.argv[1:]))
