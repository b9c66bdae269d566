"""Transition engine (cellrl.transitions): equal to CellOracle, bounded memory, resumable, deterministic.

Three levels of evidence:
* unit: the neighbour sampler replays numpy's ``RandomState.choice`` bit for bit; propagation equals CellOracle's
  ``_do_simulation``; the whole chain equals a transcription of CellOracle's code that calls its own
  ``_do_simulation`` and velocyto's ``colDeltaCorpartial`` (``_celloracle_reference``), on a small random model;
* real CellOracle: ``Oracle.simulate_shift -> estimate_transition_prob -> calculate_embedding_shift`` on the
  fitted Paul15 subset and demo oracles (fixtures ``paul15_fitted`` / ``demo_fitted`` from conftest), 3 regulators
  x {KO, OE}: delta == ``layers["delta_X"]`` (1e-6 relative), shift == ``delta_embedding`` (1e-5), next cell
  identical for >= 99.9 % of cells;
* table files: determinism (same bytes), resume after an interruption, memory without cells x cells arrays,
  CuPy == numpy (skipped without CuPy and a GPU).

Ties: the next cell is the KD-tree nearest neighbour of ``E_i + shift_i``. Our shift and CellOracle's differ by
~1e-14 (summation order), so the two next cells can differ only when two cells are equidistant from the shifted
point to within ~1e-14, which has not happened on these data (measured: 100 % identical); the 99.9 % bound leaves
room for such exact ties.
"""

from __future__ import annotations

import copy
import json
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellrl import transitions as T
from cellrl.errors import ConfigError, InputError
from cellrl.model import random_model

SETTINGS = dict(n_propagation=3, n_neighbors=200, sampled_fraction=0.3, sigma_corr=0.05, knn_random=True, seed=0)


