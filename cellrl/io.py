"""Atomic file output: write to a temporary sibling, then rename, so an interrupted job never looks finished."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffix (or ``suffix``) so writers that dispatch on the extension work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suf = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suf}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs should be readable like any other file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy scalars/arrays converted)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=default) + "\n"))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically."""
    return write_atomic(path, lambda p: p.write_text(text))


def save_npy(path: str | os.PathLike, arr: np.ndarray) -> Path:
    """Save one array as .npy atomically."""

    def w(p: Path) -> None:
        with open(p, "wb") as fh:
            np.save(fh, arr)

    return write_atomic(path, w)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Save arrays as a compressed .npz atomically."""

    def w(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    return write_atomic(path, w)


def write_table(path: str | os.PathLike, df: "Any", **kwargs: Any) -> Path:
    """Write a DataFrame atomically; parquet for .parquet, else TSV."""
    p = Path(path)
    if p.suffix == ".parquet":
        return write_atomic(p, lambda t: df.to_parquet(t, **kwargs))
    return write_atomic(p, lambda t: df.to_csv(t, sep="\t", **({"index": False} | kwargs)))


def write_h5ad(path: str | os.PathLike, adata: "Any") -> Path:
    """Write an AnnData atomically."""
    return write_atomic(path, lambda p: adata.write_h5ad(p))
