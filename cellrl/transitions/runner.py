"""The table runner: one chunk of cells (all actions at once), chunk plan and size, backend, resumable chunk cache,
statistics, and the rule's file interface (:func:`transitions_files`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import resource
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp

from ..io import atomic_path, sha256_file, save_npy, write_json, write_table
from ..model import OracleModel, load_model
from ..progress import Progress, note
from ..xp import blas_threads, cupy_available, get_xp, to_numpy
from .maths import (ClusterLinear, ClusterPlan, cluster_linear, correlation, embedding_float32, embedding_shift,
                    linear_split, packed_expression, pca_displacement, plan_cluster, propagate,
                    transition_probabilities, unit_vectors, unpack)
from . import next_cell as nc
from .neighbors import check_n_neighbors, sample_neighbors
from .settings import Actions, TransitionSettings, build_actions

log = logging.getLogger("cellrl.transitions")


# ------------------------------------------------------------------------------------------------ one chunk
@dataclass
class Context:
    """Everything a chunk needs, prepared once (on the backend). Without ``embedding`` (the PCA next-cell models,
    which use only the PCA displacement) the embedding fields ``E``, ``nbr`` and ``tree`` are None: no neighbour
    sampling, correlation, transition probabilities or embedding shift."""

    xp: ModuleType
    settings: TransitionSettings
    actions: Actions
    X: Any  # (N, G)
    rowsum: Any  # (N,) sum_g X
    sqsum: Any  # (N,) sum_g X^2
    E: Any  # (N, 2)
    nbr: Any  # (N, k)
    float32_embedding: bool  # unit vectors in float32 (embedding_float32), computed per chunk
    values: Any  # (A,)
    plans: list[ClusterPlan]
    tree: Any  # scipy cKDTree on E (CPU; the celloracle model only)
    n_genes: int
    embedding: bool = True  # the embedding path (correlation, probabilities, shift) is computed
    pca: nc.PcaSpace | None = None  # PCA space of X (next-cell models other than celloracle), numpy
    scores: Any = None  # (N, d) pca.scores on the backend
    loadings: Any = None  # (G, d)
    candidates: Any = None  # (N, K)
    half_gap: Any = None  # (N,)
    radius: Any = None  # (N,)
    _lin_cache: dict = dataclasses.field(default_factory=dict)
    _lin_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    lin_cache_size: int = 1

    def linear(self, cluster: int) -> ClusterLinear:
        """:func:`cluster_linear` of ``cluster``. Chunks come by cluster, so only the ``lin_cache_size`` most
        recently used clusters are kept (one per worker thread); thread-safe."""
        with self._lin_lock:
            hit = self._lin_cache.pop(cluster, None)
            if hit is None:
                hit = cluster_linear(self.xp, self.X, self.plans[cluster], len(self.actions),
                                     self.settings.n_propagation, loadings=self.loadings, with_q=self.embedding)
            while len(self._lin_cache) >= max(1, self.lin_cache_size):
                self._lin_cache.pop(next(iter(self._lin_cache)))
            self._lin_cache[cluster] = hit  # most recent last
            return hit


def prepare(model: OracleModel, settings: TransitionSettings, xp: ModuleType,
            nbr: np.ndarray | None = None, embedding: bool | None = None) -> Context:
    """Neighbours, per-cluster propagation plans, the PCA space and the KD-tree: the action-independent part
    (the unit vectors of the embedding shift come per chunk). ``embedding``: compute the embedding path (default:
    only where the next-cell model needs it, :func:`cellrl.transitions.next_cell.needs_embedding`)."""
    from scipy.spatial import cKDTree

    if embedding is None:
        embedding = nc.needs_embedding(settings.next_cell)
    acts = build_actions(model, settings.actions)
    X = np.ascontiguousarray(model.X, dtype=np.float64)
    all_genes = bool(X.min() < 0)  # clipping can then move genes the network does not reach
    check_n_neighbors(model.n_cells, settings.n_neighbors)
    pca = None
    with ThreadPoolExecutor(1, thread_name_prefix="cellrl-plans") as pool:  # overlaps the neighbour/PCA search
        plans_f = pool.submit(lambda: [plan_cluster(xp, W, acts, settings.n_propagation, all_genes)
                                       for W in model.coefs])
        if nbr is None and embedding:
            nbr = sample_neighbors(model.embedding, settings.n_neighbors, settings.sampled_fraction,
                                   settings.knn_random, settings.seed)
        if settings.next_cell != "celloracle":
            pca = nc.pca_space(X, nc.n_pcs_of(settings.n_pcs, model.meta), settings.n_neighbors)
        plans = plans_f.result()
    E = Ex = nbr_x = tree = None
    if embedding:
        E = np.asarray(model.embedding, dtype=np.float64)
        Ex = xp.asarray(E)
        nbr_x = xp.asarray(nbr)
        tree = cKDTree(E) if settings.next_cell == "celloracle" else None
    Xx = xp.asarray(X)
    on = (lambda a: None if pca is None else xp.asarray(a))
    return Context(xp=xp, settings=settings, actions=acts, X=Xx, rowsum=Xx.sum(axis=1),
                   sqsum=xp.einsum("ng,ng->n", Xx, Xx), E=Ex, nbr=nbr_x,
                   float32_embedding=embedding_float32(model),
                   values=xp.asarray(acts.values), plans=plans, tree=tree, n_genes=X.shape[1], embedding=embedding,
                   pca=pca, scores=on(pca and pca.scores), loadings=on(pca and pca.loadings),
                   candidates=on(pca and pca.candidates), half_gap=on(pca and pca.half_gap),
                   radius=on(pca and pca.radius))


@dataclass
class ChunkResult:
    next_cell: np.ndarray  # (n, A) int32
    shift: Any  # (n, A, 2) on the backend; None without the embedding path
    delta: Any | None = None  # (n, A, |U|) when asked for
    n_clipped: int = 0  # (cell, action) pairs whose propagation clipped (or had a tiny input): exact corrections


def run_chunk(ctx: Context, cells: np.ndarray, cluster: int, keep_delta: bool = False) -> ChunkResult:
    """Next cell of every (cell in ``cells``, action); all cells must belong to cluster ``cluster``."""
    xp = ctx.xp
    plan = ctx.plans[cluster]
    lin = ctx.linear(cluster)
    A = len(ctx.actions)
    ci = xp.asarray(cells)
    Xc = ctx.X[ci]  # (n, G)
    XcU = xp.take(Xc, xp.asarray(plan.genes), axis=1)  # (n, |U|)

    # 1. exact propagation on each action's reachable genes, all actions at once (packed rows)
    XT = packed_expression(xp, XcU, plan)  # (T, n)
    d = propagate(xp, XcU, plan, ctx.values, ctx.settings.n_propagation, XT=XT)  # (T, n)
    delta = unpack(xp, d, plan, A) if keep_delta else None
    P = shift = nbr = None
    if ctx.embedding:
        # 2-5. correlation of delta with every sampled neighbour's displacement (and the PCA displacement)
        nbr = ctx.nbr[ci]  # (n, k)
        cc = correlation(xp, ctx.X, ctx.rowsum, ctx.sqsum, ci, Xc, nbr, plan, lin, d, XT, ctx.values,
                         ctx.settings.knn_random, ctx.loadings)
        disp, n_clipped = cc.disp, cc.n_clipped
        # 6. transition probabilities and embedding shift
        P = transition_probabilities(xp, cc.corr, ctx.settings.sigma_corr)
        u, ubar = unit_vectors(xp, ctx.E, nbr, ctx.float32_embedding, cells=ci)  # (n, k, 2), (n, 2)
        shift = embedding_shift(xp, P, u, ubar)  # (n, A, 2)
    else:  # 2-3. the PCA displacement alone (same operations as inside correlation)
        split = linear_split(xp, ctx.sqsum, ci, plan, lin, d, XT, ctx.values)
        disp, n_clipped = pca_displacement(xp, split, plan, lin, ctx.loadings), split.n_clipped(xp, plan, A)

    # 7. next cell (cellrl.transitions.next_cell)
    model = ctx.settings.next_cell
    if model != "celloracle":
        nxt = nc.pca_next_cells(xp, model, disp, ctx.settings.step_gain, ctx.scores, ci, ctx.candidates[ci],
                                ctx.radius[ci], ctx.half_gap[ci], ctx.pca.nearest, P=P, nbr=nbr)
    else:  # celloracle: nearest cell to the shifted point (CPU KD-tree; NaN shift = no move)
        target = to_numpy(ctx.E[ci][:, None, :] + shift).reshape(-1, 2)
        ok = np.isfinite(target).all(axis=1)
        nxt = np.repeat(np.asarray(cells), len(ctx.actions)).astype(np.int64)
        if ok.any():
            _, idx = ctx.tree.query(target[ok], k=1, workers=-1 if ok.sum() > 50_000 else 1)
            nxt[ok] = idx
    return ChunkResult(next_cell=nxt.reshape(len(cells), -1).astype(np.int32), shift=shift,
                       delta=delta, n_clipped=n_clipped)


# --------------------------------------------------------------------------------------------- whole table
def spatial_order(embedding: np.ndarray, cells_per_tile: int = 64) -> np.ndarray:
    """Rank of every cell along a serpentine walk over square tiles of the embedding (~``cells_per_tile`` cells
    per tile on average): nearby cells get nearby ranks, so a chunk's neighbour lists overlap (smaller Gram
    blocks). Only the order in which cells are computed; it never changes a result."""
    E = np.asarray(embedding, dtype=np.float64)
    lo, span = E.min(axis=0), np.ptp(E, axis=0)
    span[span == 0] = 1.0
    tiles = max(1, int(np.sqrt(len(E) / cells_per_tile)))
    gx, gy = (np.minimum(((E - lo) / span * tiles).astype(np.int64), tiles - 1)).T
    gy = np.where(gx % 2 == 0, gy, tiles - 1 - gy)
    key = (gx * tiles + gy) * len(E) + np.arange(len(E))
    rank = np.empty(len(E), dtype=np.int64)
    rank[np.argsort(key, kind="stable")] = np.arange(len(E))
    return rank


def chunk_plan(cluster_ids: np.ndarray, chunk_cells: int,
               embedding: np.ndarray | None = None) -> list[tuple[int, np.ndarray]]:
    """Cells grouped by cluster (one coefficient matrix per chunk), in :func:`spatial_order` of ``embedding``
    within a cluster when given, then cut into chunks of <= chunk_cells."""
    rank = spatial_order(embedding) if embedding is not None else None
    out = []
    for c in np.unique(cluster_ids):
        cells = np.flatnonzero(cluster_ids == c)
        if rank is not None:
            cells = cells[np.argsort(rank[cells], kind="stable")]
        for s in range(0, cells.size, chunk_cells):
            out.append((int(c), cells[s:s + chunk_cells]))
    return out


def bytes_per_cell(n_genes: int, n_union: int, n_actions: int, k: int, n_rows: int | None = None) -> int:
    """Working memory of one cell in a chunk (8-byte words): ~7 packed rows (T) of propagation and correction
    temporaries, ~8 (A x k) numerator / correlation arrays, its expression row (G + 2 |U|) and neighbour
    statistics. Gram blocks and correction batches are bounded separately (GRAM_BLOCK, CORRECTION_BATCH)."""
    T = n_rows if n_rows is not None else n_union * n_actions
    return 8 * (7 * T + 8 * n_actions * k + n_genes + 2 * n_union + 4 * k)


def choose_chunk_cells(xp: ModuleType, per_cell: int, override: int | None = None, fraction: float = 0.25,
                       cpu_target_bytes: int = 32 << 20, cpu_min_cells: int = 16,
                       gpu_cap_bytes: int = 8 << 30) -> tuple[int, str]:
    """Cells per chunk (``override`` wins): never more than ``fraction`` of the free memory (RAM for numpy,
    GPU memory for CuPy) allows. On CPU, chunks are kept near ``cpu_target_bytes`` of working set (cache-sized:
    measured fastest; the big products are per cell, so small chunks lose no BLAS efficiency), but at least
    ``cpu_min_cells``; on GPU they are as large as memory allows up to ``gpu_cap_bytes``."""
    if override:
        return int(override), "transitions.chunk_cells"
    per_cell = max(int(per_cell), 1)
    if xp is np:
        import psutil

        free = int(psutil.virtual_memory().available)
        mem_cells = int(free * fraction) // per_cell
        want = max(cpu_min_cells, cpu_target_bytes // per_cell)
        why = (f"~{cpu_target_bytes >> 20} MiB working set ({per_cell / 2**20:.2f} MiB per cell, >= "
               f"{cpu_min_cells} cells), within {fraction:.0%} of free RAM ({free / 2**30:.1f} GiB)")
    else:
        free = int(xp.cuda.runtime.memGetInfo()[0])
        mem_cells = min(int(free * fraction), gpu_cap_bytes) // per_cell
        want = mem_cells
        why = (f"{fraction:.0%} of free GPU memory ({free / 2**30:.1f} GiB) capped at {gpu_cap_bytes >> 30} GiB, "
               f"{per_cell / 2**20:.2f} MiB per cell")
    return int(max(1, min(4096, want, mem_cells))), why


def select_backend(backend: str) -> tuple[ModuleType, str]:
    """(xp, reason) for the ``transitions.backend`` setting."""
    if backend == "numpy":
        return np, "numpy: transitions.backend = numpy"
    if backend == "cupy":
        return get_xp("cupy"), "cupy: transitions.backend = cupy"
    if cupy_available():
        return get_xp("cupy"), "cupy: backend auto and CuPy sees a CUDA GPU"
    try:
        import cupy  # noqa: F401  # type: ignore

        why = "CuPy is installed but sees no CUDA GPU"
    except Exception:
        why = "CuPy is not installed (pip install cupy-cuda12x for the GPU path)"
    return np, f"numpy: backend auto and {why}"


def model_fingerprint(model: OracleModel) -> str:
    """sha256 over every model array the table depends on."""
    h = hashlib.sha256()
    for a in (model.X, model.embedding, model.cluster_ids, model.regulator_idx, model.ko_values,
              model.oe_values):
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    for W in model.coefs:
        W = sp.csr_matrix(W)
        for a in (W.data, W.indices, W.indptr):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _code_hash() -> str:
    """sha256 of the engine's source (every module of this package)."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def chunk_workers(xp: ModuleType, threads: int | None, n_chunks: int) -> int:
    """Chunks computed at once: one on the GPU; on CPU ``threads`` (default: the cores this process may use).
    numpy, BLAS, scipy's sparse products and the KD-tree release the GIL, so threads run chunks in parallel."""
    if xp is not np:
        return 1
    n = int(threads) if threads else len(os.sched_getaffinity(0))
    return max(1, min(n, n_chunks))


