"""Atomic file output (write to a temporary sibling, then rename, so an interrupted job never looks finished) and
the integrity check of artifacts against the sha256 their stage recorded next to them."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import InputError

log = logging.getLogger("cellrl.io")


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
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp{glob.escape(suf)}"):
            with contextlib.suppress(OSError):  # left by an earlier writer killed mid-write (kill -9)
                stale.unlink()
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


def save_npz(path: str | os.PathLike, compress: bool = True, **arrays: np.ndarray) -> Path:
    """Save arrays as a .npz (compressed unless ``compress=False``) atomically."""

    def w(p: Path) -> None:
        with open(p, "wb") as fh:
            (np.savez_compressed if compress else np.savez)(fh, **arrays)

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


# ---------------------------------------------------------------------------------------------- integrity
#: Artifacts whose stage records their sha256 next to them: kind -> (stats file in the same folder, its field,
#: the rule that writes both). The table's digest is over the array's bytes (``table.tobytes()``), the others
#: over the file.
RECORDED_SHA256: dict[str, tuple[str, str, str]] = {
    "model": ("stats.json", "model_sha256", "fit_oracle"),
    "table": ("stats.json", "table_sha256", "transitions"),
    "agent": ("train_summary.json", "model_zip_sha256", "train"),
    "bfs": ("bfs_stats.json", "bfs_sha256", "bfs"),
}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_array(a: np.ndarray) -> str:
    """Hex sha256 of an array's C-order bytes (equal to ``sha256(a.tobytes())``)."""
    return hashlib.sha256(np.ascontiguousarray(a).data).hexdigest()


def rerun_fix(path: str | os.PathLike, rule: str) -> str:
    """The fix of a bad artifact: rerun the rule that writes it."""
    return f"rerun the {rule} rule: snakemake {path} --forcerun {rule}"


def verify_sha256(path: str | os.PathLike, expected: str, rule: str, field: str, actual: str | None = None) -> None:
    """Raise InputError naming ``path``, ``field`` and the rule to rerun unless the file's sha256 (or ``actual``,
    a digest the caller computed, e.g. :func:`sha256_array`) equals ``expected``."""
    actual = actual if actual is not None else sha256_file(path)
    if actual != expected:
        raise InputError(f"sha256 {actual[:16]}... differs from the {expected[:16]}... recorded when the {rule} "
                         "rule wrote it: the file was altered or replaced since", path=path, field=field,
                         fix=rerun_fix(path, rule))


def verify_artifact(path: str | os.PathLike, kind: str, actual: str | None = None) -> bool:
    """Check ``path`` against the sha256 recorded next to it (:data:`RECORDED_SHA256`); InputError on a mismatch.

    Returns False, with a log line, when there is nothing to check against (no stats file, or one written before
    checksums were recorded): files passed by hand are used as they are.
    """
    stats_name, field, rule = RECORDED_SHA256[kind]
    path = Path(path)
    stats = path.parent / stats_name
    if not stats.exists():
        log.info("%s: no %s next to it, sha256 not verified", path, stats_name)
        return False
    try:
        expected = json.loads(stats.read_text()).get(field)
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"cannot read {stats_name} ({type(e).__name__}: {e})", path=stats,
                         fix=rerun_fix(path, rule)) from e
    if not expected:
        log.info("%s: %s records no %s, sha256 not verified", path, stats, field)
        return False
    verify_sha256(path, str(expected), rule, f"{stats_name} {field}", actual)
    return True
