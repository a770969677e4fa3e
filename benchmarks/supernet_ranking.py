"""Super-network ranking: does the super-network order architectures as training them would?

The NAS measure of a weight-sharing super-network (e.g. Yu et al. 2020, "Evaluating the
search phase of NAS"): Kendall's tau between an architecture's accuracy as a slice of the
super-network and the same architecture's accuracy when distilled alone from the teacher
with a fixed budget, over architectures spread across the space. The standalone models start
from the same importance-ordered slice of the teacher (as DistilBERT starts from the
teacher's layers) and are distilled on the teacher's logits for ``--standalone-steps``.

    python benchmarks/supernet_ranking.py [--task movie-reviews] [--archs 10] \
        [--supernet-steps 200] [--standalone-steps 200]

Prints the table and tau; writes benchmarks/results/supernet_ranking.{csv,md}.
"""

from __future__ import annotations

import argparse
import copy
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _results import header, publish

from canao.nas.calibrate import calibrate_readout
from canao.nas.distill import SupernetConfig, batches, load_teacher, train_supernet
from canao.nas.finetune import FinetuneConfig, finetune, predict_labels
from canao.nas.retrain import RetrainConfig, retrain
from canao.nas.space import ArchConfig, SearchSpace
from canao.nas.supernet import IMPORTANCE, extract, reorder_by_importance
from canao.nas.tasks import Split, load_task


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Tau-b (ties counted as neither concordant nor discordant)."""
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da == db:
                concordant += 1
            else:
                discordant += 1
    denominator = np.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return float((concordant - discordant) / denominator) if denominator else float("nan")


def spread(space: SearchSpace, count: int, seed: int) -> list[ArchConfig]:
    """``count`` architectures spread over depth: seeded samples, one depth after another."""
    rng = random.Random(seed)
    archs: list[ArchConfig] = []
    while len(archs) < count:
        layers = space.layer_choices[len(archs) % len(space.layer_choices)]
        sample = space.sample(rng)
        while sample.num_layers != layers:
            sample = space.sample(rng)
        if sample not in archs:
            archs.append(sample)
    return archs


def accuracy(model: torch.nn.Module, tokenizer: object, dev: Split) -> float:
    length = 128 if dev.is_pair else 64  # as the search scores them
    predicted = predict_labels(model, tokenizer, dev, length)  # type: ignore[arg-type]
    return float((predicted == np.asarray(dev.labels)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="movie-reviews")
    parser.add_argument(
        "--teacher-examples", type=int, default=6400, help="0: the whole training set"
    )
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--archs", type=int, default=10)
    parser.add_argument("--supernet-steps", type=int, default=200)
    parser.add_argument("--standalone-steps", type=int, default=200)
    parser.add_argument("--dev-limit", type=int, default=500)
    parser.add_argument(
        "--calibrate",
        type=int,
        default=512,
        help="also rank by the slices' accuracy with their read-out refitted on this many "
        "training examples (the search's default scoring; 0: off)",
    )
    parser.add_argument(
        "--reuse-standalone",
        type=Path,
        metavar="CSV",
        help="take standalone accuracies from an earlier run's CSV where the architecture "
        "matches (same teacher, steps and seed: standalone distillation is deterministic), "
        "distilling only the others",
    )
    args = parser.parse_args()
    reused = {}
    if args.reuse_standalone is not None:
        earlier = pd.read_csv(args.reuse_standalone)
        reused = dict(zip(earlier["arch"], earlier["standalone_acc"], strict=True))
    data = load_task(args.task)
    dev = Split(
        data["dev"].texts[: args.dev_limit],
        data["dev"].labels[: args.dev_limit],
        data["dev"].label_names,
    )
    pair = data["train"].is_pair
    teacher_path = finetune(
        FinetuneConfig(
            task=args.task,
            epochs=args.teacher_epochs,
            train_limit=args.teacher_examples or None,
            max_length=128 if pair else 64,
        )
    )
    teacher, tokenizer = load_teacher(teacher_path)
    config = SupernetConfig(steps=args.supernet_steps, max_length=128 if pair else 64)
    supernet = train_supernet(teacher_path, data["train"], args.task, config=config)
    # The standalone models' starting point: the teacher ordered as the super-network was.
    ordered = copy.deepcopy(teacher)
    data_iter = batches(tokenizer, data["train"], 32, 64, np.random.default_rng(config.seed))
    torch.manual_seed(config.seed)
    rank = IMPORTANCE[config.importance]
    reorder_by_importance(ordered, rank(ordered, [next(data_iter) for _ in range(8)]))
    rows = []
    for arch in spread(supernet.space, args.archs, seed=0):
        shared = accuracy(extract(supernet.model, arch), tokenizer, dev)
        calibrated = accuracy(
            calibrate_readout(
                extract(supernet.model, arch),
                tokenizer,
                data["train"],
                args.calibrate,
                config.max_length,
            ),
            tokenizer,
            dev,
        )
        if arch.key in reused:
            standalone = float(reused[arch.key])
        else:
            alone, _ = retrain(
                extract(ordered, arch),
                teacher_path,
                data["train"],
                RetrainConfig(
                    steps=args.standalone_steps,
                    learning_rate=config.learning_rate * 3,
                    max_length=config.max_length,
                ),
            )
            standalone = accuracy(alone, tokenizer, dev)
        print(
            f"{arch.key:64s} super-net {shared:.4f} calibrated {calibrated:.4f} "
            f"standalone {standalone:.4f}",
            flush=True,
        )
        rows.append(
            {
                "arch": arch.key,
                "supernet_acc": shared,
                "supernet_calibrated_acc": calibrated,
                "standalone_acc": standalone,
            }
        )
    table = pd.DataFrame(rows)
    tau = kendall_tau(list(table["supernet_acc"]), list(table["standalone_acc"]))
    tau_calibrated = kendall_tau(
        list(table["supernet_calibrated_acc"]), list(table["standalone_acc"])
    )
    title = (
        f"Super-network ranking on {args.task} dev ({len(dev)} examples): Kendall tau {tau:.3f} "
        f"with the shared read-out, {tau_calibrated:.3f} with each slice's read-out calibrated "
        f"on {args.calibrate} training examples, "
        f"over {len(table)} architectures; super-network {args.supernet_steps} steps, "
        f"standalone distillation {args.standalone_steps} steps each. "
        f"{header('torch threads: default')}"
    )
    teacher_score = accuracy(teacher, tokenizer, dev)
    title += f"; teacher {teacher_score:.4f}"
    name = "supernet_ranking" + ("" if args.task == "movie-reviews" else f"_{args.task}")
    publish(table, table.round(4), name, title)


if __name__ == "__main__":
    main()