def _store_chunk(f: Path, **arrays: Any) -> None:
    """Write a finished chunk and its sha256 (``chunk_<i>.sha256``, written first: a crash between the two
    leaves a checksum without its piece, which is simply recomputed)."""
    tmp = f.with_name(f".{f.name}.tmp.npz")
    np.savez(tmp, **arrays)
    with atomic_path(f.with_suffix(".sha256")) as t:
        t.write_text(sha256_file(tmp) + "\n")
    os.replace(tmp, f)


def _stored_chunk(f: Path, cells: np.ndarray, n_actions: int) -> dict[str, np.ndarray] | None:
    """A stored chunk of these ``cells`` that matches its recorded sha256, or None (recompute it). A piece that
    fails the check or cannot be read is removed with a warning naming the file."""
    if not f.exists():
        return None
    side = f.with_suffix(".sha256")
    try:
        expected = side.read_text().strip() if side.exists() else None
        if expected is None:
            why = "no recorded sha256 next to it"
        elif sha256_file(f) != expected:
            why = f"its sha256 differs from the one recorded in {side.name} (altered or damaged since it was stored)"
        else:
            with np.load(f, allow_pickle=False) as z:
                d = {k: z[k] for k in ("cells", "next_cell", "shift_norm_sum", "n_clipped")}
            if not np.array_equal(d["cells"], cells):
                return None  # another chunking (e.g. chunk_cells changed): recomputed and overwritten
            if d["next_cell"].shape != (len(cells), n_actions) or d["shift_norm_sum"].shape != (n_actions,):
                why = f"next_cell {d['next_cell'].shape} does not fit {len(cells)} cells x {n_actions} actions"
            else:
                return d
    except Exception as e:  # truncated, not an npz, missing arrays: the piece is only a cache
        why = f"unreadable ({type(e).__name__}: {e})"
    log.warning("discarding transition chunk %s: %s; recomputing it", f, why)
    f.unlink(missing_ok=True)
    side.unlink(missing_ok=True)
    return None


