from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from transformers import BertConfig

from canao.cli import main
from canao.latency.cache import LatencyCache
from canao.latency.protocol import Protocol
from canao.nas.latency import LatencyEvaluator
from canao.nas.space import ArchConfig

TINY_BASE = BertConfig(vocab_size=1000, max_position_embeddings=64)


def test_candidates_are_compiled_checked_measured_and_cached(tmp_path: Path) -> None:
    evaluator = LatencyEvaluator(
        TINY_BASE, seq=16, threads=1, cache=LatencyCache(tmp_path / "l.db")
    )
    small, large = ArchConfig(32, (1,), (64,), 16), ArchConfig(64, (4, 2), (256, 128), 16)
    first = evaluator(small)
    assert not first.cached and first.median_ms > 0 and first.build_s > 0
    assert first.max_abs_diff is not None and first.max_abs_diff < 1e-4
    assert first.launches is not None and first.launches > 5
    again = evaluator(small)
    assert again.cached and again.median_ms == first.median_ms
    assert evaluator.cached(large) is None
    assert evaluator(large).median_ms > 0


def test_a_candidate_links_kernels_an_earlier_one_compiled(tmp_path: Path) -> None:
    # Timed in a child process, so each candidate is exported too (linked from the cache).
    evaluator = LatencyEvaluator(
        TINY_BASE, seq=16, threads=1, protocol=Protocol(warmup=0, repeats=2), in_process=False
    )
    two_layers = evaluator(ArchConfig(48, (3, 2), (96, 64), 16))
    # Its one layer has the first layer's sizes: every kernel was compiled for the first.
    one_layer = evaluator(ArchConfig(48, (3,), (96,), 16))
    assert two_layers.kernels_compiled is not None and one_layer.kernels_compiled == 0
    assert one_layer.max_abs_diff is not None and one_layer.max_abs_diff < 1e-4
    assert one_layer.export_s > 0
    whole = LatencyEvaluator(
        TINY_BASE, seq=16, threads=1, protocol=Protocol(warmup=0, repeats=2), reuse_kernels=False
    )(ArchConfig(48, (3,), (96,), 16))
    assert whole.kernels_compiled is None and whole.max_abs_diff == one_layer.max_abs_diff


def test_candidates_are_timed_beside_an_anchor(tmp_path: Path) -> None:
    from canao.latency.measure import threads_here

    large = ArchConfig(64, (4, 2), (256, 128), 16)
    evaluator = LatencyEvaluator(
        TINY_BASE,
        seq=16,
        threads=threads_here(),  # in-process timing, the anchor's condition
        protocol=Protocol(warmup=1, repeats=8),
        cache=LatencyCache(tmp_path / "l.db"),
        anchor=large,
    )
    first = evaluator(ArchConfig(32, (1,), (64,), 16))
    assert first.anchor_ms is not None and first.anchor_ms > 0
    assert first.ratio == pytest.approx(first.median_ms / first.anchor_ms)
    # The first anchored measurement sets the reference: its anchored value is its median.
    assert first.anchored_ms == pytest.approx(first.median_ms)
    assert first.max_abs_diff is not None and first.max_abs_diff < 1e-4  # still checked
    second = evaluator(ArchConfig(64, (4,), (128,), 16))
    assert second.anchored_ms == pytest.approx(second.ratio * first.anchor_ms)
    assert evaluator.cached(ArchConfig(32, (1,), (64,), 16)) == first.median_ms  # raw, cached

    # A second process of the study (a resumed run, another worker) on this machine: the
    # anchor's cached latency is the reference, the same number for both.
    evaluator(large)
    resumed = LatencyEvaluator(
        TINY_BASE,
        seq=16,
        threads=threads_here(),
        protocol=Protocol(warmup=1, repeats=8),
        cache=LatencyCache(tmp_path / "l.db"),
        anchor=large,
    )
    third = resumed(ArchConfig(48, (3,), (96,), 16))
    assert third.anchored_ms == pytest.approx(third.ratio * evaluator.cached(large))


CONTAINER = ArchConfig(64, (4, 2), (256, 128), 16)


def _retiming_evaluator() -> LatencyEvaluator:
    """Anchored on CONTAINER, timed in this process, at most 2 retimes."""
    from canao.latency.measure import threads_here

    return LatencyEvaluator(
        TINY_BASE,
        seq=16,
        threads=threads_here(),
        protocol=Protocol(warmup=0, repeats=4),
        anchor=CONTAINER,
        noise_band=100.0,  # no spread is "wide": only the order or the anchor's time decides
        retime_limit=2,
    )


