"""What every benchmark script does with its table: a header naming the machine and
versions, the table printed, and CSV + Markdown under benchmarks/results/."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from canao.latency.environment import cpu_model, versions

RESULTS = Path(__file__).resolve().parent / "results"


def header(detail: str) -> str:
    packages = ", ".join(f"{name} {version}" for name, version in sorted(versions().items()))
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores; {packages}; {detail}"


def publish(table: pd.DataFrame, shown: pd.DataFrame, stem: str, title: str) -> None:
    """Print ``shown`` under ``title``; save ``table`` as CSV and ``shown`` as Markdown."""
    print(title)
    print(shown.to_string(index=False))
    RESULTS.mkdir(exist_ok=True)
    table.to_csv(RESULTS / f"{stem}.csv", index=False)
    (RESULTS / f"{stem}.md").write_text(
        title + "\n\n" + shown.to_markdown(index=False) + "\n", encoding="utf-8"
    )
    print(f"wrote {RESULTS / stem}.csv and .md")
