"""Each task's own metrics, and the majority-class score printed beside every score.

GLUE reports MRPC and QQP with F1 (of the positive class) and accuracy, CoLA with Matthews
correlation, the other classification tasks with accuracy (Wang et al. 2019); a user's task
gets accuracy and macro-F1, which an imbalanced label set cannot flatter. Accuracy stays the
search's score on every task, so rewards compare across tasks; the other metrics are reported
beside it. A candidate that does not beat the majority class (predicting the most frequent
training label for every dev example) by at least one dev example has learnt nothing the
label counts do not already say: the search flags it and never ships it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

# Metrics beside accuracy, per GLUE task; anything else (a user's task) gets macro-F1.
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "mrpc": ("f1",),
    "qqp": ("f1",),
    "cola": ("mcc",),
    "sst2": (),
    "rte": (),
    "qnli": (),
    "mnli": (),
    "wnli": (),
    "movie-reviews": (),
}
USER_METRICS: tuple[str, ...] = ("macro_f1",)


def metric_names(task: str) -> tuple[str, ...]:
    """``("accuracy", ...)``: accuracy first (the search's score), then the task's own."""
    bare = task.removeprefix("hub:").removeprefix("glue/")
    return ("accuracy", *GLUE_METRICS.get(bare, USER_METRICS))


def compute(
    names: Sequence[str], predicted: Sequence[int], labels: Sequence[int], num_classes: int
) -> dict[str, float]:
    """The named metrics of ``predicted`` against ``labels``."""
    pred, gold = np.asarray(predicted, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if pred.shape != gold.shape or gold.size == 0:
        raise ValueError(f"{pred.size} predictions for {gold.size} labels")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (gold, pred), 1)
    functions = {
        "accuracy": lambda: float(np.trace(confusion) / confusion.sum()),
        "f1": lambda: _f1(confusion, positive=1),
        "macro_f1": lambda: float(np.mean([_f1(confusion, c) for c in range(num_classes)])),
        "mcc": lambda: _mcc(confusion),
    }
    return {name: functions[name]() for name in names}


def _f1(confusion: np.ndarray, positive: int) -> float:
    true_positive = confusion[positive, positive]
    predicted = confusion[:, positive].sum()
    actual = confusion[positive, :].sum()
    if predicted + actual == 0:
        return 0.0
    return float(2 * true_positive / (predicted + actual))


def _mcc(confusion: np.ndarray) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004); 0 when a side is constant."""
    total = confusion.sum()
    correct = np.trace(confusion)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    numerator = correct * total - predicted @ actual
    denominator = np.sqrt(float(total**2 - predicted @ predicted)) * np.sqrt(
        float(total**2 - actual @ actual)
    )
    return float(numerator / denominator) if denominator > 0 else 0.0


def majority_class(train_labels: Sequence[int]) -> int:
    """The most frequent training label (the smallest id on a tie, so it is reproducible)."""
    counts = Counter(train_labels)
    return min(counts, key=lambda label: (-counts[label], label))


def majority_scores(
    names: Sequence[str], train_labels: Sequence[int], dev_labels: Sequence[int], num_classes: int
) -> dict[str, float]:
    """What always predicting the training majority class scores on dev."""
    constant = [majority_class(train_labels)] * len(dev_labels)
    return compute(names, constant, dev_labels, num_classes)


def beats_majority(accuracy: float, majority_accuracy: float, dev_size: int) -> bool:
    """At least one more dev example right than the majority class gets."""
    return accuracy * dev_size >= majority_accuracy * dev_size + 1 - 1e-9


def describe(scores: Mapping[str, float], majority: Mapping[str, float] | None = None) -> str:
    """``accuracy 0.8030 (majority 0.5000), macro_f1 0.80 (majority 0.33)``."""
    parts = []
    for name, value in scores.items():
        beside = f" (majority {majority[name]:.4f})" if majority and name in majority else ""
        parts.append(f"{name} {value:.4f}{beside}")
    return ", ".join(parts)
