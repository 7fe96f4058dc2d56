"""Progress of long work on stderr: a bar on a terminal; elsewhere (a pipe, a CI log) a plain line every
few seconds, which a bar's carriage returns would garble into one endless line.

The libraries report through a callback, `progress(what, done, total)`; `Stages` turns one into a
`Progress` per `what` (a parity run's reference pass, then its native pass, ...).
"""
from __future__ import annotations

import sys
import time

EVERY = 5.0  # seconds between plain lines


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    return f"{s // 60}:{s % 60:02d}" if s < 3600 else f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """`update(done, total)` with the count done so far; `close()` at the end. `check()`, when given, runs
    at every update (the command line raises a pending interrupt there)."""

    def __init__(self, desc: str, unit: str, total: int | None = None, *, file=None, check=None):
        self.file = file if file is not None else sys.stderr
        self.desc, self.unit, self.total, self.check = desc, unit, total, check
        self.n, self.start = 0, time.monotonic()
        self.last = self.start
        self.said = False
        self.bar = None
        isatty = getattr(self.file, "isatty", None)
        if isatty is not None and isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit=unit, desc=desc, file=self.file, dynamic_ncols=True)

    def update(self, done: int, total: int | None = None) -> None:
        if self.check is not None:
            self.check()
        if total is not None and total != self.total:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        self.n = done
        now = time.monotonic()
        if now - self.last >= EVERY:
            self.last = now
            self._say(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        text = f"{self.desc}: {count} {self.unit}s, {_duration(elapsed)}, {rate:.3g} {self.unit}s/s"
        if self.total and rate > 0 and self.n < self.total:
            text += f", ETA {_duration((self.total - self.n) / rate)}"
        return text

    def _say(self, text: str) -> None:
        self.said = True
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.said:  # a stage that lasted: say how it ended (a short one stays silent)
            self._say(self.line())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Stages:
    """The libraries' `progress(what, done, total)`: one Progress per `what`, opened as the previous closes."""

    def __init__(self, prefix: str, unit: str = "layer", *, file=None, check=None):
        # stderr as it is now: a library may redirect it while it works (parity silences ldm's prints)
        self.file = file if file is not None else sys.stderr
        self.prefix, self.unit, self.check = prefix, unit, check
        self.what, self.current = None, None

    def __call__(self, what: str, done: int, total: int | None = None, unit: str | None = None) -> None:
        if what != self.what:
            self.close()
            self.what = what
            self.current = Progress(f"{self.prefix}: {what}", unit or self.unit, total, file=self.file,
                                    check=self.check)
        self.current.update(done, total)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
        self.what = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
