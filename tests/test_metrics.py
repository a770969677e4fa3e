"""Each task's own metric, the majority-class baseline, and a winner that must beat it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest

from canao.nas.metrics import (
    beats_majority,
    compute,
    describe,
    majority_class,
    majority_scores,
    metric_names,
)
from canao.nas.search import SearchSettings, best_trial


def test_each_task_gets_its_own_metrics() -> None:
    assert metric_names("mrpc") == ("accuracy", "f1") == metric_names("hub:glue/qqp")
    assert metric_names("cola") == ("accuracy", "mcc")
    assert metric_names("sst2") == ("accuracy",) == metric_names("movie-reviews")
    assert metric_names("/data/my_task.csv") == ("accuracy", "macro_f1")


def test_metrics_by_hand() -> None:
    gold = [1, 1, 1, 0, 0, 1, 0, 1]
    pred = [1, 0, 1, 0, 1, 1, 0, 1]
    # tp 4, fp 1, fn 1, tn 2
    scores = compute(("accuracy", "f1", "macro_f1", "mcc"), pred, gold, 2)
    assert scores["accuracy"] == pytest.approx(6 / 8)
    assert scores["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))
    f1_negative = 2 * 2 / (2 * 2 + 1 + 1)
    assert scores["macro_f1"] == pytest.approx((0.8 + f1_negative) / 2)
    mcc = (4 * 2 - 1 * 1) / math.sqrt((4 + 1) * (4 + 1) * (2 + 1) * (2 + 1))
    assert scores["mcc"] == pytest.approx(mcc)


def test_majority_class_scores_what_it_should() -> None:
    # MRPC-like: 68.4% positive. The constant classifier's accuracy is the positive share,
    # its F1 is high (0.81), its MCC and macro-F1 give it away.
    train = [1] * 684 + [0] * 316
    dev = [1] * 279 + [0] * 129
    scores = majority_scores(("accuracy", "f1", "mcc", "macro_f1"), train, dev, 2)
    assert majority_class(train) == 1 and majority_class([0, 1]) == 0  # ties: smallest id
    assert scores["accuracy"] == pytest.approx(279 / 408)
    assert scores["f1"] == pytest.approx(2 * 279 / (2 * 279 + 129))
    assert scores["mcc"] == 0.0
    assert scores["macro_f1"] == pytest.approx(scores["f1"] / 2)
    assert "accuracy 0.6838 (majority 0.6838)" in describe({"accuracy": 279 / 408}, scores)


def test_a_candidate_must_get_one_more_example_right_than_the_majority() -> None:
    assert not beats_majority(279 / 408, 279 / 408, 408)
    assert beats_majority(280 / 408, 279 / 408, 408)


def test_winner_is_never_a_majority_class_candidate() -> None:
    from canao.nas.job import flag_majority

    evaluator = SimpleNamespace(
        majority={"accuracy": 0.684}, beats_majority=lambda a: beats_majority(a, 0.684, 408)
    )
    frame = pd.DataFrame(
        {
            "state": ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"],
            "arch": ["one-layer", "six-layer", "three-layer", "broken"],
            "accuracy": [0.684, 0.701, 0.69, None],
            "latency_ms": [1.0, 10.0, 5.0, None],
            "reward": [0.9, 0.6, 0.7, None],
        }
    )
    flagged = flag_majority(frame, evaluator)  # type: ignore[arg-type]
    assert list(flagged["beats_majority"]) == [False, True, True, None]
    eligible = flagged[flagged["beats_majority"] != False]  # noqa: E712
    assert best_trial(eligible, SearchSettings(latency_ms=2.0))["arch"] == "three-layer"
    assert best_trial(flagged, SearchSettings(latency_ms=2.0))["arch"] == "one-layer"  # unguarded
