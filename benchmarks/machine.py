"""The machine a benchmark ran on (CPU model, ISA flags, cores, versions, BLAS; the GPU where CuPy sees one), and
the random-model sizes the throughput benchmarks share. Imports nothing heavy: torch and CuPy only when present,
so a GPU machine with numpy, scipy and CuPy alone can run benchmarks/persistent_throughput.py."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

# name: (genes, cell types, regulators (actions = 2 x regulators), cells, quick cells) of cellrl.model.random_model
MODEL_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "3000_genes": (3000, 10, 108, 2500, 1200), "demo": (400, 6, 20, 2400, 2400)}


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, ISA flags, cores, torch/numpy versions and threads, BLAS libraries."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            fields.setdefault(k.strip().lower(), v.strip())
    except OSError:
        pass
    model = fields.get("model name")
    if not model:
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
            model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
                         None)
        except (OSError, subprocess.SubprocessError):
            pass
    if not model and "cpu part" in fields:
        model = f"CPU implementer {fields.get('cpu implementer')} part {fields['cpu part']}"
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    try:
        from threadpoolctl import threadpool_info

        blas = [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                for d in threadpool_info() if d.get("user_api") == "blas"]
    except Exception as e:  # pragma: no cover - informational only
        blas = [{"error": str(e)}]
    try:
        import torch as th

        torch_info = dict(torch_cpu_capability=th.backends.cpu.get_cpu_capability(), torch=th.__version__)
    except ImportError:
        torch_info = dict(torch_cpu_capability=None, torch=None)
    return dict(cpu_model=model or platform.processor() or platform.machine(), arch=platform.machine(),
                isa={f: f in flags for f in ("avx2", "avx512f", "neon", "asimd", "sve")},
                **torch_info, cores=len(os.sched_getaffinity(0)), os_cpu_count=os.cpu_count(),
                torch_threads=threads, numpy=np.__version__, blas=blas, python=platform.python_version(),
                host=platform.node(), gpu=gpu_info())


def machine_with_load(threads: int = 1) -> dict[str, Any]:
    """:func:`machine_info` plus the load average now (the machine is often shared with other jobs)."""
    return {**machine_info(threads), "loadavg": os.getloadavg()}


def gpu_info() -> dict[str, Any] | None:
    """Name, memory and CuPy / CUDA versions of the GPU CuPy sees (None without CuPy or a GPU)."""
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() == 0:
            return None
        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return dict(name=name, memory_gib=round(props["totalGlobalMem"] / 2**30, 1), cupy=cp.__version__,
                    cuda_runtime=cp.cuda.runtime.runtimeGetVersion())
    except Exception:
        return None


