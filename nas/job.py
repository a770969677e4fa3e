"""``canao search`` end to end: teacher -> super-network -> search -> outputs -> winner.

Every expensive step is cached (teacher and super-network on disk, latencies in
the latency cache, trials in the study's storage), so rerunning the same
command resumes where it stopped instead of starting over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from transformers import BertConfig

from canao.compiler.pipelines import precision_pipeline
from canao.compiler.quantized import int8_scheme, quantized_reference
from canao.compiler.schedules.dense_int8 import Int8Tiling
from canao.latency.cache import LatencyCache
from canao.latency.protocol import Protocol
from canao.latency.rpc import RPCAddress
from canao.nas.artifacts import StudyArtifacts, open_artifact_store
from canao.nas.calibrate import calibrate_readout
from canao.nas.controllers import check_controller
from canao.nas.distill import (
    SuperNet,
    SupernetConfig,
    cache_root,
    load_supernet,
    load_teacher,
    supernet_dir,
    train_supernet,
)
from canao.nas.finetune import FinetuneConfig, finetune, predict_labels, teacher_dir
from canao.nas.latency import LatencyEvaluator, LatencyResult
from canao.nas.metrics import beats_majority, compute, describe, majority_scores, metric_names
from canao.nas.retrain import RetrainConfig, retrain
from canao.nas.search import (
    SearchConfigError,
    SearchSettings,
    best_trial,
    monotonicity_violations,
    pareto_front,
    predictor_report,
    run_search,
    trials_frame,
)
from canao.nas.space import ArchConfig, SearchSpace
from canao.nas.storage import open_storage, redact
from canao.nas.supernet import extract
from canao.nas.tasks import Split, TaskLike, load_task, num_labels, task_name
from canao.nas.teacher import resolve_teacher
from canao.progress import Progress

Log = Callable[[str], None]


@dataclass(frozen=True)
class SearchJob:
    task: TaskLike = "movie-reviews"  # a name, a path, or a TaskSpec (files and columns)
    target: str = "x86"
    latency_ms: float | None = None  # None: half of the teacher's measured latency
    controller: str = "evolution"
    trials: int = 20
    budget_minutes: float | None = None  # the trial loop's wall-clock limit, beside trials
    # The most accurate model within the latency target (MnasNet's hard constraint). The
    # soft reward also pays for beating the target: in the quick start it chose a 1-layer
    # model at -9.6 points over a 6-layer one at -1.2 (README, super-network coverage).
    objective: str = "hard"
    weight: float = -0.07
    storage: str | None = None  # None: sqlite:///<out>/study.db
    # Where the study's teacher and super-network are shared with workers on other machines
    # (a folder or s3://bucket/prefix; nas/artifacts.py). None: this machine's cache only.
    artifacts: str | None = None
    study_name: str = "canao-search"
    out: Path = Path("canao-search")
    seq: int = 128
    threads: int = 1
    seed: int = 0
    teacher: str | None = None  # None: MiniLM-L6; a folder, hub id or preset (nas/teacher.py)
    teacher_epochs: int = 1
    teacher_examples: int | None = None  # None: the whole training set
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)  # steps 0: export as cut
    # Retrain the winner and the next most accurate Pareto points within the target, k in all;
    # the best after retraining is exported (cut-out accuracy is a shared-weight estimate).
    retrain_top: int = 1
    # "int8": candidates timed as fast-int8 builds and scored quantized (the same scheme in
    # PyTorch), the winner exported int8: the search optimises what ships.
    precision: str = "fp32"
    dev_limit: int | None = None
    # Read-out calibration (nas/calibrate.py): each cut-out sub-network's classifier is
    # refitted on this many training examples before it is scored, retrained or exported;
    # 0 scores the shared read-out as it is.
    calibrate: int = 512
    predictor_skip: float | None = None
    screen: float | None = None  # predictor screens: measure the top fraction only
    rpc: RPCAddress | None = None
    export_winner: bool = True
    progress: bool = True
    anchor: bool = True  # time the teacher interleaved with each candidate (local runs)

    @property
    def pipeline(self) -> str:
        return precision_pipeline(self.precision)

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"


@dataclass
class SupernetEvaluator:
    """The task's metrics of the extracted sub-network on dev; latency as canao ships it.

    ``accuracy`` is the search's score on every task; ``metrics`` adds the task's own (F1,
    Matthews correlation, macro-F1) and ``majority`` what the majority class scores.
    """

    supernet: SuperNet
    dev: Split
    latency_evaluator: LatencyEvaluator
    max_length: int = 64
    metric_names: tuple[str, ...] = ("accuracy",)
    majority: dict[str, float] = field(default_factory=dict)
    train: Split | None = None  # what the winner is retrained on
    # Score each model quantized as the int8 build computes it (None: fp32).
    int8: Int8Tiling | None = None
    calibrate: int = 0  # training examples the read-out is refitted on (0: shared read-out)

    def sub_network(self, arch: ArchConfig) -> torch.nn.Module:
        """``arch`` cut out of the super-network, its read-out calibrated: what is scored,
        retrained and exported."""
        model = extract(self.supernet.model, arch)
        if self.calibrate > 0 and self.train is not None:
            # An int8 search reads the features the int8 build computes (nas/calibrate.py).
            deployed = partial(quantized_reference, tiling=self.int8) if self.int8 else None
            calibrate_readout(
                model,
                self.supernet.tokenizer,
                self.train,
                self.calibrate,
                self.max_length,
                deployed=deployed,
            )
        return model

    def accuracy(self, arch: ArchConfig) -> float:
        return self.metrics(arch)["accuracy"]

    def metrics(self, arch: ArchConfig) -> dict[str, float]:
        """Cached per (super-network, dev split, metrics, architecture): controllers revisit."""
        key = f"{self._dev_key()}|{self.max_length}|{','.join(self.metric_names)}|{arch.key}"
        key += f"|int8-{self.int8.spec.levels}" if self.int8 else ""
        # "on-int8": the read-out fitted on quantized features (before: on float ones).
        key += f"|calibrate{self.calibrate}" if self.calibrate > 0 else ""
        key += "-on-int8" if self.calibrate > 0 and self.int8 else ""
        with self._store() as db:
            hit = db.execute("SELECT metrics FROM metrics WHERE key = ?", (key,)).fetchone()
        if hit is not None:
            return dict(json.loads(hit[0]))
        values = self.score_model(self.sub_network(arch))
        with self._store() as db:
            db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?)", (key, json.dumps(values)))
        return values

    def score_model(self, model: torch.nn.Module) -> dict[str, float]:
        """The task's metrics of any classifier over this evaluator's dev split."""
        if self.int8:
            model = quantized_reference(model, self.int8)
        predicted = predict_labels(model, self.supernet.tokenizer, self.dev, self.max_length)
        classes = int(self.supernet.model.config.num_labels)
        return compute(self.metric_names, predicted, self.dev.labels, classes)

    def beats_majority(self, accuracy: float) -> bool:
        if "accuracy" not in self.majority:
            return True
        return beats_majority(accuracy, self.majority["accuracy"], len(self.dev))

    def _dev_key(self) -> str:
        digest = hashlib.sha256(json.dumps([self.dev.texts, self.dev.labels]).encode())
        return digest.hexdigest()[:16]

    @contextlib.contextmanager
    def _store(self) -> Iterator[sqlite3.Connection]:
        folder = self.supernet.path or cache_root()
        db = sqlite3.connect(folder / "accuracy.sqlite", timeout=60)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS metrics (key TEXT PRIMARY KEY, metrics TEXT)")
            yield db
            db.commit()
        finally:
            db.close()

    def latency(self, arch: ArchConfig) -> LatencyResult:
        return self.latency_evaluator(arch)


@dataclass
class SearchOutcome:
    trials: pd.DataFrame
    pareto: pd.DataFrame
    winner: pd.Series | None  # None: no candidate beat the majority class
    summary: dict[str, object]
    out: Path
    evaluator: SupernetEvaluator


def _dev_slice(split: Split, limit: int | None) -> Split:
    if limit is None or limit >= len(split):
        return split
    return Split(split.texts[:limit], split.labels[:limit], split.label_names)


def study_artifacts(job: SearchJob) -> StudyArtifacts | None:
    """The study's shared teacher and super-network (``--artifacts``), its study opened."""
    if job.artifacts is None:
        return None
    import optuna

    study = optuna.create_study(
        storage=open_storage(job.storage_url()),
        study_name=job.study_name,
        load_if_exists=True,
        directions=["maximize", "minimize"] if job.objective == "pareto" else ["maximize"],
    )
    return StudyArtifacts(study, open_artifact_store(job.artifacts), job.storage_url())


