from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from canao.nas.latency import LatencyPredictor, LatencyResult, features
from canao.nas.search import (
    ABANDONED,
    SearchConfigError,
    SearchSettings,
    best_trial,
    budget_used,
    measured_points,
    pareto_front,
    predictor_report,
    reward,
    run_search,
    trials_frame,
)
from canao.nas.space import ArchConfig
from tests.search_fakes import SPACE, FakeEvaluator

REPO = Path(__file__).resolve().parent.parent
optuna.logging.set_verbosity(optuna.logging.WARNING)


def settings(**fields: object) -> SearchSettings:
    base = {"controller": "evolution", "trials": 12, "latency_ms": 3.0, "study_name": "t"}
    return SearchSettings(**{**base, **fields})  # type: ignore[arg-type]


def test_mnasnet_rewards() -> None:
    assert reward(0.9, 5.0, 5.0, "soft", -0.07) == pytest.approx(0.9)
    assert reward(0.9, 10.0, 5.0, "soft", -0.07) == pytest.approx(0.9 * 2**-0.07)
    assert reward(0.9, 2.5, 5.0, "soft", -0.07) > 0.9  # faster than the target is rewarded
    assert reward(0.9, 4.0, 5.0, "hard", -0.07) == 0.9  # within the target: accuracy only
    assert reward(0.9, 10.0, 5.0, "hard", -0.07) == pytest.approx(0.45)
    with pytest.raises(SearchConfigError, match="no scalar reward"):
        reward(0.9, 1.0, 1.0, "pareto", -0.07)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"objective": "fastest"}, "unknown objective"),
        ({"latency_ms": 0.0}, "latency target must be positive"),
        ({"trials": 0}, "trials must be >= 1"),
        ({"budget_minutes": 0.0}, "--budget-minutes must be positive"),
        ({"screen": 0.0}, "--screen must be in"),
        ({"screen": 0.5, "objective": "pareto"}, "--screen needs a scalar reward"),
    ],
)
def test_bad_settings(fields: dict[str, object], message: str) -> None:
    with pytest.raises(SearchConfigError, match=message):
        settings(**fields)


def test_failed_candidates_are_recorded_and_the_search_goes_on(tmp_path: Path) -> None:
    study = run_search(
        SPACE, FakeEvaluator(fail_hidden=384), settings(trials=25, controller="random"), None
    )
    frame = trials_frame(study)
    failed = frame[frame["state"] == "FAIL"]
    assert len(frame) == 25 and len(failed) > 0
    assert failed["error"].str.contains("RuntimeError: LLVM error compiling L").all()
    assert (frame.loc[frame["state"] == "COMPLETE", "arch"].str.contains("-H384-") == False).all()  # noqa: E712


def test_repeated_architectures_are_not_evaluated_again() -> None:
    evaluator = FakeEvaluator()
    study = run_search(SPACE, evaluator, settings(trials=40), None)
    distinct = trials_frame(study)["arch"].nunique()
    assert evaluator.calls == distinct < 40


def test_pareto_front_and_winner() -> None:
    frame = pd.DataFrame(
        {
            "state": ["COMPLETE"] * 5 + ["FAIL"],
            "arch": ["a", "b", "c", "d", "e", "f"],
            "accuracy": [0.80, 0.85, 0.84, 0.90, 0.70, 0.99],
            "latency_ms": [2.0, 3.0, 4.0, 8.0, 1.0, 0.5],
            "reward": [0.80, 0.84, 0.82, 0.86, 0.72, None],
        }
    )
    assert list(pareto_front(frame)["arch"]) == ["e", "a", "b", "d"]  # c is dominated by b
    assert best_trial(frame, settings())["arch"] == "d"
    assert best_trial(frame, settings(objective="pareto", latency_ms=3.5))["arch"] == "b"
    assert best_trial(frame, settings(objective="pareto", latency_ms=0.5))["arch"] == "e"


def test_pareto_search_records_both_objectives() -> None:
    study = run_search(
        SPACE, FakeEvaluator(), settings(controller="nsga2", objective="pareto"), None
    )
    assert all(len(t.values) == 2 for t in study.trials)
    assert not pareto_front(trials_frame(study)).empty


