"""Base GRN: TFinfo parquet, TF-target table, scATAC peaks + gimmemotifs scan of a local FASTA; errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import MM10_PROMOTER_GRN, shared_path

from cellrl.errors import InputError
from cellrl.grn import (build_base_grn, build_base_grn_file, load_tf_targets, tf_targets_dict,
                        tfinfo_to_long, to_celloracle_tfdict)


def _tfinfo() -> pd.DataFrame:
    # gene B has two peaks: TF1 on one, TF2 on the other; TF1 -> TF1 is a self-edge (dropped)
    return pd.DataFrame({
        "peak_id": ["chr1_1_100", "chr1_200_300", "chr1_400_500", "chr2_1_100"],
        "gene_short_name": ["A", "B", "B", "Tf1"],
        "Tf1": [1, 1, 0, 1],
        "Tf2": [0, 0, 1.0, 0],
        "Tf3": [0, 0, 0, 0],
    })


def test_tfinfo_melt_ors_peaks_per_gene_and_drops_self_edges(tmp_path):
    p = tmp_path / "tfinfo.parquet"
    _tfinfo().to_parquet(p)
    grn = build_base_grn({"source": "tfinfo", "path": str(p)})
    assert list(grn.columns) == ["tf", "target", "source"]
    assert set(zip(grn.tf, grn.target)) == {("Tf1", "A"), ("Tf1", "B"), ("Tf2", "B")}
    assert (grn.source == "tfinfo").all()
    # the raw melt keeps the self-edge; build_base_grn drops it
    assert ("Tf1", "Tf1") in set(zip(*tfinfo_to_long(_tfinfo())[["tf", "target"]].to_numpy().T))
    # same result as CellOracle's own TFinfo -> TFdict conversion (target -> TFs)
    ours = to_celloracle_tfdict(tf_targets_dict(grn))
    tmp = _tfinfo().drop(columns=["peak_id"]).groupby("gene_short_name").sum()
    theirs = {g: sorted(t for t in row[row > 0].index if t != g) for g, row in tmp.iterrows()}
    assert ours == {g: v for g, v in theirs.items() if v}


def test_tfinfo_min_targets_drops_small_tfs(tmp_path):
    p = tmp_path / "tfinfo.parquet"
    _tfinfo().to_parquet(p)
    grn = build_base_grn({"source": "tfinfo", "path": str(p)}, tfinfo_min_targets=2)
    assert set(grn.tf) == {"Tf1"}


def test_mm10_promoter_base_grn_real(tmp_path):
    path = shared_path(*MM10_PROMOTER_GRN)
    table, tft = tmp_path / "grn" / "base_grn.parquet", tmp_path / "grn" / "tf_targets.json"
    grn = build_base_grn_file({"source": "tfinfo", "path": str(path)}, table, tft)
    assert grn.tf.nunique() == 1079 and grn.target.nunique() > 24000
    assert len(grn) > 2_000_000
    back = pd.read_parquet(table)
    assert list(back.columns) == ["tf", "target", "source"] and len(back) == len(grn)
    d = load_tf_targets(tft)
    assert len(d) == 1079 and sum(map(len, d.values())) == len(grn)
    # spot check against the raw file: every gene with a 1 in Gata1's column is a Gata1 target
    raw = pd.read_parquet(path, columns=["gene_short_name", "Gata1"])
    expect = set(raw.loc[raw.Gata1 > 0, "gene_short_name"]) - {"Gata1"}
    assert set(d["Gata1"]) == expect


def test_trrust_table_real():
    path = shared_path("trrust", "trrust_rawdata.mouse.tsv")
    grn = build_base_grn({"source": "table", "path": str(path)})
    raw = pd.read_csv(path, sep="\t", header=None)
    expect = {(a, b) for a, b in zip(raw[0], raw[1]) if a != b}
    assert set(zip(grn.tf, grn.target)) == expect
    assert (grn.source == "table").all() and not grn.duplicated(["tf", "target"]).any()


def test_table_with_header_and_csv(tmp_path):
    p = tmp_path / "edges.csv"
    p.write_text("TF,target,mode\nSox2,Nanog,Activation\nSox2,Pou5f1,Unknown\nSox2,Nanog,Repression\n")
    grn = build_base_grn({"source": "table", "path": str(p)})
    assert set(zip(grn.tf, grn.target)) == {("Sox2", "Nanog"), ("Sox2", "Pou5f1")}


@pytest.mark.parametrize("source", [
    {"source": "tfinfo", "path": "does/not/exist.parquet"},
    {"source": "table", "path": "does/not/exist.tsv"},
    {"source": "atac", "peak_gene": "does/not/exist.csv", "genome_fasta": "nope.fa"},
])
def test_missing_input_is_a_clear_error_and_no_output(tmp_path, source):
    out, tft = tmp_path / "base_grn.parquet", tmp_path / "tf_targets.json"
    with pytest.raises(InputError, match="not found"):
        build_base_grn_file(source, out, tft)
    assert not out.exists() and not tft.exists()
    assert not list(tmp_path.iterdir())


def test_bad_tables_are_clear_errors(tmp_path):
    notfo = tmp_path / "x.parquet"
    pd.DataFrame({"a": [1], "b": [2]}).to_parquet(notfo)
    with pytest.raises(InputError, match="not a CellOracle TFinfo table"):
        build_base_grn({"source": "tfinfo", "path": str(notfo)})
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        build_base_grn({"source": "table", "path": str(empty)})
    selfonly = tmp_path / "self.tsv"
    selfonly.write_text("A\tA\n")
    with pytest.raises(InputError, match="no TF -> target edge"):
        build_base_grn({"source": "table", "path": str(selfonly)})
    with pytest.raises(InputError, match="unknown base GRN source"):
        build_base_grn({"source": "motifs"})


def test_load_tf_targets_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_tf_targets(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Tf1": "Gene1"}))
    with pytest.raises(InputError, match="list of targets"):
        load_tf_targets(bad)


# ---------------------------------------------------------------------------------------------------------------
# scATAC + motif scan on a tiny generated genome
# ---------------------------------------------------------------------------------------------------------------
MOTIF_A, MOTIF_B = "TGACTCAGCA", "CCGGAAGTGG"


def _write_tiny_atac(d, n_bp: int = 60_000):
    """Two random chromosomes; 8 peaks -> Gene0..Gene7; MOTIF_A planted in peaks 0, 2, 5, MOTIF_B in 1, 5, 6.
    The genome is large next to the planted copies so that gimmemotifs' background (random 200 bp windows
    of this genome) is mostly motif-free."""
    rng = np.random.default_rng(0)
    chroms = {c: list(rng.choice(list("ACGT"), n_bp)) for c in ("chr1", "chr2")}
    sites = [("chr1", 200), ("chr1", 900), ("chr1", 1600), ("chr1", 2400), ("chr2", 300), ("chr2", 1100),
             ("chr2", 2000), ("chr2", 3000)]
    peaks, genes = [], []
    for i, (c, start) in enumerate(sites):
        if i in (0, 2, 5):
            chroms[c][start + 50:start + 50 + len(MOTIF_A)] = list(MOTIF_A)
        if i in (1, 5, 6):
            chroms[c][start + 180:start + 180 + len(MOTIF_B)] = list(MOTIF_B)
        peaks.append(f"{c}_{start}_{start + 300}")
        genes.append(f"Gene{i}")
    fasta = d / "tiny_genome.fa"
    with open(fasta, "w") as f:
        for c, s in chroms.items():
            s = "".join(s)
            f.write(f">{c}\n" + "\n".join(s[i:i + 60] for i in range(0, len(s), 60)) + "\n")
    pg = pd.DataFrame({"peak_id": peaks + ["chr1_5000_5300", "chrX_1_300"],
                       "gene_short_name": genes + ["LowCoaccess", "OffGenome"],
                       "coaccess": [1.0] * 8 + [0.1, 1.0]})
    pg.to_csv(d / "peak_gene.csv")
    pd.DataFrame({"x": peaks + ["chr1_5000_5300"]}).to_csv(d / "all_peaks.csv")

    def pfm(seq: str, name: str) -> str:
        rows = []
        for ch in seq:
            r = [0.02] * 4
            r["ACGT".index(ch)] = 0.94
            rows.append("\t".join(f"{v:.2f}" for v in r))
        return f">{name}\n" + "\n".join(rows) + "\n"

    (d / "motifs.pfm").write_text(pfm(MOTIF_A, "MA_test") + pfm(MOTIF_B, "MB_test"))
    (d / "motifs.motif2factors.txt").write_text("Motif\tFactor\tEvidence\tCurated\n"
                                                "MA_test\tFOS\tdirect\tY\nMB_test\tSPI1\tdirect\tY\n")
    return fasta


@pytest.mark.slow
def test_atac_motif_scan_recovers_planted_motifs(tmp_path):
    fasta = _write_tiny_atac(tmp_path)
    source = {"source": "atac", "peaks": str(tmp_path / "all_peaks.csv"),
              "peak_gene": str(tmp_path / "peak_gene.csv"), "motifs": str(tmp_path / "motifs.pfm")}
    settings = {"atac": {"genome_fasta": str(fasta), "motif_fpr": 0.02, "motif_score_threshold": 10,
                         "peak_gene_score_min": 0.8, "tf_symbols": "capitalize"}}
    out, tft = tmp_path / "grn" / "base_grn.parquet", tmp_path / "grn" / "tf_targets.json"
    grn = build_base_grn_file(source, out, tft, threads=1, **settings)
    assert set(zip(grn.tf, grn.target)) == {("Fos", "Gene0"), ("Fos", "Gene2"), ("Fos", "Gene5"),
                                            ("Spi1", "Gene1"), ("Spi1", "Gene5"), ("Spi1", "Gene6")}
    assert (grn.source == "atac").all()
    assert load_tf_targets(tft) == {"Fos": ["Gene0", "Gene2", "Gene5"], "Spi1": ["Gene1", "Gene5", "Gene6"]}


def test_atac_without_fasta_says_how_to_configure_one(tmp_path):
    _write_tiny_atac(tmp_path, n_bp=4000)
    source = {"source": "atac", "peak_gene": str(tmp_path / "peak_gene.csv")}
    out, tft = tmp_path / "grn" / "base_grn.parquet", tmp_path / "grn" / "tf_targets.json"
    with pytest.raises(InputError) as e:
        build_base_grn_file(source, out, tft, atac={"genome_fasta": None})
    msg = str(e.value)
    assert "genome FASTA" in msg and "base_grn: {atac: {genome_fasta:" in msg
    assert "datasets: {<name>: {base_grn: {source: atac, genome_fasta:" in msg
    assert not out.exists() and not tft.exists()


def test_atac_peaks_not_on_genome_is_a_clear_error(tmp_path):
    fasta = _write_tiny_atac(tmp_path, n_bp=4000)
    pd.DataFrame({"peak_id": ["chr9_1_100"], "gene_short_name": ["G"]}).to_csv(tmp_path / "pg.tsv", sep="\t")
    with pytest.raises(InputError, match="no peak lies on the genome FASTA"):
        build_base_grn({"source": "atac", "peak_gene": str(tmp_path / "pg.tsv"), "genome_fasta": str(fasta)})


@pytest.mark.parametrize("entry, ok", [
    ({"source": "tfinfo", "path": "x.parquet"}, True),
    ({"source": "table"}, False),                                   # table needs path
    ({"source": "atac", "peak_gene": "pg.csv", "genome_fasta": None}, True),
    ({"source": "atac", "path": "x"}, False),                       # atac needs peak_gene
    ({"source": "bed", "path": "x"}, False),
    ({"source": "tfinfo", "path": "x", "fasta": "y"}, False),       # unknown key
])
def test_schema_validates_base_grn_entries(entry, ok):
    from cellrl.config import load_config, validate_config
    from cellrl.errors import ConfigError

    cfg = load_config()
    cfg["datasets"]["demo"]["base_grn"] = entry
    if ok:
        validate_config(cfg)
    else:
        with pytest.raises(ConfigError, match="base_grn"):
            validate_config(cfg)


def test_atac_real_tutorial_inputs_without_fasta(tmp_path):
    """CellOracle's scATAC tutorial inputs (mm10 peaks + Cicero peak-gene table) and no genome configured."""
    peaks = shared_path("celloracle_mouse_base_grn", "scatac_all_peaks.csv")
    pg = shared_path("celloracle_mouse_base_grn", "scatac_processed_peak_file.csv")
    out, tft = tmp_path / "base_grn.parquet", tmp_path / "tf_targets.json"
    with pytest.raises(InputError, match="needs a local genome FASTA"):
        build_base_grn_file({"source": "atac", "peaks": str(peaks), "peak_gene": str(pg)}, out, tft,
                            atac={"genome_fasta": None, "motif_fpr": 0.02})
    assert not out.exists() and not tft.exists()
    # the inputs themselves parse: 15,779 peak-gene rows, 86,935 peaks, every linked peak among them
    from cellrl.grn import _read_peak_gene, _read_peak_ids

    table, ids = _read_peak_gene(pg, 0.8), _read_peak_ids(peaks)
    assert len(table) == 15779 and len(ids) == 86935 and table.peak_id.isin(set(ids)).all()


