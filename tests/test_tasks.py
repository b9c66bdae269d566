"""Task geometry: scaler on training cells only, centroids, goal sets, curriculum order, action masks."""

from __future__ import annotations

import numpy as np
import pytest

from cellrl.errors import InputError
from cellrl.model import random_model
from cellrl.tasks import TaskGeometry, _group_percentile, allowed_mask, validate_table


@pytest.fixture(scope="module")
def model():
    return random_model(n_cells=400, n_genes=30, n_types=5, n_regulators=6, seed=3)


@pytest.fixture(scope="module")
def geo(model):
    return TaskGeometry.from_model(model)


def _cos(a, b):
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def test_scaler_uses_training_cells_only(model, geo):
    train = model.split == "train"
    np.testing.assert_allclose(geo.mean, model.X[train].mean(0))
    np.testing.assert_allclose(geo.std, model.X[train].std(0))
    assert geo.z.dtype == np.float32 and geo.z.shape == model.X.shape
    np.testing.assert_allclose(geo.z[train].mean(0), 0, atol=1e-4)
    # Changing held-out cells changes nothing fitted on training cells.
    m2 = random_model(n_cells=400, n_genes=30, n_types=5, n_regulators=6, seed=3)
    m2.X = m2.X.copy()
    m2.X[~train] *= 10
    g2 = TaskGeometry.from_model(m2)
    np.testing.assert_allclose(g2.mean, geo.mean)
    np.testing.assert_allclose(g2.centroids, geo.centroids, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g2.goal_threshold, geo.goal_threshold)


def test_centroids_thresholds_and_goals_match_a_loop(model, geo):
    """The vectorised geometry equals a plain per-type loop of the definitions."""
    train = model.split == "train"
    for t in range(len(model.cluster_names)):
        zt = geo.z[train & (geo.type_ids == t)].astype(np.float64)
        m = zt.mean(0)
        d = np.array([1 - _cos(r, m) for r in zt])
        keep = d <= np.percentile(d, 95) + 1e-7
        c = zt[keep].mean(0)
        np.testing.assert_allclose(geo.centroids[t], c, rtol=1e-4, atol=1e-5)
        dc = np.array([1 - _cos(r, c) for r in zt])
        np.testing.assert_allclose(geo.goal_threshold[t], np.percentile(dc, 25), rtol=1e-4, atol=1e-6)
        all_d = np.array([1 - _cos(r, c) for r in geo.z.astype(np.float64)])
        expect = (geo.type_ids == t) & (all_d <= geo.goal_threshold[t] + 1e-6)
        assert (geo.goal_mask[t] != expect).sum() <= 1       # float32 ties at the threshold at most
        np.testing.assert_allclose(geo.cos_sim[:, t], 1 - all_d, atol=1e-5)
    # about a quarter of each type's training cells are goal cells
    frac = [geo.goal_mask[t, train & (geo.type_ids == t)].mean() for t in range(geo.n_types)]
    assert all(0.15 < f < 0.4 for f in frac)


def test_group_percentile_equals_numpy():
    rng = np.random.default_rng(0)
    v = rng.normal(size=500)
    g = rng.integers(0, 7, 500)
    for q in (0, 25, 50, 95, 100):
        got = _group_percentile(v, g, 7, q)
        want = [np.percentile(v[g == k], q) for k in range(7)]
        np.testing.assert_allclose(got, want)


def test_umap_centroid_order(model, geo):
    emb_c = np.stack([model.embedding[(model.split == "train") & (model.cluster_ids == t)].mean(0)
                      for t in range(geo.n_types)])
    for s in range(geo.n_types):
        order = geo.umap_centroid_order(s)
        assert s not in order and len(order) == geo.n_types - 1
        d = np.linalg.norm(emb_c[order] - emb_c[s], axis=1)
        assert np.all(np.diff(d) >= 0)
    assert geo.target_order().shape == (geo.n_types, geo.n_types - 1)


def test_allowed_mask_semantics():
    split = np.array(["train", "train", "val", "test", "train"])
    table = np.array([[0, 1, 2], [3, 1, 4], [2, 0, -1], [3, 3, 3], [1, 4, 0]], dtype=np.int32)
    test_mask = allowed_mask(table, split, training=False)
    np.testing.assert_array_equal(test_mask, [[0, 1, 1], [1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1]])
    train_mask = allowed_mask(table, split, training=True)
    np.testing.assert_array_equal(train_mask, [[0, 1, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1]])


def test_unknown_type_and_bad_tables(geo, model):
    assert geo.type_index(str(geo.type_names[2])) == 2
    with pytest.raises(InputError, match="unknown target cell type 'Nope'.*known types"):
        geo.type_index("Nope")
    good = np.zeros((model.n_cells, model.n_actions), np.int64)
    assert validate_table(good, model.n_cells, model.n_actions).dtype == np.int32
    with pytest.raises(InputError, match="does not match the model"):
        validate_table(good[:, :-1], model.n_cells, model.n_actions)
    with pytest.raises(InputError, match="out of range"):
        validate_table(good + model.n_cells, model.n_cells, model.n_actions)
    with pytest.raises(InputError, match="integer"):
        validate_table(good.astype(float), model.n_cells, model.n_actions)


def test_type_without_training_cells_is_an_input_error():
    m = random_model(n_cells=200, n_genes=10, n_types=3, n_regulators=3, seed=1)
    m.split = np.where(m.cluster_ids == 2, "test", m.split)
    with pytest.raises(InputError, match="without training cells"):
        TaskGeometry.from_model(m)
