"""Persistent engine (cellrl.persistent.engine): whole applied sets simulated from the current cell, == CellOracle.

Evidence, as for the table engine (tests/test_transitions.py, whose CellOracle transcription and fixtures are reused):
* single-gene sets are the table's actions: next cell == ``table[i, a]`` for every cell and action, delta equal;
* 2- and 3-gene sets (mixed KO/OE, a pin downstream of another pin, clipping, a knockout of a gene at 0 that
  is therefore not pinned, near-duplicate cells, negative expression) equal the transcription of CellOracle's code
  that calls its own ``_do_simulation`` with a multi-gene ``simulation_input`` and velocyto's correlation kernel;
* real CellOracle: ``Oracle.simulate_shift(perturb_condition={g1: v1, g2: v2, ...})`` ->
  ``estimate_transition_prob`` -> ``calculate_embedding_shift`` on the fitted demo and Paul15 oracles: delta within
  1e-6, next cell identical for 100 % of cells;
* determinism and batch independence; masks and set updates.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp

from cellrl import transitions as T
from cellrl.model import random_model
from cellrl.persistent.engine import KO, OE, PersistentEngine
from test_transitions import _celloracle_reference, _float32_embedding, _unpack

SETTINGS = dict(n_propagation=3, n_neighbors=30, sampled_fraction=0.3, sigma_corr=0.05, knn_random=True, seed=7,
                backend="numpy")


def _set(engine: PersistentEngine, actions: list[int], n: int) -> np.ndarray:
    """(n, R) applied sets: the same ``actions`` applied in order to every row."""
    ap = np.zeros((n, engine.n_regulators), np.int8)
    for a in actions:
        ap = engine.apply(ap, np.full(n, a))
    return ap


def _perturb_condition(model, engine: PersistentEngine, actions: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Gene indices and values of a set, as CellOracle's ``perturb_condition`` would get them."""
    r = engine.action_regulator[actions]
    vals = np.where(engine.action_code[actions] == KO, model.ko_values[r], model.oe_values[r])
    return model.regulator_idx[r], vals.astype(float)


def _linked_pair(model) -> tuple[int, int]:
    """Two regulators (r1, r2) with an edge r1 -> r2 in some cluster: a pin downstream of another pin."""
    reg = model.regulator_idx
    for r1 in range(len(reg)):
        for r2 in range(len(reg)):
            if r1 != r2 and any(W[reg[r1], reg[r2]] != 0 for W in model.coefs):
                return r1, r2
    raise AssertionError("no regulator -> regulator edge in this model")


def _check_sets(model, settings, sets, seed, min_clipped=0):
    """Engine vs the CellOracle transcription for each set (applied to every cell)."""
    eng = PersistentEngine.from_model(model, settings)
    cells = np.arange(model.n_cells)
    clipped = 0
    for acts in sets:
        ap = _set(eng, acts, model.n_cells)
        genes, vals = _perturb_condition(model, eng, acts)
        ref_delta, ref_shift = _celloracle_reference(model, genes, vals, n_neighbors=settings["n_neighbors"],
                                                     seed=seed)
        # the transcription really pinned every gene of the set (where its input is non-zero)
        d_in = vals[None, :] - model.X[:, genes]
        np.testing.assert_allclose(ref_delta[:, genes][d_in != 0], d_in[d_in != 0], atol=1e-12)
        delta = eng.delta(cells, ap)
        np.testing.assert_allclose(delta, ref_delta, rtol=1e-10, atol=1e-12)
        out = eng.simulate(cells, ap)
        np.testing.assert_allclose(out["shift"], ref_shift, rtol=0, atol=1e-10)
        assert (T.nearest_cells(model.embedding, ref_shift) == out["next_cell"]).all()
        assert (eng.step(cells, ap) == out["next_cell"]).all()
        free = np.ones(model.n_genes, bool)
        free[genes] = False
        clipped += int(((model.X + delta == 0) & (model.X > 0) & free[None, :]).sum())
    assert clipped >= min_clipped, clipped
    return eng


