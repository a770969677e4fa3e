"""Task data (real GLUE files from ../shared/data) and the fine-tuning entry point."""

from __future__ import annotations

import csv
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from canao.nas.finetune import FinetuneConfig, finetune
from canao.nas.tasks import (
    Split,
    TaskDataError,
    default_glue_root,
    load_hub,
    load_movie_reviews,
    load_task,
    num_labels,
    read_split,
)

needs_glue = pytest.mark.skipif(
    not (default_glue_root() / "sst2" / "dev.tsv").is_file(),
    reason="../shared/data/glue is not beside this checkout",
)


@needs_glue
def test_real_sst2_and_rte() -> None:
    sst2 = load_task("sst2")
    assert len(sst2["dev"]) == 872 and len(sst2["train"]) == 67349
    assert set(sst2["dev"].labels) == {0, 1} and len(sst2["dev"].texts[0]) == 1
    rte = load_task("rte")
    assert len(rte["dev"]) == 277 and len(rte["dev"].texts[0]) == 2  # sentence pairs


def test_bad_task_files(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match="unknown task 'mnli2'"):
        load_task("mnli2", tmp_path)
    with pytest.raises(TaskDataError, match="not found"):
        read_split(tmp_path / "nope.tsv", ("sentence",))
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nhello\t1\n")
    with pytest.raises(TaskDataError, match=r"missing columns \['sentence'\]"):
        read_split(bad, ("sentence",))
    bad.write_text('sentence\tlabel\n"quoted\tpositive\n')
    with pytest.raises(TaskDataError, match="labels must be integers"):
        read_split(bad, ("sentence",))


@pytest.mark.slow
def test_finetune_saves_a_reloadable_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "sst2"
    folder.mkdir()
    rows = "\n".join(f"{'great fun' if i % 2 else 'dull and long'} {i}\t{i % 2}" for i in range(48))
    for split in ("train", "dev"):
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + rows + "\n")
    out = finetune(FinetuneConfig(train_limit=48, batch_size=16), glue_root=tmp_path, log=False)
    record = json.loads((out / "canao_finetune.json").read_text())
    assert record["train_examples"] == 48 and 0.0 <= record["dev_accuracy"] <= 1.0
    assert (out / "model.safetensors").is_file()
    assert finetune(FinetuneConfig(train_limit=48, batch_size=16), glue_root=tmp_path) == out


# --- helpers for the tests below ---------------------------------------------------------------


def write_tsv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def write_folder(folder: Path, header: str, train: list[str], dev: list[str]) -> Path:
    write_tsv(folder / "train.tsv", header, train)
    write_tsv(folder / "dev.tsv", header, dev)
    return folder


def fake_datasets(monkeypatch: pytest.MonkeyPatch, data: dict) -> list[tuple[str, str]]:
    """Install a stand-in ``datasets`` module whose load_dataset returns ``data``.

    Plain dicts of column lists mimic the DatasetDict API the loader uses
    (``ds["train"]["sentence"]``), so the real lazy import in nas/tasks.py is exercised without
    the datasets package or a network.
    """
    calls: list[tuple[str, str]] = []

    def load_dataset(path: str, name: str) -> dict:
        calls.append((path, name))
        return data

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


# --- GLUE names, GLUE folders ------------------------------------------------------------------


@needs_glue
def test_real_glue_metadata() -> None:
    sst2 = load_task("sst2")
    assert sst2["dev"].label_names == ("negative", "positive") and not sst2["dev"].is_pair
    assert num_labels(sst2) == 2
    rte = load_task("rte")
    assert rte["train"].is_pair and len(rte["train"]) == 2490
    assert rte["dev"].label_names == ("entailment", "not_entailment") and num_labels(rte) == 2
    assert set(rte["dev"].labels) == {0, 1}


def test_glue_folder_label_names_and_mnli_dev_matched(tmp_path: Path) -> None:
    # Original GLUE files spell labels out; they map to the hub's ids, not sorted order.
    write_folder(
        tmp_path / "mnli",
        "premise\thypothesis\tlabel",
        ["a cat sat\ta cat\tentailment", "a dog ran\ta cat\tcontradiction"],
        [],
    )
    (tmp_path / "mnli" / "dev.tsv").unlink()
    write_tsv(tmp_path / "mnli" / "dev_matched.tsv", "premise\thypothesis\tlabel", ["x\ty\t1"])
    mnli = load_task("mnli", tmp_path)
    assert mnli["train"].labels == (0, 2) and mnli["dev"].labels == (1,)
    assert mnli["train"].texts[0] == ("a cat sat", "a cat") and mnli["train"].is_pair
    assert num_labels(mnli) == 3


# --- movie-reviews -----------------------------------------------------------------------------


