"""An inter-process lock on a file: one process at a time through a critical section."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    Used where parallel processes (test or search workers) would otherwise race:
    building the LiteRT venv, creating a new SQLite study database.
    """
    with open(path, "w", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Write into a sibling folder and move it to ``final`` only once the block completes.

    A cache folder is then either whole or absent: a killed run leaves no half-written
    checkpoint for the next one (or another worker) to load.
    """
    staging = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        shutil.rmtree(final, ignore_errors=True)  # a stale, incomplete folder from before
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