def prepare(job: SearchJob, log: Log, artifacts: StudyArtifacts | None = None) -> SupernetEvaluator:
    """Teacher, super-network and evaluators (each cached after the first run; fetched from
    the study's artifact store, or built and put there, with ``artifacts``)."""
    data = load_task(job.task)
    teacher = teacher_checkpoint(job, data, log, artifacts)
    log(f"super-network: {job.supernet.steps} sandwich steps (cached after the first run)")
    length = task_length(data, job.supernet.max_length)
    config = replace(job.supernet, max_length=length)

    def train() -> SuperNet:
        return train_supernet(
            teacher,
            data["train"],
            task_name(job.task),
            config=config,
            progress=_bar("super-net", job, job.supernet.batch_size),
        )

    if artifacts is None:
        supernet = train()
    else:
        space = SearchSpace.from_teacher(BertConfig.from_pretrained(str(teacher)))
        local = supernet_dir(teacher, task_name(job.task), space, config, data["train"])
        supernet = load_supernet(artifacts.folder("supernet", local, lambda: train().path))
    # This machine's copy of the teacher (the recorded path may be another machine's).
    supernet.info = {**(supernet.info or {}), "teacher": str(teacher)}
    base = supernet.model.config
    evaluator = LatencyEvaluator(
        base,
        target=job.target,
        pipeline=job.pipeline,
        seq=job.seq,
        threads=job.threads,
        protocol=Protocol(warmup=3, repeats=15),
        rpc=job.rpc,
        cache=LatencyCache(),
        # The teacher, timed beside every candidate: the load on a shared machine drifts
        # between trials, and candidates are ranked by their ratio to it.
        anchor=supernet.space.largest() if job.anchor else None,
    )
    dev = _dev_slice(data["dev"], job.dev_limit)
    names = metric_names(task_name(job.task))
    classes = int(base.num_labels)
    majority = majority_scores(names, data["train"].labels, dev.labels, classes)
    return SupernetEvaluator(
        supernet,
        dev,
        evaluator,
        max_length=length,
        metric_names=names,
        majority=majority,
        train=data["train"],
        int8=int8_scheme(job.target, job.pipeline) if job.precision == "int8" else None,
        calibrate=job.calibrate,
    )


