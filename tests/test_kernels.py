"""Native kernels (cellrl.kernels): the fused low-rank Adam step and the one-pass inference product."""

from __future__ import annotations

import pytest
import torch as th

from cellrl import kernels

LIB = kernels.load()
pytestmark = pytest.mark.skipif(LIB is None, reason="no C compiler: the native kernels cannot be built here")


def _torch_step(w, m, v, g, step, lr=3e-4, scale=None):
    kw = {} if scale is None else {"grad_scale": th.tensor(scale)}
    th._fused_adam_([w], [g], [m], [v], [], [th.tensor(float(step))], lr=lr, beta1=0.9, beta2=0.999,
                    weight_decay=0.0, eps=1e-5, amsgrad=False, maximize=False, **kw)


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("K,R,C,scale", [(64, 512, 3000, 2.5), (1, 37, 75, None), (10, 4, 16, 1.7), (3, 9, 131, None),
                                         (10, 130, 2100, 1.3)])
def test_lowrank_adam_is_torch_mm_plus_fused_adam_bit_for_bit(K, R, C, scale, generic):
    """Bit for bit where torch's kernel takes its vector path (all elements when each thread's share is a
    multiple of 16 floats, as at 3,000 genes); torch computes the few leftover elements in double precision,
    so those agree to float rounding."""
    lib = kernels.load(("-DCELLRL_GENERIC",)) if generic else LIB
    assert lib.cellrl_kernel_isa() == (0 if generic else lib.cellrl_kernel_isa())
    gen = th.Generator().manual_seed(K * 1000 + C)
    w = th.randn(R, C, generator=gen) * 0.02
    m = th.randn(R, C, generator=gen) * 1e-3
    v = th.rand(R, C, generator=gen) * 1e-5
    gy = th.randn(K, R, generator=gen) * 0.1
    x = th.randn(K, C, generator=gen)
    ref = [t.clone() for t in (w, m, v)]
    for step in (1, 2, 7):
        _torch_step(*ref, gy.t() @ x, step, scale=scale)
        kernels.lowrank_adam_(lib, w, m, v, gy, x, lr=3e-4, beta1=0.9, beta2=0.999, eps=1e-5, step=step,
                              grad_scale=scale, threads=2)
        for name, a, b in zip(("weight", "exp_avg", "exp_avg_sq"), (w, m, v), ref):
            if (R * C) % 32 == 0:
                assert th.equal(a, b), f"{name} differs at step {step}: max {float((a - b).abs().max())}"
            else:
                th.testing.assert_close(a, b, rtol=2e-6, atol=1e-12, msg=f"{name} at step {step}")


def test_lowrank_adam_threads_do_not_change_results():
    gen = th.Generator().manual_seed(3)
    base = [th.randn(130, 333, generator=gen) for _ in range(2)] + [th.rand(130, 333, generator=gen)]
    gy, x = th.randn(64, 130, generator=gen), th.randn(64, 333, generator=gen)
    out = []
    for threads in (1, 2):
        w, m, v = (t.clone() for t in base)
        kernels.lowrank_adam_(LIB, w, m, v, gy, x, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=3,
                              threads=threads)
        out.append((w, m, v))
    for a, b in zip(*out):
        assert th.equal(a, b)


def test_lowrank_adam_rejects_bad_shapes():
    w = th.zeros(4, 6)
    with pytest.raises(ValueError, match="do not make"):
        kernels.lowrank_adam_(LIB, w, th.zeros(4, 6), th.zeros(4, 6), th.zeros(2, 4), th.zeros(3, 6), lr=1e-3,
                              beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    with pytest.raises(ValueError, match="exp_avg must be"):
        kernels.lowrank_adam_(LIB, w, th.zeros(6, 4), th.zeros(4, 6), th.zeros(2, 4), th.zeros(2, 6), lr=1e-3,
                              beta1=0.9, beta2=0.999, eps=1e-8, step=1)


@pytest.mark.parametrize("K,R,C", [(8, 512, 3000), (1, 3, 17), (64, 130, 333)])
def test_linear_forward_matches_matmul(K, R, C):
    gen = th.Generator().manual_seed(R)
    w, x = th.randn(R, C, generator=gen), th.randn(K, C, generator=gen)
    th.testing.assert_close(kernels.linear_forward(LIB, w, x, threads=2), x @ w.t(), rtol=1e-5, atol=1e-4)


def test_build_is_cached_and_atomic(tmp_path):
    a = kernels.build(out_dir=tmp_path)
    mtime = a.stat().st_mtime_ns
    assert kernels.build(out_dir=tmp_path) == a and a.stat().st_mtime_ns == mtime
    assert [p.name for p in a.parent.iterdir()] == ["liblowrank_adam.so"]     # no temporary files left
