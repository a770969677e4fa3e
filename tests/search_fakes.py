"""A cheap, deterministic candidate evaluator, and a worker entry point for process tests.

``python -m tests.search_fakes STORAGE TRIALS [HANG_AT MARKER]`` runs one search
worker; with HANG_AT it writes MARKER and hangs when asked to evaluate that trial
number, so a test can kill it mid-trial.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import optuna
from transformers import BertConfig

from canao.nas.latency import LatencyResult, kernel_work
from canao.nas.search import SearchSettings, run_search
from canao.nas.space import ArchConfig, SearchSpace

SPACE = SearchSpace.from_teacher(
    BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6)
)


class FakeEvaluator:
    """Accuracy grows with size; latency follows the dense work; some archs 'fail to compile'."""

    def __init__(self, fail_hidden: int | None = None, delay_s: float = 0.0) -> None:
        self.fail_hidden = fail_hidden
        self.delay_s = delay_s
        self.calls = 0

    def accuracy(self, arch: ArchConfig) -> float:
        self.calls += 1
        time.sleep(self.delay_s)
        return 0.5 + 0.4 * (arch.encoder_params() / SPACE.largest().encoder_params()) ** 0.3

    def latency(self, arch: ArchConfig) -> LatencyResult:
        if arch.hidden_size == self.fail_hidden:
            raise RuntimeError(f"LLVM error compiling {arch.key}")
        work = kernel_work(arch)
        return LatencyResult(work["dense"][0] / 2e8 + 0.05 * arch.num_layers, cached=False)


class HangingEvaluator(FakeEvaluator):
    def __init__(self, study_storage: str, hang_at: int, marker: Path) -> None:
        super().__init__(delay_s=0.05)
        self.storage, self.hang_at, self.marker = study_storage, hang_at, marker

    def accuracy(self, arch: ArchConfig) -> float:
        study = optuna.load_study(study_name="fake", storage=self.storage)
        if len(study.trials) - 1 >= self.hang_at:
            self.marker.write_text("hanging")
            time.sleep(600)
        return super().accuracy(arch)


def main(argv: list[str]) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, trials = argv[0], int(argv[1])
    evaluator: FakeEvaluator = FakeEvaluator(delay_s=0.05)
    if len(argv) > 2:
        evaluator = HangingEvaluator(storage, int(argv[2]), Path(argv[3]))
    settings = SearchSettings(
        controller="evolution", trials=trials, latency_ms=3.0, study_name="fake"
    )
    run_search(SPACE, evaluator, settings, storage)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
