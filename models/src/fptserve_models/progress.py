"""A small progress bar for long steps (decoding, preloading, epochs) and plain-text tables.

On a terminal the bar redraws one line (at most 10 times a second); otherwise (a log file, CI)
it prints a line at each quarter reached at least 10 s after the previous line, and one at the
end, so logs stay short. No dependency."""

from __future__ import annotations

import sys
import time
from typing import Sequence, TextIO


def _fmt_seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:4.1f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, stream: TextIO | None = None, width: int = 28):
        self.total = max(0, int(total))
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.count = 0
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.next_quarter = 1
        self.postfix = ""
        self.closed = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.count += n
        if postfix is not None:
            self.postfix = postfix
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if now - self.last_draw >= 0.1 or self.count >= self.total:
                self._draw(now)
        elif self.total and self.count * 4 >= self.next_quarter * self.total and self.count < self.total:
            while self.count * 4 >= self.next_quarter * self.total:
                self.next_quarter += 1
            if now - max(self.last_draw, self.start) >= 10.0:
                self.last_draw = now
                print(self._line(now), file=self.stream, flush=True)

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        frac = self.count / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        eta = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        rate = f"{elapsed / self.count:.3f}s/it" if self.count else "-"
        post = f" {self.postfix}" if self.postfix else ""
        return (
            f"{self.desc}: [{bar}] {self.count}/{self.total} {_fmt_seconds(elapsed)} "
            f"(eta {_fmt_seconds(eta)}, {rate}){post}"
        )

    def _draw(self, now: float) -> None:
        self.last_draw = now
        self.stream.write("\r" + self._line(now) + "\x1b[K")
        self.stream.flush()

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            self._draw(now)
            self.stream.write("\n")
            self.stream.flush()
        elif not failed:
            print(self._line(now), file=self.stream, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table (columns right-aligned except the first), as a string."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)