def compute_table(model: OracleModel, settings: TransitionSettings | dict | None = None,
                  chunk_dir: str | Path | None = None,
                  on_chunk: Callable[[int, int], None] | None = None,
                  threads: int | None = None, progress: bool = True) -> tuple[np.ndarray, Actions, dict]:
    """The whole table ``(cells, A)`` int32, the actions and diagnostics.

    ``threads``: CPU worker threads, each computing whole chunks (default: every core this process may use;
    the table does not depend on it). The GPU path runs one chunk at a time.

    ``chunk_dir``: finished chunks are stored under ``chunk_dir/<key>/`` with key = hash(model arrays, settings
    that change the result, engine source, backend) and reused by a later call with the same key (resume after
    an interruption; the interrupted run's chunk size is kept unless ``chunk_cells`` is set). Each piece has its
    sha256 next to it; one that fails it or cannot be read is discarded with a warning and recomputed.
    ``on_chunk(i, n_chunks)`` is called after each chunk is stored (tests raise from it). ``progress``: chunks
    done, cell-actions/s and ETA on the console (:mod:`cellrl.progress`) and in the log.
    """
    if not isinstance(settings, TransitionSettings):
        settings = TransitionSettings.from_dict(settings)
    t0 = time.time()
    xp, why = select_backend(settings.backend)
    log.info("backend %s", why)
    tag = f"transitions {model.meta['dataset']}" if model.meta.get("dataset") else "transitions"
    note(f"[{tag}] neighbours and reachable genes of {model.n_cells:,} cells ({why})", enabled=progress)
    ctx = prepare(model, settings, xp)
    t_prep = time.time() - t0
    A, N, G = len(ctx.actions), model.n_cells, model.n_genes
    k = int(ctx.nbr.shape[1]) if ctx.embedding else 0
    max_u = max(int(p.genes.size) for p in ctx.plans)
    per_cell = max(bytes_per_cell(G, int(p.genes.size), A, k, p.n_rows) for p in ctx.plans)
    if ctx.pca is not None:
        per_cell += nc.bytes_per_cell(settings.next_cell, A, ctx.pca.candidates.shape[1], ctx.pca.scores.shape[1])
    backend_name = "cupy" if xp is not np else "numpy"
    key_src, key = "{}", ""
    cdir, stored = None, None
    if chunk_dir is not None:  # chunks are reusable only for the same model, settings, code and backend
        key_src = json.dumps({"model": model_fingerprint(model), "settings": settings.result_keys(),
                              "code": _code_hash(), "backend": backend_name}, sort_keys=True)
        key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
        root = Path(chunk_dir)
        cdir = root / key
        if root.exists():
            for stale in root.iterdir():  # chunks of other inputs/settings/code can never be reused
                if stale.is_dir() and stale.name != key:
                    shutil.rmtree(stale, ignore_errors=True)
        if (cdir / "meta.json").exists():
            try:
                stored = json.loads((cdir / "meta.json").read_text()).get("chunk_cells")
            except (OSError, ValueError, AttributeError) as e:  # the pieces' own checks still guard reuse
                log.warning("ignoring unreadable %s (%s: %s)", cdir / "meta.json", type(e).__name__, e)
    if stored and settings.chunk_cells is None:
        chunk, chunk_why = int(stored), "reused from the interrupted run in chunk_dir"
    else:
        chunk, chunk_why = choose_chunk_cells(xp, per_cell, settings.chunk_cells)
    if cdir is not None:
        if stored and stored != chunk:
            shutil.rmtree(cdir, ignore_errors=True)
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / "meta.json").write_text(json.dumps({"chunk_cells": chunk, "key_source": json.loads(key_src)}))
    chunks = chunk_plan(np.asarray(model.cluster_ids), chunk, model.embedding)
    sampled = (f"{k} of n_neighbors + 1 = {settings.n_neighbors + 1} embedding neighbours sampled per cell"
               if settings.knn_random else f"all n_neighbors + 1 = {k} embedding neighbours per cell")
    if not ctx.embedding:
        sampled = f"no embedding neighbours (next_cell {settings.next_cell} uses the PCA displacement only)"
    log.info("%d cells x %d actions, %d genes, %s, |U| <= %d; %d chunks of <= %d cells (%s)",
             N, A, G, sampled, max_u, len(chunks), chunk, chunk_why)

    table = np.empty((N, A), dtype=np.int32)
    shift_norm_sum = np.zeros(A)
    clipped = 0
    reused = 0
    gpu_peak = 0
    t_chunks = time.time()
    todo = []
    reused_cells = 0
    for i, (c, cells) in enumerate(chunks):
        z = _stored_chunk(cdir / f"chunk_{i:05d}.npz", cells, A) if cdir is not None else None
        if z is not None:
            table[cells] = z["next_cell"]
            shift_norm_sum += z["shift_norm_sum"]
            clipped += int(z["n_clipped"])
            reused += 1
            reused_cells += len(cells)
            continue
        todo.append(i)
    workers = chunk_workers(xp, threads, len(todo))
    ctx.lin_cache_size = workers

    def work(i: int) -> tuple[int, np.ndarray, np.ndarray, int]:
        c, cells = chunks[i]
        r = run_chunk(ctx, cells, c)
        sn = np.full(A, np.nan) if r.shift is None else to_numpy(xp.sqrt((r.shift ** 2).sum(axis=2)).sum(axis=0))
        return i, r.next_cell, sn, r.n_clipped

    # counted in cell-actions (chunks differ in size); chunks reused from chunk_dir count as done before the start
    bar = Progress(N * A, tag, unit="cell-action", log=log, enabled=progress, initial=reused_cells * A)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="cellrl-chunk") if workers > 1 else None
    try:
        with bar, blas_threads(1 if workers > 1 else None):  # chunk threads must not oversubscribe
            results = pool.map(work, todo) if pool is not None else map(work, todo)
            for done, (i, next_cell, sn, n_clip) in enumerate(results):
                cells = chunks[i][1]
                table[cells] = next_cell
                shift_norm_sum += sn
                clipped += n_clip
                if xp is not np:
                    gpu_peak = max(gpu_peak, int(xp.get_default_memory_pool().total_bytes()))
                if cdir is not None:
                    _store_chunk(cdir / f"chunk_{i:05d}.npz", cells=cells, next_cell=next_cell, shift_norm_sum=sn,
                                 n_clipped=n_clip)
                if on_chunk is not None:
                    on_chunk(i, len(chunks))
                bar.update(len(cells) * A, chunks=f"{reused + done + 1}/{len(chunks)}")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    t_chunks_done = time.time()
    elapsed = t_chunks_done - t0
    self_frac = (table == np.arange(N, dtype=np.int32)[:, None]).mean(axis=0)
    stats = {
        "n_cells": N, "n_genes": G, "n_actions": A, "n_neighbors_sampled": k if ctx.embedding else None,
        "next_cell": settings.next_cell,
        "pca_components": None if ctx.pca is None else int(ctx.pca.scores.shape[1]),
        "settings": dataclasses.asdict(settings),
        "backend": backend_name, "backend_reason": why,
        "chunk_cells": chunk, "chunk_cells_reason": chunk_why, "n_chunks": len(chunks), "chunks_reused": reused,
        "threads": workers,
        "clipped_pair_fraction": clipped / max(N * A, 1),
        "max_reachable_genes": max_u, "reachable_genes_per_cluster": [int(p.genes.size) for p in ctx.plans],
        "mean_reachable_genes_per_action": float(np.mean([p.n_rows / max(A, 1) for p in ctx.plans])),
        "self_transition_fraction": float(self_frac.mean()),
        "self_transition_fraction_per_action": {f"{kd}:{g}": float(v) for kd, g, v in
                                                zip(ctx.actions.kinds, ctx.actions.genes, self_frac)},
        # mean |embedding shift|; None (no per-action entry) where the next-cell model computes no shift
        "mean_shift": (float(shift_norm_sum.sum() / (N * A)) if A else 0.0) if ctx.embedding else None,
        **({"mean_shift_per_action": {f"{kd}:{g}": float(v / N) for kd, g, v in
                                      zip(ctx.actions.kinds, ctx.actions.genes, shift_norm_sum)}}
           if ctx.embedding else {}),
        "time_s": round(elapsed, 3), "prepare_s": round(t_prep, 3), "chunks_s": round(t_chunks_done - t_chunks, 3),
        "cell_actions_per_s": (N * A) / elapsed if elapsed > 0 else None,
        "peak_rss_bytes": _peak_rss_bytes(), "peak_gpu_pool_bytes": gpu_peak,
        "table_sha256": hashlib.sha256(table.tobytes()).hexdigest(),
        "code": _code_hash(), "chunk_key": key,
    }
    return table, ctx.actions, stats


