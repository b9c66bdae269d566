"""Next-cell models (cellrl.transitions.next_cell): hand-made cases with known answers, stagnation when the
simulated change is zero or small, agreement with a dense brute-force reference, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from cellrl import transitions as T
from cellrl.model import random_model
from cellrl.transitions import next_cell as nc

MODELS = ("pca", "pca_step", "pca_direction", "pca_step_direction", "prob_max")
SETTINGS = dict(n_propagation=3, n_neighbors=20, sampled_fraction=0.3, sigma_corr=0.05, knn_random=True, seed=0,
                backend="numpy")

# five cells on a line in a 2-D PCA space: 0 at the origin, 1 at x=1, 2 at x=2, 3 at x=10, 4 at y=3
SCORES = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0], [0.0, 3.0]])


def _space(k: int):
    """PcaSpace of SCORES (identity loadings) with k candidates per cell."""
    X = SCORES - SCORES.mean(axis=0)
    return nc.pca_space(X, 2, k)


def _step(model: str, s: np.ndarray, k: int = 2, P: np.ndarray | None = None, nbr: np.ndarray | None = None,
          gain: float = 4.0):
    """Next cell of cell 0 for displacement(s) ``s`` (A, 2) under ``model``."""
    sp_ = _space(k)
    cells = np.array([0])
    s = np.asarray(s, dtype=np.float64)[None]  # (1, A, 2)
    if model == "pca_step_direction":
        return nc.pca_step_direction(np, s, gain, sp_.scores, cells, sp_.candidates[cells], sp_.radius[cells],
                                     sp_.half_gap[cells], sp_.nearest)[0]
    if model == "pca_step":  # the engine's call: pca_nearest on the displacement times step_gain
        model, s = "pca", gain * s
    if model == "pca":
        return nc.pca_nearest(np, s, sp_.scores, cells, sp_.candidates[cells], sp_.radius[cells], sp_.nearest)[0]
    if model == "pca_direction":
        return nc.pca_direction(np, s, sp_.scores, cells, sp_.candidates[cells], sp_.half_gap[cells])[0]
    return nc.prob_max(np, P[None], s, cells, nbr[None], sp_.half_gap[cells])[0]


def test_pca_space_is_the_data_and_its_neighbours():
    sp_ = _space(3)
    # PCA keeps all distances of 2-D data (rotation + sign only)
    d0 = np.linalg.norm(SCORES[:, None] - SCORES[None], axis=2)
    d1 = np.linalg.norm(sp_.scores[:, None] - sp_.scores[None], axis=2)
    np.testing.assert_allclose(d1, d0, atol=1e-12)
    np.testing.assert_allclose(sp_.loadings.T @ sp_.loadings, np.eye(2), atol=1e-12)
    assert sp_.candidates[0].tolist() == [1, 2, 4] and sp_.candidates[3].tolist() == [2, 1, 0]
    np.testing.assert_allclose(sp_.half_gap, [0.5, 0.5, 0.5, 4.0, 1.5])
    np.testing.assert_allclose(sp_.radius[0], 3.0)
    assert (sp_.candidates != np.arange(5)[:, None]).all()


def test_pca_space_with_duplicate_cells():
    """A cell listed after its duplicate (or not at all) is still dropped from its own candidates."""
    X = np.vstack([SCORES, SCORES[1], SCORES[1]])  # cells 5 and 6 duplicate cell 1
    sp_ = nc.pca_space(X - X.mean(axis=0), 2, 3)
    assert (sp_.candidates != np.arange(7)[:, None]).all() and sp_.candidates.shape == (7, 3)
    assert {5, 6} <= set(sp_.candidates[1]) and {1, 6} <= set(sp_.candidates[5])
    assert sp_.half_gap[[1, 5, 6]].tolist() == [0.0, 0.0, 0.0] and sp_.half_gap[0] == pytest.approx(0.5)


def test_pca_nearest_known_answers():
    s = [[0.0, 0.0], [0.4, 0.0], [0.6, 0.0], [1.9, 0.1], [0.0, 2.0], [-5.0, 0.0], [9.0, 0.0]]
    # zero and small (< half the gap to cell 1) changes stay; 0.6 reaches past the midpoint to cell 1; (1.9, 0.1)
    # is nearest to cell 2; (0, 2) to cell 4; (-5, 0) points away from every cell: still nearest to itself;
    # (9, 0) is nearest to cell 3, outside the 2 candidates: the KD-tree answers it
    assert _step("pca", s, k=2).tolist() == [0, 0, 1, 2, 4, 0, 3]


def test_pca_step_known_answers():
    s = [[0.0, 0.0], [0.1, 0.0], [0.3, 0.0], [0.45, 0.02], [0.0, 0.5], [2.2, 0.0], [-1.0, 0.0]]
    # step_gain 4: zero stays; 0.1 -> 0.4, still nearest to itself (a stagnation, as pca's 0.4); 0.3 -> 1.2, cell 1
    # (pca would stay); 0.45 -> 1.8, cell 2; (0, 0.5) -> (0, 2), cell 4; 2.2 -> 8.8, cell 3 (outside the 2
    # candidates: the KD-tree answers it); pointing away from every cell: stays
    assert _step("pca_step", s, k=2).tolist() == [0, 0, 1, 2, 4, 3, 0]
    assert _step("pca", s, k=2).tolist() == [0, 0, 0, 0, 0, 2, 0]
    # step_gain 1 is pca
    assert _step("pca_step", s, k=2, gain=1.0).tolist() == _step("pca", s, k=2).tolist()


def test_pca_step_gain_is_checked_and_keyed():
    from cellrl.errors import ConfigError

    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="step_gain"):
            T.TransitionSettings.from_dict({"next_cell": "pca_step", "step_gain": bad})
    a = T.TransitionSettings.from_dict({"next_cell": "pca_step", "step_gain": 2.0}).result_keys()
    b = T.TransitionSettings.from_dict({"next_cell": "pca_step", "step_gain": 4.0}).result_keys()
    assert a != b  # a resumed table never mixes gains
    c = T.TransitionSettings.from_dict({"next_cell": "pca_direction", "step_gain": 2.0}).result_keys()
    assert "step_gain" not in c  # the other models' chunk keys do not change


def test_pca_direction_known_answers():
    s = [[0.0, 0.0], [0.4, 0.0], [0.6, 0.01], [0.1, 0.6], [-5.0, 0.0]]
    # zero and small stay; along x -> the nearest candidate in that direction (cell 1 before 2: first on ties of
    # the cosine); mostly y -> cell 4; pointing away from all candidates: the least misaligned (cell 4 at 90
    # degrees against cells 1, 2 at 180) -- a move, since the change is large
    assert _step("pca_direction", s, k=3).tolist() == [0, 0, 1, 4, 4]


def test_pca_step_direction_known_answers():
    s = [[0.0, 0.0], [0.1, 0.0], [0.3, 0.0], [0.45, 0.02], [2.2, 0.0], [-1.0, 0.0], [0.02, 0.9]]
    # pca_step where it moves (0.3 -> cell 1, 0.45 -> cell 2, 2.2 -> cell 3); where the gained step stays:
    # zero and 0.1 (|s| < r/2 = 0.5) still stay; (-1, 0) points into the void behind cell 0 (pca_step stays) but
    # |s| > r/2: the least misaligned candidate, as pca_direction (cell 4 at 90 degrees); (0.02, 0.9) -> (0.08,
    # 3.6): nearest to cell 4 as pca_step
    got = _step("pca_step_direction", s, k=3).tolist()
    assert got == [0, 0, 1, 2, 3, 4, 4]
    step, direction = _step("pca_step", s, k=3), _step("pca_direction", s, k=3)
    assert got == np.where(step != 0, step, direction).tolist()


def test_prob_max_known_answers():
    nbr = np.array([1, 3, 4])
    P = np.array([[0.2, 0.7, 0.1], [0.2, 0.7, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    s = [[0.0, 0.0], [0.6, 0.0], [0.6, 0.0]]
    # no change: stay even with a clear winner; resolvable change: the most probable neighbour (cell 3);
    # uniform probabilities: the first neighbour (ties), as CellOracle's kernel gives no preference
    assert _step("prob_max", s, P=P, nbr=nbr).tolist() == [0, 3, 1]


@pytest.fixture(scope="module")
def model():
    return random_model(n_cells=300, n_genes=30, n_types=3, n_regulators=4, seed=3)


@pytest.mark.parametrize("which", MODELS)
def test_zero_delta_is_a_stagnation(which):
    """A knockout of a gene already 0 everywhere changes nothing: every model keeps the cell."""
    m = random_model(n_cells=300, n_genes=30, n_types=3, n_regulators=3, seed=1)
    m.X[:, int(m.regulator_idx[0])] = 0.0
    m.ko_values[:] = 0.0
    table, acts, stats = T.compute_table(m, dict(SETTINGS, actions="ko", next_cell=which), progress=False)
    assert (table[:, 0] == np.arange(m.n_cells)).all()
    assert stats["next_cell"] == which and stats["pca_components"] is not None
    assert (table[:, 1:] != np.arange(m.n_cells)[:, None]).any()  # the other knockouts do move cells


@pytest.mark.parametrize("n_pcs", [None, 10])  # 30 PCs: NearestCell's brute-force search; 10: its KD-tree
@pytest.mark.parametrize("which", MODELS)
def test_table_equals_dense_reference(model, which, n_pcs):
    """The chunked table equals the model's definition applied to the dense simulated delta (brute force)."""
    s = dict(SETTINGS, next_cell=which, chunk_cells=37, n_pcs=n_pcs)
    table, _, _ = T.compute_table(model, s, progress=False, threads=2)
    sim = T.simulate_actions(model, s)
    ps = nc.pca_space(model.X, nc.n_pcs_of(n_pcs, model.meta), s["n_neighbors"])
    assert ps.nearest.brute == (n_pcs is None)
    disp = sim["delta"] @ ps.loadings  # (A, N, d)
    N = model.n_cells
    P = ps.scores
    gate = np.linalg.norm(disp, axis=2) > ps.half_gap[None]
    D = P[ps.candidates] - P[:, None, :]
    cos = np.einsum("and,nkd->ank", disp, D) / np.linalg.norm(D, axis=2)[None]
    aligned = np.where(gate, ps.candidates[np.arange(N)[None], cos.argmax(axis=2)], np.arange(N)[None])
    if which in ("pca", "pca_step", "pca_step_direction"):  # nearest of all cells to p_i + g s (i included)
        g = T.TransitionSettings().step_gain if which != "pca" else 1.0
        d2 = ((P[None, :, None, :] + g * disp[:, :, None, :] - P[None, None, :, :]) ** 2).sum(axis=3)
        ref = d2.argmin(axis=2)
        if which == "pca_step_direction":  # where the gained step stays: pca_direction's answer
            ref = np.where(ref == np.arange(N)[None], aligned, ref)
    else:
        if which == "pca_direction":
            best = aligned
        else:  # prob_max: P_ij is not exposed by the engine (its argmax is the hand-made case above); the gate
            best = table.T  # is checked here: every cell whose change is under r_i / 2 stays
        ref = np.where(gate, best, np.arange(N)[None])
    np.testing.assert_array_equal(table, ref.T)
    assert 0.0 < (table == np.arange(N)[:, None]).mean() < 1.0  # both stagnations and moves occur


