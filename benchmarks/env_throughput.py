"""Environment and training throughput on this CPU (issue 4).

1. Raw vectorised environment: steps/s of ``VecReprogrammingEnv`` with uniformly random masked actions,
   observations included (current expression gathered for every env every step), at the demo size and at
   3,000 genes, for several numbers of parallel episodes N.
2. End-to-end MaskablePPO training with the reference network and hyperparameters (8 envs, n_steps 1024,
   batch 64, n_epochs 11): env steps/s of full PPO iterations (rollout + update), the split between rollout
   and update, and the FLOPs actually executed by the network's linear layers (counted with hooks) as a
   fraction of measured torch matmul FLOP/s (same shapes as the training matmuls, and a large square one).
   Then the *minibatch floor*: the network's forward + backward + fused Adam on a minibatch with nothing else
   (no PPO bookkeeping), and the steps/s ceiling it implies (minibatches per iteration x floor, + rollouts).
   At 3,000 genes a second agent trains with the native kernels off (``3000_genes_torch_only``: dense
   first-layer gradients, torch's fused Adam, BLAS products), its iterations alternating with the native
   agent's (the machine's speed drifts), and the summary reports the ratio of medians.
3. Machine context: load average before/after (the machine is shared), memory copy bandwidth.

    .venv/bin/python benchmarks/env_throughput.py [--quick] [--threads 2] [--iterations 3]

Writes benchmarks/out/env_throughput_<timestamp>.json (full record) and benchmarks/results/env_throughput.json
(committed summary). Uses ``cellrl.model.random_model`` and a random table (the network's cost does not
depend on the data; the env's cost depends only on the shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cellrl.env import VecReprogrammingEnv  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)
from cellrl.model import random_model  # noqa: E402
from cellrl.tasks import TaskGeometry  # noqa: E402

import torch as th  # noqa: E402

HERE = Path(__file__).resolve().parent
REFERENCE = dict(n_envs=8, n_steps=1024, batch_size=64, n_epochs=11)


def problem(n_cells: int, n_genes: int, n_types: int, n_regulators: int, seed: int = 0):
    m = random_model(n_cells=n_cells, n_genes=n_genes, n_types=n_types, n_regulators=n_regulators, seed=seed)
    rng = np.random.default_rng(seed)
    table = rng.integers(0, m.n_cells, (m.n_cells, m.n_actions)).astype(np.int32)
    return m, table, TaskGeometry.from_model(m)


def bench_raw_env(geo, table, n_envs: int, seconds: float) -> dict:
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
                steps_per_s=round(calls * n_envs / dt), calls=calls, seconds=round(dt, 2),
                episodes_per_s=round(env.batch.episodes / dt))


def matmul_flops(shapes: list[tuple[int, int, int]], seconds: float = 1.0) -> dict:
    out = {}
    for m, k, n in shapes:
        a, b = th.randn(m, k), th.randn(k, n)
        for _ in range(3):
            a @ b
        r, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            r += 1
        out[f"{m}x{k}x{n}"] = round(2 * m * k * n * r / (time.perf_counter() - t0) / 1e9, 1)
    return out


def copy_bandwidth() -> float:
    x = np.zeros(25_000_000, np.float32)
    y = np.ones_like(x)
    np.copyto(x, y)
    t0 = time.perf_counter()
    for _ in range(5):
        np.copyto(x, y)
    return round(5 * 2 * x.nbytes / (time.perf_counter() - t0) / 1e9, 1)


class FlopCounter:
    """Counts FLOPs of every nn.Linear (2*rows*in*out forward; backward: weight grad, plus input grad when the
    input needs one)."""

    def __init__(self, module: th.nn.Module):
        self.fwd = 0
        self.bwd = 0
        self.handles = [mod.register_forward_hook(self._hook) for mod in module.modules()
                        if isinstance(mod, th.nn.Linear)]

    def _hook(self, mod, inputs, output):
        x = inputs[0]
        f = 2 * x.numel() // x.shape[-1] * mod.in_features * mod.out_features
        self.fwd += f
        if th.is_grad_enabled() and output.requires_grad:
            self.bwd += f * (2 if x.requires_grad else 1)

    def close(self):
        for h in self.handles:
            h.remove()


def bench_minibatch_floor(agent, steps: int = 200, repeats: int = 3) -> dict:
    """The network's own maths per PPO minibatch with nothing else: forward (extractor with the unique-target
    trick, actor and critic MLPs, heads), a loss over logits and values, backward, fused Adam -- on minibatches
    of ``batch_size`` rows drawn from the agent's rollout buffer. Its time x minibatches per iteration is the
    update time no PPO implementation of this network can beat on this machine."""
    pol = agent.policy
    pol.set_training_mode(True)
    buf = agent.rollout_buffer
    obs = {k: th.as_tensor(v.reshape(agent.n_steps * agent.n_envs, -1)) for k, v in buf.observations.items()}
    n, bs = next(iter(obs.values())).shape[0], agent.batch_size
    gen = th.Generator().manual_seed(0)

    def step() -> None:
        idx = th.randint(0, n, (bs,), generator=gen)
        feats = pol.extract_features({k: v[idx] for k, v in obs.items()}, pol.features_extractor)
        latent_pi, latent_vf = pol.mlp_extractor(feats)
        loss = pol.action_net(latent_pi).logsumexp(1).mean() + pol.value_net(latent_vf).pow(2).mean()
        pol.optimizer.zero_grad()
        loss.backward()
        pol.optimizer.step()

    for _ in range(20):
        step()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t0) / steps)
    return {"ms_per_minibatch": round(best * 1e3, 2), "batch_size": bs}


class _TrainingRun:
    """One agent (reference network + hyperparameters) trained an iteration at a time, with timings and FLOPs.
    ``native=False``: the first layers on plain PyTorch (dense gradient + torch's fused Adam, BLAS products)."""

    def __init__(self, geo, table, native: bool):
        from stable_baselines3.common.callbacks import BaseCallback

        from cellrl.train import build_agent, make_vec_env

        env = make_vec_env(geo, table, {}, REFERENCE["n_envs"])
        self.agent = agent = build_agent(env, {"device": "cpu", "seed": 0, **REFERENCE})
        agent._lowrank = agent.policy.optimizer.attach(agent.policy.features_extractor.lowrank_layers(), native)
        self.counter = counter = FlopCounter(agent.policy)
        self.times = times = []
        self.wall = 0.0

        class Timer(BaseCallback):
            def _on_rollout_start(self) -> None:
                now = time.perf_counter()
                if times and "update_s" not in times[-1]:
                    times[-1]["update_s"] = now - times[-1]["t_end"]
                    times[-1]["flops_update"] = counter.fwd + counter.bwd - times[-1]["flops_mark"]
                times.append({"t0": now, "flops_start": counter.fwd + counter.bwd})

            def _on_rollout_end(self) -> None:
                now = time.perf_counter()
                times[-1]["rollout_s"] = now - times[-1]["t0"]
                times[-1]["t_end"] = now
                times[-1]["flops_mark"] = counter.fwd + counter.bwd
                times[-1]["flops_rollout"] = times[-1]["flops_mark"] - times[-1]["flops_start"]

            def _on_training_end(self) -> None:
                self._on_rollout_start()
                times.pop()

            def _on_step(self) -> bool:
                return True

        self.timer = Timer()

    def iteration(self) -> None:
        t0 = time.perf_counter()
        self.agent.learn(REFERENCE["n_envs"] * REFERENCE["n_steps"], callback=self.timer,
                         reset_num_timesteps=not self.times)
        self.wall += time.perf_counter() - t0

    def result(self, geo, table, threads: int) -> dict:
        agent, times = self.agent, self.times
        self.counter.close()
        steps_per_iter = REFERENCE["n_envs"] * REFERENCE["n_steps"]
        its = [{"rollout_s": round(t["rollout_s"], 2), "update_s": round(t["update_s"], 2),
                "steps_per_s": round(steps_per_iter / (t["rollout_s"] + t["update_s"]), 1),
                "gflop": round((t["flops_rollout"] + t["flops_update"]) / 1e9, 1),
                "gflop_per_s": round((t["flops_rollout"] + t["flops_update"]) / (t["rollout_s"] + t["update_s"])
                                     / 1e9, 1),
                "update_gflop_per_s": round(t["flops_update"] / t["update_s"] / 1e9, 1)} for t in times]
        best = max(its, key=lambda r: r["steps_per_s"])
        floor = bench_minibatch_floor(agent)
        n_mb = REFERENCE["n_epochs"] * steps_per_iter // REFERENCE["batch_size"]
        best_update_ms = min(t["update_s"] for t in times) / n_mb * 1e3
        min_rollout = min(t["rollout_s"] for t in times)
        floor.update(minibatches_per_iteration=n_mb, ppo_update_ms_per_minibatch=round(best_update_ms, 2),
                     ppo_overhead_over_floor=round(best_update_ms / floor["ms_per_minibatch"], 2),
                     ceiling_steps_per_s_free_rollouts=round(
                         steps_per_iter / (n_mb * floor["ms_per_minibatch"] / 1e3), 1),
                     ceiling_steps_per_s_measured_rollouts=round(
                         steps_per_iter / (n_mb * floor["ms_per_minibatch"] / 1e3 + min_rollout), 1))
        g, a = geo.n_genes, int(table.shape[1])
        e1, e2 = 512, 128
        naive_fwd = 2 * 2 * (g * e1 + e1 * e2) + 2 * (256 * 256 + 256 * 64 + 64 * a + 256 * 128 + 128 * 64 + 64)
        return dict(genes=g, actions=a, cells=geo.n_cells, types=geo.n_types, **REFERENCE, threads=threads,
                    native_kernels=bool(agent._lowrank), iterations=its, minibatch_floor=floor,
                    steps_per_s=best["steps_per_s"],
                    median_steps_per_s=sorted(r["steps_per_s"] for r in its)[len(its) // 2],
                    mean_steps_per_s=round(len(its) * steps_per_iter / self.wall, 1),
                    achieved_gflop_per_s=best["gflop_per_s"],
                    executed_mflop_per_sample_iteration=round(best["gflop"] * 1e3 / steps_per_iter, 1),
                    naive_mflop_per_sample_forward=round(naive_fwd / 1e6, 2),
                    naive_mflop_per_sample_iteration=round(naive_fwd * (1 + 3 * REFERENCE["n_epochs"]) / 1e6, 1),
                    n_params=int(sum(p.numel() for p in agent.policy.parameters())))


def bench_training(geo, table, iterations: int, threads: int, natives: tuple[bool, ...] = (True,)) -> list[dict]:
    """End-to-end PPO training, one agent per entry of ``natives``; their iterations alternate (A B A B ...),
    so that a shared machine's drifting speed hits both alike."""
    runs = [_TrainingRun(geo, table, n) for n in natives]
    for _ in range(iterations):
        for r in runs:
            r.iteration()
    return [r.result(geo, table, threads) for r in runs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="2", help="comma-separated torch thread counts to measure training with")
    p.add_argument("--iterations", type=int, default=3, help="PPO iterations (8192 steps each) per training run")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per raw env measurement")
    p.add_argument("--quick", action="store_true", help="raw env only, short")
    args = p.parse_args()
    threads = [int(t) for t in str(args.threads).split(",")]
    th.set_num_threads(threads[0])
    load_before = os.getloadavg()
    rec: dict = dict(benchmark="env_throughput", time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     machine=platform.node(), cpu=platform.processor() or platform.machine(),
                     cpus=len(os.sched_getaffinity(0)), torch=th.__version__, numpy=np.__version__,
                     torch_threads=threads, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                     load_average_before=[round(x, 2) for x in load_before])
    rec["copy_gb_per_s"] = copy_bandwidth()
    demo = problem(2400, 400, 6, 20)
    big = problem(8000, 3000, 10, 108)
    rec["raw_env"] = []
    for name, (m, table, geo) in (("demo", demo), ("3000_genes", big)):
        for n in (64, 1024, 4096):
            r = bench_raw_env(geo, table, n, args.seconds / (2 if args.quick else 1))
            r["size"] = name
            rec["raw_env"].append(r)
            print(json.dumps(r), flush=True)
    if not args.quick:
        rec["matmul_gflop_per_s"] = {}
        rec["training"] = {}
        for nt in threads:
            th.set_num_threads(nt)
            mm = matmul_flops([(64, 3000, 512), (512, 64, 3000), (8, 3000, 512), (2048, 2048, 2048)])
            rec["matmul_gflop_per_s"][f"{nt}_threads"] = mm
            print("matmul", nt, "threads", mm, flush=True)
            results = [("demo", demo, r) for r in bench_training(demo[2], demo[1], args.iterations, nt)]
            pair = bench_training(big[2], big[1], args.iterations, nt, natives=(True, False))
            results += [("3000_genes", big, pair[0]), ("3000_genes_torch_only", big, pair[1])]
            for name, (m, table, geo), r in results:
                r["load_average"] = [round(x, 2) for x in os.getloadavg()]
                # executed FLOPs (unique targets embedded once) and what the naive network would have cost
                r["reference_equivalent_gflop_per_s"] = round(
                    r["naive_mflop_per_sample_iteration"] * r["steps_per_s"] / 1e3, 1)
                r["fraction_of_matmul_same_shape"] = round(r["achieved_gflop_per_s"] / mm["64x3000x512"], 3)
                r["fraction_of_matmul_peak"] = round(r["achieved_gflop_per_s"] / max(mm.values()), 3)
                r["reference_equivalent_fraction_of_matmul_same_shape"] = round(
                    r["reference_equivalent_gflop_per_s"] / mm["64x3000x512"], 3)
                rec["training"][f"{name}_{nt}_threads"] = r
                print(name, nt, "threads", json.dumps(r), flush=True)
    rec["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    out = HERE / "out" / f"env_throughput_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    if not args.quick:
        big_raw = [r for r in rec["raw_env"] if r["size"] == "3000_genes"]
        summary = {k: rec[k] for k in ("benchmark", "time", "cpu", "cpus", "torch", "torch_threads",
                                        "omp_wait_policy", "load_average_before", "load_average_after",
                                        "copy_gb_per_s", "matmul_gflop_per_s")}
        summary["raw_env_steps_per_s_3000_genes"] = max(r["steps_per_s"] for r in big_raw)
        summary["raw_env"] = rec["raw_env"]
        summary["training"] = rec["training"]
        big_runs = {k: v for k, v in rec["training"].items() if k.startswith("3000_genes_") and "torch" not in k}
        torch_runs = {k: v for k, v in rec["training"].items() if k.startswith("3000_genes_torch")}
        summary["training_steps_per_s_3000_genes"] = max(v["steps_per_s"] for v in big_runs.values())
        summary["training_steps_per_s_3000_genes_all_iterations"] = [
            it["steps_per_s"] for v in big_runs.values() for it in v["iterations"]]
        if torch_runs:
            summary["training_steps_per_s_3000_genes_torch_only"] = max(v["steps_per_s"] for v in torch_runs.values())
            summary["training_steps_per_s_3000_genes_torch_only_all_iterations"] = [
                it["steps_per_s"] for v in torch_runs.values() for it in v["iterations"]]
            summary["native_over_torch_only_median"] = round(
                max(v["median_steps_per_s"] for v in big_runs.values())
                / max(v["median_steps_per_s"] for v in torch_runs.values()), 2)
        summary["minibatch_floor_3000_genes"] = {k: v["minibatch_floor"] for k, v in rec["training"].items()
                                                 if k.startswith("3000_genes")}
        summary["targets"] = {"raw_env_steps_per_s": 100_000, "training_steps_per_s": 500,
                              "fraction_of_matmul": 0.5}
        res = HERE / "results" / "env_throughput.json"
        res.parent.mkdir(parents=True, exist_ok=True)
        res.write_text(json.dumps(summary, indent=2) + "\n")
        print("wrote", res)
    print("wrote", out)


if __name__ == "__main__":
    main()
