"""Task data (real GLUE files from ../shared/data) and the fine-tuning entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canao.nas.finetune import FinetuneConfig, finetune
from canao.nas.tasks import TaskDataError, default_glue_root, load_task, read_split

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
