"""Retraining the top k of the Pareto front: which candidates, and the best one wins."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from canao.nas.job import SearchJob, SupernetEvaluator, retrain_candidates, retrain_front
from canao.nas.retrain import RetrainConfig
from canao.nas.search import SearchSettings
from canao.nas.tasks import Split
from tests.tiny_teacher import toy_supernet


def front(rows: list[tuple[str, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["arch", "latency_ms", "accuracy"])


def test_candidates_are_the_winner_then_the_most_accurate_within_the_target() -> None:
    points = front([("a", 1.0, 0.60), ("b", 2.0, 0.70), ("c", 3.0, 0.75), ("d", 9.0, 0.90)])
    winner = points.iloc[2]  # c: the most accurate within 5 ms
    picked = retrain_candidates(points, winner, top=3, target_ms=5.0)
    assert [row["arch"] for row in picked] == ["c", "b", "a"]
    assert [row["arch"] for row in retrain_candidates(points, winner, 1, 5.0)] == ["c"]
    # Nothing else within the target: the fastest others.
    assert [r["arch"] for r in retrain_candidates(points, points.iloc[0], 2, 1.5)] == ["a", "b"]


def test_retraining_the_front_exports_the_best_after_retraining(tmp_path: Path) -> None:
    supernet, train = toy_supernet(tmp_path)
    space = supernet.space
    small, large = space.smallest(), space.largest()
    points = front([(small.key, 1.0, 0.5), (large.key, 2.0, 0.6)])
    evaluator = SupernetEvaluator(supernet, train, latency_evaluator=None, train=train)  # type: ignore[arg-type]
    job = SearchJob(
        out=tmp_path, retrain=RetrainConfig(steps=2, batch_size=8), retrain_top=2, progress=False
    )
    summary: dict[str, object] = {}
    settings = SearchSettings(latency_ms=5.0)
    chosen, model = retrain_front(
        evaluator, points, points.iloc[1], job, settings, summary, lambda _: None
    )
    table = pd.read_csv(tmp_path / "retrained.csv")
    assert list(table["arch"]) == [large.key, small.key]
    assert {"accuracy_before", "accuracy"} <= set(table.columns)
    best = table.sort_values(["accuracy", "latency_ms"], ascending=[False, True]).iloc[0]
    assert chosen["arch"] == best["arch"] == summary["winner"]["arch"]
    assert (
        model.config.num_hidden_layers == (small if best["arch"] == small.key else large).num_layers
    )
    assert summary["retrain"]["steps"] == 2
    assert (chosen["arch"] != large.key) == ("winner_from_search" in summary)
    # Every retrained point is kept, loadable, and is the model that was scored.
    from transformers import BertForSequenceClassification

    stale = tmp_path / "front" / "an-earlier-run"
    assert sorted(p.name for p in (tmp_path / "front").iterdir()) == sorted([small.key, large.key])
    for row in table.itertuples():
        saved = BertForSequenceClassification.from_pretrained(row.checkpoint)
        arch = small if row.arch == small.key else large
        assert saved.config.num_hidden_layers == arch.num_layers
        assert (Path(row.checkpoint) / "tokenizer.json").is_file()
    kept = BertForSequenceClassification.from_pretrained(tmp_path / "front" / chosen["arch"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, kept.state_dict()[name]), name
    stale.mkdir()
    retrain_front(evaluator, points, points.iloc[1], job, settings, {}, lambda _: None)
    assert not stale.exists()  # a rerun's front is its own


def test_sentence_pairs_are_trained_and_scored_at_128_tokens() -> None:
    from canao.nas.job import task_length

    pairs = {"train": Split((("a premise", "a hypothesis"),), (0,))}
    single = {"train": Split((("a sentence",),), (0,))}
    assert task_length(pairs, 64) == 128 and task_length(single, 64) == 64
    assert task_length(pairs, 256) == 256
