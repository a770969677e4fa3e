"""An append-only SQLite cache of measurements.

Keyed by :func:`canao.latency.protocol.measurement_key`; every measurement is
kept (a later one never overwrites an earlier one), lookups return the newest.
SQLite because several search workers may share one file, and because a
killed run must not lose what it already measured: each insert commits.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from canao.latency.protocol import Measurement, Protocol

_SCHEMA = """
CREATE TABLE IF NOT EXISTS measurements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    target TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    shapes TEXT NOT NULL,
    threads INTEGER NOT NULL,
    device TEXT NOT NULL,
    median_ms REAL NOT NULL,
    min_ms REAL NOT NULL,
    iqr_ms REAL NOT NULL,
    mean_ms REAL NOT NULL,
    cpu_model TEXT NOT NULL,
    measured_at TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS measurements_key ON measurements (key);
"""


def default_cache_path() -> Path:
    """``$CANAO_CACHE_DIR/latency.sqlite``, else ``~/.cache/canao/latency.sqlite``."""
    base = os.environ.get("CANAO_CACHE_DIR") or Path.home() / ".cache" / "canao"
    return Path(base) / "latency.sqlite"


class LatencyCache:
    """Measurements on disk. ``LatencyCache(":memory:")`` keeps them in memory."""

    def __init__(self, path: str | Path | None = None) -> None:
        target = default_cache_path() if path is None else path
        if str(target) != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        # timeout: wait for another worker's write instead of failing at once.
        self._conn = sqlite3.connect(str(target), timeout=30)
        self._conn.executescript(_SCHEMA)
        self.path = str(target)

    def put(self, measurement: Measurement) -> None:
        record = json.dumps(asdict(measurement))
        with self._conn:  # one transaction per measurement: nothing half-written
            self._conn.execute(
                "INSERT INTO measurements (key, model, model_hash, target, pipeline, shapes,"
                " threads, device, median_ms, min_ms, iqr_ms, mean_ms, cpu_model, measured_at,"
                " record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    measurement.key,
                    measurement.model,
                    measurement.model_hash,
                    measurement.target,
                    measurement.pipeline,
                    measurement.shapes,
                    measurement.threads,
                    measurement.device,
                    measurement.median_ms,
                    measurement.min_ms,
                    measurement.iqr_ms,
                    measurement.mean_ms,
                    measurement.cpu_model,
                    measurement.measured_at,
                    record,
                ),
            )

    def get(self, key: str) -> Measurement | None:
        """The newest measurement stored under ``key``, or None."""
        row = self._conn.execute(
            "SELECT record FROM measurements WHERE key = ? ORDER BY id DESC LIMIT 1", (key,)
        ).fetchone()
        return None if row is None else _from_record(row[0])

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM measurements").fetchone()[0])

    def dataframe(self) -> pd.DataFrame:
        """Every stored measurement, one row each, oldest first."""
        return pd.read_sql_query("SELECT * FROM measurements ORDER BY id", self._conn).drop(
            columns=["record"]
        )

    def close(self) -> None:
        self._conn.close()


def _from_record(record: str) -> Measurement:
    fields = json.loads(record)
    fields["protocol"] = Protocol(**fields["protocol"])
    fields["repeats_ms"] = tuple(fields["repeats_ms"])
    return Measurement(**fields)


def to_dataframe(measurements: list[Measurement]) -> pd.DataFrame:
    """Measurements as a DataFrame, one row each (repeats dropped, protocol flattened)."""
    return pd.DataFrame([m.row() for m in measurements])