# --------------------------------------------------------------------------------------------------- unit
def test_single_gene_sets_are_the_table(small_model):
    s = dict(SETTINGS, seed=0)
    table, acts, _ = T.compute_table(small_model, s, progress=False)
    ref = T.simulate_actions(small_model, s)
    eng = PersistentEngine.from_model(small_model, s)
    assert eng.n_actions == len(acts) == 2 * eng.n_regulators
    cells = np.arange(small_model.n_cells)
    for a in range(eng.n_actions):
        ap = _set(eng, [a], small_model.n_cells)
        assert (eng.step(cells, ap) == table[:, a]).all(), f"action {a}"
        np.testing.assert_allclose(eng.delta(cells, ap), ref["delta"][a], rtol=1e-12, atol=1e-13)


def test_sets_equal_celloracle_code():
    """2- and 3-gene sets, mixed KO/OE, one pin downstream of another (pins change the operator, so the sum of
    single-gene responses is not the answer: checked), on a random model (float32 embedding as from scanpy)."""
    m = _float32_embedding(random_model(n_cells=400, n_genes=40, n_types=4, n_regulators=5, seed=3))
    R = m.n_regulators
    r1, r2 = _linked_pair(m)
    r3 = next(r for r in range(R) if r not in (r1, r2))
    sets = [[r1, R + r2], [R + r1, r2], [r1, r2, R + r3], [R + r3, R + r1, r2]]
    eng = _check_sets(m, SETTINGS, sets, seed=7)
    cells = np.arange(m.n_cells)
    ap = _set(eng, sets[0], m.n_cells)
    single = sum(eng.delta(cells, _set(eng, [a], m.n_cells)) for a in sets[0])
    assert np.abs(eng.delta(cells, ap) - single).max() > 1e-3  # the pins interact


def test_sets_with_clipping_equal_celloracle_code():
    """Repression everywhere and low expression: max(X + d, 0) clips at every hop (on the regulators and at the
    last hop) for many (cell, gene); still CellOracle's result."""
    m = _float32_embedding(random_model(n_cells=400, n_genes=40, n_types=4, n_regulators=5, seed=8))
    m.coefs = [sp.csr_matrix(W.toarray() * -3.0) for W in m.coefs]
    m.X = m.X * np.random.default_rng(2).uniform(0.0, 1.0, m.X.shape)
    m.oe_values = m.oe_values * 3.0
    R = m.n_regulators
    r1, r2 = _linked_pair(m)
    r3 = next(r for r in range(R) if r not in (r1, r2))
    _check_sets(m, dict(SETTINGS, seed=2), [[R + r1, r2], [R + r1, R + r2, R + r3], [r3, R + r2, R + r1]],
                seed=2, min_clipped=100)


def test_knockout_of_a_silent_gene_is_not_pinned():
    """CellOracle re-pins only genes whose input differs from the cell's value: a knockout of a gene already at 0
    leaves it free, so the propagation can move it (here: another pin upstream of it)."""
    m = _float32_embedding(random_model(n_cells=400, n_genes=40, n_types=4, n_regulators=5, seed=3))
    R = m.n_regulators
    r1, r2 = _linked_pair(m)
    m.X[::2, m.regulator_idx[r2]] = 0.0  # half the cells: the knocked-out gene is silent
    _check_sets(m, SETTINGS, [[R + r1, r2]], seed=7)


def test_near_duplicates_and_negative_expression_equal_celloracle_code():
    """Near-duplicate neighbours (the expanded numerator would cancel: formed from D) and a cell with negative
    expression (every gene clips untouched): still CellOracle's result."""
    from sklearn.neighbors import NearestNeighbors

    m = _float32_embedding(random_model(n_cells=400, n_genes=40, n_types=4, n_regulators=5, seed=11))
    nn1 = NearestNeighbors(n_neighbors=2).fit(m.embedding).kneighbors(return_distance=False)[:, 1]
    rng = np.random.default_rng(0)
    for i in range(0, m.n_cells, 3):
        j = int(nn1[i])
        m.X[j] = m.X[i] if i % 2 else m.X[i] * (1 + 1e-9 * rng.standard_normal(m.n_genes))
    R = m.n_regulators
    eng = _check_sets(m, dict(SETTINGS, seed=5), [[0, R + 3], [R + 1, 2, 4]], seed=5)
    assert eng.any_near
    m2 = copy.deepcopy(m)
    m2.X[5] -= 3.0
    eng2 = _check_sets(m2, dict(SETTINGS, seed=5), [[0, R + 3]], seed=5)
    assert eng2.any_negative


