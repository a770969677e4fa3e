"""Train the super-network with distillation from the teacher, and score sub-networks.

Training follows DynaBERT/BigNAS: the super-network starts as a copy of the
fine-tuned teacher with heads, neurons and hidden channels reordered by
importance, then each step distils the teacher's logits into the largest,
the smallest and ``random_subnets`` random sub-networks (the sandwich rule),
summing their gradients before one optimiser step. The result is cached under
``$CANAO_CACHE_DIR/supernets/<task>-<key>/`` as a ``save_pretrained`` folder
plus ``supernet.json`` (space, settings, log), so a search reuses it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification, BertTokenizerFast
from transformers import logging as hf_logging

from canao.locks import file_lock, staged_folder
from canao.nas.finetune import (
    accuracy,
    data_fingerprint,
    encode,
    epoch_batches,
    token_lengths,
    without_ungrouped,
)
from canao.nas.space import ArchConfig, SearchSpace
from canao.nas.supernet import (
    DEPTH_HEADS,
    IMPORTANCE,
    add_depth_heads,
    depth_heads,
    extract,
    load_depth_heads,
    reorder_by_importance,
    save_depth_heads,
    subnet_logits,
)
from canao.nas.tasks import Split
from canao.nas.teacher import model_fingerprint

LAYER_MAPPINGS = ("uniform", "kept")  # see hidden_state_loss


@dataclass(frozen=True)
class SupernetConfig:
    steps: int = 200
    batch_size: int = 32
    # 1e-4, not fine-tuning's 3e-5: a few hundred CPU steps must move every sub-network
    # (benchmarks/supernet_coverage.py compares the two).
    learning_rate: float = 1e-4
    random_subnets: int = 2  # besides the largest and the smallest
    temperature: float = 1.0
    # Hidden-state distillation (TinyBERT, DynaBERT, MiniLM): each kept layer's output and the
    # embeddings are pulled towards the teacher's at the mapped layer; 0 distils logits only.
    hidden_weight: float = 1.0
    # Progressive shrinking (DynaBERT: width first, then depth): this fraction of the steps
    # samples widths at full depth only, the rest the whole space.
    width_first: float = 0.3
    # A pooler and classifier per depth (supernet.add_depth_heads): shallow sub-networks read
    # their own layers' output instead of sharing the full depth's read-out.
    depth_heads: bool = False
    # Which teacher layer a kept layer's output is pulled towards: "uniform" (TinyBERT: the
    # end of its block, the last layer to the teacher's last) or "kept" (its own position).
    layer_mapping: str = "uniform"
    importance_batches: int = 8
    max_length: int = 64
    dropout: float = 0.1
    seed: int = 0
    # How heads, neurons and hidden channels are ranked before slicing: "first-order"
    # (|dL/dmask|, DynaBERT) or "obert" (oBERT's structured Fisher saliency).
    importance: str = "first-order"
    group_by_length: bool = True  # batches of similar length (finetune.epoch_batches)

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE:
            raise ValueError(
                f"unknown importance {self.importance!r}; choose one of {', '.join(IMPORTANCE)}"
            )
        if self.layer_mapping not in LAYER_MAPPINGS:
            raise ValueError(
                f"unknown layer mapping {self.layer_mapping!r}; "
                f"choose one of {', '.join(LAYER_MAPPINGS)}"
            )

    def cache_fields(self) -> dict[str, object]:
        """What the cache key hashes; the default ordering is left out, so caches made
        before the ordering (or length grouping) was selectable stay valid."""
        fields = without_ungrouped(asdict(self))
        if fields["importance"] == "first-order":
            del fields["importance"]
        return fields


@dataclass
class SuperNet:
    """A trained super-network, its tokenizer and its space."""

    model: BertForSequenceClassification
    tokenizer: BertTokenizerFast
    space: SearchSpace
    path: Path | None = None
    info: dict[str, object] | None = None


def cache_root() -> Path:
    return Path(os.environ.get("CANAO_CACHE_DIR") or Path.home() / ".cache" / "canao")


def supernet_dir(
    teacher: Path, task: str, space: SearchSpace, config: SupernetConfig, train: Split
) -> Path:
    """Cache folder: one per (teacher's content, training data's content, space, settings)."""
    data = data_fingerprint({"train": train})
    fields = [model_fingerprint(teacher), task, data, asdict(space), config.cache_fields()]
    key = hashlib.sha256(json.dumps(fields, default=list).encode()).hexdigest()[:12]
    safe_task = re.sub(r"[^A-Za-z0-9_.-]+", "_", task)  # paths and hub names
    return cache_root() / "supernets" / f"{safe_task}-{key}"


def load_teacher(path: Path) -> tuple[BertForSequenceClassification, BertTokenizerFast]:
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = BertForSequenceClassification.from_pretrained(str(path), local_files_only=True)
        tokenizer = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    finally:
        hf_logging.set_verbosity(previous)
    return model.eval(), tokenizer


def batches(
    tokenizer: BertTokenizerFast,
    split: Split,
    batch_size: int,
    max_length: int,
    rng: np.random.Generator,
    group_by_length: bool = False,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Shuffled training batches forever, each padded to its own longest example (of
    similar length with ``group_by_length``: :func:`~canao.nas.finetune.epoch_batches`)."""
    lengths = token_lengths(tokenizer, split.texts, max_length) if group_by_length else None
    while True:
        for rows in epoch_batches(len(split), batch_size, rng, lengths, drop_last=True):
            inputs = encode(tokenizer, [split.texts[i] for i in rows], max_length)
            yield dict(inputs), torch.tensor([split.labels[i] for i in rows])


