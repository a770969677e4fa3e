"""Using a shipped model: canao.load(DIR).predict and canao predict run the compiled library."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
)

import canao
from canao.cli import main
from canao.compiler.build import compile_model, export_artifact
from canao.compiler.importer import InputSpec
from canao.compiler.models import load_model, minilm_path
from canao.errors import ArtifactError, CanaoError, DeviceUnreachableError

LABELS = ("negative", "neutral", "positive")
SEQ = 24
TEXTS = [
    "a quiet, lovely film",
    "dull",
    "the plot falls apart in the second half, and nobody seems to care",
    "fine, I guess",
    "one more, so the last batch is not full",
]


def classifier_config(
    tokenizer: BertTokenizerFast, labels: tuple[str, ...], hidden: int, layers: int, heads: int
) -> BertConfig:
    """A small random BERT classifier over MiniLM's vocabulary, its labels named."""
    return BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A winner-shaped folder: model/ (checkpoint + tokenizer), compiled/ (model.so, manifest)."""
    folder = tmp_path_factory.mktemp("winner")
    tokenizer = BertTokenizerFast.from_pretrained(str(minilm_path()), local_files_only=True)
    torch.manual_seed(0)
    config = classifier_config(tokenizer, LABELS, hidden=32, layers=1, heads=2)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    compiled = compile_model(load_model(model), "x86", "fast", InputSpec(2, SEQ))
    export_artifact(compiled, folder / "compiled")
    return folder


def pytorch_probabilities(folder: Path, texts: list) -> np.ndarray:
    model = BertForSequenceClassification.from_pretrained(str(folder / "model")).eval()
    tokenizer = BertTokenizerFast.from_pretrained(str(folder / "model"))
    rows = [(t,) if isinstance(t, str) else t for t in texts]
    columns = [list(c) for c in zip(*rows, strict=True)]
    batch = tokenizer(
        *columns, truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt"
    )
    with torch.no_grad():
        return torch.softmax(model(**batch).logits, -1).numpy()


def test_load_predicts_what_pytorch_predicts(shipped: Path) -> None:
    with canao.load(shipped) as predictor:
        assert predictor.labels == LABELS and predictor.batch == 2 and predictor.seq == SEQ
        predictions = predictor.predict(TEXTS)  # 5 texts: batches of 2, the last padded
        single = predictor.predict("dull")
    expected = pytorch_probabilities(shipped, TEXTS)
    got = np.array([[p.probabilities[name] for name in LABELS] for p in predictions])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert [p.label for p in predictions] == [LABELS[i] for i in expected.argmax(-1)]
    assert [p.text for p in predictions] == TEXTS
    assert single[0].probabilities == pytest.approx(predictions[1].probabilities, abs=1e-5)


def test_pairs_and_truncation(shipped: Path) -> None:
    pairs = [("a man plays a guitar", "someone makes music"), ("word " * 80, "short")]
    with canao.load(shipped) as predictor:
        got = np.array([list(p.probabilities.values()) for p in predictor.predict(pairs)])
    np.testing.assert_allclose(got, pytorch_probabilities(shipped, pairs), atol=1e-4)


def test_cli_predict_texts_file_and_pairs(shipped: Path, tmp_path: Path, capsys) -> None:
    assert main(["predict", str(shipped), *TEXTS[:2]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].split("\t")[2] == "dull"
    assert lines[0].split("\t")[0] in LABELS
    texts_file = tmp_path / "texts.csv"
    texts_file.write_text('id,text\n1,dull\n2,"fine, I guess"\n')
    assert main(["predict", str(shipped), "--file", str(texts_file), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["text"] for r in rows] == ["dull", "fine, I guess"]
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert main(["predict", str(shipped), "--pairs", "a", "b", "c", "d", "--json"]) == 0
    assert [json.loads(r)["text"] for r in capsys.readouterr().out.split("\n") if r] == [
        ["a", "b"],
        ["c", "d"],
    ]


def test_bad_folders_and_inputs(shipped: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        canao.load(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="holds no compiled model"):
        canao.load(tmp_path)
    assert main(["predict", str(shipped), "--pairs", "a", "b", "c"]) == 2
    assert "two by two" in capsys.readouterr().err
    assert main(["predict", str(shipped)]) == 2
    assert "no texts to classify" in capsys.readouterr().err
    with pytest.raises(CanaoError, match="not both"):
        canao.deploy.read_texts(["a"], tmp_path / "x.txt")


def test_library_is_checked_against_its_manifest(shipped: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shipped, copy)
    library = copy / "compiled" / "model.so"
    library.write_bytes(library.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="SHA-256 differs"):
        canao.load(copy)
    shutil.copy(shipped / "compiled" / "model.so", library)
    manifest_path = copy / "compiled" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["num_labels"] = 2
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="names 3 labels but the compiled model has 2"):
        canao.load(copy)
    manifest["num_labels"], manifest["target"]["triple"] = 3, "aarch64-linux-gnu"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DeviceUnreachableError, match=r"compiled for aarch64-linux-gnu.*--rpc"):
        canao.load(copy)


def test_predict_on_a_board_over_rpc(shipped: Path) -> None:
    from canao.latency.rpc import LocalRPC

    with (
        LocalRPC(key="board", use_tracker=False) as board,
        canao.load(shipped, rpc=board.server, timeout_s=20) as predictor,
    ):
        assert predictor.device.startswith("rpc://")
        remote = predictor.predict(TEXTS)
    expected = pytorch_probabilities(shipped, TEXTS)
    got = np.array([[p.probabilities[name] for name in LABELS] for p in remote])
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_an_exported_search_winner_predicts_like_its_pytorch_model(tmp_path: Path) -> None:
    """The whole path a user takes: search exports the winner, canao.load runs it."""
    import pandas as pd

    from canao.nas.job import SearchJob, SupernetEvaluator, export_winner
    from canao.nas.retrain import RetrainConfig
    from canao.nas.supernet import extract
    from tests.tiny_teacher import toy_supernet

    supernet, train = toy_supernet(tmp_path)
    texts = train.texts
    tokenizer = supernet.tokenizer
    arch = supernet.space.smallest()
    evaluator = SupernetEvaluator(
        supernet,
        train,
        latency_evaluator=None,
        train=train,  # type: ignore[arg-type]
    )
    job = SearchJob(out=tmp_path / "search", seq=SEQ, retrain=RetrainConfig(steps=3, batch_size=8))
    summary: dict[str, object] = {}
    folder = export_winner(evaluator, pd.Series({"arch": arch.key}), job, summary)
    retrain = summary["retrain"]
    assert retrain["steps"] == 3 and set(retrain["before"]) == set(retrain["after"]) == {"accuracy"}
    with canao.load(folder) as predictor:
        assert predictor.labels == ("bad", "good")
        predictions = predictor.predict([t[0] for t in texts[:5]])
    # The exported, retrained winner is a Hugging Face checkpoint: Auto* loads it.
    reference = AutoModelForSequenceClassification.from_pretrained(str(folder / "model")).eval()
    assert not torch.equal(
        reference.classifier.weight, extract(supernet.model, arch).classifier.weight
    )
    batch = tokenizer(
        [t[0] for t in texts[:5]], max_length=SEQ, padding="max_length", return_tensors="pt"
    )
    with torch.no_grad():
        expected = torch.softmax(reference(**batch).logits, -1).numpy()
    got = np.array([[p.probabilities["bad"], p.probabilities["good"]] for p in predictions])
    np.testing.assert_allclose(got, expected, atol=1e-4)