# ----------------------------------------------------------------------------------------------- helpers
def _celloracle_reference(model, gene: int, value: float, n_propagation=3, n_neighbors=200, sampled_fraction=0.3,
                          sigma_corr=0.05, knn_random=True, seed=0):
    """CellOracle 0.20.0's simulate_shift (GRN_unit cluster) + estimate_transition_prob + calculate_embedding_shift
    transcribed on plain arrays, calling its own _do_simulation and velocyto's correlation kernels."""
    from celloracle.trajectory.oracle_GRN import _do_simulation
    from sklearn.neighbors import NearestNeighbors
    from velocyto.estimation import colDeltaCor, colDeltaCorpartial

    genes = model.gene_names.astype(str)
    X = np.asarray(model.X, dtype=np.float64)
    gem = pd.DataFrame(X, columns=genes)
    sim_in = gem.copy()
    sim_in[genes[gene]] = value
    parts = []
    for c in np.unique(model.cluster_ids):
        W = pd.DataFrame(model.coefs[c].toarray(), index=genes, columns=genes)
        m = model.cluster_ids == c
        parts.append(_do_simulation(coef_matrix=W, simulation_input=sim_in[m], gem=gem[m],
                                    n_propagation=n_propagation))
    delta = pd.concat(parts, axis=0).reindex(gem.index).values - X

    E = model.embedding.astype(np.float32)  # obsm embeddings are float32 in AnnData from scanpy
    nn = NearestNeighbors(n_neighbors=n_neighbors + 1)
    nn.fit(E)
    knn = nn.kneighbors_graph(mode="connectivity")
    if knn_random:
        state = np.random.get_state()
        np.random.seed(seed)
        neigh_ixs = knn.indices.reshape((-1, n_neighbors + 1))
        p = np.linspace(0.5, 0.1, neigh_ixs.shape[1])
        p = p / p.sum()
        sampling_ixs = np.stack([np.random.choice(neigh_ixs.shape[1], size=(int(sampled_fraction * (n_neighbors + 1)),),
                                                  replace=False, p=p) for _ in range(neigh_ixs.shape[0])], 0)
        np.random.set_state(state)
        neigh_ixs = neigh_ixs[np.arange(neigh_ixs.shape[0])[:, None], sampling_ixs]
        nz = neigh_ixs.size
        knn = sp.csr_matrix((np.ones(nz), neigh_ixs.ravel(), np.arange(0, nz + 1, neigh_ixs.shape[1])),
                            shape=(neigh_ixs.shape[0], neigh_ixs.shape[0]))
        corr = colDeltaCorpartial(np.ascontiguousarray(X.T), np.ascontiguousarray(delta.T), neigh_ixs)
        corr[np.isnan(corr)] = 1
    else:
        corr = colDeltaCor(np.ascontiguousarray(X.T), np.ascontiguousarray(delta.T))
        np.fill_diagonal(corr, 0)
    tp = np.exp(corr / sigma_corr) * knn.toarray()
    tp /= tp.sum(1)[:, None]
    uv = E.T[:, None, :] - E.T[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv /= np.linalg.norm(uv, ord=2, axis=0)
        np.fill_diagonal(uv[0, ...], 0)
        np.fill_diagonal(uv[1, ...], 0)
    de = (tp * uv).sum(2)
    de -= (knn.toarray() * uv).sum(2) / knn.sum(1).A.T
    return delta, de.T


def _float32_embedding(model):
    m = copy.copy(model)
    m.embedding = model.embedding.astype(np.float32).astype(np.float64)
    m.meta = dict(model.meta, embedding_dtype="float32")  # CellOracle saw float32 (as from scanpy's UMAP)
    return m


def _unpack(fx):
    """(oracle, model) from a conftest fixture: a tuple (oracle, links, model[, truth]) or an object/dict."""
    if isinstance(fx, dict):
        return fx["oracle"], fx["model"]
    if hasattr(fx, "oracle"):
        return fx.oracle, fx.model
    return fx[0], fx[2]


def _check_against_celloracle(oracle, model, n_regulators=3, seed=0):
    """Run CellOracle's own per-perturbation calls on a copy of the oracle and compare with the engine."""
    o = copy.deepcopy(oracle)
    acts = T.build_actions(model, "both")
    R = model.n_regulators
    regs = np.unique(np.linspace(0, R - 1, min(n_regulators, R)).round().astype(int))
    ids = np.concatenate([regs, R + regs])
    ours = T.simulate_actions(model, dict(SETTINGS, seed=seed, backend="numpy"), action_ids=ids)
    assert model.embedding.shape == (o.adata.n_obs, 2)
    report = []
    for j, a in enumerate(ids):
        gene, value = acts.genes[a], float(acts.values[a])
        o.simulate_shift(perturb_condition={gene: value}, n_propagation=3, ignore_warning=True)
        o.estimate_transition_prob(n_neighbors=200, knn_random=True, sampled_fraction=0.3, random_seed=seed,
                                   calculate_randomized=False)
        o.calculate_embedding_shift(sigma_corr=0.05)
        ref_delta = np.asarray(o.adata.layers["delta_X"])
        ref_shift = np.asarray(o.delta_embedding)
        if j == 0:  # same sampled neighbours, same order
            assert np.array_equal(o.embedding_knn.indices.reshape(o.adata.n_obs, -1), ours["neighbors"])
        scale = max(float(np.abs(ref_delta).max()), 1e-12)
        np.testing.assert_allclose(ours["delta"][j], ref_delta, rtol=1e-6, atol=1e-6 * scale)
        finite = np.isfinite(ref_shift).all(axis=1)  # CellOracle gives NaN rows if two cells share coordinates
        assert finite.mean() > 0.99
        np.testing.assert_allclose(ours["shift"][j][finite], ref_shift[finite], rtol=0, atol=1e-5)
        ref_next = T.nearest_cells(model.embedding, ref_shift)
        same = float((ref_next == ours["next_cell"][j])[finite].mean())
        assert same >= 0.999, f"{acts.kinds[a]} {gene}: next cell identical for only {same:.4%}"
        rel = float(np.abs(ours["delta"][j] - ref_delta).max() / scale)
        err = float(np.abs(ours["shift"][j][finite] - ref_shift[finite]).max())
        report.append((acts.kinds[a], gene, same, rel, err))
    print("\n".join(f"{k} {g}: next cell identical {s:.4%}, delta max rel err {r:.1e}, shift max abs err {e:.1e}"
                    for k, g, s, r, e in report))
    return report


# ------------------------------------------------------------------------------------------------ unit
@pytest.mark.parametrize("m,size,n,seed", [(201, 60, 2000, 0), (201, 60, 500, 15071990), (11, 10, 300, 3),
                                           (31, 9, 1000, 1)])
def test_weighted_choice_replays_numpy(m, size, n, seed):
    p = np.linspace(0.5, 0.1, m)
    p = p / p.sum()
    fast = T.weighted_choice_rows(np.random.RandomState(seed), n, m, size, p)
    rs = np.random.RandomState(seed)
    slow = np.stack([rs.choice(m, size=(size,), replace=False, p=p) for _ in range(n)])
    assert np.array_equal(fast, slow)


def test_union_is_unique_with_inverse():
    """The Gram blocks' neighbour union by marking equals np.unique(return_inverse) (duplicates, gaps, one row)."""
    from cellrl.transitions.maths import _union

    rng = np.random.default_rng(3)
    for nb in (rng.integers(0, 50, (7, 9)), np.array([[4, 4, 4]]), rng.integers(40, 50, (3, 30))):
        uni, inv = _union(np, nb, 50)
        ref_uni, ref_inv = np.unique(nb.ravel(), return_inverse=True)
        np.testing.assert_array_equal(uni, ref_uni)
        np.testing.assert_array_equal(inv, ref_inv.reshape(nb.shape))


def test_blas_threads_limits_and_restores():
    """blas_threads(1) caps NumPy's BLAS inside the block and restores it after, reusing its threadpoolctl
    controller until a module is imported."""
    from threadpoolctl import threadpool_info

    from cellrl import xp as xpmod

    def blas() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas()
    with xpmod.blas_threads(1):
        assert blas() and set(blas()) == {1}
        ctl = xpmod._controller()
    assert blas() == before
    assert xpmod._controller() is ctl  # no import since: the same controller
    import sys

    sys.modules["_cellrl_test_marker"] = sys  # a new module: the controller is rebuilt
    try:
        assert xpmod._controller() is not ctl
    finally:
        del sys.modules["_cellrl_test_marker"]
    with xpmod.blas_threads(None):
        assert blas() == before


def test_propagation_equals_do_simulation(small_model):
    from celloracle.trajectory.oracle_GRN import _do_simulation

    m = small_model
    acts = T.build_actions(m, "both")
    genes = m.gene_names.astype(str)
    for c in range(len(m.cluster_names)):
        plan = T.plan_cluster(np, m.coefs[c], acts, 3, all_genes=False)
        cells = np.flatnonzero(m.cluster_ids == c)
        packed = T.propagate(np, m.X[cells][:, plan.genes], plan, acts.values, 3)  # (T, n)
        d = T.unpack(np, packed, plan, len(acts))  # (n, A, |U|)
        W = pd.DataFrame(m.coefs[c].toarray(), index=genes, columns=genes)
        gem = pd.DataFrame(m.X[cells], columns=genes)
        for a in range(len(acts)):
            sim_in = gem.copy()
            sim_in[acts.genes[a]] = acts.values[a]
            ref = _do_simulation(W, sim_in, gem, 3).values - m.X[cells]
            full = np.zeros_like(ref)
            full[:, plan.genes] = d[:, a]
            np.testing.assert_allclose(full, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("knn_random", [True, False])
def test_engine_equals_celloracle_code_on_random_model(knn_random):
    m = _float32_embedding(random_model(n_cells=400, n_genes=40, n_types=4, n_regulators=5, seed=3))
    s = dict(SETTINGS, n_neighbors=30, knn_random=knn_random, seed=7, backend="numpy")
    ids = [0, 2, 5, 9]
    ours = T.simulate_actions(m, s, action_ids=ids, chunk_cells=37)
    acts = T.build_actions(m)
    for j, a in enumerate(ids):
        delta, shift = _celloracle_reference(m, int(acts.gene_idx[a]), float(acts.values[a]), n_neighbors=30,
                                             knn_random=knn_random, seed=7)
        np.testing.assert_allclose(ours["delta"][j], delta, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ours["shift"][j], shift, rtol=0, atol=1e-10)
        assert (T.nearest_cells(m.embedding, shift) == ours["next_cell"][j]).mean() >= 0.999


def test_near_duplicate_cells_match_celloracle_exactly():
    """Cells whose expression equals (or nearly equals) an embedding neighbour's: the engine's expanded
    |X_j|^2 + |X_i|^2 - 2 X_i.X_j form would lose every digit there, so it forms D = X_j - X_i explicitly
    (EXACT_BELOW); the result must still be CellOracle's to 1e-10."""
    from sklearn.neighbors import NearestNeighbors

    m = _float32_embedding(random_model(n_cells=400, n_genes=40, n_types=4, n_regulators=5, seed=11))
    nn1 = NearestNeighbors(n_neighbors=2).fit(m.embedding).kneighbors(return_distance=False)[:, 1]
    rng = np.random.default_rng(0)
    for i in range(0, m.n_cells, 3):  # a third exact copies, a third within 1e-9 relative
        j = int(nn1[i])
        m.X[j] = m.X[i] if i % 2 else m.X[i] * (1 + 1e-9 * rng.standard_normal(m.n_genes))
    s = dict(SETTINGS, n_neighbors=30, seed=5, backend="numpy")
    ids = [0, 3, 6]
    ours = T.simulate_actions(m, s, action_ids=ids, chunk_cells=41)
    acts = T.build_actions(m)
    for j, a in enumerate(ids):
        delta, shift = _celloracle_reference(m, int(acts.gene_idx[a]), float(acts.values[a]), n_neighbors=30,
                                             seed=5)
        np.testing.assert_allclose(ours["shift"][j], shift, rtol=0, atol=1e-10)
        assert (T.nearest_cells(m.embedding, shift) == ours["next_cell"][j]).mean() >= 0.999


@pytest.mark.parametrize("case", ["random", "duplicates", "grid", "float32", "clumps"])
def test_knn_like_sklearn_is_sklearn(case):
    """The fast neighbour search returns sklearn's indices, tie order included (ties go to sklearn's tree)."""
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(1)
    E = {"random": rng.normal(size=(1500, 2)),
         "duplicates": np.repeat(rng.normal(size=(400, 2)), 3, axis=0),
         "grid": np.stack(np.meshgrid(np.arange(40), np.arange(40)), -1).reshape(-1, 2).astype(float),
         "float32": rng.normal(size=(1200, 2)).astype(np.float32),
         "clumps": np.repeat(rng.normal(size=(6, 2)), 150, axis=0)}[case]
    for k in (11, 201):
        ref = NearestNeighbors(n_neighbors=k).fit(E).kneighbors(return_distance=False)
        assert np.array_equal(T.knn_like_sklearn(E, k), ref)


def test_threads_do_not_change_the_table(small_model):
    s = dict(SETTINGS, n_neighbors=30, backend="numpy", chunk_cells=23)
    t1, _, st1 = T.compute_table(small_model, s, threads=1)
    t2, _, st2 = T.compute_table(small_model, s, threads=2)
    assert st1["threads"] == 1 and st2["threads"] == 2 and st1["n_chunks"] > 4
    assert st1["table_sha256"] == st2["table_sha256"]


def test_zero_delta_is_a_stagnation():
    """A knockout of a gene that is already 0 everywhere with no effect: CellOracle's correlations are NaN -> 1,
    probabilities uniform, shift ~0, next cell = the cell itself."""
    m = random_model(n_cells=300, n_genes=30, n_types=3, n_regulators=3, seed=1)
    g = int(m.regulator_idx[0])
    m.X[:, g] = 0.0
    m.ko_values[:] = 0.0
    table, acts, stats = T.compute_table(m, dict(SETTINGS, n_neighbors=20, actions="ko", backend="numpy"))
    assert (table[:, 0] == np.arange(m.n_cells)).all()
    assert stats["self_transition_fraction_per_action"][f"KO:{acts.genes[0]}"] == 1.0


def test_negative_expression_uses_every_gene():
    m = random_model(n_cells=200, n_genes=20, n_types=2, n_regulators=2, seed=2)
    m.X[0, :] -= 10.0
    ctx = T.prepare(m, T.TransitionSettings(n_neighbors=20, backend="numpy"), np)
    assert all(p.genes.size == m.n_genes for p in ctx.plans)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="unknown setting"):
        T.TransitionSettings.from_dict({"n_neighbours": 3})
    with pytest.raises(ConfigError, match="actions"):
        T.TransitionSettings.from_dict({"actions": "all"})
    with pytest.raises(InputError, match="n_neighbors"):
        T.compute_table(random_model(n_cells=50, n_genes=20, n_types=2, n_regulators=2), {"n_neighbors": 200})


def test_backend_fallback_says_why():
    xp, why = T.select_backend("numpy")
    assert xp is np and "numpy" in why
    xp, why = T.select_backend("auto")
    assert why.startswith("cupy") or ("numpy" in why and "CuPy" in why)


# -------------------------------------------------------------------------------- table files and chunks
def test_table_files_deterministic(tmp_path, small_model):
    p = tmp_path / "model.npz"
    small_model.save(p)
    outs = []
    for run in ("a", "b"):
        d = tmp_path / run
        st = T.transitions_files(p, d / "table.npy", d / "actions.tsv", d / "stats.json", chunk_dir=d / "chunks",
                                 **dict(SETTINGS, n_neighbors=30, backend="numpy", chunk_cells=None, actions="both"))
        outs.append((d / "table.npy").read_bytes())
        assert not (d / "chunks").exists()  # removed after success
    assert outs[0] == outs[1]
    table = np.load(tmp_path / "a" / "table.npy")
    assert table.dtype == np.int32 and table.shape == (small_model.n_cells, 2 * small_model.n_regulators)
    assert table.min() >= 0 and table.max() < small_model.n_cells
    acts = pd.read_csv(tmp_path / "a" / "actions.tsv", sep="\t")
    assert list(acts.columns) == ["index", "gene", "kind", "value"]
    assert list(acts["kind"]) == ["KO"] * 6 + ["OE"] * 6
    assert list(acts["gene"][:6]) == list(small_model.regulators)
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    import hashlib

    assert stats["table_sha256"] == hashlib.sha256(table.tobytes()).hexdigest()
    for key in ("self_transition_fraction_per_action", "mean_shift", "time_s", "peak_rss_bytes", "backend",
                "backend_reason"):
        assert key in stats
    assert len(stats["self_transition_fraction_per_action"]) == 12
    # chunking does not change the table
    t2, _, _ = T.compute_table(small_model, dict(SETTINGS, n_neighbors=30, backend="numpy", chunk_cells=7))
    assert np.array_equal(t2, table)


def test_sparse_and_dense_linear_part_agree(monkeypatch):
    m = random_model(n_cells=500, n_genes=60, n_types=3, n_regulators=8, seed=4)
    s = dict(SETTINGS, n_neighbors=30, backend="numpy", chunk_cells=64)
    monkeypatch.setattr(T, "SPARSE_Q_BELOW", 0.0)
    dense = T.simulate_actions(m, s)
    monkeypatch.setattr(T, "SPARSE_Q_BELOW", 2.0)
    sparse = T.simulate_actions(m, s)
    np.testing.assert_allclose(sparse["shift"], dense["shift"], rtol=0, atol=1e-12)
    assert (sparse["next_cell"] == dense["next_cell"]).mean() >= 0.999


def test_clipping_corrections_match_celloracle(monkeypatch):
    """Strong repressive edges and low expression make max(X + d, 0) clip for many (cell, action) pairs, where
    delta is no longer c r: those pairs go through the exact correction (and, in small batches, several
    batches); the result must still be CellOracle's."""
    m = _float32_embedding(random_model(n_cells=400, n_genes=40, n_types=4, n_regulators=5, seed=8))
    m.coefs = [sp.csr_matrix(W.toarray() * -3.0) for W in m.coefs]  # repression everywhere
    m.X = m.X * np.random.default_rng(2).uniform(0.0, 1.0, m.X.shape)  # low targets clip
    m.oe_values = m.oe_values * 3.0
    monkeypatch.setattr(T, "CORRECTION_BATCH", 97)
    s = dict(SETTINGS, n_neighbors=30, seed=2, backend="numpy")
    table, acts, stats = T.compute_table(m, s)
    assert 0.05 < stats["clipped_pair_fraction"] < 1.0, stats["clipped_pair_fraction"]
    ids = [0, 4, 5, 9]
    ours = T.simulate_actions(m, s, action_ids=ids, chunk_cells=53)
    for j, a in enumerate(ids):
        delta, shift = _celloracle_reference(m, int(acts.gene_idx[a]), float(acts.values[a]), n_neighbors=30,
                                             seed=2)
        np.testing.assert_allclose(ours["delta"][j], delta, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ours["shift"][j], shift, rtol=0, atol=1e-9)
        assert (table[:, a] == ours["next_cell"][j]).all()


@pytest.mark.parametrize("which,n", [("ko", 6), ("oe", 6)])
def test_action_subsets(small_model, which, n):
    full, _, _ = T.compute_table(small_model, dict(SETTINGS, n_neighbors=30, backend="numpy"))
    part, acts, _ = T.compute_table(small_model, dict(SETTINGS, n_neighbors=30, backend="numpy", actions=which))
    assert part.shape[1] == n and set(acts.kinds) == {which.upper()}
    assert np.array_equal(part, full[:, :6] if which == "ko" else full[:, 6:])


def test_resume_after_interruption(tmp_path, small_model):
    s = dict(SETTINGS, n_neighbors=30, backend="numpy", chunk_cells=20)
    ref, _, _ = T.compute_table(small_model, s)

    class Stop(Exception):
        pass

    def stop_after_3(i, n):
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        T.compute_table(small_model, s, chunk_dir=tmp_path / "chunks", on_chunk=stop_after_3)
    done = []
    table, _, stats = T.compute_table(small_model, s, chunk_dir=tmp_path / "chunks",
                                      on_chunk=lambda i, n: done.append(i))
    assert stats["chunks_reused"] == 3 and 0 not in done and len(done) == stats["n_chunks"] - 3
    assert np.array_equal(table, ref)
    # a different setting never reuses those chunks
    s2 = dict(s, sigma_corr=0.1)
    _, _, st2 = T.compute_table(small_model, s2, chunk_dir=tmp_path / "chunks")
    assert st2["chunks_reused"] == 0


def test_resume_keeps_the_interrupted_chunk_size(tmp_path, small_model):
    s = dict(SETTINGS, n_neighbors=30, backend="numpy")

    def stop(i, n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.compute_table(small_model, dict(s, chunk_cells=25), chunk_dir=tmp_path / "c", on_chunk=stop)
    _, _, st = T.compute_table(small_model, s, chunk_dir=tmp_path / "c")  # chunk_cells null: take the stored one
    assert st["chunk_cells"] == 25 and st["chunks_reused"] == 1


def test_memory_has_no_cells_by_cells_arrays():
    """4,000 cells: one dense cells x cells float64 array would be 128 MB; the engine stays far below."""
    m = random_model(n_cells=4000, n_genes=30, n_types=4, n_regulators=4, seed=5)
    tracemalloc.start()
    T.compute_table(m, dict(SETTINGS, backend="numpy", chunk_cells=256))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < m.n_cells ** 2 * 8 / 4, f"peak {peak / 2**20:.1f} MiB"
    assert T.celloracle_dense_bytes(30_000) > 24 * 2**30  # CellOracle's dense arrays alone exceed this machine


def test_chunk_size_from_memory():
    n, why = T.choose_chunk_cells(np, T.bytes_per_cell(3000, 3000, 216, 60))
    assert 1 <= n <= 4096 and "RAM" in why
    n_small, _ = T.choose_chunk_cells(np, 1000)
    assert n_small == min(4096, (32 << 20) // 1000)
    n_huge, _ = T.choose_chunk_cells(np, 1 << 40)  # memory wins over the minimum
    assert n_huge == 1
    assert T.choose_chunk_cells(np, 10, override=33) == (33, "transitions.chunk_cells")


@pytest.mark.parametrize("which", ["celloracle", "pca_step_direction", "prob_max"])
def test_gpu_branches_equal_numpy(which, standin_backend):
    """The table runner's GPU path (one chunk at a time, sparse plans on the backend, backend arrays throughout)
    gives the numpy table, run on the CPU stand-in for CuPy (conftest ``standin_backend``)."""
    m = random_model(n_cells=600, n_genes=60, n_types=4, n_regulators=6, seed=5)
    s = dict(SETTINGS, n_neighbors=40, next_cell=which)
    t_np, _, st_np = T.compute_table(m, dict(s, backend="numpy"), progress=False)
    t_gpu, _, st_gpu = T.compute_table(m, dict(s, backend="cupy"), progress=False)
    assert st_np["backend"] == "numpy" and st_gpu["backend"] == "cupy" and st_gpu["threads"] == 1
    np.testing.assert_array_equal(t_gpu, t_np)
    assert 0.0 < st_np["self_transition_fraction"] < 1.0


@pytest.mark.gpu
def test_cupy_table_equals_numpy(small_model):
    cp = pytest.importorskip("cupy", reason="CuPy is not installed (pip install cupy-cuda12x)")
    try:
        n_dev = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"CuPy sees no CUDA device: {e}")
    if n_dev == 0:  # pragma: no cover
        pytest.skip("CuPy sees no CUDA device")
    m = random_model(n_cells=3000, n_genes=300, n_types=5, n_regulators=12, seed=11)
    s = dict(SETTINGS, n_neighbors=50)
    t_np, _, st_np = T.compute_table(m, dict(s, backend="numpy"))
    t_cp, _, st_cp = T.compute_table(m, dict(s, backend="cupy"))
    assert st_cp["backend"] == "cupy"
    assert np.array_equal(t_np, t_cp)
    small_np, _, _ = T.compute_table(small_model, dict(s, n_neighbors=30, backend="numpy"))
    small_cp, _, _ = T.compute_table(small_model, dict(s, n_neighbors=30, backend="cupy"))
    assert np.array_equal(small_np, small_cp)


# ------------------------------------------------------------------------------- real CellOracle oracles
@pytest.mark.slow
def test_equal_to_celloracle_paul15(paul15_fitted):
    oracle, model = _unpack(paul15_fitted)
    report = _check_against_celloracle(oracle, model, n_regulators=3)
    assert len(report) == 6


@pytest.mark.slow
def test_equal_to_celloracle_demo(demo_fitted):
    oracle, model = _unpack(demo_fitted)
    report = _check_against_celloracle(oracle, model, n_regulators=3)
    assert len(report) >= 6


@pytest.mark.parametrize("hops", [1, 3, 5])
def test_reachable_sets_search_equals_sparse_products(hops, monkeypatch):
    """The numba breadth-first search gives the sparse-product fallback's sets (and reachable()'s), explicit
    zeros in W being no edges."""
    from cellrl.transitions import maths

    m = random_model(n_cells=60, n_genes=50, n_types=2, n_regulators=8, seed=5)
    W = sp.csr_matrix(m.coefs[0])
    W.data[::7] = 0.0  # explicit zeros
    starts = np.asarray(m.regulator_idx, dtype=np.int64)
    fast = maths.reachable_sets(W, starts, hops)
    monkeypatch.setattr(maths, "_reach_numba", None)
    slow = maths.reachable_sets(W, starts, hops)
    assert np.array_equal(fast.indptr, slow.indptr) and np.array_equal(fast.indices, slow.indices)
    W.eliminate_zeros()  # reachable() follows every stored entry
    for j, g in enumerate(starts):
        assert fast.indices[fast.indptr[j]:fast.indptr[j + 1]].tolist() == maths.reachable(W, int(g), hops).tolist()
    assert fast.indptr[-1] > len(starts)  # the sets reach beyond the start genes
