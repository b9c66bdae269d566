"""Console progress (cellrl.progress): plain lines off a TTY, a tqdm bar on one, the terminal inside log_to."""

from __future__ import annotations

import io
import logging
import sys
import types

import numpy as np
import pytest

from cellrl import smk
from cellrl.progress import Progress, console, note


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_format_and_rate_limit():
    out, clock = io.StringIO(), FakeClock()
    with Progress(100_000, "train", stream=out, clock=clock, interval_s=30) as p:
        for _ in range(10):  # 10,000 steps every 5 s: a line every 30 s at most
            clock.t += 5
            p.update(10_000, succ=0.8234)
    lines = out.getvalue().splitlines()
    assert lines == ["[train] 0/100,000 steps (0%)",
                     "[train] 60,000/100,000 steps (60%) 2,000 steps/s ETA 0:00:20 succ=0.823",
                     "[train] 100,000/100,000 steps (100%) 2,000 steps/s in 0:00:50 succ=0.823"]


def test_interval_zero_reports_every_update_slow_rates_and_unknown_total():
    out, clock = io.StringIO(), FakeClock()
    with Progress(4, "get_links", unit="cluster", stream=out, clock=clock, interval_s=0) as p:
        clock.t += 45
        p.update(1, done="Ery")
    with Progress(None, "scan", stream=out, clock=clock, interval_s=0) as p:
        clock.t += 2
        p.update(5)
    lines = out.getvalue().splitlines()
    assert lines[1] == "[get_links] 1/4 clusters (25%) 45.0 s/cluster ETA 0:02:15 done=Ery"
    assert lines[2] == "[get_links] 1/4 clusters (25%) 45.0 s/cluster in 0:00:45 done=Ery"
    assert lines[4] == "[scan] 5 steps 2.5 steps/s"


def test_initial_counts_as_done_but_not_in_the_rate():
    out, clock = io.StringIO(), FakeClock()
    with Progress(1000, "t", unit="cell-action", stream=out, clock=clock, interval_s=0, initial=600) as p:
        clock.t += 10
        p.update(200)
    assert out.getvalue().splitlines()[1] == "[t] 800/1,000 cell-actions (80%) 20 cell-actions/s ETA 0:00:10"


def test_error_inside_marks_the_last_line_stopped():
    out, clock = io.StringIO(), FakeClock()
    with pytest.raises(RuntimeError):
        with Progress(10, "t", stream=out, clock=clock):
            clock.t += 3
            raise RuntimeError("boom")
    assert out.getvalue().splitlines()[-1] == "[t] 0/10 steps (0%) stopped after 0:00:03"