def transitions_files(model_path: str | Path, table_out: str | Path, actions_out: str | Path,
                      stats_out: str | Path, chunk_dir: str | Path | None = None, threads: int | None = None,
                      progress: bool = True, **settings: Any) -> dict:
    """Rule ``transitions``: model.npz -> table.npy (int32 cells x actions), actions.tsv, stats.json.

    Resumable: chunks finished by an interrupted run are reused (``chunk_dir``); removed after success.
    ``threads``: CPU worker threads (the rule's ``threads``); the table does not depend on it. ``progress``:
    chunk progress on the console.
    """
    s = TransitionSettings.from_dict(settings)
    model = load_model(model_path)
    table, acts, stats = compute_table(model, s, chunk_dir=chunk_dir, threads=threads, progress=progress)
    stats["model"] = str(model_path)
    stats["dataset"] = model.meta.get("dataset")
    save_npy(table_out, table)
    write_table(actions_out, acts.frame())
    write_json(stats_out, stats)
    if chunk_dir is not None:
        shutil.rmtree(chunk_dir, ignore_errors=True)
    log.info("table %s: %d x %d, self-transitions %.3f, %.1f s, peak RSS %.2f GiB (%s)", table_out,
             *table.shape, stats["self_transition_fraction"], stats["time_s"], stats["peak_rss_bytes"] / 2**30,
             stats["backend_reason"])
    return stats


