"""Progress: a bar on a terminal, a line every few percent in a log."""

from __future__ import annotations

import io

from canao.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_every_few_percent_with_the_numbers() -> None:
    stream = io.StringIO()
    progress = Progress("teacher", 100, stream=stream, every_percent=10, rate_unit="ex")
    for step in range(100):
        progress.update(1, count=32, loss=1.0 / (step + 1))
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 10 and "\r" not in stream.getvalue()
    assert lines[0].startswith("teacher: 10/100 steps (10%)")
    assert "loss=0.1000" in lines[0] and "ex/s=" in lines[0]
    assert lines[-1].startswith("teacher: 100/100 steps (100%)") and "loss=0.0100" in lines[-1]


def test_a_terminal_gets_a_bar() -> None:
    stream = Terminal()
    with Progress("super-net", 4, stream=stream) as progress:
        for _ in range(4):
            progress.update(1, kl_smallest=0.25)
    text = stream.getvalue()
    assert "\r" in text and "super-net" in text and "kl_smallest=0.2500" in text