def test_tf_list_formats_and_restriction(tmp_path):
    from cellrl.grn import read_tf_list, restrict_regulators

    csv = tmp_path / "tfs.csv"
    csv.write_text("TF,Sources\nPOU5F1,TRRUST\nNANOG,RegNetwork\nSOX2,x\n")  # BEELINE mouse-tfs.csv layout
    assert read_tf_list(csv) == ["POU5F1", "NANOG", "SOX2"]
    txt = tmp_path / "tfs.txt"
    txt.write_text("# my TFs\nGata6\n\nGata4\nGata6\n")
    assert read_tf_list(txt) == ["Gata6", "Gata4"]
    keep, dropped = restrict_regulators({"Pou5f1": ["a"], "Eno1": ["b"], "Nanog": [], "Itgb2": ["c"]},
                                        read_tf_list(csv))
    assert keep == {"Pou5f1": ["a"], "Nanog": []} and dropped == ["Eno1", "Itgb2"]
    bad = tmp_path / "bad.csv"
    bad.write_text("gene,source\nA,b\n")
    with pytest.raises(InputError, match="no TF column"):
        read_tf_list(bad)
    with pytest.raises(InputError, match="not found"):
        read_tf_list(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(InputError, match="empty"):
        read_tf_list(tmp_path / "empty.txt")
