"""Progress the user sees on the console during long stages (training, oracle fitting, transition chunks).

Workflow scripts run inside :func:`cellrl.smk.log_to`, which sends stdout/stderr and the logging to the rule's
log file; progress therefore goes to :func:`console`, the terminal saved by ``log_to``. On a TTY it is a tqdm
bar; otherwise (Snakemake piping, SLURM, CI) one plain line at most every ``interval_s`` plus one at the end::

    [train] 40,960/100,000 steps (41%) 1,520 steps/s ETA 0:00:39 succ=0.82

The plain lines also go to the rule's log when a logger is given (and only there when that logger already
writes to the console, so no line shows twice). Console trouble never raises.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from types import TracebackType
from typing import Any, Callable, TextIO

from . import smk

__all__ = ["console", "note", "Progress"]


def console() -> TextIO:
    """The user's terminal: the stderr saved by :func:`cellrl.smk.log_to` inside it, else ``sys.stderr``."""
    return smk.real_stderr if smk.real_stderr is not None else sys.stderr


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # closed or odd stream
        return False


def _write(stream: Any, line: str) -> bool:
    """Write one line; False when the stream cannot take it (closed, detached, ...)."""
    try:
        stream.write(line + "\n")
        stream.flush()
        return True
    except Exception:
        return False


def _reaches(log: logging.Logger, stream: Any) -> bool:
    """Whether ``log``'s INFO records already end up on ``stream`` (e.g. ``basicConfig`` outside ``log_to``), so
    a line is not printed twice."""
    if not log.isEnabledFor(logging.INFO):
        return False
    lg: logging.Logger | None = log
    while lg is not None:
        for h in lg.handlers:
            if (isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is stream
                    and h.level <= logging.INFO):
                return True
        lg = lg.parent if lg.propagate else None
    return False


def _plural(unit: str) -> str:
    return unit if unit.endswith("s") else unit + "s"


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(max(0.0, seconds)))))


def _value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def note(msg: str, log: logging.Logger | None = None, enabled: bool = True) -> None:
    """One line on the console (and in ``log``) for a phase without a count, e.g. ``[oracle] PCA ...``."""
    if not enabled:
        return
    stream = console()
    if log is None or not _reaches(log, stream):
        _write(stream, msg)
    if log is not None:
        log.info("%s", msg)


class Progress:
    """Progress of ``total`` units (``None``: unknown) on the console, as a context manager.

    ``update(n, **postfix)`` counts ``n`` more units; ``postfix`` items (e.g. ``succ=0.82``) end the line.
    ``interval_s`` spaces the plain lines (non-TTY console and ``log``); ``initial`` units were done before
    (resume: the rate counts only the new ones). ``enabled=False`` makes every call a no-op. ``stream`` and
    ``clock`` replace the console and ``time.monotonic`` (tests).
    """

    def __init__(self, total: float | None, desc: str, unit: str = "step", log: logging.Logger | None = None,
                 interval_s: float = 30.0, *, enabled: bool = True, initial: float = 0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.log = log
        self.interval_s = float(interval_s)
        self.enabled = enabled
        self.initial = self.n = initial
        self.postfix: dict[str, Any] = {}
        self._clock = clock
        self._t0 = self._last = clock()
        self._closed = not enabled
        self._bar: Any = None
        if not enabled:
            return
        self.stream = stream if stream is not None else console()
        if _isatty(self.stream):
            try:
                from tqdm import tqdm

                big = total is not None and total >= 10_000  # 1.23M/4.10M; unit_scale shows small counts as 8.00
                self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.stream,
                                 dynamic_ncols=True, mininterval=0.5, unit_scale=big)
            except Exception:
                self._bar = None
        # plain lines on the console when there is no bar, unless the logger already puts them there
        self._plain = self._bar is None and not (log is not None and _reaches(log, self.stream))
        self._emit()

    # -- public ------------------------------------------------------------------------------------------
    def update(self, n: float = 1, **postfix: Any) -> None:
        """Count ``n`` more units; the postfix shows from the next redraw or line."""
        if self._closed:
            return
        self.n += n
        self.postfix.update(postfix)
        if self._bar is not None:
            def draw(bar: Any) -> None:  # tqdm redraws at most every mininterval
                if postfix:
                    bar.set_postfix_str(self._post(), refresh=False)
                bar.update(n)

            self._bar_call(draw)
        now = self._clock()
        if now - self._last >= self.interval_s:
            self._last = now
            self._emit()

    def set_postfix(self, **postfix: Any) -> None:
        """Change the postfix (the bar redraws now; plain lines show it from the next one)."""
        if self._closed:
            return
        self.postfix.update(postfix)
        if self._bar is not None:
            self._bar_call(lambda b: b.set_postfix_str(self._post()))

    def close(self, stopped: bool = False) -> None:
        """Close the bar and write the final line (``stopped``: after an error)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar_call(lambda b: b.close())
            self._bar = None
        self._emit(final=True, stopped=stopped)

    def line(self, final: bool = False, stopped: bool = False) -> str:
        """The plain progress line: desc, done/total, percent, rate, ETA (or elapsed when final), postfix."""
        units = _plural(self.unit)
        parts = [f"[{self.desc}]"]
        if self.total:
            parts.append(f"{self.n:,.0f}/{self.total:,.0f} {units} ({100 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{self.n:,.0f} {units}")
        elapsed = self._clock() - self._t0
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:,.0f} {units}/s" if rate >= 10 else f"{rate:.1f} {units}/s" if rate >= 1
                         else f"{1 / rate:,.1f} s/{self.unit}")
        if final:
            parts.append(("stopped after " if stopped else "in ") + _hms(elapsed))
        elif rate > 0 and self.total:
            parts.append(f"ETA {_hms((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self._post())
        return " ".join(parts)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(stopped=exc_type is not None)

    # -- internals ---------------------------------------------------------------------------------------
    def _post(self) -> str:
        return " ".join(f"{k}={_value(v)}" for k, v in self.postfix.items())

    def _bar_call(self, fn: Callable[[Any], Any]) -> None:
        try:
            fn(self._bar)
        except Exception:  # the terminal went away: keep counting, stop drawing
            self._bar = None

    def _emit(self, final: bool = False, stopped: bool = False) -> None:
        if not (self._plain or self.log is not None):
            return
        text = self.line(final, stopped)
        if self._plain and not _write(self.stream, text):
            self._plain = False
        if self.log is not None:
            self.log.info("%s", text)