def test_deterministic_and_batch_independent():
    m = random_model(n_cells=500, n_genes=60, n_types=3, n_regulators=8, seed=4)
    eng = PersistentEngine.from_model(m, SETTINGS)
    rng = np.random.default_rng(1)
    n = 3000
    cells = rng.integers(0, m.n_cells, n)
    ap = np.zeros((n, eng.n_regulators), np.int8)
    for _ in range(3):
        mask = eng.action_mask(ap)
        ap = eng.apply(ap, np.array([rng.choice(np.flatnonzero(r)) for r in mask]))
    a = eng.step(cells, ap)
    assert np.array_equal(a, eng.step(cells, ap))
    assert np.array_equal(a, PersistentEngine.from_model(m, SETTINGS).step(cells, ap))
    perm = rng.permutation(n)
    assert np.array_equal(a[perm], eng.step(cells[perm], ap[perm]))
    parts = np.concatenate([eng.step(cells[i:i + 7], ap[i:i + 7]) for i in range(0, 70, 7)])
    assert np.array_equal(parts, a[:70])
    eng2 = PersistentEngine.from_model(m, SETTINGS, threads=2)  # a batch split over two threads
    assert np.array_equal(a, eng2.step(cells, ap))
    assert 0.0 < float((a == cells).mean()) < 1.0  # some stagnations, mostly moves


def test_gathered_neighbour_differences_equal_precomputed(monkeypatch):
    """Above ZD_MAX_BYTES the neighbour differences of [Z | X_R] are gathered at each step instead of stored:
    same shifts and next cells."""
    import cellrl.persistent.engine as E

    m = random_model(n_cells=500, n_genes=60, n_types=3, n_regulators=8, seed=4)
    stored = PersistentEngine.from_model(m, SETTINGS)
    monkeypatch.setattr(E, "ZD_MAX_BYTES", 0)
    gathered = PersistentEngine.from_model(m, SETTINGS)
    assert stored.ZD is not None and gathered.ZD is None
    cells = np.arange(m.n_cells)
    ap = _set(stored, [0, 8 + 3, 5], m.n_cells)
    a, b = stored.simulate(cells, ap), gathered.simulate(cells, ap)
    np.testing.assert_allclose(a["shift"], b["shift"], rtol=0, atol=1e-12)
    assert np.array_equal(a["next_cell"], b["next_cell"])


def test_masks_and_set_updates(small_model):
    eng = PersistentEngine.from_model(small_model, SETTINGS)
    R = eng.n_regulators
    assert eng.regulators == list(small_model.regulators) and eng.n_actions == 2 * R
    ap = eng.apply(np.zeros((2, R), np.int8), np.array([1, R + 4]))
    assert ap[0, 1] == KO and ap[1, 4] == OE and ap.sum() == KO + OE and ap.dtype == np.int8
    mask = eng.action_mask(ap)
    assert mask.shape == (2, 2 * R)
    assert not mask[0, 1] and not mask[0, R + 1] and mask[0].sum() == 2 * R - 2  # KO and OE of gene 1 exclude
    assert not mask[1, 4] and not mask[1, R + 4] and mask[1].sum() == 2 * R - 2
    with pytest.raises(ValueError, match="already in the set"):
        eng.apply(ap, np.array([R + 1, 0]))
    empty = np.zeros((small_model.n_cells, R), np.int8)  # an empty set moves nothing: a stagnation
    cells = np.arange(small_model.n_cells)
    assert np.abs(eng.delta(cells, empty)).max() == 0.0
    assert (eng.step(cells, empty) == cells).mean() > 0.99


