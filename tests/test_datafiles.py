"""A user's task data as files are kept: each format, each layout, each bad input in one line."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from canao.nas.tasks import TaskDataError, TaskSpec, load_task, num_labels

AG_NEWS = ("World", "Sports", "Business", "Sci/Tech")


def pairs_frame(rows: int, classes: tuple[str, ...] = ("yes", "no", "maybe")) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sentence1": [f"first sentence {i}" for i in range(rows)],
            "sentence2": [f'second "quoted" sentence {i}' for i in range(rows)],
            "label": [classes[i % len(classes)] for i in range(rows)],
        }
    )


def test_folder_with_hugging_face_split_names(tmp_path: Path) -> None:
    pairs_frame(30).to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    pairs_frame(6).to_csv(tmp_path / "validation.tsv", sep="\t", index=False)
    data = load_task(str(tmp_path))
    assert (len(data["train"]), len(data["dev"])) == (30, 6)
    assert data["dev"].is_pair and data["dev"].texts[0] == (
        "first sentence 0",
        'second "quoted" sentence 0',  # TSV quotes are literal
    )
    assert data["train"].label_names == ("maybe", "no", "yes") and num_labels(data) == 3
    assert data["dev"].labels[:3] == (2, 1, 0)


def test_headerless_tsv_with_string_labels_as_ag_news_ships(tmp_path: Path) -> None:
    lines = [f"news story {i} about things\t{AG_NEWS[i % 4]}" for i in range(80)]
    path = tmp_path / "ag_news.tsv"
    path.write_text("\n".join(lines) + "\n")
    data = load_task(str(path))  # one file: dev held out of it
    assert (len(data["train"]), len(data["dev"])) == (72, 8)
    assert data["train"].label_names == ("Business", "Sci/Tech", "Sports", "World")
    assert Counter(data["dev"].labels) == {0: 2, 1: 2, 2: 2, 3: 2}  # stratified
    assert not set(data["train"].texts) & set(data["dev"].texts)
    assert data["train"].texts[0][0].startswith("news story")
    assert load_task(str(path)) == data  # the same held-out split every time


def test_headerless_file_with_label_first_named_by_position(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    pd.DataFrame({"c": [i % 2 + 1 for i in range(20)], "t": [f"t {i}" for i in range(20)]}).to_csv(
        path, header=False, index=False
    )
    data = load_task(TaskSpec(train=str(path), label_column="0", text_columns=("1",)))
    assert data["train"].label_names == ("1", "2")  # 1-based class ids become ids 0 and 1
    assert data["train"].texts[0][0].startswith("t ")
    assert load_task(str(path)) == data  # detected the same way without the flags


def test_single_csv_with_quoting_and_columns_named(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    frame = pd.DataFrame(
        {
            "review_id": range(40),
            "body": [f'a "great", long film {i}' for i in range(40)],
            "stars": [str(1 + i % 5) for i in range(40)],
        }
    )
    frame.to_csv(path, index=False)
    data = load_task(TaskSpec(str(path), text_columns=("body",), label_column="stars"))
    assert data["train"].label_names == ("1", "2", "3", "4", "5")
    assert data["train"].texts[0][0].startswith('a "great", long film')  # CSV quoting honoured
    assert load_task(str(path)) == data  # detected: ids and numbers are not text; few values
    numbers = write(tmp_path / "numbers.csv", "a,b\n" + "".join(f"{i},{i % 2}\n" for i in range(9)))
    with pytest.raises(TaskDataError, match=r"numbers.csv: no text columns.*--text-columns"):
        load_task(str(numbers))


def test_jsonl_train_parquet_validation_and_six_classes(tmp_path: Path) -> None:
    train = pd.DataFrame(
        {"text": [f"t {i}" for i in range(36)], "label": [i % 6 for i in range(36)]}
    )
    train.to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    dev = pd.DataFrame({"text": [f"d {i}" for i in range(12)], "label": [i % 6 for i in range(12)]})
    (tmp_path / "data").mkdir()
    dev.to_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet")  # a hub shard
    data = load_task(tmp_path)
    assert num_labels(data) == 6 and len(data["dev"]) == 12
    assert data["dev"].labels == tuple(i % 6 for i in range(12))


def test_labelled_test_split_is_dev_when_there_is_no_validation(tmp_path: Path) -> None:
    pairs_frame(30).to_parquet(tmp_path / "train.parquet")
    pairs_frame(9).to_parquet(tmp_path / "test.parquet")
    assert len(load_task(tmp_path)["dev"]) == 9
    unlabelled = pairs_frame(9).assign(label="-1")
    unlabelled.to_parquet(tmp_path / "test.parquet")
    data = load_task(tmp_path)  # GLUE-style test without labels: dev held out of train
    assert (len(data["train"]), len(data["dev"])) == (27, 3)


def test_explicit_train_and_dev_files(tmp_path: Path) -> None:
    pairs_frame(30).to_csv(tmp_path / "a.csv", index=False)
    pairs_frame(6).to_json(tmp_path / "b.jsonl", orient="records", lines=True)
    data = load_task(TaskSpec(train=str(tmp_path / "a.csv"), dev=str(tmp_path / "b.jsonl")))
    assert (len(data["train"]), len(data["dev"])) == (30, 6) and data["dev"].is_pair


def test_task_spec_fingerprint_follows_content_not_path(tmp_path: Path) -> None:
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        pairs_frame(10).to_csv(tmp_path / name / "train.csv", index=False)
    one, two = (TaskSpec(str(tmp_path / name)).fingerprint() for name in ("one", "two"))
    assert one == two
    pairs_frame(11).to_csv(tmp_path / "two" / "train.csv", index=False)
    assert TaskSpec(str(tmp_path / "two")).fingerprint() != one


# --- bad input: one line each, naming the file --------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


GOOD_TRAIN = "sentence\tlabel\nfine\t0\ngood\t1\nbad\t0\n"


@pytest.mark.parametrize(
    ("train", "dev", "message"),
    [
        (GOOD_TRAIN, "sentence\tlabel\nok\t0\nfine\t1\textra\n", r"dev.tsv: cannot read as csv"),
        (GOOD_TRAIN, "sentence\tlabel\nok\t0\nnew\t2\n", r"dev.tsv: example 2: label '2' never"),
        (GOOD_TRAIN, "sentence\tlabel\nno label\n", r"dev.tsv: example 1: empty label"),
        (GOOD_TRAIN, "", r"dev.tsv: empty file"),
        (GOOD_TRAIN, "sentence\tlabel\n", r"dev.tsv: no examples"),
        (GOOD_TRAIN, "sentence\tgold\nfine\t1\n", r"dev.tsv: missing columns \['label'\]"),
        ("sentence\tlabel\na\t0\nb\t0\n", None, r"train.tsv: only one class \('0'\)"),
    ],
)
def test_malformed_files(tmp_path: Path, train: str, dev: str | None, message: str) -> None:
    write(tmp_path / "train.tsv", train)
    if dev is not None:
        write(tmp_path / "dev.tsv", dev)
    with pytest.raises(TaskDataError, match=message) as error:
        load_task(tmp_path)
    assert "\n" not in str(error.value)


def test_missing_paths_columns_and_formats(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"task path .*missing.csv not found"):
        load_task(str(tmp_path / "missing.csv"))
    with pytest.raises(TaskDataError, match=r"task file .*nope.csv not found"):
        load_task(TaskSpec(train=str(tmp_path / "nope.csv")))
    write(tmp_path / "empty" / "notes.txt", "hi")
    with pytest.raises(TaskDataError, match=r"no train file .*has \['notes.txt'\]"):
        load_task(tmp_path / "empty")
    train = write(tmp_path / "t" / "train.tsv", GOOD_TRAIN)
    with pytest.raises(TaskDataError, match=r"train.tsv: no column 'body'; has \['sentence'"):
        load_task(TaskSpec(str(train), text_columns=("body",)))
    with pytest.raises(TaskDataError, match="apply to data files, not to the named task 'sst2'"):
        load_task(TaskSpec("sst2", label_column="y"))
    with pytest.raises(TaskDataError, match="not both"):
        load_task(TaskSpec("sst2", train=str(train)))
    write(tmp_path / "x" / "train.xlsx", "?")
    with pytest.raises(TaskDataError, match=r"train.xlsx: unsupported file type"):
        load_task(TaskSpec(train=str(tmp_path / "x" / "train.xlsx")))
    write(tmp_path / "two" / "train.tsv", GOOD_TRAIN)
    write(tmp_path / "two" / "train.csv", "sentence,label\na,0\n")
    with pytest.raises(TaskDataError, match="several train files of different formats"):
        load_task(tmp_path / "two")
    write(tmp_path / "j" / "train.jsonl", '{"text": "a", "label": 0}\n{"text": "b", label: 1}\n')
    with pytest.raises(TaskDataError, match=r"train.jsonl: cannot read as json"):
        load_task(tmp_path / "j")