def task_length(data: dict[str, Split], length: int) -> int:
    """Tokens per example for training and scoring: sentence pairs (RTE, MRPC) get 128, as
    their teacher does; at 64 most RTE pairs would lose their second sentence."""
    return max(length, 128) if data["train"].is_pair else length


def teacher_checkpoint(
    job: SearchJob, data: dict[str, Split], log: Log, artifacts: StudyArtifacts | None = None
) -> Path:
    """The teacher's folder: ``--teacher`` as it is if it is a classifier, else fine-tuned
    (or fetched from the study's artifact store, where another worker fine-tuned it)."""
    source = resolve_teacher(job.teacher, num_labels(data), data["train"].label_names)
    if source.fine_tuned:
        log(f"teacher: {source.label}, already a classifier for this task, used as it is")
        return source.path
    log(
        f"teacher: fine-tuning {source.label} on {task_name(job.task)} "
        f"({job.teacher_epochs} epoch(s); cached after the first run)"
    )
    config = FinetuneConfig(
        task=job.task,
        epochs=job.teacher_epochs,
        train_limit=job.teacher_examples,
        seed=job.seed,
        max_length=task_length(data, 64),
    )
    if artifacts is None:
        return finetune(config, base_model=source.path, log=job.progress)
    return artifacts.folder(
        "teacher",
        teacher_dir(config, source.path, data),
        lambda: finetune(config, base_model=source.path, log=job.progress),
    )


