"""Native CPU kernels, compiled on first use with the machine's C compiler and loaded with ctypes.

Two kernels (source: ``lowrank_adam.c``): :func:`lowrank_adam_`, the weight gradient of a linear layer from
its two thin factors fused with torch's Adam update in one pass over the weight and Adam state, and
:func:`linear_forward`, a one-pass ``x @ W.T`` for batches of a few rows. It is built with ``-O3 -march=native -fopenmp -ffp-contract=off`` into
``_build/<key>/`` (``CELLRL_KERNEL_DIR`` overrides the folder), where the key hashes the source, the flags, the
compiler and this CPU's feature flags, so a shared checkout on nodes with different CPUs builds one library
per CPU kind. The library links the OpenMP runtime already loaded by torch (same soname), so its threads are
torch's threads. :func:`load` returns None (and logs why once) when no compiler is found or the build fails;
callers then fall back to plain PyTorch, which computes the same maths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("cellrl.kernels")

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "lowrank_adam.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c11"]

_tried: dict[tuple, ctypes.CDLL | None] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    return cc if cc and shutil.which(cc) else None


def build(extra_flags: tuple[str, ...] = (), out_dir: str | Path | None = None) -> Path:
    """Compile ``lowrank_adam.c`` (if not already built for this source, compiler and CPU); return the .so path.

    Raises RuntimeError with the compiler's message when the build fails. The library is written to a
    temporary name and renamed, so concurrent builds never load a half-written file.
    """
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    flags = FLAGS + list(extra_flags)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(flags), cc, *version, _cpu_flags()])
                         .encode()).hexdigest()[:16]
    root = Path(out_dir or os.environ.get("CELLRL_KERNEL_DIR") or HERE / "_build")
    target = root / key / "liblowrank_adam.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE} failed:\n{res.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    f, i64, p = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p
    lib.cellrl_lowrank_adam.argtypes = [p, p, p, p, p, i64, i64, i64, f, f, f, f, f, f, f, f, ctypes.c_int,
                                        ctypes.c_int]
    lib.cellrl_lowrank_adam.restype = ctypes.c_int
    lib.cellrl_kernel_isa.restype = ctypes.c_int
    lib.cellrl_linear_forward.argtypes = [p, p, i64, i64, i64, p, ctypes.c_int]
    lib.cellrl_linear_forward.restype = None
    return lib


def load(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it cannot be built here (the reason is logged once).

    ``CELLRL_NATIVE_KERNELS=0`` disables it (plain PyTorch is used instead).
    """
    if os.environ.get("CELLRL_NATIVE_KERNELS", "1") == "0" and not extra_flags:
        return None
    key = tuple(extra_flags)
    if key not in _tried:
        import torch  # noqa: F401  (load torch's OpenMP runtime first: the kernel then shares it)
        try:
            _tried[key] = _bind(ctypes.CDLL(str(build(extra_flags))))
        except (RuntimeError, OSError) as e:
            log.warning("native kernels unavailable, using PyTorch (same maths, slower): %s", e)
            _tried[key] = None
    return _tried[key]


def lowrank_adam_(lib: ctypes.CDLL, weight, exp_avg, exp_avg_sq, grad_out, inp, *, lr: float, beta1: float,
                  beta2: float, eps: float, step: int, grad_scale: float | None = None, threads: int = 1) -> None:
    """One Adam step of ``weight`` [R x C] with gradient ``grad_out^T @ inp`` (torch tensors, float32, CPU).

    ``grad_out`` [K x R], ``inp`` [K x C]; ``step`` is the step number after incrementing (as torch's Adam);
    the gradient is divided by ``grad_scale`` when given (clipping). Updates ``weight``, ``exp_avg`` and
    ``exp_avg_sq`` in place, bit-identical to ``torch._fused_adam_`` on ``grad_out.T @ inp`` (bias corrections
    in double precision rounded to float32, as there).
    """
    import torch as th

    R, C = weight.shape
    for name, t in (("weight", weight), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != th.float32 or not t.is_contiguous() or t.device.type != "cpu" or tuple(t.shape) != (R, C):
            raise ValueError(f"lowrank_adam_: {name} must be a contiguous float32 CPU tensor of shape {(R, C)}")
    gt = grad_out.detach().t().contiguous().float()
    x = inp.detach().contiguous().float()
    if gt.shape[0] != R or x.shape[1] != C or x.shape[0] != gt.shape[1]:
        raise ValueError(f"lowrank_adam_: factors {tuple(grad_out.shape)} and {tuple(inp.shape)} do not make a "
                         f"{(R, C)} gradient")
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    f32 = ctypes.c_float
    rc = lib.cellrl_lowrank_adam(
        weight.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), gt.data_ptr(), x.data_ptr(), x.shape[0], R, C,
        f32(beta1), f32(beta2), f32(1 - beta1), f32(1 - beta2), f32(lr / bc1), f32(bc2 ** 0.5), f32(eps),
        f32(grad_scale or 1.0), int(grad_scale is not None), int(threads))
    if rc != 0:
        raise MemoryError("lowrank_adam_: out of memory packing the input")


def linear_forward(lib: ctypes.CDLL, weight, x, threads: int = 1):
    """``x @ weight.T`` (no bias) for a few rows ``x`` [K x C] and ``weight`` [R x C]: one pass over the weight.

    For inference batches (a rollout step has 8 rows) where BLAS reads the whole weight at a fraction of the
    memory bandwidth. Same products, summed in another order than BLAS (float rounding).
    """
    import torch as th

    R, C = weight.shape
    w = weight.detach()
    xx = x.detach().contiguous()
    if w.dtype != th.float32 or xx.dtype != th.float32 or not w.is_contiguous() or xx.shape[-1] != C:
        raise ValueError("linear_forward: float32 contiguous weight [R x C] and input [K x C] expected")
    y = th.empty(xx.shape[0], R, dtype=th.float32)
    lib.cellrl_linear_forward(w.data_ptr(), xx.data_ptr(), xx.shape[0], R, C, y.data_ptr(), int(threads))
    return y