@pytest.mark.parametrize("which", ["celloracle", "pca_step_direction", "prob_max"])
def test_gpu_branches_equal_numpy(which, standin_backend):
    """The engine's GPU path (sparse products and row sums on the backend, backend index arrays) gives the numpy
    engine's next cells over three growing set steps, run on the CPU stand-in for CuPy (conftest
    ``standin_backend``)."""
    m = random_model(n_cells=600, n_genes=60, n_types=4, n_regulators=6, seed=5)
    s = dict(SETTINGS, n_neighbors=40, next_cell=which)
    engines = [PersistentEngine.from_model(m, dict(s, backend=b)) for b in ("numpy", "cupy")]
    assert engines[0].xp is np and engines[1].xp is standin_backend
    rng = np.random.default_rng(0)
    start = rng.integers(0, m.n_cells, 300)
    cells = [start, start]
    ap = np.zeros((300, engines[0].n_regulators), np.int8)
    for _ in range(3):
        a = np.argmax(np.where(engines[0].action_mask(ap), rng.random((300, engines[0].n_actions)), -1), axis=1)
        ap = engines[0].apply(ap, a)
        cells = [np.asarray(e.step(c, ap)) for e, c in zip(engines, cells)]
        np.testing.assert_array_equal(cells[1], cells[0])
    assert (cells[0] != start).mean() > 0.1  # the sets move cells


@pytest.mark.gpu
def test_cupy_equals_numpy():
    cp = pytest.importorskip("cupy", reason="CuPy is not installed (pip install cupy-cuda12x)")
    try:
        if cp.cuda.runtime.getDeviceCount() == 0:  # pragma: no cover
            pytest.skip("CuPy sees no CUDA device")
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"CuPy sees no CUDA device: {e}")
    m = random_model(n_cells=2000, n_genes=300, n_types=5, n_regulators=12, seed=11)
    s = dict(SETTINGS, n_neighbors=50)
    e_np = PersistentEngine.from_model(m, s)
    e_cp = PersistentEngine.from_model(m, dict(s, backend="cupy"))
    rng = np.random.default_rng(0)
    cells = rng.integers(0, m.n_cells, 4000)
    ap = _set(e_np, [0, 12 + 3, 5], 4000)
    assert (e_np.step(cells, ap) == e_cp.step(cells, ap)).mean() >= 0.999


# ------------------------------------------------------------------------------- real CellOracle oracles
def _check_against_celloracle(fitted, n_sets: int = 3) -> list[dict]:
    """CellOracle's own multi-gene ``simulate_shift`` on a copy of the oracle vs the engine, for 2- and 3-gene
    sets with a pin downstream of another pin (when the network has such an edge) and mixed KO/OE."""
    oracle, model = _unpack(fitted)
    o = copy.deepcopy(oracle)
    eng = PersistentEngine.from_model(model, dict(SETTINGS, n_neighbors=200, seed=0))
    R = eng.n_regulators
    reg = model.regulator_idx
    pairs = [(a, b) for a in range(R) for b in range(R) if a != b and any(W[reg[a], reg[b]] != 0 for W in model.coefs)]
    r1, r2 = pairs[0] if pairs else (0, 1)
    r3 = next(r for r in range(R) if r not in (r1, r2))
    sets = [[r1, R + r2], [R + r1, r2, R + r3], [r1, r2, r3]][:n_sets]
    cells = np.arange(model.n_cells)
    report = []
    for acts in sets:
        genes, vals = _perturb_condition(model, eng, acts)
        cond = {str(model.gene_names[g]): float(v) for g, v in zip(genes, vals)}
        o.simulate_shift(perturb_condition=cond, n_propagation=3, ignore_warning=True)
        o.estimate_transition_prob(n_neighbors=200, knn_random=True, sampled_fraction=0.3, random_seed=0,
                                   calculate_randomized=False)
        o.calculate_embedding_shift(sigma_corr=0.05)
        ref_delta = np.asarray(o.adata.layers["delta_X"])
        ref_shift = np.asarray(o.delta_embedding)
        ap = _set(eng, acts, model.n_cells)
        delta = eng.delta(cells, ap)
        scale = max(float(np.abs(ref_delta).max()), 1e-12)
        np.testing.assert_allclose(delta, ref_delta, rtol=1e-6, atol=1e-6 * scale)
        out = eng.simulate(cells, ap)
        finite = np.isfinite(ref_shift).all(axis=1)  # CellOracle gives NaN rows where two cells share coordinates
        assert finite.mean() > 0.99
        np.testing.assert_allclose(out["shift"][finite], ref_shift[finite], rtol=0, atol=1e-5)
        ref_next = T.nearest_cells(model.embedding, ref_shift)
        same = float((ref_next == out["next_cell"])[finite].mean())
        free = np.ones(model.n_genes, bool)
        free[genes] = False
        report.append({"set": cond, "next_cell_identical": same,
                       "delta_max_rel_err": float(np.abs(delta - ref_delta).max() / scale),
                       "shift_max_abs_err": float(np.abs(out["shift"][finite] - ref_shift[finite]).max()),
                       "clipped_entries": int(((model.X + ref_delta == 0) & (model.X > 0) & free).sum()),
                       "pins_linked": bool(pairs)})
        assert same == 1.0, report[-1]
    print(report)
    return report


