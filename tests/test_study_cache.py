"""One teacher and one super-network per study: keyed by content, trained once under a lock."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

import canao.nas.distill as distill
from canao.locks import staged_folder
from canao.nas.distill import SupernetConfig, supernet_dir, train_supernet
from canao.nas.finetune import FinetuneConfig, teacher_dir
from canao.nas.space import SearchSpace
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
    assert supernet_dir(copy, "toy", space, CONFIG) == supernet_dir(teacher, "toy", space, CONFIG)
    finetune = FinetuneConfig(task="toy")
    assert teacher_dir(finetune, copy, tmp_path) == teacher_dir(finetune, teacher, tmp_path)

    model = BertForSequenceClassification.from_pretrained(copy)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # other weights: another teacher
    model.save_pretrained(copy)
    assert model_fingerprint(copy) != model_fingerprint(teacher)
    assert supernet_dir(copy, "toy", space, CONFIG) != supernet_dir(teacher, "toy", space, CONFIG)


def test_workers_starting_together_train_one_supernet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, train = toy_supernet(tmp_path)
    teacher = tmp_path / "teacher"
    config = SupernetConfig(steps=2, batch_size=8, importance_batches=1, seed=7)  # not cached
    trained: list[int] = []
    sandwich = distill._sandwich

    def counting(*args, **kwargs):
        trained.append(threading.get_ident())
        return sandwich(*args, **kwargs)

    monkeypatch.setattr(distill, "_sandwich", counting)
    results: list[Path] = []

    def worker() -> None:
        results.append(train_supernet(teacher, train, "toy", config=config).path)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(trained) == 1  # the second waited on the lock and loaded the first's
    assert len(results) == 2 and results[0] == results[1]
    assert not list(results[0].parent.glob("*.partial-*"))


def test_a_failed_write_leaves_no_folder(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "entry"
    final.parent.mkdir()
    with pytest.raises(RuntimeError), staged_folder(final) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("killed while saving")
    assert not final.exists() and list(final.parent.iterdir()) == []
