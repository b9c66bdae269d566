"""benchmarks/env_throughput.py: machine record and one tiny training + floor measurement (seconds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("env_throughput", ROOT / "benchmarks" / "env_throughput.py")
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