# ------------------------------------------------------------------------------------- single-action helpers
def simulate_actions(model: OracleModel, settings: TransitionSettings | dict | None = None,
                     action_ids: Sequence[int] | None = None, xp: ModuleType | None = None,
                     chunk_cells: int = 512) -> dict[str, np.ndarray]:
    """Dense per-action outputs for checks against CellOracle (small data only): delta (A', N, G), shift
    (A', N, 2) and next cell (A', N), computed by the same chunk code as the table (with the embedding path for
    every next-cell model: the shift is always returned)."""
    if not isinstance(settings, TransitionSettings):
        settings = TransitionSettings.from_dict(settings)
    xp = xp or select_backend(settings.backend)[0]
    ctx = prepare(model, settings, xp, embedding=True)
    ids = np.arange(len(ctx.actions)) if action_ids is None else np.asarray(action_ids)
    N, G = model.n_cells, model.n_genes
    delta = np.zeros((len(ids), N, G))
    shift = np.zeros((len(ids), N, 2))
    nxt = np.zeros((len(ids), N), dtype=np.int32)
    for c, cells in chunk_plan(np.asarray(model.cluster_ids), chunk_cells, model.embedding):
        r = run_chunk(ctx, cells, c, keep_delta=True)
        d = to_numpy(r.delta)[:, ids]  # (n, A', |U|)
        g = ctx.plans[c].genes
        delta[:, cells[:, None], g[None, :]] = d.transpose(1, 0, 2)
        shift[:, cells] = to_numpy(r.shift)[:, ids].transpose(1, 0, 2)
        nxt[:, cells] = r.next_cell[:, ids].T
    return {"delta": delta, "shift": shift, "next_cell": nxt, "neighbors": to_numpy(ctx.nbr)}


def nearest_cells(embedding: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Next cell for a given shift (N, 2): the cell nearest to E_i + shift_i (same KD-tree query as the table)."""
    from scipy.spatial import cKDTree

    E = np.asarray(embedding, dtype=np.float64)
    target = E + shift
    out = np.arange(len(E))
    ok = np.isfinite(target).all(axis=1)
    out[ok] = cKDTree(E).query(target[ok], k=1, workers=-1)[1]
    return out.astype(np.int32)


def celloracle_dense_bytes(n_cells: int) -> int:
    """Lower bound on CellOracle's peak for one perturbation (calculate_embedding_shift): corrcoef, the dense
    kNN mask (twice), transition_prob and the (2, N, N) unit vectors (+ a same-size norm temporary), float64."""
    return 8 * n_cells * n_cells * (1 + 2 + 1 + 2 + 1)