def test_resuming_needs_the_same_settings(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    run_search(SPACE, FakeEvaluator(), settings(trials=3), storage)
    run_search(SPACE, FakeEvaluator(), settings(trials=5), storage)  # more trials: fine
    assert len(optuna.load_study(study_name="t", storage=storage).trials) == 5
    with pytest.raises(SearchConfigError, match="different settings"):
        run_search(SPACE, FakeEvaluator(), settings(trials=6, latency_ms=9.0), storage)


def test_predictor_recovers_per_kernel_costs_and_reports_held_out_error() -> None:
    rng = np.random.default_rng(0)
    archs = [SPACE.sample(__import__("random").Random(i)) for i in range(40)]
    # work per kind (dense, attention, softmax, norm, quantize), kernels per kind, constant
    cost = np.array([0.004, 0.006, 0.002, 0.001, 0.0, 0.01, 0.008, 0.005, 0.003, 0.0, 0.2])
    latency = [float(features(a) @ cost) * (1 + rng.normal(0, 0.01)) for a in archs]
    predictor = LatencyPredictor().fit(archs, latency)
    errors = [abs(predictor.predict(a) / y - 1) for a, y in zip(archs, latency, strict=True)]
    assert np.mean(errors) < 0.02
    assert LatencyPredictor().holdout_mape(archs, latency) < 0.03
    assert LatencyPredictor().holdout_mape(archs[:5], latency[:5]) is None


def test_int8_predictor_counts_the_quantizers() -> None:
    from types import SimpleNamespace

    from canao.nas.latency import kernel_work

    arch = ArchConfig(256, (4, 2), (1024, 512), head_dim=32)
    assert kernel_work(arch, seq=64)["quantize"] == (0.0, 0)
    # One quantizer per encoder dense input: QKV (hidden), attention out (heads x 32),
    # FFN in (hidden), FFN out (FFN size); per token.
    inputs = (256 + 128 + 256 + 1024) + (256 + 64 + 256 + 512)
    assert kernel_work(arch, seq=64, int8=True)["quantize"] == (64.0 * inputs, 8)
    like = LatencyPredictor.like(SimpleNamespace(seq=64, batch=1, pipeline="fast-int8"))
    assert (like.seq, like.batch, like.int8) == (64, 1, True)
    assert not LatencyPredictor.like(SimpleNamespace(seq=64, pipeline="fast")).int8
    # int8 timings with a per-element quantizer cost: fitted on int8 features.
    rng = np.random.default_rng(1)
    archs = [SPACE.sample(__import__("random").Random(i)) for i in range(60)]
    cost = np.array([0.001, 0.006, 0.002, 0.001, 0.05, 0.01, 0.008, 0.005, 0.003, 0.01, 0.2])
    latency = [float(features(a, 64, int8=True) @ cost) * (1 + rng.normal(0, 0.005)) for a in archs]
    assert like.holdout_mape(archs, latency) < 0.02


class CountingEvaluator(FakeEvaluator):
    def __init__(self) -> None:
        super().__init__()
        self.timed: list[ArchConfig] = []

    def latency(self, arch: ArchConfig) -> LatencyResult:
        self.timed.append(arch)
        return super().latency(arch)


def test_predictor_screens_and_only_promising_candidates_are_built() -> None:
    evaluator = CountingEvaluator()
    study = run_search(
        SPACE,
        evaluator,
        settings(trials=60, predictor_min_points=10, screen=0.3, controller="random"),
        None,
    )
    frame = trials_frame(study)
    done = frame[frame["state"] == "COMPLETE"]
    predicted = done[done["latency_source"] == "predicted"]
    measured = done[done["latency_source"] == "measured"]
    assert len(predicted) > 0 and len(measured) == len(evaluator.timed)
    assert (predicted["latency_ms"] == predicted["predicted_ms"]).all()
    # Screened out: below the top 30% of measured rewards, so never the winner.
    assert frame.loc[frame["reward"].idxmax(), "latency_source"] == "measured"
    # The predictor is fitted on timings only, never on its own predictions.
    archs, _ = measured_points(study)
    assert {a.key for a in archs} <= set(measured["arch"])


def test_predictions_appear_beside_measurements_and_can_skip() -> None:
    study = run_search(
        SPACE,
        FakeEvaluator(),
        settings(trials=40, predictor_min_points=10, predictor_skip=1.0, controller="random"),
        None,
    )
    frame = trials_frame(study)
    late = frame[frame["trial"] >= 20]
    assert late["predicted_ms"].notna().all()
    measured = late[late["state"] == "COMPLETE"]
    assert (abs(measured["predicted_ms"] / measured["latency_ms"] - 1) < 0.2).all()
    skipped = frame[frame["state"] == "PRUNED"]
    assert len(skipped) > 0 and (skipped["predicted_ms"] > 3.0).all()
    assert predictor_report(study)["holdout_mape"] is not None


def _worker(storage: str, trials: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.search_fakes", storage, str(trials), *extra], cwd=REPO
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def study_storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same worker tests on a SQLite file and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres_server").new_database()


def test_a_killed_search_resumes_without_losing_finished_trials(
    tmp_path: Path, study_storage: str
) -> None:
    storage = study_storage
    marker = tmp_path / "hanging"
    worker = _worker(storage, 10, "4", str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert worker.poll() is None and time.monotonic() < deadline, "worker ended early"
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    study = optuna.load_study(study_name="fake", storage=storage)
    states = [t.state for t in study.trials]
    assert states[:4] == [optuna.trial.TrialState.COMPLETE] * 4
    assert states[4] == optuna.trial.TrialState.RUNNING  # killed mid-evaluation
    assert _worker(storage, 10).wait(timeout=120) == 0
    study = optuna.load_study(study_name="fake", storage=storage)
    assert study.trials[4].state == optuna.trial.TrialState.FAIL
    assert study.trials[4].user_attrs[ABANDONED] is True
    assert budget_used(study) == 10  # the abandoned trial does not count
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 10


def test_two_workers_share_one_storage(study_storage: str) -> None:
    storage = study_storage
    workers = [_worker(storage, 16) for _ in range(2)]
    assert [w.wait(timeout=180) for w in workers] == [0, 0]
    study = optuna.load_study(study_name="fake", storage=storage)
    frame = trials_frame(study)
    assert 16 <= len(frame) <= 17  # each worker stops at the budget; at most one overshoots
    assert (frame["state"] == "COMPLETE").all()
    assert frame["worker"].nunique() == 2
    assert sorted(frame["trial"]) == list(range(len(frame)))


def test_anchor_noise_band() -> None:
    from canao.nas.job import anchor_noise

    timings = [10.0, 10.5, 11.0, 9.5, 10.0, None]
    noise = anchor_noise(pd.DataFrame({"latency_anchor_ms": timings}))
    assert noise is not None and noise["anchor_timings"] == 5
    low, high = np.quantile([10.0, 10.5, 11.0, 9.5, 10.0], [0.1, 0.9])
    assert noise["band"] == pytest.approx((high - low) / 10.0, abs=1e-4)
    assert anchor_noise(pd.DataFrame({"latency_ms": [1.0]})) is None


def test_containment_ignores_layer_order_but_not_sizes() -> None:
    from canao.nas.search import contains

    outer = ArchConfig(256, (8, 4), (1024, 512), 32)
    assert contains(outer, ArchConfig(256, (4, 8), (512, 1024), 32))  # same layers, reordered
    assert contains(outer, ArchConfig(128, (4,), (1024,), 32))  # matched to outer's first
    assert not contains(outer, ArchConfig(256, (8, 8), (512, 512), 32))  # two 8-head layers
    assert not contains(outer, ArchConfig(384, (4,), (512,), 32))  # wider
    assert not contains(outer, ArchConfig(256, (4, 4, 4), (512, 512, 512), 32))  # deeper


def test_monotonicity_violations_beyond_the_band() -> None:
    from canao.nas.search import monotonicity_violations

    big = ArchConfig(256, (8, 8), (1024, 1024), 32).key
    small = ArchConfig(128, (4, 4), (512, 512), 32).key
    other = ArchConfig(384, (2,), (256,), 32).key  # neither contains nor is contained by big
    frame = pd.DataFrame(
        {
            "arch": [big, small, other],
            "state": ["COMPLETE"] * 3,
            "latency_ms": [10.0, 10.4, 30.0],
        }
    )
    within = monotonicity_violations(frame, band=0.05)
    assert within["pairs"] == 1 and within["violations"] == 0  # 4% slower: inside the band
    beyond = monotonicity_violations(frame, band=0.02)
    assert beyond["violations"] == 1 and beyond["worst"][0]["sub"] == small


class _AnchoredFake(FakeEvaluator):
    """Latencies as an anchored evaluator reports them, and a recorder for the order check."""

    def __init__(self) -> None:
        super().__init__()
        self.latency_evaluator = self
        self.remembered: dict[ArchConfig, float] = {}

    def remember(self, arch: ArchConfig, anchored_ms: float) -> None:
        self.remembered[arch] = anchored_ms

    def latency(self, arch: ArchConfig) -> LatencyResult:
        raw = super().latency(arch).median_ms
        return LatencyResult(raw, cached=False, anchor_ms=10.0, anchored_ms=raw * 0.9)


def test_a_resumed_worker_checks_order_against_the_study_so_far(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = run_search(SPACE, _AnchoredFake(), settings(trials=6), storage)
    recorded = {
        ArchConfig.from_key(t.user_attrs["arch"]): t.user_attrs["latency_ms"]
        for t in first.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    }
    resumed = _AnchoredFake()
    run_search(SPACE, resumed, settings(trials=6), storage)  # nothing left to run
    assert resumed.remembered == pytest.approx(recorded) and len(recorded) > 1
