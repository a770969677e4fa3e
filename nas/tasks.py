"""Task data: GLUE-style TSV folders (SST-2, RTE, ...) as tokenised splits.

A task folder holds ``train.tsv`` and ``dev.tsv`` with a header row; the text
columns are ``sentence`` (single-sentence tasks) or ``sentence1``/``sentence2``
(pairs), and ``label`` is an integer. Quotes are literal (``QUOTE_NONE``):
GLUE sentences contain quote characters that are not quoting. The same
folders come from the Hugging Face hub as ``datasets.load_dataset("glue", ...)``;
the project's copies live in ``../shared/data/glue``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from canao.errors import CanaoError

# Text columns of the GLUE tasks canao knows by name.
TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "sst2": ("sentence",),
    "rte": ("sentence1", "sentence2"),
}


class TaskDataError(CanaoError):
    """A task folder or file that is missing or malformed."""


@dataclass(frozen=True)
class Split:
    texts: tuple[tuple[str, ...], ...]  # one tuple per example: (sentence,) or (s1, s2)
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)


def default_glue_root() -> Path:
    """``../shared/data/glue`` relative to the repository root (the project's real GLUE copy)."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "glue"


def read_split(path: Path, columns: tuple[str, ...]) -> Split:
    """One TSV split, with one clear error for a missing file or column."""
    if not path.is_file():
        raise TaskDataError(f"task file {path} not found")
    try:
        frame = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise TaskDataError(f"{path}: not a tab-separated file with a header ({err})") from None
    missing = [c for c in (*columns, "label") if c not in frame.columns]
    if missing:
        raise TaskDataError(f"{path}: missing columns {missing}; has {list(frame.columns)}")
    try:
        labels = tuple(int(v) for v in frame["label"])
    except ValueError:
        raise TaskDataError(f"{path}: labels must be integers") from None
    texts = tuple(zip(*(frame[c].astype(str) for c in columns), strict=True))
    return Split(texts, labels)


def load_task(task: str, root: Path | None = None) -> dict[str, Split]:
    """``{"train": Split, "dev": Split}`` for a GLUE task folder ``root/task``."""
    if task not in TEXT_COLUMNS:
        raise TaskDataError(f"unknown task {task!r}; known: {', '.join(TEXT_COLUMNS)}")
    folder = (root or default_glue_root()) / task
    return {
        split: read_split(folder / f"{split}.tsv", TEXT_COLUMNS[task]) for split in ("train", "dev")
    }
