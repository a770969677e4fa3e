"""The search loop: controller proposes, candidate is scored and measured, study records.

The study lives in Optuna storage (SQLite by default, any database URL), so
several worker processes or machines can share one search and a killed
search resumes with every finished trial kept: controllers are Optuna
samplers that rebuild their state from the trial history
(:mod:`canao.nas.controllers`). A candidate whose evaluation raises (compile,
numerics check, measurement) is recorded as a failed trial with its error,
and the search goes on.

Rewards (MnasNet, Tan et al. 2019), for accuracy ``A`` and latency ``T``
against the target ``T0``:
- ``soft``: ``A * (T / T0) ** w`` with ``w = -0.07``;
- ``hard``: ``A`` when ``T <= T0``, else ``A * (T / T0) ** -1``;
- ``pareto``: no scalar; the study has two objectives (accuracy up, latency down).
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import optuna
import pandas as pd

from canao.errors import CanaoError
from canao.nas.controllers import make_sampler
from canao.nas.latency import LatencyPredictor, LatencyResult
from canao.nas.space import ArchConfig, SearchSpace, contains
from canao.nas.storage import open_storage, redact

OBJECTIVES = ("soft", "hard", "pareto")
# Trials of a worker that died mid-evaluation: failed, but not counted against the budget.
ABANDONED = "abandoned"
# Metrics a trial may record beside accuracy (canao.nas.metrics), as trials.csv columns.
OTHER_METRICS = ("f1", "mcc", "macro_f1")


class SearchConfigError(CanaoError):
    """Settings that cannot work, or that contradict the stored study being resumed."""


class CandidateEvaluator(Protocol):
    def accuracy(self, arch: ArchConfig) -> float: ...

    def latency(self, arch: ArchConfig) -> LatencyResult: ...


@dataclass(frozen=True)
class SearchSettings:
    controller: str = "evolution"
    trials: int = 20
    objective: str = "soft"
    latency_ms: float = 10.0
    weight: float = -0.07
    seed: int = 0
    study_name: str = "canao-search"
    # Skip (prune) a candidate whose predicted latency exceeds this multiple of the
    # target, once the predictor has `predictor_min_points` measurements (None: never).
    predictor_skip: float | None = None
    predictor_min_points: int = 20
    # Predictor screens (scalar objectives): once fitted, a candidate is built and timed only
    # when its reward with the predicted latency is within the top `screen` fraction of the
    # measured rewards so far; the others are scored with the predicted latency (None: off).
    screen: float | None = None
    # Wall-clock minutes this worker spends in the trial loop (None: no limit). Checked
    # before each new trial: one started in time runs to its end.
    budget_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise SearchConfigError(
                f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}"
            )
        if not self.latency_ms > 0:
            raise SearchConfigError(f"latency target must be positive, got {self.latency_ms} ms")
        if self.trials < 1:
            raise SearchConfigError(f"trials must be >= 1, got {self.trials}")
        if self.screen is not None:
            if not 0 < self.screen <= 1:
                raise SearchConfigError(f"--screen must be in (0, 1], got {self.screen}")
            if self.objective == "pareto":
                raise SearchConfigError("--screen needs a scalar reward (objective soft or hard)")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise SearchConfigError(f"--budget-minutes must be positive, got {self.budget_minutes}")


def reward(
    accuracy: float, latency_ms: float, target_ms: float, objective: str, weight: float
) -> float:
    """MnasNet's reward; see the module docstring."""
    ratio = latency_ms / target_ms
    if objective == "soft":
        return accuracy * ratio**weight
    if objective == "hard":
        return accuracy if ratio <= 1 else accuracy / ratio
    raise SearchConfigError(f"objective {objective!r} has no scalar reward")


