"""benchmarks/env_throughput.py: machine record and one tiny training + floor measurement (seconds);
benchmarks/real_data.py: success on the tasks exact search solves."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench(name: str = "env_throughput"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_machine_info_and_tiny_measure():
    b = _bench()
    info = b.machine_info(1)
    assert info["cpu_model"] and set(info["isa"]) == {"avx2", "avx512f", "neon", "asimd", "sve"}
    geo, table = b.problem(120, 20, 3, 4)
    hyper = dict(n_envs=2, n_steps=32, batch_size=16, n_epochs=2, learning_rate=1e-3)
    r = b.measure(geo, table, hyper, iterations=2, floor_steps=5, device="cpu")
    assert r["measured_iterations"] == 2 and len(r["iterations"]) == 3
    assert r["minibatches_per_iteration"] == 8 and r["floor_minibatches_timed"] == 2 * 5
    assert r["training_steps_per_s"] > 0 and r["floor_steps_per_s"] > 0
    assert abs(r["ratio"] - r["training_steps_per_s"] / r["floor_steps_per_s"]) < 1e-2


def test_real_data_exact_reachable_success(tmp_path):
    """Success per method on the tasks exact search solves (from the persistent summary's success_vs_exact), the
    number of such tasks, and one scope when exact search ran on every task."""
    import json

    b = _bench("real_data")
    f = tmp_path / "benchmark" / "persistent" / "summary.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"training": {"timesteps": 10}, "protocol": {"n_exact_tasks": 4, "n_episodes": 4,
                                                                         "max_set_size": 3},
                             "methods": {"exact": {"exact_tasks": {"success": 0.5}},
                                         "agent": {"exact_tasks": {"success": 0.5}, "success_vs_exact": 1.0},
                                         "greedy": {"exact_tasks": {"success": 0.25}, "success_vs_exact": 0.5}}}))
    q = b.collect_persistent(tmp_path)
    assert q["n_exact_reachable_tasks"] == 2
    assert {k: v["success_exact_reachable"] for k, v in q["methods"].items()} == {"agent": 1.0, "exact": 1.0,
                                                                                 "greedy": 0.5}
    assert q["agent_minus_greedy_exact_reachable"] == 0.5 and q["methods"]["agent"]["success_all_tasks"] == 0.5
    assert b.collect_persistent(tmp_path / "missing") is None