def _bar(
    label: str, job: SearchJob, batch_size: int
) -> Callable[[int, int, dict[str, float]], None] | None:
    """A training progress callback: a bar (or lines in a log) with the step's numbers."""
    if not job.progress:
        return None
    bar: dict[str, Progress] = {}

    def update(done: int, total: int, values: dict[str, float]) -> None:
        if label not in bar:
            bar[label] = Progress(label, total, rate_unit="ex")
        bar[label].update(1, count=batch_size, **values)

    return update


def check_job(job: SearchJob) -> None:
    """Every option a typo can break, checked before minutes of fine-tuning and training."""
    from canao.workflow import preflight

    SearchSettings(
        controller=job.controller,
        trials=job.trials,
        objective=job.objective,
        latency_ms=1.0 if job.latency_ms is None else job.latency_ms,
        budget_minutes=job.budget_minutes,
        screen=job.screen,
    )
    check_controller(job.controller, multi_objective=job.objective == "pareto")
    if job.calibrate < 0:
        raise SearchConfigError(f"--calibrate must be 0 or more examples, got {job.calibrate}")
    preflight(job.target, [job.pipeline], job.rpc, 20.0)
    if job.rpc is None:
        _require_local_device(job.target)
    data = load_task(job.task)
    resolve_teacher(job.teacher, num_labels(data), data["train"].label_names)
    if job.storage is not None:  # the default SQLite file is created in OUT with the outputs
        open_storage(job.storage)
    if job.artifacts is not None:
        open_artifact_store(job.artifacts)


def _require_local_device(target: str) -> None:
    """Candidates are measured here unless --rpc names a device: this machine must run them."""
    import tvm

    from canao.compiler.targets import get_target
    from canao.errors import DeviceUnreachableError

    spec = get_target(target)
    if spec.is_cross or not tvm.device(spec.device_type, 0).exist:
        raise DeviceUnreachableError(
            f"no {target} device on this machine to measure candidates on: "
            "pass --rpc HOST:PORT (and --key NAME for a tracker) to measure on one"
        )


def run_job(job: SearchJob, log: Log = print) -> SearchOutcome:
    # TVM reads TVM_NUM_THREADS once, when its thread pool starts: set it before any run so
    # candidates are timed in this process at the wanted thread count.
    os.environ.setdefault("TVM_NUM_THREADS", str(job.threads))
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_job(job)
    job.out.mkdir(parents=True, exist_ok=True)
    evaluator = prepare(job, log, study_artifacts(job))
    teacher = _teacher_point(evaluator, job, log)
    target = job.latency_ms or _recorded_target(job) or round(teacher["latency_ms"] / 2, 3)
    settings = SearchSettings(
        controller=job.controller,
        trials=job.trials,
        objective=job.objective,
        latency_ms=target,
        weight=job.weight,
        seed=job.seed,
        study_name=job.study_name,
        predictor_skip=job.predictor_skip,
        screen=job.screen,
        budget_minutes=job.budget_minutes,
    )
    log(
        f"search: {job.controller}, {job.trials} trials, target {target:.2f} ms "
        f"({job.objective}), storage {redact(job.storage_url())}"
    )
    started = time.perf_counter()
    study = run_search(
        evaluator.supernet.space,
        evaluator,
        settings,
        job.storage_url(),
        on_trial=_trial_bar(job),
    )
    seconds = round(time.perf_counter() - started, 1)
    return write_outputs(study, job, settings, evaluator, teacher, log, search_seconds=seconds)


def _recorded_target(job: SearchJob) -> float | None:
    """The latency target of the study being resumed or joined, if it exists.

    The default target is half the teacher's latency as this worker measures it; a worker
    on another machine (or a later run) measures it a little differently, and must still
    search the same study with the same reward.
    """
    import optuna

    try:
        study = optuna.load_study(
            study_name=job.study_name, storage=open_storage(job.storage_url())
        )
    except KeyError:  # no such study yet: this worker starts it
        return None
    recorded = study.user_attrs.get("canao", {}).get("latency_ms")
    return None if recorded is None else float(recorded)


def _teacher_point(evaluator: SupernetEvaluator, job: SearchJob, log: Log) -> dict[str, object]:
    """The teacher's accuracy and latency under the same protocol (the reference point)."""
    model, _ = load_teacher(Path(str(evaluator.supernet.info["teacher"])))
    largest = evaluator.supernet.space.largest()
    scores = evaluator.score_model(model)
    latency = evaluator.latency(largest).median_ms
    log(
        f"teacher: {describe(scores, evaluator.majority)}, latency {latency:.2f} ms on {job.target}"
    )
    return {"arch": largest.key, **scores, "latency_ms": latency}


