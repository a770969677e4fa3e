"""--teacher: any BERT folder (or hub id); a classifier is used as it is, a base model tuned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

from canao.cli import main
from canao.compiler.models import minilm_path
from canao.nas.teacher import TeacherError, resolve_teacher

# BERT-shaped: heads of dimension 64 (BERT-base's), unlike MiniLM's 32.
WIDE_HEADS = {
    "hidden_size": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 64,
}


def save_teacher(folder: Path, classifier: bool, **fields: object) -> Path:
    tokenizer = BertTokenizerFast.from_pretrained(str(minilm_path()), local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, **{**WIDE_HEADS, **fields})
    model = BertForSequenceClassification(config) if classifier else BertModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_base_models_are_tuned_and_classifiers_used_as_they_are(tmp_path: Path) -> None:
    base = resolve_teacher(str(save_teacher(tmp_path / "base", classifier=False)), 2)
    assert not base.fine_tuned
    tuned = resolve_teacher(str(save_teacher(tmp_path / "tuned", classifier=True)), 2)
    assert tuned.fine_tuned and tuned.path == tmp_path / "tuned"
    assert resolve_teacher(None, 2).label == "MiniLM-L6" and not resolve_teacher(None, 2).fine_tuned


def test_teacher_errors_are_one_line_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TeacherError, match="not found: a local Hugging Face folder"):
        resolve_teacher(str(tmp_path / "nowhere"), 2)
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(TeacherError, match="is a gpt2, not a BERT"):
        resolve_teacher(str(gpt), 2)
    three = save_teacher(tmp_path / "three", classifier=True, num_labels=3)
    with pytest.raises(TeacherError, match="classifier with 3 labels but the task has 2"):
        resolve_teacher(str(three), 2)
    named = save_teacher(
        tmp_path / "named", classifier=True, id2label={0: "pos", 1: "neg"}, label2id={}
    )
    with pytest.raises(TeacherError, match=r"predicts labels \['pos', 'neg'\]"):
        resolve_teacher(str(named), 2, ("neg", "pos"))
    (three / "vocab.txt").unlink()
    (three / "tokenizer.json").unlink()
    with pytest.raises(TeacherError, match="has no tokenizer"):
        resolve_teacher(str(three), 3)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherError, match="could not be fetched from the Hugging Face hub"):
        resolve_teacher("nobody-here/no-such-model", 2)


def test_search_rejects_a_bad_teacher_before_training(tmp_path: Path, capsys) -> None:
    three = save_teacher(tmp_path / "three", classifier=True, num_labels=3)
    assert main(["search", "--teacher", str(three), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 labels but the task has 2" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_teacher_with_64_wide_heads_searches_end_to_end(tmp_path: Path, capsys) -> None:
    base = save_teacher(tmp_path / "bert-shaped", classifier=False)
    rows = [
        "text,label",
        *(f"film {i} was {'great' if i % 2 else 'awful'},{i % 2}" for i in range(200)),
    ]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "search"
    args = ["search", "--task", str(tmp_path / "data.csv"), "--teacher", str(base)]
    args += ["--supernet-steps", "2", "--trials", "2", "--seq", "32", "--retrain-steps", "2"]
    args += ["-o", str(out)]
    assert main(args) == 0
    assert "fine-tuning" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    teacher_arch = summary["teacher"]["arch"]
    assert teacher_arch == "L2-H128-d64-a2.2-f256.256"  # the space follows the teacher
    trials = (out / "trials.csv").read_text()
    assert "-d64-" in trials
