"""Base GRN: the prior TF -> target edges that CellOracle is allowed to fit.

Three sources, chosen by a dataset's ``base_grn:`` entry in the config:

``tfinfo``
    A CellOracle TFinfo parquet (``peak_id``, ``gene_short_name``, one 0/1 column per TF), e.g. CellOracle's
    mouse promoter base GRN. A TF regulates a gene when any of the gene's peaks has a 1 in the TF's column.
``table``
    A TF -> target table (TSV/CSV; columns tf, target[, mode, ...]; header optional), e.g. TRRUST.
``atac``
    scATAC peaks + a peak -> gene table (``peak_id``, ``gene_short_name``[, ``coaccess``/``score``]) + a motif
    scan of the peak sequences with gimmemotifs (through ``celloracle.motif_analysis.TFinfo``, CellOracle's own
    pipeline) against a *local* genome FASTA. No FASTA configured is an error that says how to give one.

Every source becomes the same long table ``grn/base_grn.parquet`` (columns ``tf``, ``target``, ``source``;
no duplicates, no self-edges) and the dict ``grn/tf_targets.json`` (TF -> sorted list of targets). CellOracle's
own ``TFdict`` is the inverse (target -> TFs); :func:`to_celloracle_tfdict` converts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .errors import InputError
from .io import write_json, write_table

log = logging.getLogger(__name__)

SOURCES = ("tfinfo", "table", "atac")
COLUMNS = ["tf", "target", "source"]
FASTA_FIX = ("set the path of a local genome FASTA (plain or bgzip, the genome the peaks were called on) in "
             "config/config.yaml, either for all datasets as `base_grn: {atac: {genome_fasta: /path/mm10.fa}}` "
             "or for one dataset as `datasets: {<name>: {base_grn: {source: atac, genome_fasta: /path/mm10.fa}}}`; "
             "genomepy can download one (`genomepy install mm10 --provider UCSC`) on a machine with internet")


# ---------------------------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------------------------
def _require_file(path: Any, what: str, field: str) -> Path:
    if path is None or str(path) == "":
        raise InputError(f"no {what} configured", field=field, fix=f"set {field} in config/config.yaml")
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found", path=p, field=field,
                         fix=f"check {field} in config/config.yaml (relative paths are from the project root)")
    if p.is_file() and p.stat().st_size == 0:
        raise InputError(f"{what} is empty", path=p, field=field)
    return p


def tfinfo_to_long(tfinfo: pd.DataFrame, source: str = "tfinfo", path: object = None) -> pd.DataFrame:
    """Melt a CellOracle TFinfo frame (peak_id, gene_short_name, one 0/1 column per TF) into tf/target/source.

    Vectorised: the TF columns become one boolean matrix, rows are OR-ed per gene, and the non-zero cells
    are read off with ``np.nonzero`` (29K peaks x 1,079 TFs take well under a second).
    """
    missing = [c for c in ("peak_id", "gene_short_name") if c not in tfinfo.columns]
    if missing:
        raise InputError(f"not a CellOracle TFinfo table: columns {missing} missing "
                         f"(has {list(tfinfo.columns[:5])}...)", path=path,
                         fix="a TFinfo parquet has columns peak_id, gene_short_name and one 0/1 column per TF; "
                             "use `source: table` for a tf/target table")
    tf_cols = [c for c in tfinfo.columns if c not in ("peak_id", "gene_short_name")]
    if not tf_cols:
        raise InputError("TFinfo table has no TF columns", path=path)
    block = tfinfo[tf_cols]
    if not all(pd.api.types.is_numeric_dtype(t) for t in block.dtypes):
        block = block.apply(pd.to_numeric, errors="coerce")
    vals = block.to_numpy(dtype=np.float32)
    if np.isnan(vals).any():
        raise InputError("TFinfo TF columns must be numeric 0/1", path=path)
    genes = tfinfo["gene_short_name"].astype(str).to_numpy()
    ugenes, inv = np.unique(genes, return_inverse=True)
    hit = np.zeros((len(ugenes), len(tf_cols)), dtype=bool)
    np.logical_or.at(hit, inv, vals > 0)
    ti, gi = np.nonzero(hit.T)  # TF-major order
    return pd.DataFrame({"tf": np.asarray(tf_cols, dtype=str)[ti], "target": ugenes[gi], "source": source})


def read_tfinfo(path: str | os.PathLike, field: str = "base_grn.path") -> pd.DataFrame:
    """Read a TFinfo parquet (or CSV/TSV) and return the long tf/target/source table."""
    p = _require_file(path, "TFinfo base GRN", field)
    try:
        if p.suffix == ".parquet":
            df = pd.read_parquet(p)
        else:
            df = pd.read_csv(p, sep="\t" if p.suffix in (".tsv", ".txt") else ",", index_col=None)
            df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed")])
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
        raise InputError(f"cannot read TFinfo table ({type(e).__name__}: {e})", path=p, field=field) from e
    return tfinfo_to_long(df, "tfinfo", p)


_HEADER_WORDS = {"tf", "source", "regulator", "from", "tf_name", "gene1"}


def read_tf_table(path: str | os.PathLike, field: str = "base_grn.path") -> pd.DataFrame:
    """Read a TF -> target table: first column TF, second target (more columns, e.g. TRRUST's mode, ignored).

    Tab- or comma-separated by extension (``.csv`` -> comma, else tab); a header row is detected by its first
    cell (tf / source / regulator / from).
    """
    p = _require_file(path, "TF-target table", field)
    sep = "," if p.suffix == ".csv" else "\t"
    try:
        raw = pd.read_csv(p, sep=sep, header=None, dtype=str, comment="#", usecols=[0, 1],
                          keep_default_na=False)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read TF-target table ({type(e).__name__}: {e})", path=p, field=field,
                         fix="a tab-separated file with columns tf, target[, mode]") from e
    if len(raw) and str(raw.iloc[0, 0]).strip().lower() in _HEADER_WORDS:
        raw = raw.iloc[1:]
    raw = raw.apply(lambda s: s.str.strip())
    raw = raw[(raw[0] != "") & (raw[1] != "")]
    return pd.DataFrame({"tf": raw[0].to_numpy(), "target": raw[1].to_numpy(), "source": "table"})


# ---------------------------------------------------------------------------------------------------------------
# scATAC + motif scan
# ---------------------------------------------------------------------------------------------------------------
def _read_peak_ids(path: Path) -> np.ndarray:
    """Peak ids ``chr_start_end`` from a BED file (chrom, start, end) or a one-column CSV/TSV of ids."""
    if path.suffix in (".bed", ".narrowPeak") or path.name.endswith((".bed.gz",)):
        bed = pd.read_csv(path, sep="\t", header=None, comment="#", usecols=[0, 1, 2])
        return (bed[0].astype(str) + "_" + bed[1].astype(str) + "_" + bed[2].astype(str)).to_numpy()
    df = pd.read_csv(path, sep="," if path.suffix == ".csv" else "\t")
    col = [c for c in df.columns if not str(c).startswith("Unnamed") and str(c) != ""]
    col = [c for c in col if df[c].astype(str).str.match(r"^[^_\s]+_\d+_\d+$").all()] or col
    if not col:
        raise InputError("no peak id column found", path=path, field="base_grn.peaks",
                         fix="a BED file or a CSV with one column of ids like chr1_3094805_3095006")
    return df[col[-1]].astype(str).to_numpy()


def _read_peak_gene(path: Path, score_min: float) -> pd.DataFrame:
    """Peak -> gene table: ``peak_id``, ``gene_short_name`` and optionally a ``coaccess``/``score`` column,
    kept when >= ``score_min`` (CellOracle's tutorial keeps Cicero co-accessibility >= 0.8)."""
    df = pd.read_csv(path, sep="," if path.suffix == ".csv" else "\t")
    df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed")])
    missing = [c for c in ("peak_id", "gene_short_name") if c not in df.columns]
    if missing:
        raise InputError(f"peak-to-gene table lacks columns {missing} (has {list(df.columns)})", path=path,
                         field="base_grn.peak_gene",
                         fix="columns peak_id (chr_start_end), gene_short_name[, coaccess] as in CellOracle's "
                             "processed_peak_file.csv")
    for c in ("coaccess", "score"):
        if c in df.columns:
            before = len(df)
            df = df[pd.to_numeric(df[c], errors="coerce") >= score_min]
            log.info("peak-gene table: kept %d of %d rows with %s >= %s", len(df), before, c, score_min)
            break
    return df[["peak_id", "gene_short_name"]].astype(str).drop_duplicates().reset_index(drop=True)


def _genome_for_scan(fasta: Path, workdir: Path) -> Path:
    """Path genomepy can index: the FASTA itself when its folder is writable, else a symlink under workdir."""
    if os.access(fasta.parent, os.W_OK):
        return fasta.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    link = workdir / fasta.name
    if not link.exists():
        link.symlink_to(fasta.resolve())
    return link


class _StrXXHash:
    """xxhash whose hash constructors also take str (UTF-8), as gimmemotifs 0.17 expects of xxhash < 4."""

    def __init__(self, mod: Any):
        self._mod = mod

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._mod, name)
        if not name.startswith("xxh") or not callable(fn):
            return fn
        return lambda data=b"", *a, **k: fn(data.encode() if isinstance(data, str) else data, *a, **k)


def _gimmemotifs_xxhash_compat() -> None:
    """gimmemotifs 0.17.2 hashes str with xxhash; xxhash >= 4 only takes bytes. Wrap its module reference."""
    import xxhash

    try:
        xxhash.xxh64("a")
        return
    except TypeError:
        pass
    import gimmemotifs.motif as gm_motif
    import gimmemotifs.scanner as gm_scanner

    for mod in (gm_motif, gm_scanner):
        if getattr(mod, "xxhash", None) is xxhash:
            mod.xxhash = _StrXXHash(xxhash)


def scan_atac(peak_gene: str | os.PathLike, genome_fasta: str | os.PathLike | None, *,
              peaks: str | os.PathLike | None = None, motifs: str | os.PathLike | None = None,
              motif_fpr: float = 0.02, motif_score_threshold: float = 10.0, peak_gene_score_min: float = 0.8,
              tf_symbols: str = "capitalize", workdir: str | os.PathLike | None = None,
              threads: int = 1) -> pd.DataFrame:
    """scATAC peaks + peak-to-gene links + gimmemotifs scan -> CellOracle TFinfo frame.

    Runs CellOracle's motif pipeline (``celloracle.motif_analysis.TFinfo``): ``scan(fpr)`` with gimmemotifs
    against a background drawn from the same genome, ``filter_motifs_by_score(threshold)`` (cumulative score,
    CellOracle tutorial default 10), ``to_dataframe()``. ``motifs`` is a gimmemotifs PFM/motif file (its
    ``<name>.motif2factors.txt`` next to it maps motifs to TFs); None uses gimmemotifs' default vertebrate
    database (gimme.vertebrate.v5.0). ``tf_symbols`` formats TF names (capitalize for mouse, upper for human).
    """
    if genome_fasta is None or str(genome_fasta) == "":
        raise InputError("base GRN source 'atac' needs a local genome FASTA to scan peak sequences for motifs, "
                         "and none is configured", field="base_grn.atac.genome_fasta", fix=FASTA_FIX)
    fasta = Path(genome_fasta)
    if not fasta.exists():
        raise InputError("genome FASTA not found", path=fasta, field="base_grn.atac.genome_fasta", fix=FASTA_FIX)
    pg_path = _require_file(peak_gene, "peak-to-gene table", "base_grn.peak_gene")
    pg = _read_peak_gene(pg_path, peak_gene_score_min)
    if peaks is not None:
        ids = set(_read_peak_ids(_require_file(peaks, "scATAC peak file", "base_grn.peaks")))
        before = len(pg)
        pg = pg[pg.peak_id.isin(ids)].reset_index(drop=True)
        log.info("peak-gene rows whose peak is in the peak file: %d of %d", len(pg), before)
    ok = pg.peak_id.str.match(r"^[^_\s]+_\d+_\d+$")
    if not ok.all():
        bad = pg.peak_id[~ok].iloc[0]
        raise InputError(f"peak id {bad!r} is not chr_start_end", path=pg_path, field="base_grn.peak_gene")

    import celloracle.motif_analysis as ma  # heavy import, only on this path
    from genomepy import Genome

    _gimmemotifs_xxhash_compat()

    work = Path(workdir) if workdir is not None else pg_path.parent
    gpath = _genome_for_scan(fasta, work / "genome_index")
    try:
        genome = Genome(str(gpath))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read genome FASTA ({type(e).__name__}: {e})", path=fasta,
                         field="base_grn.atac.genome_fasta", fix=FASTA_FIX) from e
    sizes = genome.sizes
    parts = pg.peak_id.str.split("_", expand=True)
    chrom, start, end = parts[0], parts[1].astype(int), parts[2].astype(int)
    inside = chrom.map(sizes).fillna(-1).to_numpy() >= end.to_numpy()
    inside &= (start < end).to_numpy()
    if not inside.any():
        raise InputError(f"no peak lies on the genome FASTA (peak chromosomes e.g. {sorted(set(chrom))[:3]}, "
                         f"FASTA has {sorted(sizes)[:3]})", path=fasta, field="base_grn.atac.genome_fasta",
                         fix="use the genome build the peaks were called on, with the same chromosome names")
    if not inside.all():
        log.warning("dropping %d peak-gene rows whose peak is not on the FASTA", int((~inside).sum()))
    pg = pg[inside].reset_index(drop=True)

    from gimmemotifs.motif import default_motifs, read_motifs

    if motifs is not None:
        mp = _require_file(motifs, "motif file", "base_grn.motifs")
        motif_list = read_motifs(str(mp))
        if not motif_list:
            raise InputError("no motifs in the motif file", path=mp, field="base_grn.motifs")
    else:
        motif_list = default_motifs()  # gimme.vertebrate.v5.0, CellOracle's default for mouse and human
    tfi = ma.TFinfo(peak_data_frame=pg, ref_genome=str(gpath), genomes_dir=None)
    # A FASTA path is not one of CellOracle's named genomes: choose its TF-name formatting through the species
    # CellOracle maps to it (Mouse: capitalize, Human: upper, Drosophila: unchanged).
    tfi.species = {"capitalize": "Mouse", "upper": "Human"}.get(tf_symbols, "Drosophila")
    tfi.scan(fpr=motif_fpr, motifs=motif_list, TF_formatting=True, n_cpus=max(1, int(threads)), verbose=False)
    if tfi.scanned_df is None or len(tfi.scanned_df) == 0:
        log.warning("motif scan found no motif in any peak")
        return pd.DataFrame(columns=["peak_id", "gene_short_name"])
    tfi.reset_filtering()
    tfi.filter_motifs_by_score(threshold=motif_score_threshold)
    tfi.make_TFinfo_dataframe_and_dictionary(verbose=False)
    return tfi.to_dataframe(verbose=False)


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------
def build_base_grn(source: Mapping[str, Any], *, tfinfo_min_targets: int = 1,
                   atac: Mapping[str, Any] | None = None, threads: int = 1,
                   workdir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Build the long base GRN (columns tf, target, source) from one dataset's ``base_grn:`` entry.

    ``source`` is ``{source: tfinfo|table, path}`` or ``{source: atac, peak_gene, peaks?, genome_fasta?,
    motifs?}``; the remaining keyword arguments are the ``base_grn:`` stage settings. Self-edges and
    duplicates are dropped; TFs with fewer than ``tfinfo_min_targets`` targets are dropped.
    """
    kind = source.get("source")
    if kind not in SOURCES:
        raise InputError(f"unknown base GRN source {kind!r}", field="datasets.<name>.base_grn.source",
                         fix=f"one of {list(SOURCES)}")
    if kind == "tfinfo":
        df = read_tfinfo(source.get("path"))
    elif kind == "table":
        df = read_tf_table(source.get("path"))
    else:
        a = dict(atac or {})
        fasta = source.get("genome_fasta") or a.get("genome_fasta")
        tfinfo = scan_atac(source.get("peak_gene"), fasta, peaks=source.get("peaks"),
                           motifs=source.get("motifs") or a.get("motifs"),
                           motif_fpr=a.get("motif_fpr", 0.02),
                           motif_score_threshold=a.get("motif_score_threshold", 10.0),
                           peak_gene_score_min=a.get("peak_gene_score_min", 0.8),
                           tf_symbols=a.get("tf_symbols", "capitalize"), workdir=workdir, threads=threads)
        df = tfinfo_to_long(tfinfo, "atac") if len(tfinfo.columns) > 2 else pd.DataFrame(columns=COLUMNS)
    df = df[df.tf != df.target].drop_duplicates(["tf", "target"])
    if tfinfo_min_targets > 1:
        n = df.groupby("tf")["target"].transform("size")
        df = df[n >= tfinfo_min_targets]
    df = df.sort_values(["tf", "target"]).reset_index(drop=True)[COLUMNS]
    where = source.get("path") or source.get("peak_gene")
    if len(df) == 0:
        raise InputError("the base GRN has no TF -> target edge", path=where,
                         fix="check the file (TFinfo: 0/1 TF columns; table: tf and target columns) "
                             "and base_grn.tfinfo_min_targets")
    log.info("base GRN (%s, %s): %d edges, %d TFs, %d targets", kind, where, len(df), df.tf.nunique(),
             df.target.nunique())
    return df


def tf_targets_dict(grn: pd.DataFrame) -> dict[str, list[str]]:
    """TF -> sorted list of targets."""
    return {tf: sorted(g.tolist()) for tf, g in grn.groupby("tf", sort=True)["target"]}


def to_celloracle_tfdict(tf_targets: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Invert TF -> targets into CellOracle's ``TFdict`` (target -> list of regulators)."""
    out: dict[str, list[str]] = {}
    for tf, targets in tf_targets.items():
        for t in targets:
            out.setdefault(t, []).append(tf)
    return {t: sorted(v) for t, v in out.items()}


def load_tf_targets(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read ``grn/tf_targets.json``; InputError naming the file when it is missing or malformed."""
    p = Path(path)
    if not p.exists():
        raise InputError("TF -> targets file not found", path=p, field="tf_targets",
                         fix="build it with the base_grn rule (`snakemake results/<dataset>/grn/tf_targets.json`)")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read TF -> targets JSON ({e})", path=p, fix="rebuild it with the base_grn rule") from e
    if not isinstance(d, dict) or not all(isinstance(v, list) for v in d.values()):
        raise InputError("TF -> targets JSON must map each TF to a list of targets", path=p,
                         fix="rebuild it with the base_grn rule")
    return {str(k): [str(t) for t in v] for k, v in d.items()}


def read_tf_list(path: str | os.PathLike) -> list[str]:
    """Read a list of TF symbols: one per line (``#`` comments), or a CSV/TSV whose header has a ``TF`` column
    (e.g. BEELINE's ``mouse-tfs.csv``: TF,Sources). Symbols keep their case; compare them case-insensitively."""
    p = Path(path)
    fix = "one symbol per line, or a CSV/TSV with a TF column (config oracle.regulators)"
    if not p.is_file():
        raise InputError("TF list not found", path=p, field="oracle.regulators", fix=fix)
    try:
        lines = [ln.strip() for ln in p.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the TF list ({e})", path=p, field="oracle.regulators", fix=fix) from e
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    sep = "," if lines and "," in lines[0] else "\t" if lines and "\t" in lines[0] else None
    if sep is not None:
        head = [c.strip().lower() for c in lines[0].split(sep)]
        if "tf" not in head:
            raise InputError(f"the TF list's header {lines[0]!r} has no TF column", path=p,
                             field="oracle.regulators", fix=fix)
        col = head.index("tf")
        lines = [ln.split(sep)[col].strip() for ln in lines[1:] if len(ln.split(sep)) > col]
    tfs = list(dict.fromkeys(t for t in lines if t))
    if not tfs:
        raise InputError("the TF list is empty", path=p, field="oracle.regulators", fix=fix)
    return tfs


def restrict_regulators(tf_targets: Mapping[str, list[str]], tfs: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Keep the base GRN's regulators that are on ``tfs`` (case-insensitive); also return the dropped ones, sorted."""
    listed = {t.lower() for t in tfs}
    keep = {tf: tg for tf, tg in tf_targets.items() if tf.lower() in listed}
    return keep, sorted(set(tf_targets) - set(keep))


def build_base_grn_file(source: Mapping[str, Any], table_out: str | os.PathLike,
                        tf_targets_out: str | os.PathLike, **settings: Any) -> pd.DataFrame:
    """Rule ``base_grn``: write ``grn/base_grn.parquet`` and ``grn/tf_targets.json`` (atomically)."""
    settings.setdefault("workdir", Path(table_out).parent)
    grn = build_base_grn(source, **settings)
    write_table(table_out, grn, index=False)
    write_json(tf_targets_out, tf_targets_dict(grn))
    return grn