def _trial_bar(job: SearchJob) -> Callable[[object], None] | None:
    if not job.progress:
        return None
    bar = Progress("search", job.trials, unit="trial")

    def update(trial: object) -> None:
        attrs = getattr(trial, "user_attrs", {})
        shown = {}
        if "latency_ms" in attrs:
            shown = {"acc": f"{attrs['accuracy']:.3f}", "ms": f"{attrs['latency_ms']:.2f}"}
        bar.update(1, **shown)

    return update


# The band monotonicity is checked against when no anchor measured the noise (RPC runs).
DEFAULT_NOISE_BAND = 0.05


def _latency_sources(frame: pd.DataFrame) -> dict[str, int]:
    """Completed trials by where their latency came from: built and timed, or predicted."""
    done = frame[frame["state"] == "COMPLETE"]
    sources = done["latency_source"].fillna("measured") if "latency_source" in done else None
    if sources is None:
        return {"measured": len(done), "predicted": 0}
    return {
        "measured": int((sources != "predicted").sum()),
        "predicted": int((sources == "predicted").sum()),
    }


def anchor_noise(frame: pd.DataFrame) -> dict[str, float | int] | None:
    """How much the same build (the anchor) moved between trials: the study's noise band.

    ``band``: the 10-90 percentile spread of the anchor's medians over their median; a raw
    latency difference smaller than this may be load, not the architecture.
    """
    if "latency_anchor_ms" not in frame or frame["latency_anchor_ms"].notna().sum() < 2:
        return None
    anchor = frame["latency_anchor_ms"].dropna().astype(float)
    low, mid, high = anchor.quantile([0.1, 0.5, 0.9])
    return {
        "anchor_timings": len(anchor),
        "anchor_median_ms": round(mid, 4),
        "band": round((high - low) / mid, 4),
    }


def write_outputs(
    study: object,
    job: SearchJob,
    settings: SearchSettings,
    evaluator: SupernetEvaluator,
    teacher: dict[str, object],
    log: Log,
    search_seconds: float | None = None,
) -> SearchOutcome:
    """trials.csv, pareto.csv, pareto.png, summary.json, and the exported winner."""
    frame = flag_majority(trials_frame(study), evaluator)  # type: ignore[arg-type]
    eligible = frame[frame["beats_majority"] != False]  # noqa: E712 (None: not scored)
    front = pareto_front(eligible)
    winner = best_trial(eligible, settings) if _any_complete(eligible) else None
    frame.to_csv(job.out / "trials.csv", index=False)
    front.to_csv(job.out / "pareto.csv", index=False)
    plot_pareto(frame, front, teacher, job.out / "pareto.png", settings.latency_ms)
    noise = anchor_noise(frame)
    summary: dict[str, object] = {
        "job": _job_dict(job),
        "latency_target_ms": settings.latency_ms,
        "metrics": list(evaluator.metric_names),
        "majority_class": evaluator.majority,
        "teacher": teacher,
        "winner": None if winner is None else _row_dict(winner),
        "trials_at_or_below_majority": int((frame["beats_majority"] == False).sum()),  # noqa: E712
        "trials": frame["state"].value_counts().to_dict(),
        "search_seconds_this_run": search_seconds,
        "predictor": predictor_report(study, getattr(evaluator, "latency_evaluator", None)),
        "latency_sources": _latency_sources(frame),
        "latency_noise": noise,
        "monotonicity": monotonicity_violations(
            frame, noise["band"] if noise else DEFAULT_NOISE_BAND
        ),
    }
    if winner is None:
        summary["no_winner"] = (
            "no completed candidate beats the majority class "
            f"(accuracy {evaluator.majority.get('accuracy', float('nan')):.4f}): nothing exported"
        )
        _write_summary(job, summary)
        log(f"no winner: {summary['no_winner']}; outputs in {job.out}")
        return SearchOutcome(frame, front, None, summary, job.out, evaluator)
    model = None
    if job.export_winner and job.retrain.steps > 0 and job.retrain_top > 1:
        winner, model = retrain_front(evaluator, front, winner, job, settings, summary, log)
    summary["speedup_vs_teacher"] = float(teacher["latency_ms"]) / float(winner["latency_ms"])
    # Written before the export too: a winner that fails its build or numerics check still
    # leaves the search's summary (its checkpoint is already saved by then).
    _write_summary(job, summary)
    if job.export_winner:
        summary["winner_export"] = str(
            export_winner(evaluator, winner, job, summary, log, model=model)
        )
    _write_summary(job, summary)
    scores = {name: float(winner[name]) for name in evaluator.metric_names if name in winner}
    retrained = summary.get("retrain")
    after = f" (retrained alone: {describe(retrained['after'])})" if retrained else ""  # type: ignore[index]
    log(
        f"winner {winner['arch']}: {describe(scores, evaluator.majority)}{after}; "
        f"{winner['latency_ms']:.2f} ms ({summary['speedup_vs_teacher']:.1f}x faster than the "
        f"teacher); {summary['trials_at_or_below_majority']} trial(s) no better than the "
        f"majority class; outputs in {job.out}"
    )
    return SearchOutcome(frame, front, winner, summary, job.out, evaluator)