def test_tty_gets_a_tqdm_bar_and_the_log_plain_lines(caplog):
    out, log = TTY(), logging.getLogger("cellrl.test_progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        with Progress(8, "get_links", unit="cluster", log=log, stream=out, interval_s=3600) as p:
            for i in range(8):
                p.update(1, done=f"c{i}")
    text = out.getvalue()
    assert "get_links: 100%" in text and "8/8" in text and "done=c7" in text and "\r" in text
    assert not any(line.startswith("[get_links]") for line in text.splitlines())  # a bar, not plain lines
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == "[get_links] 0/8 clusters (0%)" and msgs[-1].startswith("[get_links] 8/8 clusters (100%)")


def test_plain_lines_reach_the_logger(caplog):
    out, log = io.StringIO(), logging.getLogger("cellrl.test_progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        with Progress(2, "t", log=log, stream=out, interval_s=0) as p:
            p.update(1)
            p.update(1)
    assert [r.getMessage() for r in caplog.records] == out.getvalue().splitlines()
    assert len(caplog.records) == 4


def test_logger_already_on_the_console_is_not_printed_twice(capsys):
    log = logging.getLogger("cellrl.test_progress.dup")
    file = io.StringIO()
    handlers = [logging.StreamHandler(sys.stderr), logging.StreamHandler(file)]  # basicConfig + a rule's log
    for h in handlers:
        log.addHandler(h)
    log.setLevel(logging.INFO)
    try:
        with Progress(1, "t", log=log, interval_s=0) as p:
            p.update(1)
        note("[t] phase", log=log)
    finally:
        for h in handlers:
            log.removeHandler(h)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and lines[-1] == "[t] phase"  # start, update, end, note: each once
    assert file.getvalue().splitlines() == lines           # and all of them in the log


def test_disabled_is_silent(caplog, capsys):
    out, log = TTY(), logging.getLogger("cellrl.test_progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        with Progress(5, "t", log=log, stream=out, enabled=False, interval_s=0) as p:
            p.update(3, x=1)
            p.set_postfix(y=2)
        note("[t] phase", log=log, enabled=False)
    assert out.getvalue() == "" and not caplog.records
    assert capsys.readouterr().err == ""


def test_closed_or_odd_streams_never_raise():
    closed = io.StringIO()
    closed.close()
    with Progress(3, "t", stream=closed, interval_s=0) as p:
        p.update(1)
        p.set_postfix(a=1)
    tty = TTY()
    with Progress(3, "t", stream=tty, interval_s=0) as p:
        tty.close()  # the terminal goes away mid-run
        p.update(2, a=1)
        p.set_postfix(a=2)
    odd = types.SimpleNamespace()  # no write, no isatty
    with Progress(3, "t", stream=odd, interval_s=0) as p:  # type: ignore[arg-type]
        p.update(3)


def test_console_is_the_real_stderr_inside_log_to(tmp_path, capsys):
    real = sys.stderr
    assert console() is real
    with smk.log_to(tmp_path / "a.log"):
        assert sys.stderr is not real and console() is real
        with smk.log_to(tmp_path / "b.log"):  # nested: still the terminal
            assert console() is real
        assert console() is real
        note("[rule] phase line", log=logging.getLogger("cellrl"))
    assert console() is real and smk.real_stderr is None
    assert "[rule] phase line" in capsys.readouterr().err       # on the terminal
    assert "[rule] phase line" in (tmp_path / "a.log").read_text()  # and in the rule's log
    with pytest.raises(ValueError):
        with smk.log_to(tmp_path / "c.log"):
            raise ValueError("x")
    assert smk.real_stderr is None


def test_transition_chunks_on_the_console_do_not_change_the_table(tmp_path, capsys):
    from cellrl.model import random_model
    from cellrl.transitions import compute_table

    m = random_model(n_cells=120, n_genes=20, n_types=2, n_regulators=3, seed=1)
    m.meta["dataset"] = "tiny"
    s = dict(n_neighbors=20, backend="numpy", chunk_cells=25)
    quiet, _, _ = compute_table(m, s, threads=1, progress=False)
    assert capsys.readouterr().err == ""
    with smk.log_to(tmp_path / "t.log"):
        table, acts, _ = compute_table(m, s, threads=1)
    assert np.array_equal(table, quiet)
    err = capsys.readouterr().err.splitlines()
    total = 120 * len(acts)
    assert err[0].startswith("[transitions tiny] neighbours and reachable genes of 120 cells")
    assert err[1] == f"[transitions tiny] 0/{total:,} cell-actions (0%)"
    assert err[-1].startswith(f"[transitions tiny] {total:,}/{total:,} cell-actions (100%)")
    assert err[-1].endswith("chunks=6/6")  # 2 clusters of ~60 cells in chunks of <= 25
    assert "[transitions tiny] 0/" in (tmp_path / "t.log").read_text()


def test_cluster_progress_counts_celloracle_clusters_and_restores(monkeypatch):
    from cellrl import oracle

    orig = object()
    fake = types.ModuleType("network_construction")
    fake.tqdm = orig  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "celloracle.network_analysis.network_construction", fake)
    out, clock = io.StringIO(), FakeClock()
    with Progress(3, "fit", unit="cluster", stream=out, clock=clock, interval_s=0) as bar:
        with oracle.cluster_progress(bar) as verbose:
            assert verbose == 1
            seen = [c for c in fake.tqdm(np.array(["a", "b", "c"]))]  # what CellOracle's loop does
        assert fake.tqdm is orig
    assert seen == ["a", "b", "c"]
    assert out.getvalue().splitlines()[1:] == ["[fit] 1/3 clusters (33%) done=a", "[fit] 2/3 clusters (67%) done=b",
                                               "[fit] 3/3 clusters (100%) done=c", "[fit] 3/3 clusters (100%) in 0:00:00 done=c"]
    with oracle.cluster_progress(Progress(3, "fit", enabled=False)) as verbose:
        assert verbose == 0 and fake.tqdm is orig