def test_a_disturbed_anchor_means_time_again(tmp_path: Path) -> None:
    evaluator = _retiming_evaluator()
    assert evaluator(ArchConfig(32, (1,), (64,), 16)).retimed == 0
    evaluator._anchor.reference_ms /= 1000  # the anchor now looks far off its usual time
    assert evaluator(ArchConfig(64, (2,), (128,), 16)).retimed == 2


def test_a_candidate_out_of_order_with_a_recorded_one_is_timed_again(tmp_path: Path) -> None:
    evaluator = _retiming_evaluator()
    calm = evaluator(ArchConfig(32, (1,), (64,), 16))
    assert calm.retimed == 0
    # A container recorded absurdly fast: its sub-network now looks out of order.
    evaluator._recorded[CONTAINER] = 1e-9
    suspect = evaluator(ArchConfig(64, (2,), (128,), 16))
    assert suspect.retimed == 2  # timed again up to the limit, the order still broken
    assert suspect.max_abs_diff is not None and suspect.max_abs_diff < 1e-4


def test_candidates_measured_on_a_board_that_serves_one_session_at_a_time() -> None:
    """Verify and measure each open a session: the first must end before the second."""
    from canao.latency.rpc import LocalRPC

    with LocalRPC(key="board", use_tracker=False) as board:
        evaluator = LatencyEvaluator(
            TINY_BASE,
            seq=16,
            protocol=Protocol(warmup=0, repeats=2),
            rpc=board.server,
            rpc_timeout_s=10,
        )
        result = evaluator(ArchConfig(32, (1,), (64,), 16))
    assert result.median_ms > 0 and result.max_abs_diff is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--controller", "bayes"], "unknown controller 'bayes'"),
        (["--controller", "rl", "--objective", "pareto"], "needs a scalar reward"),
        (["--latency-ms", "-1"], "latency target must be positive"),
        (["--task", "no-such-task"], "unknown task 'no-such-task'"),
        (["--target", "riscv"], "unknown target 'riscv'"),
        (["--screen", "1.5"], "--screen must be in"),
        (["--objective", "pareto", "--screen", "0.3"], "--screen needs a scalar reward"),
        (["--target", "arm64"], "no arm64 device on this machine"),
    ],
)
def test_bad_search_options_fail_before_any_training(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["search", "-o", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_search_end_to_end_on_offline_data(tmp_path: Path) -> None:
    out = tmp_path / "search"
    common = [
        "search", "--teacher-examples", "64", "--supernet-steps", "2", "--dev-limit", "40",
        "--seq", "32", "--retrain-steps", "4", "-o", str(out),
    ]  # fmt: skip
    assert main([*common, "--trials", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["job"]["task"] == "movie-reviews"
    assert summary["trials"] == {"COMPLETE": 3}
    for name in ("trials.csv", "pareto.csv", "pareto.png", "study.db"):
        assert (out / name).is_file(), name
    trials = pd.read_csv(out / "trials.csv")
    majority = summary["majority_class"]["accuracy"]
    assert majority == pytest.approx(0.5, abs=0.1) and "beats_majority" in trials
    # A trial is flagged exactly when it gets no more dev examples right than the majority.
    flagged = trials["accuracy"] * 40 < majority * 40 + 1 - 1e-9
    assert list(trials["beats_majority"]) == list(~flagged)
    winner = out / "winner"
    if summary["winner"] is None:  # 2 super-network steps: possibly nothing learnt
        assert "beats the majority class" in summary["no_winner"] and not winner.exists()
    else:
        assert summary["winner"]["beats_majority"]
        assert (winner / "model" / "model.safetensors").is_file()
        report = json.loads((winner / "report.json").read_text())
        assert report["numerics"]["max_abs_diff"] <= report["numerics"]["tolerance"]
    # Rerunning with a larger budget resumes the stored study.
    assert main([*common, "--trials", "5", "--no-export"]) == 0
    assert json.loads((out / "summary.json").read_text())["trials"] == {"COMPLETE": 5}


@pytest.mark.slow
def test_search_on_a_users_csv_reports_its_metrics(tmp_path: Path) -> None:
    """A user's file (string labels, held-out dev), scored with accuracy and macro-F1."""
    word = {"pos": "great", "neg": "awful"}
    labels = ["pos" if i % 3 else "neg" for i in range(300)]
    rows = ["text,label", *(f'"the film was {word[y]}, no. {i}",{y}' for i, y in enumerate(labels))]
    data = tmp_path / "reviews.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "search"
    args = ["search", "--task", str(data), "--teacher-examples", "64", "--supernet-steps", "2"]
    assert main([*args, "--seq", "32", "--trials", "2", "--no-export", "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == ["accuracy", "macro_f1"]
    assert summary["majority_class"]["accuracy"] == pytest.approx(2 / 3, abs=0.01)  # 30 dev rows
    assert "macro_f1" in summary["teacher"] and "macro_f1" in pd.read_csv(out / "trials.csv")
