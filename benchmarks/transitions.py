"""Benchmark: CellOracle's own per-action loop vs cellrl's transition engine, on the same data, in one run.

For each data set:

(a) CellOracle: for a few actions, ``simulate_shift`` + ``estimate_transition_prob(knn_random=True,
    calculate_randomized=False)`` + ``calculate_embedding_shift`` + the nearest cell to ``E + delta_embedding``;
    seconds per action -> cell-actions/s (per action it handles every cell). Skipped where its dense
    cells x cells arrays would not fit (``--celloracle-max-gib``; the estimate is recorded instead).
(b) cellrl: ``compute_table`` for the full table (every cell x every action) -> cell-actions/s.

Each side runs in its own subprocess so its peak RSS is its own. Data sets: ``paul15`` (the real subset in
``../shared/data``, fitted with cellrl.oracle.fit_oracle) and ``demoN`` (synthetic atlases from
cellrl.synthetic with ``--genes`` genes and 108 TFs, the reference system's action count: 216; imputation by
CellOracle's ``knn_imputation`` and coefficients by CellOracle's ``fit_GRN_for_simulation`` on the base GRN, no
``get_links``). Built data are cached under benchmarks/out/cache/.

    python benchmarks/transitions.py                          # paul15, demo3000, demo10000
    python benchmarks/transitions.py --sets paul15,demo3000,demo10000,demo30000 --summary   # the reported run
    python benchmarks/transitions.py --sets demo30000 --celloracle-actions 0
    python benchmarks/transitions.py --summary                # also write benchmarks/results/transitions.json
    python benchmarks/transitions.py --sets paul15 --next-cell pca_direction --summary   # its next_cell_runs entry

Results: printed, and saved as JSON under benchmarks/out/ (git-ignored). ``--summary`` with the default
``--next-cell celloracle`` rewrites benchmarks/results/transitions.json; with another next-cell model it only
replaces that model's run under ``next_cell_runs`` there (the other entries keep their numbers); a reference run
keeps the other models' runs. ``--summary-file`` writes elsewhere: ``--sets paul15,demo3000 --celloracle-actions
12 --repeats 5 [--next-cell pca_step_direction] --summary --summary-file benchmarks/results/transitions_recheck.json``
is the re-run of the current code recorded there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
CACHE = OUT / "cache"
SUMMARY = ROOT / "benchmarks" / "results" / "transitions.json"
SHARED = Path(os.environ.get("CELLRL_SHARED_DATA", ROOT.parent / "shared" / "data"))
SETTINGS = dict(n_propagation=3, n_neighbors=200, sampled_fraction=0.3, sigma_corr=0.05, knn_random=True, seed=0,
                next_cell="celloracle")
DEMO = dict(n_master_tfs=8, n_other_tfs=100, n_cell_types=8, frac_transit=0.3, decoy_edges_per_tf=20, seed=7)

sys.path.insert(0, str(ROOT))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------------------------ data
def _umap(adata) -> None:
    import scanpy as sc

    sc.pp.pca(adata, n_comps=30, random_state=0)
    sc.pp.neighbors(adata, n_neighbors=30, random_state=0, transformer="sklearn")  # exact; pynndescent breaks
    sc.tl.umap(adata, random_state=0)


def build(name: str, genes: int) -> dict:
    """Build (or reuse) the model (and oracle, where CellOracle will run) of data set ``name``."""
    import warnings

    warnings.filterwarnings("ignore")
    d = CACHE / f"{name}_g{genes}" if name.startswith("demo") else CACHE / name
    model_path, oracle_path, info_path = d / "model.npz", d / "oracle.celloracle.oracle", d / "info.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    d.mkdir(parents=True, exist_ok=True)
    import scanpy as sc

    t0 = time.time()
    if name == "paul15":
        from cellrl.oracle import fit_oracle

        src = SHARED / "paul15_subset" / "paul15_subset.h5ad"
        if not src.exists():
            return {"skipped": f"{src} absent"}
        ad = sc.read_h5ad(src)
        ad.obs["cell_type"] = ad.obs["cell_type"].astype(str)
        sc.pp.normalize_total(ad)
        ad.layers["normalized"] = ad.X.copy()
        sc.pp.log1p(ad)
        _umap(ad)
        import pandas as pd

        grn = pd.read_parquet(SHARED / "celloracle_mouse_base_grn" / "mm10_promoter_base_GRN.parquet")
        tft = {tf: grn.loc[grn[tf] == 1, "gene_short_name"].tolist() for tf in grn.columns[2:]}
        oracle, _, model, _ = fit_oracle(ad, tft, np.array(["train"] * ad.n_obs), threads=2)
    else:
        import celloracle as co
        import scipy.sparse as sp

        from cellrl.grn import to_celloracle_tfdict
        from cellrl.oracle import model_from_oracle
        from cellrl.synthetic import generate_atlas

        n = int(name[4:])
        ad, tfinfo, _ = generate_atlas(n_cells=n, n_genes=genes, **DEMO)
        sc.pp.normalize_total(ad)
        norm = ad.X.copy()
        sc.pp.log1p(ad)
        _umap(ad)
        ad.X = ad.X.toarray() if sp.issparse(ad.X) else ad.X
        norm = norm.toarray() if sp.issparse(norm) else norm
        ad.layers["raw_count"] = norm * min(1.0, 30.0 / float(norm.mean(0).max()))  # CellOracle QC only
        ad.obsm["X_umap"] = ad.obsm["X_umap"].astype(np.float64)
        oracle = co.Oracle()
        oracle.import_anndata_as_normalized_count(adata=ad, cluster_column_name="cell_type",
                                                  embedding_name="X_umap")
        tf_cols = [c for c in tfinfo.columns if c not in ("peak_id", "gene_short_name")]
        oracle.import_TF_data(TFdict=to_celloracle_tfdict(
            {tf: tfinfo.loc[tfinfo[tf] == 1, "gene_short_name"].tolist() for tf in tf_cols}))
        print(f"[build {name}] atlas + UMAP {time.time() - t0:.0f} s", flush=True)
        oracle.perform_PCA()
        k = int(0.025 * n)
        oracle.knn_imputation(n_pca_dims=50, k=k, balanced=True, b_sight=k * 8, b_maxl=k * 4, n_jobs=2)
        print(f"[build {name}] PCA + kNN imputation {time.time() - t0:.0f} s", flush=True)
        oracle.fit_GRN_for_simulation(GRN_unit="cluster", alpha=10, use_cluster_specific_TFdict=False,
                                      verbose_level=0)
        print(f"[build {name}] fit_GRN_for_simulation {time.time() - t0:.0f} s", flush=True)
        model = model_from_oracle(oracle, np.array(["train"] * oracle.adata.n_obs),
                                  meta={"dataset": name, "embedding_dtype": "float64"})
    model.save(model_path)
    if _celloracle_feasible(model.n_cells, 16 * 2**30):  # CellOracle's loop may run at this size
        oracle.to_hdf5(str(oracle_path))
    nnz = [int(c.nnz) for c in model.coefs]
    info = {"name": name, "model": str(model_path), "oracle": str(oracle_path) if oracle_path.exists() else None,
            "n_cells": model.n_cells, "n_genes": model.n_genes, "n_regulators": model.n_regulators,
            "n_clusters": len(model.cluster_names), "coef_nnz_per_cluster": nnz, "build_s": round(time.time() - t0, 1)}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def _celloracle_feasible(n_cells: int, max_bytes: float) -> bool:
    from cellrl.transitions import celloracle_dense_bytes

    return celloracle_dense_bytes(n_cells) <= max_bytes


# -------------------------------------------------------------------------------------------- workers
def work_celloracle(info: dict, n_actions: int, out: Path) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import celloracle as co

    from cellrl.model import load_model
    from cellrl.transitions import build_actions, nearest_cells

    model = load_model(info["model"])
    oracle = co.load_hdf5(info["oracle"])
    acts = build_actions(model, "both")
    ids = _pick_actions(len(acts), n_actions)
    rows = []
    nexts = []
    warm = _pick_actions(len(acts), 1)[0]  # one untimed action first: imports and first-call costs
    oracle.simulate_shift(perturb_condition={acts.genes[warm]: float(acts.values[warm])}, n_propagation=3,
                          ignore_warning=True)
    oracle.estimate_transition_prob(n_neighbors=SETTINGS["n_neighbors"], knn_random=True,
                                    sampled_fraction=SETTINGS["sampled_fraction"], random_seed=SETTINGS["seed"],
                                    calculate_randomized=False)
    oracle.calculate_embedding_shift(sigma_corr=SETTINGS["sigma_corr"])
    for a in ids:
        t = time.perf_counter()
        oracle.simulate_shift(perturb_condition={acts.genes[a]: float(acts.values[a])}, n_propagation=3,
                              ignore_warning=True)
        oracle.estimate_transition_prob(n_neighbors=SETTINGS["n_neighbors"], knn_random=True,
                                        sampled_fraction=SETTINGS["sampled_fraction"],
                                        random_seed=SETTINGS["seed"], calculate_randomized=False)
        oracle.calculate_embedding_shift(sigma_corr=SETTINGS["sigma_corr"])
        nxt = nearest_cells(model.embedding, np.asarray(oracle.delta_embedding))
        rows.append(time.perf_counter() - t)
        nexts.append(nxt)
    np.save(out.with_suffix(".npy"), np.stack(nexts) if nexts else np.zeros((0, model.n_cells), np.int32))
    return {"action_ids": ids.tolist(), "seconds_per_action": rows, "peak_rss_gib": peak_rss_gib()}


def work_engine(info: dict, backend: str, out: Path, chunk_cells: int | None, repeats: int) -> dict:
    from cellrl.model import load_model
    from cellrl.transitions import compute_table

    from cellrl.model import random_model

    model = load_model(info["model"])
    t = time.perf_counter()  # one small untimed table first: imports, numba kernel load, first-call costs
    compute_table(random_model(n_cells=300, n_genes=40, n_types=3, n_regulators=3),
                  dict(SETTINGS, n_neighbors=30, backend=backend))
    warm_s = time.perf_counter() - t
    times, hashes = [], set()
    for _ in range(repeats):  # the machine is shared: repeat and report the best and the median
        table, acts, stats = compute_table(model, dict(SETTINGS, backend=backend, chunk_cells=chunk_cells))
        times.append(stats["time_s"])
        hashes.add(stats["table_sha256"])
    np.save(out.with_suffix(".npy"), table)
    stats["time_s"] = float(np.median(times))
    stats["cell_actions_per_s"] = model.n_cells * len(acts) / stats["time_s"]
    keep = ("time_s", "prepare_s", "cell_actions_per_s", "backend", "backend_reason", "chunk_cells",
            "chunk_cells_reason", "n_chunks", "max_reachable_genes", "self_transition_fraction", "mean_shift",
            "table_sha256", "peak_gpu_pool_bytes", "n_actions", "threads")
    return {**{k: stats[k] for k in keep}, "times_s": times, "best_time_s": min(times),
            "same_table_every_repeat": len(hashes) == 1, "warm_up_s": round(warm_s, 3),
            "peak_rss_gib": peak_rss_gib()}


def _pick_actions(n_total: int, n: int) -> np.ndarray:
    if n <= 0:
        return np.zeros(0, dtype=int)
    half = n_total // 2  # KO and OE alternately, spread over the regulators
    ko = np.unique(np.linspace(0, half - 1, (n + 1) // 2).round().astype(int))
    oe = half + np.unique(np.linspace(0, half - 1, n // 2).round().astype(int)) if n > 1 else np.zeros(0, int)
    return np.concatenate([ko, oe])


def _subprocess(args: list[str], mem_gib: float | None = None) -> dict:
    out = OUT / f".worker_{os.getpid()}_{time.time_ns()}.json"
    cmd = [sys.executable, __file__, "--worker", *args, "--worker-out", str(out), "--next-cell", SETTINGS["next_cell"]]
    pre = None
    if mem_gib:
        lim = int(mem_gib * 2**30)

        def pre() -> None:  # like `ulimit -v`: CellOracle gets a MemoryError instead of exhausting the machine
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    r = subprocess.run(cmd, preexec_fn=pre, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail), "returncode": r.returncode}
    res = json.loads(out.read_text())
    out.unlink()
    res["_npy"] = str(out.with_suffix(".npy"))
    return res


# --------------------------------------------------------------------------------------------------- main
def run(sets: list[str], genes: int, co_actions: int, co_max_gib: float, backend: str,
        chunk_cells: int | None, repeats: int = 3) -> dict:
    from cellrl.transitions import celloracle_dense_bytes

    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    for name in sets:
        print(f"== {name}: building / loading data", flush=True)
        info = _subprocess(["build", name, str(genes)])
        if "error" in info or "skipped" in info:
            print(f"   skipped: {info}", flush=True)
            results.append({"name": name, **info})
            continue
        N, A = info["n_cells"], 2 * info["n_regulators"]
        row = {"name": name, "n_cells": N, "n_genes": info["n_genes"], "n_actions": A,
               "coef_nnz_per_cluster": info["coef_nnz_per_cluster"]}
        est = celloracle_dense_bytes(N) / 2**30
        row["celloracle_dense_estimate_gib"] = round(est, 2)
        co = None
        if co_actions > 0 and info.get("oracle") and est <= co_max_gib:
            print(f"   CellOracle loop on {co_actions} actions ...", flush=True)
            co = _subprocess(["celloracle", json.dumps(info), str(co_actions)], mem_gib=co_max_gib + 8)
            if "error" in co:
                row["celloracle"] = {"error": co["error"]}
                co = None
            else:
                per_action = float(np.median(co["seconds_per_action"]))
                row["celloracle"] = {"actions_timed": len(co["seconds_per_action"]),
                                     "seconds_per_action": [round(s, 3) for s in co["seconds_per_action"]],
                                     "cell_actions_per_s": N / per_action,
                                     "cell_actions_per_s_best": N / float(np.min(co["seconds_per_action"])),
                                     "full_table_s_extrapolated": per_action * A,
                                     "peak_rss_gib": round(co["peak_rss_gib"], 2)}
        else:
            why = ("not requested" if co_actions <= 0 else
                   f"not run: its dense cells x cells arrays alone need ~{est:.1f} GiB (> --celloracle-max-gib "
                   f"{co_max_gib}); estimate from celloracle_dense_bytes")
            row["celloracle"] = {"skipped": why}
        print("   cellrl engine, full table ...", flush=True)
        reps = repeats if N * A < 2_000_000 else 1
        en = _subprocess(["engine", json.dumps(info), backend, str(chunk_cells or 0), str(reps)])
        if "error" in en:
            row["cellrl"] = {"error": en["error"]}
        else:
            npy = Path(en.pop("_npy"))
            table = np.load(npy)
            npy.unlink(missing_ok=True)
            row["cellrl"] = en
            if co is not None:
                ref = np.load(co["_npy"])
                ids = co["action_ids"]
                row["next_cell_agreement_with_celloracle"] = float((table[:, ids].T == ref).mean())
                row["speedup_cell_actions_per_s"] = en["cell_actions_per_s"] / row["celloracle"]["cell_actions_per_s"]
                row["speedup_best_vs_best"] = (N * A / en["best_time_s"]) / row["celloracle"]["cell_actions_per_s_best"]
                Path(co["_npy"]).unlink(missing_ok=True)
        results.append(row)
        _print_row(row)
    # where CellOracle runs out of memory on this machine: fit peak = base + c * N^2 on the measured runs
    meas = [(r["n_cells"], r["celloracle"]["peak_rss_gib"]) for r in results  # same gene count only
            if r["name"].startswith("demo") and "peak_rss_gib" in r.get("celloracle", {})]
    oom = None
    total_gib = _total_ram_gib()
    if len(meas) >= 2:
        n = np.array([m[0] for m in meas], float)
        p = np.array([m[1] for m in meas], float)
        c, base = np.polyfit(n ** 2, p, 1)
        if c > 0:
            oom = {"fit": f"peak_gib = {base:.2f} + {c:.3e} * cells^2 (CellOracle's loop, {genes} genes, "
                          f"measured at {sorted(int(x) for x in n)} cells)",
                   "cells_at_machine_ram": int(np.sqrt(max(total_gib - base, 0) / c)), "machine_ram_gib": total_gib}
    from machine import machine_info

    return {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
            "cpus": os.cpu_count(), "machine": machine_info(threads=len(os.sched_getaffinity(0))),
            "ram_gib": total_gib, "load_avg_at_end": os.getloadavg(),
            "settings": SETTINGS, "demo_atlas": DEMO, "genes": genes, "backend": backend,
            "celloracle_out_of_memory": oom, "results": results}


def _total_ram_gib() -> float:
    import psutil

    return round(psutil.virtual_memory().total / 2**30, 1)


def _print_row(r: dict) -> None:
    co, en = r.get("celloracle", {}), r.get("cellrl", {})
    print(f"   {r['name']}: {r['n_cells']} cells x {r['n_genes']} genes x {r['n_actions']} actions")
    if "cell_actions_per_s" in co:
        print(f"     CellOracle: {np.median(co['seconds_per_action']):.2f} s/action (median) -> {co['cell_actions_per_s']:,.0f} "
              f"cell-actions/s, peak RSS {co['peak_rss_gib']:.2f} GiB (full table extrapolated "
              f"{co['full_table_s_extrapolated']:.0f} s)")
    else:
        print(f"     CellOracle: {co}")
    if "cell_actions_per_s" in en:
        print(f"     cellrl ({en['backend']}): full table {en['time_s']:.2f} s (median of {len(en['times_s'])}) -> "
              f"{en['cell_actions_per_s']:,.0f} "
              f"cell-actions/s, peak RSS {en['peak_rss_gib']:.2f} GiB, chunk {en['chunk_cells']} cells, "
              f"self-transitions {en['self_transition_fraction']:.3f}")
    else:
        print(f"     cellrl: {en}")
    if "speedup_cell_actions_per_s" in r:
        print(f"     speed-up {r['speedup_cell_actions_per_s']:.0f}x (median vs median; best vs best "
              f"{r['speedup_best_vs_best']:.0f}x); next cell agrees on "
              f"{r['next_cell_agreement_with_celloracle']:.4%} of timed cell-actions", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="paul15,demo3000,demo10000",
                    help="comma list: paul15, demoN (N cells); default %(default)s")
    ap.add_argument("--genes", type=int, default=3000, help="genes of the demo atlases")
    ap.add_argument("--celloracle-actions", type=int, default=4, help="actions timed in CellOracle's loop")
    ap.add_argument("--celloracle-max-gib", type=float, default=10.0,
                    help="run CellOracle only where its dense arrays need at most this (it also runs under an "
                         "address-space limit of this + 8 GiB)")
    ap.add_argument("--backend", default="auto", choices=["auto", "numpy", "cupy"])
    ap.add_argument("--chunk-cells", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3,
                    help="full-table repeats of the engine (median reported; 1 above 2M cell-actions)")
    ap.add_argument("--summary", action="store_true",
                    help=f"also write {SUMMARY.relative_to(ROOT)} (or --summary-file)")
    ap.add_argument("--summary-file", type=Path, default=SUMMARY,
                    help="where --summary writes (e.g. benchmarks/results/transitions_recheck.json for a re-run "
                         "on some sets, which leaves the reported all-sets run as it is)")
    ap.add_argument("--next-cell", default="celloracle", help="transitions.next_cell of the engine's table "
                    "(CellOracle's loop is always its own)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    SETTINGS["next_cell"] = a.next_cell
    if a.worker:
        kind, *rest = a.worker
        out = Path(a.worker_out)
        if kind == "build":
            res = build(rest[0], int(rest[1]))
        elif kind == "celloracle":
            res = work_celloracle(json.loads(rest[0]), int(rest[1]), out)
        else:
            res = work_engine(json.loads(rest[0]), rest[1], out, int(rest[2]) or None, int(rest[3]))
        out.write_text(json.dumps(res))
        return
    res = run(a.sets.split(","), a.genes, a.celloracle_actions, a.celloracle_max_gib, a.backend, a.chunk_cells,
              a.repeats)
    path = OUT / f"transitions_{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps(res, indent=1, default=float))
    print(f"saved {path}")
    if res["celloracle_out_of_memory"]:
        print(f"CellOracle out of memory: {res['celloracle_out_of_memory']}")
    if a.summary:
        summary = a.summary_file if a.summary_file.is_absolute() else ROOT / a.summary_file
        summary.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(summary.read_text()) if summary.exists() else {}
        if a.next_cell != "celloracle":  # one model's run, next to the reference run's entries
            res = {**old, "next_cell_runs": {**old.get("next_cell_runs", {}), a.next_cell: res}}
        elif "next_cell_runs" in old:  # a new reference run keeps the other models' runs
            res["next_cell_runs"] = old["next_cell_runs"]
        summary.write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(f"saved {summary}")


if __name__ == "__main__":
    main()
