"""A user's task data, as files are kept: CSV, TSV (header or not), JSON Lines, Parquet.

Files are read with ``datasets``' local builders (``load_dataset("csv" | "json" | "parquet",
data_files=...)``), the library this ecosystem already uses, so canao does not grow its own
parsers. What canao adds is what those builders leave to the caller:

* finding the splits: a folder holding ``train``, ``validation``/``dev`` and ``test`` files
  (Hugging Face names, or shards such as ``train-00000-of-00001.parquet``, also under ``data/``),
  a single file, or explicit ``--train``/``--dev`` files;
* header or not: a delimited file whose first row names no column canao knows (``sentence``,
  ``label``, ...) nor one the user named is read as header-less, its columns called ``0``,
  ``1``, ...;
* which columns are text and which is the label: given (``--text-columns a[,b]``,
  ``--label-column y``), detected by name, or (header-less files) the label is the column with
  the fewest distinct values and the text the rest;
* labels: strings or integers, any number of classes, named in sorted (numeric where all are
  integers) order of the training labels; a dev label never seen in training is an error.

With no dev file, labelled ``test`` data is the dev split; otherwise a stratified, seeded 10%
(at most 1,000 examples) of train is held out. Every problem is one ``TaskDataError`` line that
names the file and what is wrong with it.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from canao.errors import CanaoError

# Extensions and the datasets builder that reads them.
BUILDERS: dict[str, str] = {
    ".tsv": "csv",
    ".tab": "csv",
    ".csv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
DELIMITERS: dict[str, str] = {".tsv": "\t", ".tab": "\t", ".csv": ","}

# File stems of each split, in order of preference (Hugging Face's names first).
SPLIT_STEMS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "dev": ("validation", "dev", "valid", "val", "validation_matched", "dev_matched"),
    "test": ("test",),
}

# Text columns recognised by name, pairs first: QNLI-style files have ``sentence`` as the
# second text of a pair.
TEXT_COLUMN_SETS: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("text_a", "text_b"),
    ("sentence",),
    ("text",),
    ("review",),
    ("content",),
    ("document",),
)
LABEL_COLUMNS: tuple[str, ...] = ("label", "labels", "class", "category", "target", "y")
ID_COLUMNS: frozenset[str] = frozenset({"id", "idx", "index", "guid", "uid"})
KNOWN_COLUMNS: frozenset[str] = frozenset(
    {c for cols in TEXT_COLUMN_SETS for c in cols} | set(LABEL_COLUMNS) | ID_COLUMNS
)

HELD_OUT_FRACTION = 0.1
HELD_OUT_MAX = 1000
HELD_OUT_SEED = 0
MAX_LABEL_CARDINALITY = 1000  # a "label" column with more classes than this is text


class TaskDataError(CanaoError):
    """A task name, folder, file or split that is unknown, missing or malformed."""


@dataclass(frozen=True)
class Split:
    texts: tuple[tuple[str, ...], ...]  # one tuple per example: (sentence,) or (s1, s2)
    labels: tuple[int, ...]
    label_names: tuple[str, ...] | None = None  # names of label ids 0, 1, ... where known

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_pair(self) -> bool:
        """Whether examples are sentence pairs, which the tokenizer encodes with a separator."""
        return bool(self.texts) and len(self.texts[0]) == 2


@dataclass(frozen=True)
class DataColumns:
    """The columns a user named (None: detect)."""

    text: tuple[str, ...] | None = None
    label: str | None = None


# --- finding files -----------------------------------------------------------------------------


def split_files(folder: Path) -> dict[str, list[Path]]:
    """``{"train": [...], "dev": [...], "test": [...]}`` (only splits present) in ``folder``."""
    found: dict[str, list[Path]] = {}
    for split, stems in SPLIT_STEMS.items():
        for stem in stems:
            files = _files_named(folder, stem) or _files_named(folder / "data", stem)
            if files:
                found[split] = files
                break
    return found


def _files_named(folder: Path, stem: str) -> list[Path]:
    """``stem.ext`` or shards ``stem-*.ext`` / ``stem_0*.ext`` of one supported extension."""
    if not folder.is_dir():
        return []
    matches = sorted(
        path
        for path in folder.iterdir()
        if path.is_file()
        and path.suffix.lower() in BUILDERS
        and (path.stem == stem or path.stem.startswith(f"{stem}-"))
    )
    if len({p.suffix.lower() for p in matches}) > 1:
        raise TaskDataError(
            f"{folder}: several {stem} files of different formats "
            f"({', '.join(p.name for p in matches)}); keep one"
        )
    return matches


def load_files(
    train: Sequence[Path],
    dev: Sequence[Path] | None = None,
    test: Sequence[Path] | None = None,
    columns: DataColumns | None = None,
) -> dict[str, Split]:
    """``{"train", "dev"}`` Splits from files (see the module doc for dev's fallbacks)."""
    columns = columns or DataColumns()
    files = {"train": train, **({"dev": dev} if dev else {})}
    frames = {split: read_files(paths, columns) for split, paths in files.items()}
    text_columns, label_column = choose_columns(frames["train"], columns, train[0])
    for split, frame in frames.items():
        _require_columns(frame, (*text_columns, label_column), files[split])
    if "dev" not in frames and test:
        test_frame = read_files(test, columns)
        if label_column in test_frame.columns and _labelled(test_frame[label_column]):
            frames["dev"], files["dev"] = test_frame, test
    names = label_names(frames["train"][label_column], train[0])
    splits = {
        split: _split(frame, text_columns, label_column, names, files[split][0])
        for split, frame in frames.items()
    }
    if "dev" not in splits:
        splits["train"], splits["dev"] = hold_out(splits["train"])
    return splits


# --- reading -----------------------------------------------------------------------------------


def read_files(paths: Sequence[Path], columns: DataColumns) -> pd.DataFrame:
    """One split's files as a frame of strings, read with ``datasets``' local builders."""
    for path in paths:
        if not path.is_file():
            raise TaskDataError(f"task file {path} not found")
    suffixes = {path.suffix.lower() for path in paths}
    if len(suffixes) != 1 or next(iter(suffixes)) not in BUILDERS:
        raise TaskDataError(
            f"{paths[0]}: unsupported file type; canao reads "
            f"{', '.join(sorted(BUILDERS))} (give the file one of these extensions)"
        )
    suffix = next(iter(suffixes))
    builder = BUILDERS[suffix]
    options = _delimited_options(paths[0], suffix, columns) if builder == "csv" else {}
    frame = _load_dataset(builder, paths, options)
    if frame.empty:
        raise TaskDataError(f"{paths[0]}: no examples")
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _delimited_options(path: Path, suffix: str, columns: DataColumns) -> dict[str, object]:
    """Header or not, delimiter and quoting for a CSV/TSV file; every column read as text."""
    from datasets import Features, Value

    delimiter = DELIMITERS[suffix]
    quoting = tsv_quoting(path) if delimiter == "\t" else csv.QUOTE_MINIMAL
    first = _first_row(path, delimiter, quoting)
    named = {*(columns.text or ()), *((columns.label,) if columns.label else ())}
    named = {name for name in named if not _is_integer(name)}  # "0", "1": header-less positions
    has_header = any(f.strip().lower() in KNOWN_COLUMNS or f.strip() in named for f in first)
    has_header = has_header or _looks_like_header(path, delimiter, quoting)
    names = [f.strip() for f in first] if has_header else [str(i) for i in range(len(first))]
    if has_header and _only_one_row(path):
        raise TaskDataError(f"{path}: no examples, only a header row")
    if len(set(names)) != len(names):
        raise TaskDataError(f"{path}: the header repeats a column name: {names}")
    return {
        "delimiter": delimiter,
        "quoting": quoting,
        "header": 0 if has_header else None,
        "column_names": names,
        "features": Features({name: Value("string") for name in names}),
        "keep_default_na": False,
        "na_filter": False,
    }


def tsv_quoting(path: Path, sample_lines: int = 2000) -> int:
    """``QUOTE_NONE`` for TSV files whose quotes are text (SST-2), ``QUOTE_MINIMAL`` for quoted.

    Both kinds are common: GLUE's SST-2 keeps quotes literal, while pandas (and GLUE's RTE
    copy here) wraps fields holding quotes in quotes and doubles the inner ones. A sample is
    quoted if some field is wrapped so and no wrapped field has an undoubled inner quote.
    """
    wrapped = literal = 0
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for _, line in zip(range(sample_lines), handle, strict=False):
                for field in line.rstrip("\r\n").split("\t"):
                    if len(field) >= 2 and field[0] == field[-1] == '"':
                        inner = field[1:-1].replace('""', "")
                        literal += '"' in inner
                        wrapped += '"' not in inner
    except OSError:
        return csv.QUOTE_NONE
    return csv.QUOTE_MINIMAL if wrapped and not literal else csv.QUOTE_NONE


def _looks_like_header(path: Path, delimiter: str, quoting: int, sample_lines: int = 2000) -> bool:
    """Whether an unknown first row is a header rather than an example.

    Two signs, either enough: a column whose other values are all numbers under a first value
    that is not one (``csv.Sniffer``'s test, restricted to numbers), or a few-valued column
    (labels) whose first value never occurs again.
    """
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        rows = list(
            zip(
                range(sample_lines),
                csv.reader(handle, delimiter=delimiter, quoting=quoting),
                strict=False,
            )
        )
    rows = [row for _, row in rows]
    if len(rows) < 3:
        return False
    first, rest = rows[0], [row for row in rows[1:] if len(row) == len(rows[0])]
    for index, head in enumerate(first):
        values = [row[index].strip() for row in rest]
        if not values:
            continue
        numeric = all(_is_number(v) for v in values)
        if numeric and not _is_number(head.strip()):
            return True
        distinct = set(values)
        if len(distinct) <= max(2, len(values) // 4) and head.strip() not in distinct:
            return True
    return False


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _only_one_row(path: Path) -> bool:
    with path.open(encoding="utf-8", errors="replace") as handle:
        handle.readline()
        return not any(line.strip() for line in handle)


def _first_row(path: Path, delimiter: str, quoting: int) -> list[str]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            line = handle.readline()
    except UnicodeDecodeError:
        raise TaskDataError(f"{path}: not UTF-8 text") from None
    if not line.strip():
        raise TaskDataError(f"{path}: empty file (expected rows of examples)")
    return next(csv.reader(io.StringIO(line), delimiter=delimiter, quoting=quoting))


def _load_dataset(builder: str, paths: Sequence[Path], options: dict[str, object]) -> pd.DataFrame:
    try:
        import datasets
    except ImportError:
        raise TaskDataError("task files need the datasets package: pip install datasets") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # errors become TaskDataError
    try:
        dataset = datasets.load_dataset(
            builder, data_files={"data": [str(p) for p in paths]}, split="data", **options
        )
    except Exception as err:  # datasets wraps parser errors in DatasetGenerationError
        raise TaskDataError(f"{paths[0]}: cannot read as {builder}: {_root_cause(err)}") from None
    return dataset.to_pandas()


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


# --- columns -----------------------------------------------------------------------------------


def choose_columns(
    frame: pd.DataFrame, columns: DataColumns, path: Path
) -> tuple[tuple[str, ...], str]:
    """(text columns, label column): as given, by name, or by content (header-less files)."""
    present = list(frame.columns)
    for name in (*(columns.text or ()), *((columns.label,) if columns.label else ())):
        if name not in present:
            raise TaskDataError(f"{path}: no column {name!r}; has {present}")
    label = columns.label or next((c for c in LABEL_COLUMNS if c in present), None)
    label = label or _label_by_content(frame, exclude=columns.text or ())
    if label is None:
        raise TaskDataError(f"{path}: cannot tell the label column; name it with --label-column")
    text = columns.text or text_columns_by_name(present) or _text_by_content(frame, label)
    if not text:
        raise TaskDataError(
            f"{path}: no text columns; has {present}: name them with --text-columns a[,b]"
        )
    if len(text) > 2:
        raise TaskDataError(
            f"{path}: {len(text)} candidate text columns {list(text)}; "
            "choose one or two with --text-columns a[,b]"
        )
    if label in text:
        raise TaskDataError(f"{path}: column {label!r} cannot be both text and label")
    return tuple(text), label


def text_columns_by_name(present: Iterable[str]) -> tuple[str, ...] | None:
    have = set(present)
    return next((c for c in TEXT_COLUMN_SETS if have.issuperset(c)), None)


def _label_by_content(frame: pd.DataFrame, exclude: Sequence[str]) -> str | None:
    """The column with the fewest distinct values, if that is few enough to be classes."""
    candidates = [c for c in frame.columns if c not in exclude and c.lower() not in ID_COLUMNS]
    counts = {c: frame[c].nunique() for c in candidates}
    if not counts:
        return None
    label = min(counts, key=lambda c: (counts[c], candidates.index(c)))
    limit = min(MAX_LABEL_CARDINALITY, max(len(frame) // 2, 2))
    return label if counts[label] <= limit else None


def _text_by_content(frame: pd.DataFrame, label: str) -> tuple[str, ...]:
    """The non-label columns that hold words rather than ids or numbers."""
    return tuple(
        c
        for c in frame.columns
        if c != label
        and c.lower() not in ID_COLUMNS
        and not frame[c].astype(str).str.fullmatch(r"\s*-?\d+(\.\d+)?\s*").all()
    )


def _require_columns(frame: pd.DataFrame, needed: Sequence[str], paths: Sequence[Path]) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise TaskDataError(f"{paths[0]}: missing columns {missing}; has {list(frame.columns)}")


# --- labels ------------------------------------------------------------------------------------


def _labelled(values: pd.Series) -> bool:
    """Whether a split has real labels (test files often hold none, or -1 for all)."""
    cleaned = {str(v).strip() for v in values}
    return bool(cleaned) and not cleaned <= {"", "-1", "None", "nan"}


def label_names(values: pd.Series, path: Path) -> tuple[str, ...]:
    """The training labels' names in sorted order (numeric when all are integers)."""
    cleaned = [_label_text(v) for v in values]
    for row, text in enumerate(cleaned, start=1):
        if not text:
            raise TaskDataError(f"{path}: example {row}: empty label")
    distinct = set(cleaned)
    if len(distinct) < 2:
        raise TaskDataError(
            f"{path}: only one class ({next(iter(distinct))!r}); a classifier needs two or more"
        )
    if all(_is_integer(v) for v in distinct):
        return tuple(sorted(distinct, key=int))
    return tuple(sorted(distinct))


def _label_text(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value).strip()


def _is_integer(text: str) -> bool:
    return text.removeprefix("-").isascii() and text.removeprefix("-").isdigit()


def _split(
    frame: pd.DataFrame,
    text_columns: tuple[str, ...],
    label_column: str,
    names: tuple[str, ...],
    where: Path,
) -> Split:
    index = {name: i for i, name in enumerate(names)}
    labels: list[int] = []
    for row, value in enumerate(frame[label_column], start=1):
        text = _label_text(value)
        if text not in index:
            problem = "empty label" if not text else f"label {text!r} never occurs in train"
            raise TaskDataError(f"{where}: example {row}: {problem}; train's labels: {list(names)}")
        labels.append(index[text])
    texts = tuple(
        tuple("" if v is None else str(v) for v in row)
        for row in zip(*(frame[c] for c in text_columns), strict=True)
    )
    return Split(texts, tuple(labels), names)


def hold_out(train: Split) -> tuple[Split, Split]:
    """(train, dev): a stratified, seeded dev of 10% (at most 1,000) carved out of train."""
    size = min(HELD_OUT_MAX, max(1, int(len(train) * HELD_OUT_FRACTION)))
    dev_rows, train_rows = stratified_rows(train.labels, size, HELD_OUT_SEED)
    return subset(train, train_rows), subset(train, dev_rows)


def stratified_rows(
    labels: Sequence[int], dev_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (dev, train) of a seeded shuffle, dev taking each label in proportion.

    A row's rank is its place among its label's shuffled rows over that label's count; the
    ``dev_size`` lowest ranks go to dev. ``RandomState`` is numpy's frozen, versioned stream.
    """
    order = np.random.RandomState(seed).permutation(len(labels))
    shuffled = pd.Series(np.asarray(labels)[order])
    rank = (shuffled.groupby(shuffled).cumcount() + 0.5) / shuffled.map(shuffled.value_counts())
    in_dev = np.zeros(len(order), dtype=bool)
    in_dev[np.argsort(rank.to_numpy(), kind="stable")[:dev_size]] = True
    return order[in_dev], order[~in_dev]


def subset(split: Split, rows: np.ndarray) -> Split:
    return Split(
        tuple(split.texts[i] for i in rows), tuple(split.labels[i] for i in rows), split.label_names
    )


def files_fingerprint(paths: Iterable[Path]) -> str:
    """A digest of the files' contents, so a cache follows the data, not where it lies."""
    from canao.compiler.build import file_sha256

    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path.name}:{file_sha256(path)}".encode())
    return digest.hexdigest()[:16]
