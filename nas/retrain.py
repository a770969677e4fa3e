"""Retrain the winner: distil it as a standalone model from the teacher, for a stated budget.

A sub-network's weights are shared with every other sub-network during super-network
training, so they are a compromise; once the search has picked one, it is extracted and
trained alone (as DynaBERT, HAT and Once-for-All all do before reporting), here by
distillation from the teacher's logits on the training split. The accuracy before and after
is reported, and the retrained model is the one exported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from canao.nas.distill import (
    batches,
    distillation_loss,
    load_teacher,
    training_device,
)
from canao.nas.tasks import Split


@dataclass(frozen=True)
class RetrainConfig:
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-4
    temperature: float = 1.0
    max_length: int = 64
    seed: int = 0
    group_by_length: bool = True  # batches of similar length (finetune.epoch_batches)


def retrain(
    student: torch.nn.Module,
    teacher_path: Path,
    train: Split,
    config: RetrainConfig,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[torch.nn.Module, dict[str, object]]:
    """Distil ``student`` (a cut-out sub-network) alone, in place; (it, what was done)."""
    teacher, tokenizer = load_teacher(teacher_path)
    torch.manual_seed(config.seed)
    device = training_device()
    student.to(device).train()
    teacher.to(device).eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=config.steps)
    data = batches(
        tokenizer,
        train,
        config.batch_size,
        config.max_length,
        np.random.default_rng(config.seed),
        config.group_by_length,
    )
    started = time.perf_counter()
    recent: list[float] = []
    for step in range(config.steps):
        inputs = {k: v.to(device) for k, v in next(data)[0].items()}
        with torch.no_grad():
            target = teacher(**inputs).logits
        loss = distillation_loss(student(**inputs).logits, target, config.temperature)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        recent = [*recent[-19:], loss.item()]
        if progress is not None:
            progress(step + 1, config.steps, {"loss": sum(recent) / len(recent)})
    student.to("cpu").eval()
    teacher.to("cpu")
    return student, {
        "steps": config.steps,
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "seconds": round(time.perf_counter() - started, 1),
        "loss": "soft cross-entropy to the teacher's logits",
    }
