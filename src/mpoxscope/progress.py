"""Progress that is never silent: a tqdm bar on a terminal, plain timestamped lines with an ETA elsewhere.

Outside a terminal (a log file, CI, ``nohup``) tqdm draws nothing, so a 17-minute feature cache looked like a hang.
:func:`progress` returns a tqdm bar when its stream is a terminal and otherwise a :class:`PlainProgress` with the
same ``update`` / ``close`` / ``set_postfix`` / ``set_description`` / iteration API that prints one line every
``interval`` seconds (count, rate, ETA) and a last line when it closes:

>>> for item in progress(items, desc="caching features", unit="img"):   # doctest: +SKIP
...     work(item)
caching features: 120/755 (16%), 2.1 img/s, elapsed 0:57, ETA 5:02
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

#: Seconds between two plain progress lines.
INTERVAL_S = 10.0


def _clock_text(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PlainProgress:
    """tqdm's everyday API, printing plain lines: ``desc: n/total (p%), rate unit/s, elapsed, ETA, postfix``."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", stream: IO[str] | None = None, interval: float = INTERVAL_S,
                 disable: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.stream, self.interval, self.disable, self.clock = stream, interval, disable, clock
        self.n = 0
        self.postfix = ""
        self.start = self.last_print = clock()
        self.closed = False

    # --- the tqdm API ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("progress(): nothing to iterate (pass an iterable)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if not self.disable and now - self.last_print >= self.interval:
            self.last_print = now
            self._print(self.line(now))

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """Nothing to redraw: lines are printed on the interval."""

    def write(self, s: str) -> None:
        if not self.disable:
            self._print(s)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.n:
            now = self.clock()
            rate = self.n / max(now - self.start, 1e-9)
            self._print(f"{self.desc + ': ' if self.desc else ''}done {self.n}"
                        f"{f'/{self.total}' if self.total else ''} {self.unit} in {_clock_text(now - self.start)} "
                        f"({rate:.3g} {self.unit}/s){f', {self.postfix}' if self.postfix else ''}")

    # --- formatting -----------------------------------------------------------------------------------------
    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}",
                 f"{rate:.3g} {self.unit}/s", f"elapsed {_clock_text(elapsed)}"]
        if self.total and rate > 0:
            parts.append(f"ETA {_clock_text((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stderr
        print(text, file=stream, flush=True)


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", disable: bool = False,
             unit: str = "it", leave: bool = False, stream: IO[str] | None = None,
             interval: float = INTERVAL_S) -> Any:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`PlainProgress` printing a line
    every ``interval`` seconds; ``disable`` silences both (same API, nothing printed)."""
    out = stream or sys.stderr
    if not disable and _is_tty(out):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=out)
    return PlainProgress(iterable, total, desc, unit, out, interval, disable)
