"""Environment and stock-training throughput, against the network-maths floor, on this machine (issue 4).

    .venv/bin/python benchmarks/env_throughput.py [--quick] [--iterations 3] [--threads N]

(``--quick``: a smoke run of ~1-2 min -- fewer cells, one measured iteration, n_steps 64 at 3,000 genes; its
numbers are not the reference measurement and it writes no summary.)

Goals: stock training at 3,000 genes runs at >= 0.7 of the network-maths floor's steps/s (both measured in the
same run, CPU model stated); demo-size training runs at >= 1,000 steps/s.

Definitions (per problem size and device; "iteration" = one PPO rollout of n_envs * n_steps env steps + its
update of n_epochs passes over the rollout in minibatches of batch_size rows):

* training steps/s: env steps / wall time (rollout + update) of full iterations of a stock sb3-contrib
  ``MaskablePPO`` from ``cellrl.train.build_agent`` learning inside ``quiet_numerics()``; timed by a callback at
  rollout start/end (hence the rollout / update split); the first iteration is a warm-up and not counted.
* floor t_mb: median wall time of the network's maths for one minibatch, with nothing else: the same agent's
  ``policy.evaluate_actions`` (features extractor + actor + critic heads), a PPO scalar loss (clipped
  surrogate + value MSE + entropy), backward, ``policy.optimizer.step()`` (torch.optim.Adam with the kwargs of
  ``cellrl.network.policy_kwargs``). Minibatches are drawn beforehand from the agent's own rollout buffer
  (current expression + target centroid rows as the env produced them), so no copying, no logging ``.item()``
  calls, no grad clipping. On CUDA every step ends with a synchronize. The floor minibatches are timed after
  every rollout, before its update (outside both timings), so drift of a shared machine hits both alike.
* floor steps/s = samples per iteration / (minibatches per iteration * t_mb); reference: 8192 / (1408 t_mb).
* ratio = training steps/s / floor steps/s (goal at 3,000 genes: >= 0.7). The floor leaves out rollouts, so
  the ratio charges training for its rollouts and for PPO's bookkeeping around the network.

Also: raw ``VecReprogrammingEnv`` steps/s (random masked actions, observations included); the machine (CPU
model, ISA flags, cores, torch version and threads, BLAS, load average before/after); CUDA as a second section
when ``torch.cuda.is_available()`` (else ``"cuda": null`` and the reason). Problems are ``random_model`` with a
random transition table: the costs depend on the shapes, not on the data.

Writes benchmarks/out/env_throughput_<timestamp>.json (full record, git-ignored) and, unless ``--quick``,
benchmarks/results/env_throughput.json (the committed summary).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import torch.nn.functional as F
from stable_baselines3.common.callbacks import BaseCallback

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))  # benchmarks/machine.py, also when this file is loaded by path (tests)

from cellrl.env import VecReprogrammingEnv  # noqa: E402
from machine import MODEL_SIZES, machine_info  # noqa: E402
from cellrl.model import random_model  # noqa: E402
from cellrl.tasks import TaskGeometry  # noqa: E402
from cellrl.train import TRAIN_DEFAULTS, build_agent, make_vec_env, quiet_numerics, set_torch_threads  # noqa: E402

REFERENCE = {k: TRAIN_DEFAULTS[k] for k in ("n_envs", "n_steps", "batch_size", "n_epochs", "learning_rate")}
DEMO = dict(n_envs=8, n_steps=256, batch_size=64, n_epochs=5, learning_rate=5e-4)  # config.yaml demo overrides
# name: (genes, cell types, regulators (actions = 2 x regulators), cells, quick cells, train settings)
SIZES: dict[str, tuple[int, int, int, int, int, dict[str, Any]]] = {
    name: (*MODEL_SIZES[name], train) for name, train in (("3000_genes", REFERENCE), ("demo", DEMO))}
GOALS = {"ratio_3000_genes": 0.7, "demo_training_steps_per_s": 1000}


def problem(n_cells: int, n_genes: int, n_types: int, n_regulators: int, seed: int = 0
            ) -> tuple[TaskGeometry, np.ndarray]:
    m = random_model(n_cells=n_cells, n_genes=n_genes, n_types=n_types, n_regulators=n_regulators, seed=seed)
    table = np.random.default_rng(seed).integers(0, m.n_cells, (m.n_cells, m.n_actions)).astype(np.int32)
    return TaskGeometry.from_model(m), table


def bench_raw_env(geo: TaskGeometry, table: np.ndarray, n_envs: int, seconds: float) -> dict[str, Any]:
    env = VecReprogrammingEnv(geo, table, n_envs, {}, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    for _ in range(5):
        env.step(env.sample_masked_actions(rng))
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        env.step(env.sample_masked_actions(rng))
        calls += 1
    dt = time.perf_counter() - t0
    return dict(n_envs=n_envs, genes=geo.n_genes, actions=int(table.shape[1]), cells=geo.n_cells,
                steps_per_s=round(calls * n_envs / dt), seconds=round(dt, 2))


class IterationTimer(BaseCallback):
    """Wall time of every PPO iteration, split into rollout (collect_rollouts) and update (train); between the
    two (outside both), ``floor_steps`` floor minibatches on the rollout just collected, so that the floor and
    training are measured side by side while the shared machine's speed drifts."""

    def __init__(self, floor_steps: int = 0) -> None:
        super().__init__()
        self.floor_steps = floor_steps
        self.iterations: list[dict[str, Any]] = []
        self._t0 = self._t_rollout = self._t1 = 0.0
        self._floor: list[float] = []

    def _close(self, now: float) -> None:
        if self._t1 > self._t0:
            self.iterations.append({"rollout_s": self._t_rollout - self._t0, "update_s": now - self._t1,
                                    "floor_ms": self._floor})
        self._t0 = self._t1 = now

    def _on_rollout_start(self) -> None:
        self._close(time.perf_counter())

    def _on_rollout_end(self) -> None:
        self._t_rollout = time.perf_counter()
        self._floor = floor_ms(self.model, self.floor_steps) if self.floor_steps else []
        self._t1 = time.perf_counter()

    def _on_training_end(self) -> None:
        self._close(time.perf_counter())

    def _on_step(self) -> bool:
        return True


