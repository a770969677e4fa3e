"""Progress that tells the truth on a terminal and in a log file alike.

On a terminal, a tqdm bar with the numbers that matter (loss, examples per second). Where
output goes to a file or a CI log, a bar's carriage returns turn into one enormous line, so
instead one plain line is printed every few percent (and at the end), each with elapsed time,
rate and the same numbers.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

DEFAULT_EVERY_PERCENT = 5.0


class Progress:
    """``update(n, **values)`` after each step; ``close()`` at the end (or use ``with``)."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "step",
        stream: IO[str] | None = None,
        every_percent: float = DEFAULT_EVERY_PERCENT,
        rate_unit: str | None = None,
    ) -> None:
        self.label, self.total, self.unit = label, max(int(total), 1), unit
        self.stream = stream or sys.stderr
        self.every = max(1, round(self.total * every_percent / 100))
        self.rate_unit = rate_unit  # e.g. "ex": a rate of examples rather than of steps
        self.done = 0
        self.counted = 0  # what the rate counts (examples), when not steps
        self.values: dict[str, Any] = {}
        self.started = time.perf_counter()
        self._last_line = 0
        self._bar = self._tqdm() if _is_terminal(self.stream) else None

    def _tqdm(self) -> Any:
        from tqdm import tqdm

        return tqdm(total=self.total, desc=self.label, unit=self.unit, file=self.stream)

    def update(self, n: int = 1, count: int | None = None, **values: Any) -> None:
        """``n`` more steps done; ``count`` more of what the rate counts; values to show."""
        self.done += n
        self.counted += n if count is None else count
        self.values.update(values)
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix(self._shown(), refresh=False)
        elif self.done - self._last_line >= self.every or self.done >= self.total:
            self._line()
        if self.done >= self.total:
            self.close()

    def rate(self) -> float:
        return self.counted / max(time.perf_counter() - self.started, 1e-9)

    def _shown(self) -> dict[str, str]:
        shown = {k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in self.values.items()}
        if self.rate_unit:
            shown[f"{self.rate_unit}/s"] = f"{self.rate():.1f}"
        return shown

    def _line(self) -> None:
        self._last_line = self.done
        elapsed = time.perf_counter() - self.started
        values = " ".join(f"{k}={v}" for k, v in self._shown().items())
        percent = 100 * self.done / self.total
        print(
            f"{self.label}: {self.done}/{self.total} {self.unit}s ({percent:.0f}%) "
            f"{elapsed:.0f} s {values}".rstrip(),
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
