"""Helpers for the thin workflow scripts: send a rule's output to its log file, report errors cleanly."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator, TextIO

# The user's terminal while a rule's output goes to its log (outermost ``log_to``); read by cellrl.progress.
real_stderr: TextIO | None = None


@contextlib.contextmanager
def log_to(path: str | Path | None, name: str = "cellrl") -> Iterator[logging.Logger]:
    """Redirect stdout/stderr and the ``cellrl`` logger into ``path`` for the duration of a rule.

    On an exception the traceback goes to the log and a one-line message to the real stderr, then the
    exception propagates (Snakemake marks the job failed and removes its outputs). The real stderr is kept in
    :data:`real_stderr` meanwhile, so progress lines (:mod:`cellrl.progress`) can still reach the terminal.
    """
    global real_stderr
    logger = logging.getLogger(name)
    if path is None:
        logging.basicConfig(level=logging.INFO)
        yield logger
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    real_err = sys.stderr if real_stderr is None else real_stderr  # nested: keep the terminal
    with open(path, "w", buffering=1) as fh:
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        t0 = time.time()
        saved, real_stderr = real_stderr, real_err
        try:
            with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                yield logger
            logger.info("done in %.1f s", time.time() - t0)
        except BaseException as e:
            fh.write(traceback.format_exc())
            print(f"cellrl error: {e}\n  (full log: {path})", file=real_err)
            raise
        finally:
            root.removeHandler(handler)
            real_stderr = saved
