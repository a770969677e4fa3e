"""int8 accuracy: each task's fine-tuned teacher scored on dev in fp32 and as canao's int8
build computes it.

The int8 model is :func:`canao.compiler.quantized.quantized_reference`: every dense layer
the int8 pass rewrites, computed exactly as the kernels do (per-token uint8 activations,
per-channel int8 weights, exact integer sums). The compiled int8 build matches it to the
bound in ``compiler/quantized.py`` (tests/test_int8.py), so its dev score is the build's.
Two schemes: 8-bit activations (``int8``: every CPU's kernel, and ``fast-int8-full-range``)
and 7-bit (``int8_7bit``: ``fast-int8`` on AVX2 without VNNI, whose vpmaddubsw would
saturate on 8). Issue 16's goal: at most 0.5 point lost.

    python benchmarks/int8_accuracy.py [--tasks movie-reviews,sst2,rte]

RTE is not in the default: its one-epoch teacher on this CPU does not beat the majority
class (0.469 against 0.527 with batches grouped by length; 0.574 before), so its int8
difference is noise.

Teachers come from the cache (fine-tuned the first time, as ``canao search`` does:
movie-reviews on its first 6400 sentences as in the quick start, SST-2 and RTE on their
whole training sets, one epoch). Prints the table; writes
benchmarks/results/int8_accuracy.{csv,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from _results import RESULTS, header, publish

from canao.compiler.quantized import quantized_reference
from canao.compiler.schedules.dense_int8 import Int8Tiling
from canao.nas.distill import load_teacher
from canao.nas.finetune import FinetuneConfig, finetune, predict_labels
from canao.nas.job import task_length
from canao.nas.metrics import compute, metric_names
from canao.nas.tasks import load_task, num_labels

TEACHER_EXAMPLES = {"movie-reviews": 6400}  # the quick start's teacher; others: all
SCHEMES = {"int8": Int8Tiling.for_isa("avx512-vnni"), "int8_7bit": Int8Tiling.for_isa("avx2-u7")}


def score(model: object, tokenizer: object, data: dict, task: str, length: int) -> dict:
    dev = data["dev"]
    predicted = predict_labels(model, tokenizer, dev, length)  # type: ignore[arg-type]
    return compute(metric_names(task), predicted, dev.labels, num_labels(data))


def task_teacher(task: str) -> tuple[dict, int, Path]:
    """The task's data, its sequence length and its fine-tuned teacher's folder (trained
    once, then cached): the teacher every int8 accuracy figure is measured on."""
    data = load_task(task)
    length = task_length(data, 64)
    config = FinetuneConfig(task=task, train_limit=TEACHER_EXAMPLES.get(task), max_length=length)
    return data, length, finetune(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="movie-reviews,sst2")
    args = parser.parse_args()
    rows = []
    for task in args.tasks.split(","):
        data, length, path = task_teacher(task)
        teacher, tokenizer = load_teacher(path)
        fp32 = score(teacher, tokenizer, data, task, length)
        quantized = {
            name: score(quantized_reference(teacher, tiling), tokenizer, data, task, length)
            for name, tiling in SCHEMES.items()
        }
        for metric in fp32:
            row = {"task": task, "dev": len(data["dev"]), "metric": metric}
            row["fp32"] = round(fp32[metric], 4)
            for name, scores in quantized.items():
                row[name] = round(scores[metric], 4)
                row[f"{name}_points_lost"] = round(100 * (fp32[metric] - scores[metric]), 2)
            rows.append(row)
        print(rows[-len(fp32) :], flush=True)
    table = pd.DataFrame(rows)
    # Tasks not rerun keep their earlier rows: teachers are trained one task at a time.
    earlier = RESULTS / "int8_accuracy.csv"
    if earlier.is_file():
        kept = pd.read_csv(earlier)
        table = pd.concat([kept[~kept["task"].isin(table["task"])], table], ignore_index=True)
    title = (
        "int8 (canao's dynamic-range scheme) against fp32, teachers on dev. "
        f"{header('torch threads: default')}"
    )
    publish(table, table, "int8_accuracy", title)


if __name__ == "__main__":
    main()
