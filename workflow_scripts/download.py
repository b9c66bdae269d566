"""Rules download_paul15, download_mouse_base_grn: fetch a public input with scanpy's or CellOracle's loader."""
import socket
from pathlib import Path

from cellrl.errors import CellrlError
from cellrl.smk import log_to


def paul15(out: Path, cache: str) -> None:
    """scanpy.datasets.paul15(): raw UMI counts, clusters in obs["paul15_clusters"]; cached under `cache`."""
    import scanpy as sc
    import scipy.sparse as sp

    sc.settings.datasetdir = cache
    adata = sc.datasets.paul15()
    adata.X = sp.csr_matrix(adata.X)
    adata.obs["paul15_clusters"] = adata.obs["paul15_clusters"].astype(str).astype("category")
    adata.uns.pop("iroot", None)
    adata.write_h5ad(out)


def mouse_base_grn(out: Path, version: str) -> None:
    """celloracle.data.load_mouse_promoter_base_GRN(): TFinfo table (cached by CellOracle in ~/celloracle_data)."""
    import celloracle as co

    co.data.load_mouse_promoter_base_GRN(version=version).to_parquet(out)


def download(rule: str, out: Path, params) -> None:
    if rule == "download_paul15":
        fetch = lambda: paul15(out, params.cache)  # noqa: E731
        by_hand = "python -c 'import scanpy; scanpy.datasets.paul15().write_h5ad(\"paul15.h5ad\")'"
    else:
        fetch = lambda: mouse_base_grn(out, params.version)  # noqa: E731
        by_hand = ("python -c 'import celloracle as co; co.data.load_mouse_promoter_base_GRN("
                   f"\"{params.version}\").to_parquet(\"base_grn.parquet\")'")
    out.parent.mkdir(parents=True, exist_ok=True)
    socket.setdefaulttimeout(60)  # fail instead of hanging on a network that drops packets
    try:
        fetch()
    except OSError as e:  # URLError, timeouts, refused connections, DNS failures
        raise CellrlError(
            f"{rule}: could not download {out.name}: no network here, or the source is down ({e}).\n"
            f"  fix: on a machine with network access run\n      {by_hand}\n"
            f"    copy the file to {out} and rerun; or use config/examples/paul15_subset.yaml, which reads "
            "../shared/data offline.") from e


with log_to(snakemake.log[0]):
    download(snakemake.rule, Path(snakemake.output[0]), snakemake.params)
