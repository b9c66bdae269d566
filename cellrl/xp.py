"""Array-module switch: numpy on CPU, CuPy on GPU, one code path.

``get_xp("auto")`` returns CuPy when it imports and sees a GPU, else numpy. ``to_numpy`` brings arrays home.
``blas_threads`` caps NumPy's BLAS threads where other threads already use the cores.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any, ContextManager

import numpy as np


def cupy_available() -> bool:
    """True when CuPy imports and at least one CUDA device is visible."""
    try:
        import cupy  # type: ignore

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_xp(backend: str = "auto") -> ModuleType:
    """Return the array module for ``backend`` in {"auto", "numpy", "cupy"}."""
    if backend == "numpy":
        return np
    if backend in ("cupy", "auto"):
        if cupy_available():
            import cupy  # type: ignore

            return cupy
        if backend == "cupy":
            raise RuntimeError("backend 'cupy' requested but CuPy or a CUDA GPU is not available; "
                               "install the 'gpu' extra (pip install cupy-cuda12x) or set transitions.backend: numpy")
        return np
    raise ValueError(f"unknown backend {backend!r}; use auto, numpy or cupy")


def to_numpy(a: Any) -> np.ndarray:
    """Convert a numpy or CuPy array to numpy."""
    if hasattr(a, "get"):
        return a.get()
    return np.asarray(a)


def blas_threads(n: int | None) -> ContextManager:
    """Context manager: NumPy's BLAS limited to ``n`` threads (no-op for None)."""
    if n is None:
        return contextlib.nullcontext()
    return _controller().limit(limits=n, user_api="blas")


_CONTROLLER: list = []  # [(number of loaded modules, ThreadpoolController)]


def _controller() -> Any:
    """A threadpoolctl controller, kept while no module was imported since (finding the loaded libraries takes
    ~2 ms per call; a new import may load another BLAS)."""
    import sys

    from threadpoolctl import ThreadpoolController

    if not _CONTROLLER or _CONTROLLER[0][0] != len(sys.modules):
        ctl = ThreadpoolController()
        _CONTROLLER[:] = [(len(sys.modules), ctl)]
    return _CONTROLLER[0][1]
