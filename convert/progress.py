"""A progress bar in bytes: done / total, rate, time left. Redraws in place on a terminal, prints
a line every few seconds otherwise (logs, CI)."""

import sys
import time

from .plan import duration, human


class Progress:
    def __init__(self, total: int, *, stream=None, enabled: bool = True, label: str = "converting"):
        self.total, self.done = max(int(total), 1), 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.label = label
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.last = time.monotonic()
        self.interval = 0.2 if self.tty else 5.0

    def update(self, nbytes: int):
        self.done += int(nbytes)
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self._draw(now)

    def _draw(self, now: float, final: bool = False):
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        frac = min(self.done / self.total, 1.0)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        eta = "done" if final else (f"{duration(left)} left" if left != float("inf") else "--")
        text = (f"{self.label} [{bar}] {100 * frac:5.1f}%  {human(self.done)} / {human(self.total)}"
                f"  {rate / 1e6:.1f} MB/s  {eta}")
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self._draw(time.monotonic(), final=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start