@pytest.mark.slow
def test_sets_equal_celloracle_demo(demo_fitted):
    report = _check_against_celloracle(demo_fitted)
    assert report[0]["pins_linked"]
    assert sum(r["clipped_entries"] for r in report) > 0  # clipping acted in CellOracle's own result


@pytest.mark.slow
def test_sets_equal_celloracle_paul15(paul15_fitted):
    _check_against_celloracle(paul15_fitted)


@pytest.mark.parametrize("next_cell", ["pca_direction", "pca", "pca_step", "pca_step_direction", "prob_max"])
def test_single_gene_sets_are_the_table_other_next_cell_models(small_model, next_cell):
    """With ``transitions.next_cell`` other than celloracle, a one-gene set's next cell is still the table's (the
    engine reuses cellrl.transitions.next_cell on the set's PCA displacement)."""
    s = dict(SETTINGS, seed=0, next_cell=next_cell, n_pcs=10)
    table, acts, _ = T.compute_table(small_model, s, progress=False)
    eng = PersistentEngine.from_model(small_model, s)
    cells = np.arange(small_model.n_cells)
    moved = 0
    for a in range(eng.n_actions):
        ap = _set(eng, [a], small_model.n_cells)
        nxt = eng.step(cells, ap)
        assert (nxt == table[:, a]).all(), f"action {a}"
        moved += int((nxt != cells).sum())
    assert moved > 0


def test_sets_pca_direction_displacement_is_delta_times_loadings():
    """Multi-gene sets with clipping: the displacement behind pca_direction is the dense delta times the
    loadings, and the next cell is pca_direction's on it."""
    from cellrl.transitions import next_cell as nc

    m = _float32_embedding(random_model(n_cells=400, n_genes=40, n_types=4, n_regulators=5, seed=8))
    m.coefs = [sp.csr_matrix(W.toarray() * -3.0) for W in m.coefs]
    m.X = m.X * np.random.default_rng(2).uniform(0.0, 1.0, m.X.shape)
    R = m.n_regulators
    eng = PersistentEngine.from_model(m, dict(SETTINGS, next_cell="pca_direction", n_pcs=8))
    cells = np.arange(m.n_cells)
    for acts in ([0, R + 1], [R + 0, 1, R + 2]):
        ap = _set(eng, acts, m.n_cells)
        s = eng.delta(cells, ap) @ eng.pca.loadings
        ref = nc.pca_direction(np, s[:, None, :], eng.pca.scores, cells, eng.pca.candidates, eng.pca.half_gap)[:, 0]
        assert (eng.step(cells, ap) == ref).all()


@pytest.mark.parametrize("next_cell", ["pca_direction", "pca", "pca_step", "pca_step_direction", "prob_max"])
def test_rows_sharing_cells_equal_one_row_at_a_time(small_model, next_cell):
    """The PCA next-cell models pack the rows of one cell together (blocks of 64): many sets from a few cells in
    one batch give the next cells of one-row calls."""
    eng = PersistentEngine.from_model(small_model, dict(SETTINGS, seed=0, next_cell=next_cell, n_pcs=10))
    R, A = eng.n_regulators, eng.n_actions
    pairs = [(a, b) for a in range(A) for b in range(A) if a % R != b % R]
    cells = np.repeat(np.array([5, 17, 250]), len(pairs))[: 2 * len(pairs) + 70]
    rng = np.random.default_rng(0)
    rng.shuffle(cells)
    ap = np.zeros((cells.size, R), np.int8)
    for i in range(cells.size):
        a, b = pairs[i % len(pairs)]
        ap[i] = eng.apply(eng.apply(ap[i:i + 1], [a]), [b])[0]
    batch = eng.step(cells, ap)
    one = np.array([eng.step(cells[i:i + 1], ap[i:i + 1])[0] for i in range(cells.size)])
    assert (batch == one).all()
    assert (batch != cells).any()
