"""What int8 attention products would cost in accuracy: a study before building the kernel.

canao's int8 builds keep attention fp32 (as LiteRT does), and it is the largest part of an
int8 BERT after the dense layers (8% of BERT-base on AVX2, 12% on AVX-512 VNNI). This
scores each task's fine-tuned teacher on dev with its dense layers as the int8 builds
compute them (``quantized_reference``) and, on top, both attention products quantized
as an int8 attention kernel would run them on the same dot instructions:

- ``Q @ K^T``: Q per token as the activations (asymmetric, 255 or 127 levels), K per token
  symmetric int8 (the contraction is over the head dimension, so each key token can
  have its own scale);
- ``P @ V``: the softmax numerators ``exp(s - max)`` lie in [0, 1] with 1 at each row's
  maximum, so per row they are uint8 with zero point 0; V per head-dimension column
  symmetric int8 (the contraction is over tokens).

It is a PyTorch simulation (fake quantization around ``torch.matmul`` in eager attention),
not a kernel: it says whether the kernel is worth building, not how fast it would be.

    python benchmarks/int8_attention_accuracy.py [--tasks movie-reviews,sst2]

Prints the table; writes benchmarks/results/int8_attention_accuracy.{csv,md}.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import pandas as pd
import torch
from _results import header, publish
from int8_accuracy import SCHEMES, score, task_teacher
from transformers import BertForSequenceClassification

from canao.compiler.quantized import quantized_reference
from canao.compiler.schedules.dense_int8 import quantize_rows
from canao.nas.distill import load_teacher


def symmetric(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Symmetric int8 (127 levels) with one scale per slice along ``dim``, dequantized."""
    scale = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(x / scale).clamp(-127, 127) * scale


def as_activations(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Each row (last axis) quantized exactly as the dense layers' activations are
    (``quantize_rows``: asymmetric, 0..``levels``), dequantized. A non-negative row, such
    as softmax numerators, gets zero point 0."""
    rows = x.reshape(-1, x.shape[-1])
    q, scale, zero = quantize_rows(rows, levels)
    return ((q - zero[:, None]) * scale[:, None]).reshape(x.shape)


@contextlib.contextmanager
def int8_attention_products(levels: int) -> Iterator[None]:
    """Within the block, eager BERT attention's two 4-D products run fake-quantized.

    Both are ``torch.matmul(a, b)`` on 4-D tensors with the contraction over ``a``'s last
    and ``b``'s second-to-last axis: ``a`` (Q, or P) per row with the activations' levels,
    ``b`` (K^T, or V) per column symmetric. Every other product is left alone.
    """
    real = torch.matmul

    def quantized(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() != 4 or b.dim() != 4:
            return real(a, b)
        return real(as_activations(a, levels), symmetric(b, -2))

    torch.matmul = quantized  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.matmul = real  # type: ignore[assignment]


def task_rows(task: str) -> list[dict[str, object]]:
    data, length, path = task_teacher(task)
    _, tokenizer = load_teacher(path)
    # Eager attention: SDPA fuses both products, so there is no matmul to quantize.
    teacher = BertForSequenceClassification.from_pretrained(path, attn_implementation="eager")
    teacher.eval()
    fp32 = score(teacher, tokenizer, data, task, length)
    rows = []
    for name, tiling in SCHEMES.items():
        dense = quantized_reference(teacher, tiling)
        dense_only = score(dense, tokenizer, data, task, length)
        with int8_attention_products(tiling.spec.levels):
            with_attention = score(dense, tokenizer, data, task, length)
        for metric in fp32:
            rows.append(
                {
                    "task": task,
                    "dev": len(data["dev"]),
                    "scheme": name,
                    "metric": metric,
                    "fp32": round(fp32[metric], 4),
                    "int8_dense": round(dense_only[metric], 4),
                    "int8_dense_and_attention": round(with_attention[metric], 4),
                    "points_lost_dense": round(100 * (fp32[metric] - dense_only[metric]), 2),
                    "points_lost_with_attention": round(
                        100 * (fp32[metric] - with_attention[metric]), 2
                    ),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="movie-reviews,sst2")
    args = parser.parse_args()
    rows = []
    for task in args.tasks.split(","):
        rows += task_rows(task)
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    title = (
        "int8 attention products, simulated in PyTorch (no kernel yet), on the int8 dense "
        "scheme, teachers on dev (eager attention). "
        f"{header('torch threads: default')}"
    )
    publish(table, table, "int8_attention_accuracy", title)


if __name__ == "__main__":
    main()