@pytest.mark.parametrize("backend", ["numpy", "standin"])
@pytest.mark.parametrize("d", [3, 30])
def test_nearest_cell_is_exact_with_first_index_on_ties(d, backend, request):
    """NearestCell (KD-tree up to KD_TREE_MAX_DIMS PCs, float32 filter + float64 check above) equals the dense
    float64 search; above, exact ties (duplicate cells) go to the lowest index. ``standin``: the queries in another
    array module (the GPU path's search, on the CPU stand-in for CuPy)."""
    xp = request.getfixturevalue("standin_backend") if backend == "standin" else np
    rng = np.random.default_rng(d)
    P = rng.normal(size=(400, d)) * np.linspace(5.0, 0.1, d)  # PCA-like: variance falling along the PCs
    P[[10, 200, 399]] = P[50]  # duplicates of cell 50
    near = nc.NearestCell(P)
    assert near.brute == (d > nc.KD_TREE_MAX_DIMS)
    Q = np.vstack([P[rng.integers(0, 400, 300)] + rng.normal(size=(300, d)) * s  # near cells, gaps, far voids
                   for s in (0.01, 0.5, 5.0)] + [P[[50, 10, 7]], 1e3 * np.ones((1, d))])
    got = near(xp.asarray(Q), xp)
    assert isinstance(got, np.ndarray)
    d2 = ((Q[:, None, :] - P[None]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(d2[np.arange(len(Q)), got], d2.min(axis=1))
    if near.brute:
        np.testing.assert_array_equal(got, d2.argmin(axis=1))  # first on ties
        assert got[-4] == got[-3] == 10 and got[-2] == 7
    assert len(set(got[:900].tolist())) > 100  # a real search, not one cell
    # the moving cell itself wins exact ties (a duplicate is no move); the first index otherwise
    dup = np.array([399, 200, 50])
    assert near(xp.asarray(P[dup]), xp, prefer=xp.asarray(dup)).tolist() == dup.tolist()
    assert len(set(near(xp.asarray(P[dup]), xp).tolist())) == 1


def test_duplicate_cell_stays_where_the_search_leaves_the_candidates():
    """A step the candidates cannot certify goes to the all-cell search; there a cell and its duplicate tie, and
    the cell stays (as the candidate path would): a duplicate is the same expression state, not a move."""
    X = np.vstack([SCORES, SCORES[1]])  # cell 5 duplicates cell 1
    sp_ = nc.pca_space(X - X.mean(axis=0), 2, 2)
    u = sp_.scores[4] - sp_.scores[1]
    s = np.tile(0.6 * u / np.linalg.norm(u), (2, 1, 1))  # 0.6 towards cell 4: nearest to cells 1 and 5 alike
    cells = np.array([1, 5])
    assert (0.6 > sp_.radius[cells] - 0.6).all()  # not certified by the 2 candidates: the all-cell search answers
    got = nc.pca_nearest(np, s, sp_.scores, cells, sp_.candidates[cells], sp_.radius[cells], sp_.nearest)
    assert got[:, 0].tolist() == [1, 5]


@pytest.mark.parametrize("which", MODELS)
def test_same_config_same_table(model, which, tmp_path):
    s = dict(SETTINGS, next_cell=which)
    t1, _, st1 = T.compute_table(model, dict(s, chunk_cells=50), progress=False, threads=1)
    t2, _, st2 = T.compute_table(model, dict(s, chunk_cells=17), progress=False, threads=2)
    assert st1["table_sha256"] == st2["table_sha256"]
    ref, _, _ = T.compute_table(model, dict(SETTINGS, next_cell="celloracle"), progress=False)
    assert not np.array_equal(t1, ref)  # the setting reaches the engine


def test_next_cell_setting_is_checked():
    from cellrl.errors import ConfigError

    with pytest.raises(ConfigError, match="next_cell"):
        T.TransitionSettings.from_dict({"next_cell": "umap"})
    with pytest.raises(ConfigError, match="n_pcs"):
        T.TransitionSettings.from_dict({"n_pcs": 0})


@pytest.mark.parametrize("shape", [(40, 10), (12, 30)])
def test_pca_space_matches_svd(shape):
    """Both eigendecompositions (genes <= cells: covariance; more genes: Gram matrix) give the SVD's components,
    signed so that each component's largest-magnitude loading is positive."""
    X = np.random.default_rng(5).gamma(2.0, 1.0, shape)
    sp_ = nc.pca_space(X, 4, 3)
    Xc = X - X.mean(axis=0)
    _, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    L = Vt[:4].T
    L = L * np.where(L[np.abs(L).argmax(axis=0), np.arange(4)] < 0, -1.0, 1.0)
    np.testing.assert_allclose(sp_.loadings, L, atol=1e-9)
    np.testing.assert_allclose(sp_.scores, Xc @ L, atol=1e-9)


@pytest.mark.parametrize("which", ("pca", "pca_step", "pca_direction", "pca_step_direction"))
def test_pca_models_skip_the_embedding_path_with_the_same_table(model, which, monkeypatch):
    """pca / pca_step / pca_direction read only the PCA displacement: the table runner samples no embedding
    neighbours and computes no correlation, probabilities or shift for them, and the table is the one the full
    CellOracle path gives (simulate_actions always runs it: its next cells are the pre-skip table)."""
    from cellrl.transitions import runner

    s = dict(SETTINGS, next_cell=which, chunk_cells=41)
    full = T.simulate_actions(model, s)
    assert np.abs(full["shift"]).sum() > 0  # the embedding path ran there

    def banned(*a, **k):
        raise AssertionError("embedding path computed for a PCA next-cell model")

    for name in ("sample_neighbors", "correlation", "transition_probabilities", "embedding_shift", "unit_vectors"):
        monkeypatch.setattr(runner, name, banned)
    table, _, stats = T.compute_table(model, s, progress=False, threads=2)
    np.testing.assert_array_equal(table, full["next_cell"].T)
    assert stats["mean_shift"] is None and "mean_shift_per_action" not in stats
    assert stats["n_neighbors_sampled"] is None and stats["clipped_pair_fraction"] > 0


@pytest.mark.parametrize("which", ("celloracle", "prob_max"))
def test_embedding_models_keep_the_shift_statistics(model, which):
    _, acts, stats = T.compute_table(model, dict(SETTINGS, next_cell=which), progress=False)
    assert stats["mean_shift"] > 0 and stats["n_neighbors_sampled"] == int(0.3 * 21)
    assert len(stats["mean_shift_per_action"]) == len(acts)


def test_pca_models_still_check_n_neighbors():
    from cellrl.errors import InputError

    m = random_model(n_cells=50, n_genes=20, n_types=2, n_regulators=2)
    with pytest.raises(InputError, match="n_neighbors"):
        T.compute_table(m, dict(SETTINGS, n_neighbors=200, next_cell="pca_direction"), progress=False)


@pytest.mark.parametrize("which", ["pca", "pca_step", "pca_direction", "pca_step_direction"])
def test_array_module_branches_equal_numpy(model, which, standin_backend):
    """The branches the CuPy backend takes (``xp is not numpy``: no numba offsets, one block, index arrays moved
    to the backend) give the numpy path's next cells (CPU stand-in module, conftest ``standin_backend``)."""
    assert standin_backend is not np
    ps = nc.pca_space(model.X, nc.n_pcs_of(None, model.meta), 30)
    rng = np.random.default_rng(1)
    cells = rng.choice(model.n_cells, 120, replace=False)
    s = rng.normal(size=(len(cells), 5, ps.scores.shape[1])) * rng.choice([0.0, 0.05, 1.0, 5.0], size=(1, 5, 1))
    args = (s, 4.0, ps.scores, cells, ps.candidates[cells], ps.radius[cells], ps.half_gap[cells], ps.nearest)
    got = nc.pca_next_cells(standin_backend, which, *args)
    ref = nc.pca_next_cells(np, which, *args)
    np.testing.assert_array_equal(got, ref)
    assert 0.0 < (ref == cells[:, None]).mean() < 1.0  # both stays and moves
