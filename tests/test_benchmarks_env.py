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
    """Success per method on the tasks exact search solves: tasks keyed by (start cell, target), exact's failures
    and tasks exact did not search left out."""
    import pandas as pd

    b = _bench("real_data")
    rows = [("exact", 1, 0, True), ("exact", 1, 1, False), ("exact", 2, 0, True),
            ("agent", 1, 0, True), ("agent", 1, 1, False), ("agent", 2, 0, True), ("agent", 3, 0, True),
            ("greedy", 1, 0, False), ("greedy", 1, 1, True), ("greedy", 2, 0, True), ("greedy", 3, 0, True)]
    f = tmp_path / "episodes.parquet"
    pd.DataFrame(rows, columns=["policy", "start_cell", "target_id", "success"]).to_parquet(f)
    success, n = b.exact_reachable_success(f)
    assert n == 2 and success == {"agent": 1.0, "exact": 1.0, "greedy": 0.5}
    assert b.exact_reachable_success(tmp_path / "missing.parquet") == ({}, 0)
