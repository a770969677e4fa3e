"""One teacher and one super-network per study: keyed by content, trained once under a lock."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from canao.locks import staged_folder
from canao.nas.distill import SupernetConfig, supernet_dir
from canao.nas.finetune import FinetuneConfig, teacher_dir
from canao.nas.space import SearchSpace
from canao.nas.tasks import Split
from canao.nas.teacher import model_fingerprint
from tests.tiny_teacher import toy_supernet

CONFIG = SupernetConfig(steps=1, batch_size=8, importance_batches=1)


def _space(teacher: Path) -> SearchSpace:
    return SearchSpace.from_teacher(BertForSequenceClassification.from_pretrained(teacher).config)


def test_cache_keys_follow_content_not_path(tmp_path: Path) -> None:
    toy_supernet(tmp_path)
    teacher = tmp_path / "teacher"
    copy = shutil.copytree(teacher, tmp_path / "elsewhere" / "teacher-copy")
    space = _space(teacher)
    assert model_fingerprint(copy) == model_fingerprint(teacher)
    train = Split((("a",), ("b",)), (0, 1), ("x", "y"))
    assert supernet_dir(copy, "toy", space, CONFIG, train) == supernet_dir(
        teacher, "toy", space, CONFIG, train
    )
    # Edited training data: another super-network, even under the same task name.
    edited = Split((("a",), ("c",)), (0, 1), ("x", "y"))
    assert supernet_dir(teacher, "toy", space, CONFIG, edited) != supernet_dir(
        teacher, "toy", space, CONFIG, train
    )
    finetune = FinetuneConfig(task="toy")
    data = {"train": train}
    assert teacher_dir(finetune, copy, data) == teacher_dir(finetune, teacher, data)

    model = BertForSequenceClassification.from_pretrained(copy)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # other weights: another teacher
    model.save_pretrained(copy)
    assert model_fingerprint(copy) != model_fingerprint(teacher)
    assert supernet_dir(copy, "toy", space, CONFIG, train) != supernet_dir(
        teacher, "toy", space, CONFIG, train
    )


def test_teacher_key_follows_the_data_read_not_where_it_was_read_from(tmp_path: Path) -> None:
    """Two checkouts (or machines) with the GLUE copy at different paths share one teacher;
    edited data is another teacher."""
    from canao.compiler.models import minilm_path
    from canao.nas.tasks import load_task

    rows = "sentence\tlabel\nfine film\t1\nbad film\t0\n"
    for root in ("checkout-a", "checkout-b"):
        folder = tmp_path / root / "glue" / "sst2"
        folder.mkdir(parents=True)
        for split in ("train", "dev"):
            (folder / f"{split}.tsv").write_text(rows)
    config, base = FinetuneConfig(task="sst2"), minilm_path()
    first, second = (
        load_task("sst2", tmp_path / root / "glue") for root in ("checkout-a", "checkout-b")
    )
    assert teacher_dir(config, base, first) == teacher_dir(config, base, second)
    (tmp_path / "checkout-b" / "glue" / "sst2" / "train.tsv").write_text(rows + "great\t1\n")
    edited = load_task("sst2", tmp_path / "checkout-b" / "glue")
    assert teacher_dir(config, base, edited) != teacher_dir(config, base, first)


# One worker process: trains the toy super-network (or loads it), noting when it trains.
WORKER = """
import sys
from pathlib import Path
import canao.nas.distill as distill
from canao.nas.distill import SupernetConfig, train_supernet
from canao.nas.tasks import Split

folder, log = Path(sys.argv[1]), Path(sys.argv[2])
sandwich = distill._sandwich
def counting(*args, **kwargs):
    with log.open("a") as handle:
        handle.write("trained\\n")
    return sandwich(*args, **kwargs)
distill._sandwich = counting
texts = tuple((f"a {'good' if i % 2 else 'bad'} film number {i}",) for i in range(32))
train = Split(texts, tuple(i % 2 for i in range(32)), ("bad", "good"))
config = SupernetConfig(steps=2, batch_size=8, importance_batches=1, seed=7)
print(train_supernet(folder / "teacher", train, "toy", config=config).path)
"""


def test_workers_starting_together_train_one_supernet(tmp_path: Path) -> None:
    toy_supernet(tmp_path)  # the teacher folder (its own one-step super-network aside)
    log = tmp_path / "trained.log"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), str(log)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    paths = [worker.communicate(timeout=300)[0].strip() for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0]
    assert log.read_text().count("trained") == 1  # the other waited on the lock and loaded
    assert paths[0] == paths[1] and Path(paths[0]).is_dir()
    assert not list(Path(paths[0]).parent.glob("*.partial-*"))


def test_a_failed_write_leaves_no_folder(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "entry"
    final.parent.mkdir()
    with pytest.raises(RuntimeError), staged_folder(final) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("killed while saving")
    assert not final.exists() and list(final.parent.iterdir()) == []
