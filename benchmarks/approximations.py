"""Accuracy cost of the opt-in polynomial approximations (pipeline `fast-approx`) on SST-2.

The teacher is MiniLM-L6 fine-tuned by canao on SST-2 train (cached; see
canao.nas.finetune). Every SST-2 dev sentence (872) is padded to seq 64 and
classified by PyTorch, canao `fast` (float32-accurate exp/erf) and canao
`fast-approx` (I-BERT's second-order GELU and exp); the table gives dev
accuracy, agreement with PyTorch's predictions, max logit difference and
latency (1 thread, median).

    python benchmarks/approximations.py [--train-limit 6400] [--seq 64]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd
import torch
from _results import header, publish
from transformers import BertTokenizerFast

from canao.compiler.build import compile_model
from canao.compiler.importer import INPUT_NAMES, InputSpec
from canao.compiler.models import load_model
from canao.latency.protocol import Protocol, summarize
from canao.latency.runner import local_runner
from canao.nas.finetune import FinetuneConfig, encode, finetune
from canao.nas.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-limit", type=int, default=6400)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", "1")  # before the TVM runtime starts
    torch.set_num_threads(1)
    teacher = finetune(FinetuneConfig(task="sst2", train_limit=args.train_limit))
    tokenizer = BertTokenizerFast.from_pretrained(str(teacher), local_files_only=True)
    model = load_model(teacher, head="classification")
    dev = load_task("sst2")["dev"]
    encoded = encode(tokenizer, list(dev.texts), args.seq, pad_to=args.seq)
    examples = [
        {name: encoded[name][i : i + 1].numpy().astype(np.int64) for name in INPUT_NAMES}
        for i in range(len(dev))
    ]
    labels = np.array(dev.labels)
    with torch.inference_mode():
        reference = model.module(**{k: torch.from_numpy(v) for k, v in _stack(examples).items()})
    reference_logits = reference.logits.numpy()
    rows = [_row("pytorch", reference_logits, reference_logits, labels, float("nan"))]
    for pipeline in ("fast", "fast-approx"):
        runner = local_runner(
            compile_model(model, "x86", pipeline, InputSpec(1, args.seq)).executable
        )
        logits = np.concatenate([runner.run(example, INPUT_NAMES) for example in examples])
        latency = summarize(runner.time(examples[0], INPUT_NAMES, Protocol(3, 30))).median_ms
        rows.append(_row(f"canao {pipeline}", logits, reference_logits, labels, latency))
    table = pd.DataFrame(rows)
    title = header(
        f"SST-2 dev ({len(dev)} sentences), seq {args.seq}, 1 thread; teacher: "
        f"MiniLM-L6 fine-tuned on {args.train_limit} SST-2 train sentences"
    )
    publish(
        table,
        table.round({"dev_accuracy": 4, "agreement_with_pytorch": 4, "latency_ms": 2}),
        "approximations",
        title,
    )


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([e[name] for e in examples]) for name in INPUT_NAMES}


def _row(
    system: str, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray, latency_ms: float
) -> dict[str, object]:
    predictions = logits.argmax(-1)
    return {
        "system": system,
        "dev_accuracy": float((predictions == labels).mean()),
        "agreement_with_pytorch": float((predictions == reference.argmax(-1)).mean()),
        "max_abs_logit_diff": float(np.abs(logits - reference).max()),
        "latency_ms": latency_ms,
    }


if __name__ == "__main__":
    main()