def test_movie_reviews_is_deterministic_and_balanced(tmp_path: Path) -> None:
    data = load_task("movie-reviews")
    assert load_task("movie-reviews", tmp_path) == data  # same split every time; root ignored
    train, dev = data["train"], data["dev"]
    assert (len(train), len(dev)) == (7677, 853)  # 8530 sentences, dev = min(1000, 10%)
    assert Counter(dev.labels) == {0: 427, 1: 426}
    assert Counter(train.labels) == {0: 3838, 1: 3839}
    assert not set(train.texts) & set(dev.texts) and len(set(train.texts)) == len(train)
    assert dev.label_names == ("negative", "positive") and num_labels(data) == 2
    assert not dev.is_pair and max(len(t[0]) for t in dev.texts) < 300  # short sentences


def test_movie_reviews_split_rules(tmp_path: Path) -> None:
    rows = ["text,label,source"]
    rows += [f"bad film {i},0,rotten_tomatoes" for i in range(40)]
    rows += [f"good film {i},1,rotten_tomatoes" for i in range(20)]
    rows += ["bad film 0,0,rotten_tomatoes", "good film 0,1,rotten_tomatoes"]  # duplicates
    rows += [f"long review {i},{i % 2},imdb" for i in range(30)]  # not used
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    data = load_movie_reviews(csv_path)
    assert (len(data["train"]), len(data["dev"])) == (54, 6)  # 60 unique sentences, 10% dev
    assert Counter(data["dev"].labels) == {0: 4, 1: 2}  # stratified: the data's 2:1 balance
    assert all("review" not in t[0] for t in data["train"].texts)
    assert load_movie_reviews(csv_path) == data


# --- a user's folder ---------------------------------------------------------------------------


def test_num_labels_needs_labels() -> None:
    assert num_labels({"train": Split((("a",),), (4,))}) == 5
    with pytest.raises(TaskDataError, match="no labelled examples"):
        num_labels({"train": Split((), ())})


# --- the hub, through a stand-in datasets module ------------------------------------------------


@needs_glue
def test_hub_sst2_via_fake_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = pd.read_csv(
        default_glue_root() / "sst2" / "dev.tsv", sep="\t", quoting=csv.QUOTE_NONE, dtype=str
    )
    columns = {"sentence": list(frame["sentence"]), "label": [int(v) for v in frame["label"]]}
    calls = fake_datasets(monkeypatch, {"train": columns, "validation": columns})
    hub = load_task("hub:glue/sst2")
    assert calls == [("glue", "sst2")]
    local = load_task("sst2")["dev"]
    assert hub["dev"] == local and hub["train"] == local
    assert load_task("glue/sst2") == hub


def test_hub_mnli_uses_validation_matched(monkeypatch: pytest.MonkeyPatch) -> None:
    split = {"premise": ["p"], "hypothesis": ["h"], "label": [2]}
    calls = fake_datasets(monkeypatch, {"train": split, "validation_matched": split})
    data = load_task("hub:glue/mnli")
    assert calls == [("glue", "mnli")] and data["dev"].texts == (("p", "h"),)
    assert data["dev"].label_names == ("entailment", "neutral", "contradiction")


def test_hub_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(TaskDataError, match="pip install datasets"):
        load_task("hub:glue/sst2")
    with pytest.raises(TaskDataError, match=r"unknown hub task 'glue/stsb'; known: sst2, rte"):
        load_task("hub:glue/stsb")
    with pytest.raises(TaskDataError, match="unknown hub task 'hub:imdb'"):
        load_task("hub:imdb")
    fake_datasets(monkeypatch, {"train": {"text": ["a"], "label": [0]}})
    with pytest.raises(TaskDataError, match=r"glue/sst2\[train\]: missing split or column"):
        load_task("hub:glue/sst2")

    def offline(path: str, name: str) -> None:
        raise ConnectionError("no network")

    with pytest.raises(TaskDataError, match="could not load glue/rte from the hub: no network"):
        load_hub("rte", loader=offline)
    empty = {"sentence": [], "label": []}
    with pytest.raises(TaskDataError, match=r"glue/sst2\[train\]: no examples"):
        load_hub("sst2", loader=lambda path, name: {"train": empty, "validation": empty})


# --- bad input: one clear error each -----------------------------------------------------------


def test_unknown_task_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"known: sst2, rte, cola.*movie-reviews, hub:glue"):
        load_task("sst-2", tmp_path)
    with pytest.raises(TaskDataError, match="unknown task 'stsb'"):
        load_task("stsb", tmp_path)  # regression: not a classification task


def test_missing_folders_and_files(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"task folder .*cola not found \(GLUE task 'cola'"):
        load_task("cola", tmp_path)
    with pytest.raises(TaskDataError, match=r"task path .*nowhere not found"):
        load_task(str(tmp_path / "nowhere"))


def test_bad_columns_and_labels(tmp_path: Path) -> None:
    write_folder(tmp_path / "rte", "sentence1\tsentence2\tlabel", ["a\tb\tmaybe"], ["a\tb\t0"])
    with pytest.raises(TaskDataError, match=r"row 1: unknown label 'maybe'; known: \('entail"):
        load_task("rte", tmp_path)
    write_folder(tmp_path / "sst2", "sentence\tlabel", ["a\t0"], ["b\t2"])
    with pytest.raises(TaskDataError, match=r"dev.tsv: label id 2 but only 2 labels"):
        load_task("sst2", tmp_path)
