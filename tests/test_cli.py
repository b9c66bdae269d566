"""`cellrl plan` end to end on a tiny results folder: plans, JSON, representative cells and every error path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from results_fixture import UNREACHABLE_TYPE, build_results

from cellrl.cli import EXIT_INPUT, EXIT_OK, EXIT_UNREACHABLE, main
from cellrl.model import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_results(tmp_path_factory.mktemp("cli"))


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_from_type_text_and_json(tiny, capsys):
    code, out, err = run(capsys, "plan", "--results", str(tiny["results"]), "--start", "T0", "--target", "T1")
    assert code in (EXIT_OK, 1), err  # an untrained agent may fail; BFS is shown either way
    assert "BFS optimal sequence" in out and "agent plan (deterministic)" in out
    assert "representative of type T0" in out and "cos dist" in out
    code, out, err = run(capsys, "plan", "--results", str(tiny["results"]), "--start", "T0", "--target", "T1",
                         "--json")
    p = json.loads(out)
    assert p["start"]["cell_type"] == "T0" and p["target"]["cell_type"] == "T1"
    assert p["bfs"]["length"] == len(p["bfs"]["steps"]) - 1 > 0
    assert p["bfs"]["steps"][-1]["at_goal"] and p["bfs"]["steps"][-1]["cell_type"] == "T1"
    assert all(s["kind"] in ("KO", "OE") for s in p["bfs"]["steps"][1:])
    assert p["agent"]["success"] == (code == EXIT_OK)
    assert len(p["agent"]["steps"]) == p["agent"]["length"] + 1
    # the representative is the test cell of type T0 closest to the T0 centroid
    m = load_model(tiny["model"])
    assert m.split[p["start"]["cell_index"]] == "test" and m.cell_types[p["start"]["cell_index"]] == "T0"


def test_plan_from_cell_name_with_explicit_paths(tiny, capsys):
    m = load_model(tiny["model"])
    cell = str(m.cell_names[np.flatnonzero(m.cell_types == "T2")[0]])
    code, out, err = run(capsys, "plan", "--model", str(tiny["model"]), "--table", str(tiny["table"]),
                         "--agent", str(tiny["agent"]), "--start", cell, "--target", "t0", "--json")
    p = json.loads(out)
    assert p["start"]["cell"] == cell and p["start"]["chosen_as"] == "cell name"
    assert p["target"]["cell_type"] == "T0"  # case-insensitive type names


def test_unreachable_target(tiny, capsys):
    code, out, err = run(capsys, "plan", "--results", str(tiny["results"]), "--start", "T0", "--target",
                         UNREACHABLE_TYPE)
    assert code == EXIT_UNREACHABLE and "unreachable" in err and UNREACHABLE_TYPE in err


@pytest.mark.parametrize("argv, needle", [
    (["--start", "NoSuchCell", "--target", "T1"], "unknown start 'NoSuchCell'"),
    (["--start", "T0", "--target", "Neuron"], "unknown target cell type 'Neuron'; known types: T0, T1, T2, T3"),
    (["--start", "T1", "--target", "T1"], "already of type T1"),
])
def test_unknown_names(tiny, capsys, argv, needle):
    code, out, err = run(capsys, "plan", "--results", str(tiny["results"]), *argv)
    assert code == EXIT_INPUT and needle in err


def test_missing_files(tiny, tmp_path, capsys):
    code, _, err = run(capsys, "plan", "--results", str(tmp_path / "none"), "--start", "T0", "--target", "T1")
    assert code == EXIT_INPUT and "results folder not found" in err
    code, _, err = run(capsys, "plan", "--results", str(tiny["results"]), "--run", "other", "--start", "T0",
                       "--target", "T1", "--json")
    assert code == EXIT_INPUT and "agent file not found" in err and "--run" in err


def test_python_dash_m_entry_point(tiny):
    r = subprocess.run([sys.executable, "-m", "cellrl", "plan", "--results", str(tiny["results"]), "--start",
                        "T0", "--target", "Nope"], capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_INPUT and "known types" in r.stderr
