"""Shared fixtures. Real-data tests read ../shared/data in place and skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CELLRL_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skip the calling test when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (tests read ../shared/data in place)")
    return p


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def small_model():
    """A small random, well-formed OracleModel (not biology) for downstream unit tests."""
    from cellrl.model import random_model

    return random_model(n_cells=300, n_genes=40, n_types=4, n_regulators=6, seed=0)