def open_study(storage: str | None, space: SearchSpace, settings: SearchSettings) -> optuna.Study:
    """Create the study, or load it to resume; refuses to mix different spaces or objectives."""
    multi = settings.objective == "pareto"
    directions = ["maximize", "minimize"] if multi else ["maximize"]
    sampler = make_sampler(settings.controller, space, seed=settings.seed, multi_objective=multi)
    study = optuna.create_study(
        storage=_storage(storage),
        study_name=settings.study_name,
        load_if_exists=True,
        directions=directions,
        sampler=sampler,
    )
    identity = {
        "space": asdict(space),
        "objective": settings.objective,
        "latency_ms": settings.latency_ms,
        "weight": settings.weight,
    }
    stored = study.user_attrs.get("canao")
    if stored is None:
        study.set_user_attr("canao", _jsonable(identity))
    elif stored != _jsonable(identity):
        raise SearchConfigError(
            f"study {settings.study_name!r} in {redact(storage or 'memory')} was started "
            "with different settings "
            f"({stored}); use another --study-name or the same settings to resume"
        )
    return study


def _storage(url: str | None) -> optuna.storages.BaseStorage | None:
    return None if url is None else open_storage(url)


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def release_dead_trials(study: optuna.Study) -> int:
    """Fail RUNNING trials of workers on this host that no longer exist (a killed search)."""
    released = 0
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = str(trial.user_attrs.get("worker", ""))
        name, _, pid = owner.rpartition(":")
        if name != host or not pid.isdigit() or _alive(int(pid)):
            continue
        study._storage.set_trial_user_attr(trial._trial_id, ABANDONED, True)
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        released += 1
    return released


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def budget_used(study: optuna.Study) -> int:
    """Trials that count against ``--trials``: all but those abandoned by a dead worker."""
    return sum(1 for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(ABANDONED))


def _deadline(minutes: float | None) -> float:
    return math.inf if minutes is None else time.monotonic() + 60 * minutes


def run_search(
    space: SearchSpace,
    evaluator: CandidateEvaluator,
    settings: SearchSettings,
    storage: str | None = None,
    *,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
) -> optuna.Study:
    """Run trials until the study holds ``settings.trials`` of them (shared by all workers)."""
    study = open_study(storage, space, settings)
    release_dead_trials(study)
    _seed_order_check(study, evaluator)
    predictor = LatencyPredictor.like(getattr(evaluator, "latency_evaluator", None))
    deadline = _deadline(settings.budget_minutes)
    while budget_used(study) < settings.trials and time.monotonic() < deadline:
        trial = study.ask()
        trial.set_user_attr("worker", worker_id())
        _refit(predictor, study, settings)
        _run_trial(study, trial, space, evaluator, settings, predictor)
        if on_trial is not None:
            on_trial(study.get_trials(deepcopy=False)[-1])
    return study


def _seed_order_check(study: optuna.Study, evaluator: CandidateEvaluator) -> None:
    """Give a resumed or joining worker the study's anchored latencies for its order check.

    Without them a new process checks each candidate only against what it measured itself
    (how a container timed too fast slipped past the check in a resumed run).
    """
    latency = getattr(evaluator, "latency_evaluator", None)
    if latency is None or not hasattr(latency, "remember"):
        return
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        if attrs.get("latency_anchor_ms") is not None and attrs.get("arch"):
            latency.remember(ArchConfig.from_key(attrs["arch"]), float(attrs["latency_ms"]))


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    space: SearchSpace,
    evaluator: CandidateEvaluator,
    settings: SearchSettings,
    predictor: LatencyPredictor,
) -> None:
    try:
        params = {
            name: trial.suggest_categorical(name, list(choices))
            for name, choices in space.dimensions().items()
        }
        arch = space.decode(params)
        trial.set_user_attr("arch", arch.key)
        trial.set_user_attr("params_m", round(arch.encoder_params() / 1e6, 3))
        predicted = predictor.predict(arch) if predictor.fitted else None
        if predicted is not None:
            trial.set_user_attr("predicted_ms", round(predicted, 4))
        if _hopeless(predicted, settings):
            trial.set_user_attr("skipped", "predicted latency over the limit")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return
        accuracy, measured = _evaluate(study, evaluator, arch, settings, predicted)
        trial.set_user_attr("accuracy", accuracy)
        for name, value in _other_metrics(evaluator, arch).items():
            trial.set_user_attr(name, value)
        # latency_ms is what the reward ranks: anchored (ratio to the anchor timed beside it,
        # in the anchor's first-measured ms) where measured so; the raw median kept beside it.
        trial.set_user_attr("latency_ms", round(measured.ranked_ms, 4))
        trial.set_user_attr("latency_median_ms", round(measured.median_ms, 4))
        if measured.anchor_ms is not None and measured.ratio is not None:
            trial.set_user_attr("latency_anchor_ms", round(measured.anchor_ms, 4))
            trial.set_user_attr("latency_ratio", round(measured.ratio, 4))
            trial.set_user_attr("latency_retimed", measured.retimed)
        trial.set_user_attr("latency_cached", measured.cached)
        trial.set_user_attr("latency_source", "predicted" if measured.predicted else "measured")
        if measured.build_s:
            trial.set_user_attr("build_s", round(measured.build_s, 2))
            trial.set_user_attr("export_s", round(measured.export_s, 2))
        if measured.kernels_compiled is not None:
            trial.set_user_attr("kernels_compiled", measured.kernels_compiled)
        if measured.segments_lowered is not None:
            trial.set_user_attr("segments_lowered", measured.segments_lowered)
        study.tell(trial, _values(accuracy, measured.ranked_ms, settings))
    except KeyboardInterrupt:
        trial.set_user_attr("error", "interrupted")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    except Exception as err:  # a failed candidate must not end the search
        trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