def training_device() -> torch.device:
    """A GPU when one is present (training is the slow part on CPU), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Soft cross-entropy to the teacher's distribution (Hinton et al.), scaled by T^2."""
    soft = F.softmax(teacher / temperature, dim=-1)
    return -(soft * F.log_softmax(student / temperature, dim=-1)).sum(-1).mean() * temperature**2


def hidden_state_loss(
    student: list[torch.Tensor],
    teacher: tuple[torch.Tensor, ...],
    arch: ArchConfig,
    attention_mask: torch.Tensor,
    mapping: str = "uniform",
) -> torch.Tensor:
    """Mean squared distance of the student's hidden states to the teacher's, at real tokens.

    ``student`` holds the embeddings' output then each kept layer's (``subnet_logits``);
    ``teacher`` is Hugging Face's ``hidden_states`` (embeddings, then every layer). As in
    TinyBERT's uniform mapping, student layer i of L stands for a block of the teacher's N
    layers and matches the teacher's output at the block's end, ``(i + 1) * N // L``: the
    last student layer matches the teacher's last, which is what the pooler and classifier
    read. Its ``d`` channels match the teacher's first ``d`` (channels are importance-ordered).
    """
    d, depth, layers = arch.hidden_size, len(teacher) - 1, arch.num_layers
    if mapping == "kept":
        # Each kept layer matches the teacher's output at its own position: a shared layer is
        # asked for one thing by every sub-network (no shallow/deep conflict); the read-out
        # and the logits' loss bridge the gap to the final layer.
        targets = [teacher[0], *(teacher[j + 1] for j in arch.kept_layers)]
    else:
        targets = [teacher[0], *(teacher[(i + 1) * depth // layers] for i in range(layers))]
    weight = attention_mask[..., None].to(student[0].dtype)
    tokens = weight.sum() * d
    total = sum(
        (((s - t[..., :d]) ** 2) * weight).sum() / tokens
        for s, t in zip(student, targets, strict=True)
    )
    return total / len(targets)


def teacher_entropy(teacher: torch.Tensor, temperature: float) -> float:
    """The teacher's mean entropy at ``temperature``, scaled by T^2 like the loss."""
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    return float(-(log_p.exp() * log_p).sum(-1).mean()) * temperature**2


def train_supernet(
    teacher_path: Path,
    train: Split,
    task: str,
    space: SearchSpace | None = None,
    config: SupernetConfig | None = None,
    *,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> SuperNet:
    """Train (or load from the cache) the super-network for ``task`` from ``teacher_path``."""
    config = config or SupernetConfig()
    teacher, tokenizer = load_teacher(teacher_path)
    space = space or SearchSpace.from_teacher(teacher.config)
    out = supernet_dir(teacher_path, task, space, config, train)
    if not (out / "supernet.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        # Workers of one study start together: one trains, the others wait and load it.
        with file_lock(out.with_name(out.name + ".lock")):
            if not (out / "supernet.json").is_file():
                with staged_folder(out) as staging:
                    _train_supernet_into(
                        staging,
                        teacher,
                        tokenizer,
                        teacher_path,
                        train,
                        task,
                        space,
                        config,
                        progress,
                    )
    return load_supernet(out)


def _train_supernet_into(
    out: Path,
    teacher: BertForSequenceClassification,
    tokenizer: BertTokenizerFast,
    teacher_path: Path,
    train: Split,
    task: str,
    space: SearchSpace,
    config: SupernetConfig,
    progress: Callable[[int, int, dict[str, float]], None] | None,
) -> None:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    data = batches(
        tokenizer, train, config.batch_size, config.max_length, rng, config.group_by_length
    )
    started = time.perf_counter()
    student = copy.deepcopy(teacher)
    rank = IMPORTANCE[config.importance]
    importance = rank(student, [next(data) for _ in range(config.importance_batches)])
    reorder_by_importance(student, importance)
    # The teacher the students learn from, in the students' channel order: the reordered
    # copy computes the teacher's function exactly, and its hidden states line up channel
    # by channel with every sub-network's.
    reference = copy.deepcopy(student).eval()
    if config.depth_heads:
        add_depth_heads(student, space.layer_choices)
    log = _sandwich(student, reference, space, data, config, progress)
    info = {
        "task": task,
        "teacher": str(teacher_path),
        "space": asdict(space),
        "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 1),
        "loss_log": log,
    }
    _save_pretrained(student, out)
    tokenizer.save_pretrained(out)
    (out / "supernet.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


def _sandwich(
    student: BertForSequenceClassification,
    teacher: BertForSequenceClassification,
    space: SearchSpace,
    data: Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]],
    config: SupernetConfig,
    progress: Callable[[int, int, dict[str, float]], None] | None,
) -> list[dict[str, float]]:
    pick = random.Random(config.seed)
    device = training_device()
    student.to(device)
    teacher.to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=config.steps)
    largest = space.largest()
    log: list[dict[str, float]] = []
    student.train()
    width_steps = round(config.steps * config.width_first)
    teacher.eval()
    for step in range(config.steps):
        inputs = {k: v.to(device) for k, v in next(data)[0].items()}
        with torch.no_grad():
            out = teacher(**inputs, output_hidden_states=config.hidden_weight > 0)
            target, teacher_states = out.logits, out.hidden_states
        full_depth = step < width_steps  # progressive shrinking: widths first, then depth
        archs = [
            largest,
            space.smallest(full_depth=full_depth),
            *(space.sample(pick, full_depth=full_depth) for _ in range(config.random_subnets)),
        ]
        # What the bar shows: KL to the teacher (0 when a student matches it). The soft
        # cross-entropy trained on also holds the teacher's own entropy, a constant.
        entropy = teacher_entropy(target, config.temperature)
        losses = []
        for arch in archs:
            states: list[torch.Tensor] = []
            logits = subnet_logits(
                student,
                arch,
                inputs["input_ids"],
                inputs["attention_mask"],
                inputs.get("token_type_ids"),
                dropout=config.dropout,
                hidden_states=states,
            )
            loss = distillation_loss(logits, target, config.temperature)
            losses.append(loss.item())  # the logits' part: what the bar's KL is made from
            if config.hidden_weight > 0:
                hidden = hidden_state_loss(
                    states, teacher_states, arch, inputs["attention_mask"], config.layer_mapping
                )
                loss = loss + config.hidden_weight * hidden
            loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        kl = {"kl_largest": losses[0] - entropy, "kl_smallest": losses[1] - entropy}
        if step % 20 == 0 or step == config.steps - 1:
            log.append({"step": step, "largest": losses[0], "smallest": losses[1], **kl})
        if progress is not None:
            progress(step + 1, config.steps, kl)
    student.to("cpu").eval()
    teacher.to("cpu")
    return log


def _save_pretrained(model: BertForSequenceClassification, out: Path) -> None:
    """``save_pretrained`` of the shared weights, and the depth heads in a file of their own
    (a ``BertForSequenceClassification`` loading the folder would drop them)."""
    heads = depth_heads(model)
    if heads is not None:
        delattr(model, DEPTH_HEADS)
    try:
        model.save_pretrained(out)
    finally:
        if heads is not None:
            setattr(model, DEPTH_HEADS, heads)
    save_depth_heads(model, out)


def load_supernet(path: Path) -> SuperNet:
    model, tokenizer = load_teacher(path)
    load_depth_heads(model, path)
    info = json.loads((path / "supernet.json").read_text(encoding="utf-8"))
    space = SearchSpace(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in info["space"].items()}
    )
    return SuperNet(model, tokenizer, space, path, info)


def dev_accuracy(supernet: SuperNet, arch: ArchConfig, split: Split, max_length: int = 64) -> float:
    """Accuracy of the *extracted* sub-network on ``split``."""
    return accuracy(extract(supernet.model, arch), supernet.tokenizer, split, max_length)
