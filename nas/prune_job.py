"""``canao prune`` end to end: teacher -> prune -> dev accuracy -> compile, check, time -> report.

The pruned model is saved as a Hugging Face checkpoint, compiled with canao's
default pipeline, checked against its own PyTorch output, and timed under the
latency protocol beside the teacher in the same process (same threads), so
the report's speed-up is a side-by-side ratio.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from canao.compiler.pipelines import precision_pipeline
from canao.compiler.quantized import int8_scheme, quantized_reference
from canao.nas.distill import load_teacher
from canao.nas.finetune import FinetuneConfig, finetune, predict_labels
from canao.nas.metrics import compute, describe, majority_scores, metric_names
from canao.nas.prune import PruneConfig, PruneResult, prune
from canao.nas.tasks import TaskLike, load_task, num_labels, task_name
from canao.nas.teacher import resolve_teacher

Log = Callable[[str], None]

# Sentence pairs (RTE) need longer inputs than single sentences (SST-2).
PAIR_MAX_LENGTH = 128


@dataclass(frozen=True)
class PruneJob:
    task: TaskLike = "rte"  # a name, a path, or a TaskSpec (files and columns)
    teacher: str | None = None  # None: MiniLM-L6; a folder, hub id or preset (nas/teacher.py)
    config: PruneConfig = field(default_factory=PruneConfig)
    out: Path = Path("canao-prune")
    seq: int = 128
    threads: int = 1
    teacher_examples: int | None = None
    teacher_epochs: int | None = None  # None: 1 for large tasks, 3 below 10k examples
    measure: bool = True
    precision: str = "fp32"  # "int8": timed as fast-int8 builds, scored quantized too


def teacher_for(job: PruneJob, log: Log) -> Path:
    data = load_task(job.task)
    source = resolve_teacher(job.teacher, num_labels(data), data["train"].label_names)
    if source.fine_tuned:
        log(f"teacher: {source.label}, already a classifier for this task, used as it is")
        return source.path
    pairs = data["train"].is_pair
    epochs = job.teacher_epochs or (3 if len(data["train"]) < 10_000 else 1)
    log(f"teacher: {source.label} fine-tuned on {task_name(job.task)} ({epochs} epochs; cached)")
    return finetune(
        FinetuneConfig(
            task=job.task,
            epochs=epochs,
            max_length=PAIR_MAX_LENGTH if pairs else 64,
            # A limit above the split's size is no limit: one cache entry, not two.
            train_limit=None
            if job.teacher_examples is None or job.teacher_examples >= len(data["train"])
            else job.teacher_examples,
        ),
        base_model=source.path,
        log=True,
    )


def run_prune(job: PruneJob, log: Log = print) -> dict[str, object]:
    """Prune, score, compile, time; returns (and writes) the report."""
    os.environ.setdefault("TVM_NUM_THREADS", str(job.threads))
    data = load_task(job.task)
    config = job.config
    if data["train"].is_pair and config.max_length < PAIR_MAX_LENGTH:
        config = PruneConfig(**{**asdict(config), "max_length": PAIR_MAX_LENGTH})
    teacher_path = teacher_for(job, log)
    teacher, tokenizer = load_teacher(teacher_path)
    result = prune(teacher, tokenizer, data["train"], config, progress=log)
    names, classes = metric_names(task_name(job.task)), int(teacher.config.num_labels)

    def score(model: torch.nn.Module) -> dict[str, float]:
        predicted = predict_labels(model, tokenizer, data["dev"], config.max_length)
        return compute(names, predicted, data["dev"].labels, classes)

    job.out.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(job.out / "model")
    tokenizer.save_pretrained(job.out / "model")
    report: dict[str, object] = {
        "task": task_name(job.task),
        "config": asdict(config),
        "arch": result.arch.key,
        "layer_ratios": result.layer_ratios,
        "metrics": list(names),
        "majority_class": majority_scores(names, data["train"].labels, data["dev"].labels, classes),
        "teacher": {**score(teacher), **size_report(teacher, None)},
        "pruned": {**score(result.model), **size_report(result.model, result)},
        "precision": job.precision,
        "log": result.log,
    }
    if job.precision == "int8":  # what the int8 build computes, scored on dev
        scheme = int8_scheme("x86", precision_pipeline(job.precision))  # built as below
        report["teacher_int8"] = score(quantized_reference(teacher, scheme))
        report["pruned_int8"] = score(quantized_reference(result.model, scheme))
    if job.measure:
        report["latency"] = compile_and_time({"teacher": teacher, "pruned": result.model}, job)
    (job.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _say_summary(report, log)
    return report


def size_report(model: torch.nn.Module, result: PruneResult | None) -> dict[str, object]:
    """Parameters, non-zeros, and bytes: dense fp32, and sparse (values + 1-bit mask)."""
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    encoder = [p for n, p in model.named_parameters() if ".encoder." in n]
    return {
        "params": params,
        "nonzero_params": nonzero,
        "encoder_params": sum(p.numel() for p in encoder),
        "encoder_nonzero": sum(int(torch.count_nonzero(p)) for p in encoder),
        "dense_mb": round(params * 4 / 2**20, 2),
        "sparse_mb": round((nonzero * 4 + params / 8) / 2**20, 2),
    }


def compile_and_time(models: dict[str, torch.nn.Module], job: PruneJob) -> dict[str, object]:
    """Each model compiled (``fast``, or ``fast-int8`` for int8), checked, timed interleaved."""
    from canao.latency.protocol import Protocol, summarize, time_interleaved
    from canao.workflow import checked_inference

    calls, numerics = {}, {}
    pipeline = precision_pipeline(job.precision)
    for name, module in models.items():
        calls[name], numerics[name] = checked_inference(module.eval(), job.seq, pipeline=pipeline)
    seconds = time_interleaved(calls, Protocol(warmup=3, repeats=20))
    table = {name: summarize(values).median_ms for name, values in seconds.items()}
    return {
        "median_ms": table,
        "speedup": table["teacher"] / table["pruned"],
        "max_abs_diff_vs_pytorch": numerics,
        "threads": job.threads,
        "seq": job.seq,
        "pipeline": pipeline,
    }


def _say_summary(report: dict[str, object], log: Log) -> None:
    pruned, teacher = report["pruned"], report["teacher"]
    names = report["metrics"]
    majority = report["majority_class"]
    scores = {name: pruned[name] for name in names}  # type: ignore[index,union-attr]
    line = (
        f"pruned {report['arch']}: dev {describe(scores, majority)} "  # type: ignore[arg-type]
        f"(teacher accuracy {teacher['accuracy']:.4f}), encoder non-zeros "  # type: ignore[index]
        f"{pruned['encoder_nonzero']:,} of {teacher['encoder_params']:,}"  # type: ignore[index]
    )
    if "latency" in report:
        latency = report["latency"]
        line += (
            f", {latency['median_ms']['pruned']:.2f} ms vs {latency['median_ms']['teacher']:.2f} ms"  # type: ignore[index]
            f" ({latency['speedup']:.2f}x)"  # type: ignore[index]
        )
    log(line)