def _other_metrics(evaluator: CandidateEvaluator, arch: ArchConfig) -> dict[str, float]:
    """The task's metrics beside accuracy (F1, MCC, macro-F1), where the evaluator has them."""
    metrics = getattr(evaluator, "metrics", None)
    if metrics is None:
        return {}
    return {name: value for name, value in metrics(arch).items() if name != "accuracy"}


def _hopeless(predicted: float | None, settings: SearchSettings) -> bool:
    if predicted is None or settings.predictor_skip is None:
        return False
    return predicted > settings.predictor_skip * settings.latency_ms


def _evaluate(
    study: optuna.Study,
    evaluator: CandidateEvaluator,
    arch: ArchConfig,
    settings: SearchSettings,
    predicted: float | None,
) -> tuple[float, LatencyResult]:
    """Score ``arch``, reusing an earlier trial of the same architecture (controllers repeat).

    With ``settings.screen``, a candidate the predictor already places out of the running
    is not built: its latency is the prediction.
    """
    for done in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if done.user_attrs.get("arch") == arch.key and _was_measured(done):
            return done.user_attrs["accuracy"], LatencyResult(
                done.user_attrs["latency_ms"], cached=True
            )
    accuracy = evaluator.accuracy(arch)
    if predicted is not None and _screened_out(study, accuracy, predicted, settings):
        return accuracy, LatencyResult(predicted, cached=False, predicted=True)
    return accuracy, evaluator.latency(arch)


def _was_measured(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.user_attrs.get("latency_source", "measured") == "measured"


def _screened_out(
    study: optuna.Study, accuracy: float, predicted: float, settings: SearchSettings
) -> bool:
    """Predicted reward below the top ``screen`` fraction of the measured rewards."""
    if settings.screen is None:
        return False
    measured = [
        t.values[0]
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if _was_measured(t) and t.values
    ]
    if len(measured) < settings.predictor_min_points:
        return False
    threshold = float(np.quantile(measured, 1 - settings.screen))
    return _values(accuracy, predicted, settings)[0] < threshold


def _values(accuracy: float, latency_ms: float, settings: SearchSettings) -> list[float]:
    if settings.objective == "pareto":
        return [accuracy, latency_ms]
    return [reward(accuracy, latency_ms, settings.latency_ms, settings.objective, settings.weight)]


def _refit(predictor: LatencyPredictor, study: optuna.Study, settings: SearchSettings) -> None:
    archs, latency = measured_points(study)
    if len(archs) >= settings.predictor_min_points:
        predictor.fit(archs, latency)


def measured_points(study: optuna.Study) -> tuple[list[ArchConfig], list[float]]:
    """Distinct measured architectures and their latencies (the predictor's training data)."""
    seen: dict[str, float] = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        key, latency = trial.user_attrs.get("arch"), trial.user_attrs.get("latency_ms")
        # A screened-out trial's latency is the predictor's own: never its training data.
        if key and latency and key not in seen and _was_measured(trial):
            seen[key] = float(latency)
    return [ArchConfig.from_key(k) for k in seen], list(seen.values())


# ---- results ----


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: architecture, accuracy, measured and predicted latency, outcome."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                "arch": attrs.get("arch"),
                "params_m": attrs.get("params_m"),
                "accuracy": attrs.get("accuracy"),
                **{name: attrs[name] for name in OTHER_METRICS if name in attrs},
                "latency_ms": attrs.get("latency_ms"),
                "latency_median_ms": attrs.get("latency_median_ms"),
                "latency_anchor_ms": attrs.get("latency_anchor_ms"),
                "latency_ratio": attrs.get("latency_ratio"),
                "latency_retimed": attrs.get("latency_retimed"),
                "build_s": attrs.get("build_s"),
                "export_s": attrs.get("export_s"),
                "kernels_compiled": attrs.get("kernels_compiled"),
                "segments_lowered": attrs.get("segments_lowered"),
                "predicted_ms": attrs.get("predicted_ms"),
                "latency_source": attrs.get("latency_source"),
                "reward": trial.values[0] if trial.values and len(trial.values) == 1 else None,
                "worker": attrs.get("worker"),
                "error": attrs.get("error") or attrs.get("skipped"),
            }
        )
    return pd.DataFrame(rows)