def floor_ms(agent: Any, steps: int, warmup: int = 3, pool: int = 32) -> list[float]:
    """Times (ms) of the network maths of one minibatch (see the module docstring), one per step."""
    pol, cuda = agent.policy, agent.device.type == "cuda"
    pol.set_training_mode(True)
    # minibatches of the agent's last rollout, as PPO's update reads them (already on the device)
    mbs = list(itertools.islice(agent.rollout_buffer.get(agent.batch_size), pool))
    clip, ent_coef, vf_coef = agent.clip_range(1.0), agent.ent_coef, agent.vf_coef
    times = []
    for i in range(warmup + steps):
        mb = mbs[i % len(mbs)]
        t0 = time.perf_counter()
        values, log_prob, entropy = pol.evaluate_actions(mb.observations, mb.actions.long().flatten(),
                                                         action_masks=mb.action_masks)
        adv = (mb.advantages - mb.advantages.mean()) / (mb.advantages.std() + 1e-8)
        ratio = th.exp(log_prob - mb.old_log_prob)
        loss = (-th.min(adv * ratio, adv * th.clamp(ratio, 1 - clip, 1 + clip)).mean()
                - ent_coef * entropy.mean() + vf_coef * F.mse_loss(mb.returns, values.flatten()))
        pol.optimizer.zero_grad()
        loss.backward()
        pol.optimizer.step()
        if cuda:
            th.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(geo: TaskGeometry, table: np.ndarray, hyper: dict[str, Any], iterations: int, floor_steps: int,
            device: str) -> dict[str, Any]:
    """Stock training, 1 warm-up + ``iterations`` iterations, with ``floor_steps`` floor minibatches timed
    after each rollout (the warm-up iteration's floor samples are dropped too)."""
    env = make_vec_env(geo, table, {}, int(hyper["n_envs"]), seed=0)
    agent = build_agent(env, {**hyper, "seed": 0}, seed=0, device=device)
    per_iter = int(hyper["n_envs"]) * int(hyper["n_steps"])
    n_mb = int(hyper["n_epochs"]) * -(-per_iter // int(hyper["batch_size"]))
    timer = IterationTimer(floor_steps)
    with quiet_numerics():
        agent.learn((iterations + 1) * per_iter, callback=timer, progress_bar=False)
    its = timer.iterations[1:]
    wall = sum(t["rollout_s"] + t["update_s"] for t in its)
    train_sps = per_iter * len(its) / wall
    fl = [x for t in its for x in t["floor_ms"]]
    t_mb = float(np.median(fl))
    floor_sps = per_iter / (n_mb * t_mb / 1e3)
    update_s = float(np.median([t["update_s"] for t in its]))
    return dict(
        device=device, genes=geo.n_genes, actions=int(table.shape[1]), cells=geo.n_cells, types=geo.n_types,
        **hyper, samples_per_iteration=per_iter, minibatches_per_iteration=n_mb,
        n_params=int(sum(p.numel() for p in agent.policy.parameters())),
        training_steps_per_s=round(train_sps, 1), warmup_iterations=1, measured_iterations=len(its),
        iterations=[{"rollout_s": round(t["rollout_s"], 3), "update_s": round(t["update_s"], 3),
                     "steps_per_s": round(per_iter / (t["rollout_s"] + t["update_s"]), 1),
                     "floor_ms_median": round(float(np.median(t["floor_ms"])), 3) if t["floor_ms"] else None}
                    for t in timer.iterations],
        rollout_s_median=round(float(np.median([t["rollout_s"] for t in its])), 3),
        update_s_median=round(update_s, 3), update_ms_per_minibatch=round(update_s / n_mb * 1e3, 3),
        floor_ms_per_minibatch=round(t_mb, 3),
        floor_ms_p10_p90=[round(float(np.percentile(fl, q)), 3) for q in (10, 90)],
        floor_minibatches_timed=len(fl), floor_steps_per_s=round(floor_sps, 1),
        ratio=round(train_sps / floor_sps, 3))


def run_device(problems: dict[str, tuple[TaskGeometry, np.ndarray]], settings: dict[str, dict[str, Any]],
               iterations: int, floor_steps: int, device: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (geo, table) in problems.items():
        out[name] = r = measure(geo, table, settings[name], iterations, floor_steps, device)
        r["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        print(f"[{device}] {name}: training {r['training_steps_per_s']:.0f} steps/s (rollout "
              f"{r['rollout_s_median']:.2f} s + update {r['update_s_median']:.2f} s per iteration; update "
              f"{r['update_ms_per_minibatch']:.2f} ms/minibatch), floor {r['floor_ms_per_minibatch']:.2f} ms/"
              f"minibatch = {r['floor_steps_per_s']:.0f} steps/s, ratio {r['ratio']:.3f}", flush=True)
    return out


def goals(sec: dict[str, Any] | None) -> dict[str, Any] | None:
    if sec is None:
        return None
    vals = {"ratio_3000_genes": sec["3000_genes"]["ratio"],
            "demo_training_steps_per_s": sec["demo"]["training_steps_per_s"]}
    return {k: {"value": v, "target": GOALS[k], "met": v >= GOALS[k]} for k, v in vals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: fewer cells, iterations and timings; "
                   "n_steps 64 at 3,000 genes (same ratio definition, not the reference schedule)")
    p.add_argument("--iterations", type=int, default=None, help="measured PPO iterations per run after one "
                   "warm-up (default 3; --quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all available cores)")
    args = p.parse_args()
    iterations = args.iterations or (1 if args.quick else 3)
    threads = set_torch_threads(args.threads)
    floor_steps, env_seconds = (30, 1.0) if args.quick else (200, 3.0)  # floor minibatches per iteration
    settings = {name: dict(s[5]) for name, s in SIZES.items()}
    if args.quick:
        settings["3000_genes"]["n_steps"] = 64
    rec: dict[str, Any] = dict(benchmark="env_throughput", time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                               quick=args.quick, iterations=iterations, machine=machine_info(threads))
    rec["machine"]["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    m = rec["machine"]
    print(f"{m['cpu_model']} ({m['arch']}, {m['cores']} cores, ISA {[k for k, v in m['isa'].items() if v]}), "
          f"torch {m['torch']} with {threads} threads", flush=True)
    problems = {name: problem(qc if args.quick else c, g, t, r) for name, (g, t, r, c, qc, _) in SIZES.items()}
    rec["raw_env"] = []
    for name, (geo, table) in problems.items():
        for n in ((64, 1024) if args.quick else (64, 1024, 4096)):
            rec["raw_env"].append({"size": name, **bench_raw_env(geo, table, n, env_seconds)})
            print("raw env", json.dumps(rec["raw_env"][-1]), flush=True)
    rec["cpu"] = run_device(problems, settings, iterations, floor_steps, "cpu")
    if th.cuda.is_available():
        rec["cuda"] = {"device_name": th.cuda.get_device_name(0), "torch_cuda": th.version.cuda,
                       **run_device(problems, settings, iterations, floor_steps, "cuda")}
    else:
        rec["cuda"] = None
        rec["cuda_unavailable_reason"] = (f"torch.cuda.is_available() is False (torch {th.__version__}, "
                                          f"built with CUDA {th.version.cuda})")
    rec["goals"] = {"cpu": goals(rec["cpu"]), "cuda": goals(rec["cuda"])}
    rec["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    rec["definitions"] = __doc__.split("Definitions")[1].split("Also:")[0].strip()
    out = HERE / "out" / f"env_throughput_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    if not args.quick:
        summary = {k: v for k, v in rec.items() if k != "raw_env"}
        summary["raw_env_steps_per_s"] = {n: max(r["steps_per_s"] for r in rec["raw_env"] if r["size"] == n)
                                          for n in problems}
        res = HERE / "results" / "env_throughput.json"
        res.write_text(json.dumps(summary, indent=2) + "\n")
        print("wrote", res)
    for dev, g in rec["goals"].items():
        for k, v in (g or {}).items():
            print(f"goal [{dev}] {k}: {v['value']} (target >= {v['target']}) {'MET' if v['met'] else 'NOT met'}")
    print(f"CPU: {m['cpu_model']}; load average {m['load_average_before']} -> {m['load_average_after']}")
    print("wrote", out)


if __name__ == "__main__":
    main()