def _write_summary(job: SearchJob, summary: dict[str, object]) -> None:
    (job.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def flag_majority(frame: pd.DataFrame, evaluator: SupernetEvaluator) -> pd.DataFrame:
    """Add ``majority_accuracy`` and ``beats_majority`` (None where a trial has no score)."""
    frame = frame.copy()
    frame["majority_accuracy"] = evaluator.majority.get("accuracy")
    frame["beats_majority"] = [
        None if pd.isna(value) else evaluator.beats_majority(float(value))
        for value in frame["accuracy"]
    ]
    return frame


def _any_complete(frame: pd.DataFrame) -> bool:
    return bool((frame["state"] == "COMPLETE").any())


def _job_dict(job: SearchJob) -> dict[str, object]:
    fields = asdict(replace(job, rpc=None))
    fields["rpc"] = job.rpc.label if job.rpc else None
    fields["out"] = str(job.out)
    return fields


def _row_dict(row: pd.Series) -> dict[str, object]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def plot_pareto(
    frame: pd.DataFrame,
    front: pd.DataFrame,
    teacher: dict[str, object],
    path: Path,
    target_ms: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame[frame["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(done["latency_ms"], done["accuracy"], s=12, alpha=0.5, label="trials")
    ax.plot(front["latency_ms"], front["accuracy"], "o-", color="C3", label="Pareto front")
    ax.scatter(
        [teacher["latency_ms"]],
        [teacher["accuracy"]],
        marker="*",
        s=120,
        color="k",
        label="teacher",
    )
    ax.axvline(target_ms, color="grey", linestyle="--", linewidth=1, label="latency target")
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("dev accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def retrain_winner(
    evaluator: SupernetEvaluator,
    extracted: torch.nn.Module,
    job: SearchJob,
    log: Log,
    what: str = "the winner",
) -> dict[str, object] | None:
    """Distil the extracted winner alone from the teacher (in place); its metrics before/after."""
    if job.retrain.steps <= 0 or evaluator.train is None:
        return None
    before = evaluator.score_model(extracted)
    _, info = retrain(
        extracted,
        Path(str(evaluator.supernet.info["teacher"])),
        evaluator.train,
        replace(job.retrain, max_length=evaluator.max_length),
        progress=_bar("retrain", job, job.retrain.batch_size),
    )
    after = evaluator.score_model(extracted)
    log(
        f"retrained {what} alone for {job.retrain.steps} steps: "
        f"{describe(before)} -> {describe(after, evaluator.majority)}"
    )
    return {**info, "before": before, "after": after}


def retrain_candidates(
    front: pd.DataFrame, winner: pd.Series, top: int, target_ms: float
) -> list[pd.Series]:
    """The winner, then the most accurate other Pareto points within the target (the fastest
    ones when none is within it), ``top`` in all."""
    others = front[front["arch"] != winner["arch"]]
    within = others[others["latency_ms"] <= target_ms]
    if within.empty:
        ranked = others.sort_values("latency_ms")
    else:
        ranked = within.sort_values(["accuracy", "latency_ms"], ascending=[False, True])
    return [winner, *(row for _, row in ranked.head(max(top - 1, 0)).iterrows())]


FRONT_DIR = "front"  # retrained Pareto points, one checkpoint per architecture


def retrain_front(
    evaluator: SupernetEvaluator,
    front: pd.DataFrame,
    winner: pd.Series,
    job: SearchJob,
    settings: SearchSettings,
    summary: dict[str, object],
    log: Log,
) -> tuple[pd.Series, torch.nn.Module]:
    """Retrain the top ``job.retrain_top`` candidates alone; the best after retraining wins.

    Each retrained candidate is saved as a Hugging Face checkpoint under ``front/<arch>/``
    (the winner is also exported to ``winner/``): a user who prefers another point of the
    front, say a faster one, has it without retraining. Writes ``retrained.csv`` (each
    candidate's latency, its metrics before and after, its checkpoint) and
    ``summary["retrained"]``; returns the new winner's row and its retrained model.
    """
    rows, best = [], None
    shutil.rmtree(job.out / FRONT_DIR, ignore_errors=True)  # an earlier run's points
    for row in retrain_candidates(front, winner, job.retrain_top, settings.latency_ms):
        model = evaluator.sub_network(ArchConfig.from_key(str(row["arch"])))
        info = retrain_winner(evaluator, model, job, log, what=f"candidate {row['arch']}")
        assert info is not None  # retrain.steps > 0 and a training split: checked by the caller
        folder = job.out / FRONT_DIR / str(row["arch"])
        model.save_pretrained(folder)
        evaluator.supernet.tokenizer.save_pretrained(folder)
        rows.append(
            {
                "arch": row["arch"],
                "latency_ms": float(row["latency_ms"]),
                **{f"{k}_before": v for k, v in info["before"].items()},  # type: ignore[union-attr]
                **info["after"],  # type: ignore[dict-item]
                "checkpoint": str(folder),
            }
        )
        after = float(info["after"]["accuracy"])  # type: ignore[index]
        key = (after, -float(row["latency_ms"]))
        if best is None or key > best[0]:
            best = (key, row, model, info)
    table = pd.DataFrame(rows)
    table.to_csv(job.out / "retrained.csv", index=False)
    summary["retrained"] = table.to_dict("records")
    assert best is not None
    _, chosen, model, info = best
    if chosen["arch"] != winner["arch"]:
        summary["winner_from_search"] = _row_dict(winner)
        log(f"after retraining, {chosen['arch']} beats the search's winner {winner['arch']}")
    summary["winner"] = _row_dict(chosen)
    summary["retrain"] = info
    return chosen, model


def export_winner(
    evaluator: SupernetEvaluator,
    winner: pd.Series,
    job: SearchJob,
    summary: dict[str, object],
    log: Log = print,
    model: torch.nn.Module | None = None,
) -> Path:
    """Hugging Face checkpoint (safetensors), compiled library + manifest, and a report.

    ``model``: the winner already retrained (by :func:`retrain_front`); else it is cut out of
    the super-network and retrained here.
    """
    from canao.compiler.build import compile_model, export_artifact
    from canao.compiler.importer import InputSpec
    from canao.compiler.models import load_model
    from canao.compiler.verify import verify_locally
    from canao.workflow import can_run_locally

    arch = ArchConfig.from_key(str(winner["arch"]))
    folder = job.out / "winner"
    if model is None:
        model = evaluator.sub_network(arch)
        retrained = retrain_winner(evaluator, model, job, log)
        if retrained is not None:
            summary["retrain"] = retrained  # into summary.json and the winner's report
    model.save_pretrained(folder / "model")
    evaluator.supernet.tokenizer.save_pretrained(folder / "model")
    compiled = compile_model(load_model(model), job.target, job.pipeline, InputSpec(1, job.seq))
    if job.rpc is None and can_run_locally(compiled):
        verify_locally(compiled)  # the shipped weights, checked against PyTorch
    export_artifact(compiled, folder / "compiled")
    report = {**summary, "arch": arch.to_dict(), "numerics": compiled.numerics}
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return folder