def monotonicity_violations(frame: pd.DataFrame, band: float) -> dict[str, object]:
    """Recorded sub-networks slower than an architecture that contains them, beyond ``band``.

    A sub-network does less of every kernel's work, so measuring it slower than its
    container by more than the noise band means a latency in the reward is wrong.
    """
    done = frame[(frame["state"] == "COMPLETE") & frame["latency_ms"].notna()]
    if "latency_source" in done:
        done = done[done["latency_source"] != "predicted"]  # only timings can be out of order
    latency = done.groupby("arch")["latency_ms"].first().astype(float).to_dict()
    archs = {key: ArchConfig.from_key(key) for key in latency}
    pairs, worst = 0, []
    for inner_key, inner in archs.items():
        for outer_key, outer in archs.items():
            if inner.shape_key == outer.shape_key or not contains(outer, inner):
                continue
            pairs += 1
            excess = latency[inner_key] / latency[outer_key] - 1
            if excess > band:
                worst.append({"sub": inner_key, "container": outer_key, "excess": round(excess, 4)})
    worst.sort(key=lambda row: -float(row["excess"]))
    return {"band": band, "pairs": pairs, "violations": len(worst), "worst": worst[:5]}


def pareto_front(frame: pd.DataFrame) -> pd.DataFrame:
    """Completed, distinct architectures not beaten on both accuracy and latency."""
    done = frame[frame["state"] == "COMPLETE"].drop_duplicates("arch")
    done = done.sort_values(["latency_ms", "accuracy"], ascending=[True, False])
    keep, best = [], -math.inf
    for index, row in done.iterrows():
        if row["accuracy"] > best:
            keep.append(index)
            best = row["accuracy"]
    return done.loc[keep].reset_index(drop=True)


def best_trial(frame: pd.DataFrame, settings: SearchSettings) -> pd.Series:
    """The winner: best reward; for Pareto, the most accurate within the target (else fastest)."""
    done = frame[frame["state"] == "COMPLETE"]
    if done.empty:
        raise SearchConfigError("no trial completed: nothing to pick a winner from")
    if settings.objective != "pareto":
        return done.loc[done["reward"].idxmax()]
    within = done[done["latency_ms"] <= settings.latency_ms]
    if within.empty:
        return done.loc[done["latency_ms"].idxmin()]
    return within.sort_values(["accuracy", "latency_ms"], ascending=[False, True]).iloc[0]


def predictor_report(study: optuna.Study, latency: object = None) -> dict[str, object]:
    """Held-out error of the latency predictor on this study's measurements (``latency``: the
    LatencyEvaluator that timed them, for its shapes and pipeline)."""
    archs, measured = measured_points(study)
    mape = LatencyPredictor.like(latency).holdout_mape(archs, measured)
    return {"points": len(archs), "holdout_mape": mape}
