"""A throttled progress line for long measurements: count, rate, ETA (on stderr)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h07m``."""
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """``label: done/total (pct) | rate/s | elapsed, ETA`` redrawn at most every ``interval`` seconds.

    On a terminal the line is redrawn in place; otherwise (a log file, CI) a new line is written
    at most every ``log_interval`` seconds so logs stay short. The ETA extrapolates the rate of
    this session only (a resumed run's earlier work is not counted as speed).
    """

    def __init__(self, label: str, total: int, unit: str, stream: TextIO | None = None, interval: float = 0.5) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if self.tty else 10.0
        self.start = time.monotonic()
        self.last = 0.0
        self.done = 0
        self.note = ""

    def update(self, done: int, note: str = "", force: bool = False) -> None:
        """Record progress; redraw if due (or ``force``)."""
        self.done, self.note = done, note or self.note
        now = time.monotonic()
        if force or now - self.last >= self.interval:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        width = 20
        filled = int(width * pct / 100)
        bar = "#" * filled + "." * (width - filled)
        eta_text = duration(eta) if eta == eta else "?"
        line = (
            f"{self.label} [{bar}] {self.done}/{self.total} {self.unit} ({pct:.0f}%) | {rate:.2f}/s | "
            f"{duration(elapsed)} elapsed, ETA {eta_text}"
        )
        if self.note:
            line += f" | {self.note}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        self._draw(time.monotonic())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
