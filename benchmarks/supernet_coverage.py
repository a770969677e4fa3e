"""Super-network coverage: how many sub-networks learn something, under each training recipe.

The search can only rank candidates whose accuracy carries signal. This trains the
super-network under named recipes, all from the same cached teacher and data, and scores a
fixed, seeded set of architectures spread over the space (plus uniform shrinks at several
depths) on dev. Coverage is the fraction of them above the midpoint between the majority
class and the teacher (issue 15's quick-start measure).

Recipes (``--recipes``, comma-separated):

- ``logits``: what canao did before issue 15: the first L layers, logits-only distillation,
  learning rate 3e-5, no progressive shrinking;
- ``spaced``: evenly spaced layers (DistilBERT, DynaBERT), otherwise as ``logits``;
- ``hidden``: spaced layers + hidden-state and embedding distillation + progressive
  shrinking (width first), learning rate 3e-5;
- ``hidden-lr``: as ``hidden`` with learning rate 1e-4;
- ``depth-heads``: as ``hidden-lr`` with a pooler and classifier per depth;
- ``kept-map``: as ``hidden-lr``, each kept layer matched to the teacher's layer at its own
  position instead of TinyBERT's uniform block mapping; ``kept-map-heads``: and depth heads.

Each recipe is also scored with its read-out calibrated (``--calibrate N``, rows
``<recipe>+cal<N>``): every sub-network's classifier refitted on N training examples before
it is scored (canao.nas.calibrate), the same trained weights otherwise.

    python benchmarks/supernet_coverage.py [--task movie-reviews] [--steps 200] [--archs 16]

Prints the table; writes benchmarks/results/supernet_coverage.{csv,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import time

import pandas as pd
import torch
from _results import RESULTS, header, publish

from canao.nas.calibrate import calibrate_readout
from canao.nas.distill import SupernetConfig, load_teacher, train_supernet
from canao.nas.finetune import FinetuneConfig, finetune, predict_labels
from canao.nas.metrics import majority_scores
from canao.nas.space import SearchSpace
from canao.nas.supernet import extract
from canao.nas.tasks import Split, load_task

RECIPES: dict[str, dict[str, object]] = {
    "logits": {"hidden_weight": 0.0, "width_first": 0.0, "learning_rate": 3e-5},
    "spaced": {"hidden_weight": 0.0, "width_first": 0.0, "learning_rate": 3e-5},
    "hidden": {"hidden_weight": 1.0, "width_first": 0.3, "learning_rate": 3e-5},
    "hidden-lr": {"hidden_weight": 1.0, "width_first": 0.3, "learning_rate": 1e-4},
    "depth-heads": {"hidden_weight": 1.0, "width_first": 0.3, "learning_rate": 1e-4},
    "kept-map": {
        "hidden_weight": 1.0,
        "width_first": 0.3,
        "learning_rate": 1e-4,
        "layer_mapping": "kept",
    },
    "kept-map-heads": {
        "hidden_weight": 1.0,
        "width_first": 0.3,
        "learning_rate": 1e-4,
        "layer_mapping": "kept",
    },
}
DEPTH_HEADS = {"depth-heads", "kept-map-heads"}
DEPTH_RULE = {"logits": "first"}


def architectures(space: SearchSpace, count: int, seed: int) -> list:
    """Seeded samples over the space, plus uniform shrinks at 1, 3 and 6 layers."""
    rng = random.Random(seed)
    archs = [space.sample(rng) for _ in range(count)]
    archs += [space.uniform(layers, 0.5) for layers in (1, 3, space.max_layers)]
    return list(dict.fromkeys(archs))


def accuracy(model: torch.nn.Module, tokenizer: object, dev: Split) -> float:
    predicted = predict_labels(model, tokenizer, dev, 64)  # type: ignore[arg-type]
    return float((predicted == torch.tensor(dev.labels).numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="movie-reviews")
    parser.add_argument("--teacher-examples", type=int, default=6400)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--archs", type=int, default=16, help="seeded samples of the space")
    parser.add_argument("--dev-limit", type=int, default=500)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument(
        "--calibrate",
        type=int,
        default=512,
        help="also score each recipe with its read-out refitted on this many training "
        "examples (row '<recipe>+cal<N>'; 0: off)",
    )
    args = parser.parse_args()
    data = load_task(args.task)
    dev = data["dev"]
    dev = Split(dev.texts[: args.dev_limit], dev.labels[: args.dev_limit], dev.label_names)
    teacher_path = finetune(
        FinetuneConfig(task=args.task, train_limit=args.teacher_examples), log=True
    )
    teacher, tokenizer = load_teacher(teacher_path)
    teacher_accuracy = accuracy(teacher, tokenizer, dev)
    majority = majority_scores(("accuracy",), data["train"].labels, dev.labels, 2)["accuracy"]
    midpoint = (majority + teacher_accuracy) / 2
    rows = []
    for recipe in args.recipes.split(","):
        base = SearchSpace.from_teacher(teacher.config)
        space = dataclasses.replace(base, depth_rule=DEPTH_RULE.get(recipe, "spaced"))
        config = SupernetConfig(
            steps=args.steps,
            depth_heads=recipe in DEPTH_HEADS,
            **RECIPES[recipe],  # type: ignore[arg-type]
        )
        started = time.perf_counter()
        supernet = train_supernet(teacher_path, data["train"], args.task, space, config)
        # Training time as measured when the super-network was trained (it may come from the cache).
        seconds = float(supernet.info.get("seconds", time.perf_counter() - started))
        scorings = [(recipe, 0)]
        if args.calibrate > 0:
            scorings.append((f"{recipe}+cal{args.calibrate}", args.calibrate))
        for arch, (name, examples) in itertools.product(
            architectures(space, args.archs, seed=0), scorings
        ):
            model = calibrate_readout(
                extract(supernet.model, arch), tokenizer, data["train"], examples
            )
            score = accuracy(model, tokenizer, dev)
            print(f"{name:10s} {arch.key:60s} {score:.4f}", flush=True)
            rows.append(
                {
                    "recipe": name,
                    "arch": arch.key,
                    "layers": arch.num_layers,
                    "params_m": round(arch.encoder_params() / 1e6, 2),
                    "accuracy": score,
                    "above_midpoint": score > midpoint,
                    "train_s": round(seconds, 1),
                }
            )
    table = pd.DataFrame(rows)
    # Recipes not rerun keep their earlier rows: the table grows one recipe at a time.
    earlier = RESULTS / "supernet_coverage.csv"
    if earlier.is_file():
        kept = pd.read_csv(earlier)
        kept = kept[~kept["recipe"].isin(table["recipe"].unique())]
        table = pd.concat([kept, table], ignore_index=True)
    shown = (
        table.groupby("recipe", sort=False)
        .agg(
            archs=("accuracy", "size"),
            coverage=("above_midpoint", "mean"),
            median_acc=("accuracy", "median"),
            min_acc=("accuracy", "min"),
            max_acc=("accuracy", "max"),
            train_s=("train_s", "first"),
        )
        .reset_index()
        .round(4)
    )
    title = (
        f"Super-network coverage on {args.task} dev ({len(dev)} examples): teacher "
        f"{teacher_accuracy:.4f}, majority class {majority:.4f}, midpoint {midpoint:.4f}; "
        f"{args.steps} steps per recipe. {header('torch threads: default')}"
    )
    publish(table, shown, "supernet_coverage", title)


if __name__ == "__main__":
    main()
