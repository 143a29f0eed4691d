"""A one-line progress display with rate and ETA, on stderr.

On a terminal the line redraws in place; in a log (CI, `> file`) it prints a fresh line every few seconds.
"""

from __future__ import annotations

import sys
import time


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    def __init__(self, desc: str, total: float | None = None, unit: str = "", enabled: bool = True) -> None:
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.done = 0.0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last_draw = self.start
        self.interval = 0.2 if self.tty else 5.0

    def update(self, n: float = 1, extra: str = "", force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (force or now - self.last_draw >= self.interval):
            self.last_draw = now
            self._draw(now, extra)

    def _draw(self, now: float, extra: str) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [self.desc]
        if self.total:
            parts.append(f"{self.done / self.total:6.1%}")
        parts.append(f"{_human(rate)}{self.unit}/s")
        if extra:
            parts.append(extra)
        if self.total and rate > 0:
            parts.append(f"ETA {fmt_duration((self.total - self.done) / rate)}")
        parts.append(f"elapsed {fmt_duration(elapsed)}")
        line = " | ".join(parts)
        sys.stderr.write(("\r\033[K" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self, extra: str = "") -> None:
        if self.enabled:
            self._draw(time.perf_counter(), extra)
            if self.tty:
                sys.stderr.write("\n")


def _human(x: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.1f}{unit}" if unit or x < 100 else f"{x:.0f}"
        x /= 1000
    return f"{x:.1f}T"
