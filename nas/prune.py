"""Pruning a fine-tuned BERT: oBERT (second order), magnitude, and AE-BERT's ratio search.

Pruning state is a set of keep masks over the teacher-shaped model's weights,
re-applied after every optimiser step, so one-shot and gradual pruning and the
fine-tuning with distillation share one loop:
- ``structured`` granularity removes whole attention heads and FFN neurons
  (their rows and columns). The result is cut out as a smaller dense model
  (:func:`canao.nas.supernet.extract`), which the compiler turns into speed.
  oBERT scores a unit with the empirical Fisher over its mask variable and
  corrects the surviving units with the OBS update, folded into the weights.
- ``unstructured`` and ``block4`` granularities zero single weights or groups of
  4 with oBERT's block-diagonal Fisher inverse (Woodbury). The model keeps its
  dense shapes: smaller when stored sparsely, but no faster with dense kernels.

AE-BERT (automatic) searches per-layer pruning ratios under the overall ratio,
scores each candidate by one-shot pruning plus a short evaluation on held-out
training examples, and prunes and fine-tunes the best.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification, BertTokenizerFast

from canao.errors import CanaoError
from canao.nas import obert
from canao.nas.distill import batches as shuffled_batches
from canao.nas.distill import distillation_loss
from canao.nas.finetune import accuracy
from canao.nas.space import ArchConfig
from canao.nas.supernet import (
    Importance,
    extract,
    full_arch,
    reorder_by_importance,
)
from canao.nas.supernet import mask_gradients as supernet_mask_gradients
from canao.nas.tasks import Split

METHODS = ("obert", "magnitude", "aebert")
GRANULARITIES = ("structured", "unstructured", "block4")

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


class PruningError(CanaoError):
    """A pruning request that cannot be carried out (method, ratio, granularity)."""


@dataclass(frozen=True)
class PruneConfig:
    method: str = "obert"
    ratio: float = 0.5  # structured: fraction of heads and of FFN neurons; else of encoder weights
    granularity: str = "structured"
    stages: int = 1  # 1: one-shot; >1: gradual, ratios on the cubic schedule
    fisher_batches: int = 32  # gradients in the empirical Fisher (m)
    fisher_batch_size: int = 8
    relative_damping: float = 1e-3  # lambda = this * mean(g^2): scale-free (obert.relative_damping)
    finetune_steps: int = 200  # in total, split over the stages
    batch_size: int = 32
    learning_rate: float = 5e-5
    temperature: float = 2.0
    max_length: int = 64
    aebert_candidates: int = 16
    aebert_rounds: int = 2  # rounds of mutating the best candidates
    aebert_eval_examples: int = 256  # held out from the training split
    # FFN neurons kept per layer: a multiple of the packed dense kernel's panel width (32
    # floats with AVX-512). Other widths are padded by the compiler; whole panels avoid the
    # wasted columns (MiniLM pruned by AE-BERT at 0.3: 10.27 ms unaligned, 9.54 ms aligned).
    neuron_multiple: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PruningError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.granularity not in GRANULARITIES:
            raise PruningError(
                f"unknown granularity {self.granularity!r}; choose from {', '.join(GRANULARITIES)}"
            )
        if not 0.0 <= self.ratio < 1.0:
            raise PruningError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.method == "aebert" and self.granularity != "structured":
            raise PruningError(
                "aebert chooses per-layer ratios of heads and neurons: structured only"
            )
        if self.stages < 1:
            raise PruningError(f"stages must be >= 1, got {self.stages}")


# ---- which units are alive ----


@dataclass
class UnitMasks:
    """Alive heads and FFN neurons per layer (structured pruning state)."""

    heads: torch.Tensor  # bool [layers, heads]
    neurons: torch.Tensor  # bool [layers, ffn]

    @classmethod
    def full(cls, model: BertForSequenceClassification) -> UnitMasks:
        cfg = model.config
        return cls(
            torch.ones(cfg.num_hidden_layers, cfg.num_attention_heads, dtype=torch.bool),
            torch.ones(cfg.num_hidden_layers, cfg.intermediate_size, dtype=torch.bool),
        )

    def arch(self, model: BertForSequenceClassification) -> ArchConfig:
        full = full_arch(model)
        heads = tuple(int(h) for h in self.heads.sum(1))
        ffn = tuple(int(f) for f in self.neurons.sum(1))
        return ArchConfig(full.hidden_size, heads, ffn, full.head_dim)


def weight_masks(model: BertForSequenceClassification, units: UnitMasks) -> dict[str, torch.Tensor]:
    """Keep masks over the parameters that read or write each head and neuron."""
    hd = model.config.hidden_size // model.config.num_attention_heads
    masks: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.bert.encoder.layer):
        rows = units.heads[i].repeat_interleave(hd).float()
        prefix = f"bert.encoder.layer.{i}."
        for proj in ("query", "key", "value"):
            masks[f"{prefix}attention.self.{proj}.weight"] = rows[:, None].expand_as(
                getattr(layer.attention.self, proj).weight
            )
            masks[f"{prefix}attention.self.{proj}.bias"] = rows
        masks[f"{prefix}attention.output.dense.weight"] = rows[None, :].expand_as(
            layer.attention.output.dense.weight
        )
        neurons = units.neurons[i].float()
        masks[f"{prefix}intermediate.dense.weight"] = neurons[:, None].expand_as(
            layer.intermediate.dense.weight
        )
        masks[f"{prefix}intermediate.dense.bias"] = neurons
        masks[f"{prefix}output.dense.weight"] = neurons[None, :].expand_as(
            layer.output.dense.weight
        )
    return {name: mask.contiguous() for name, mask in masks.items()}


@torch.no_grad()
def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


# ---- scores ----


def training_batches(
    tokenizer: BertTokenizerFast, split: Split, batch_size: int, max_length: int, seed: int
) -> Iterator[Batch]:
    return shuffled_batches(tokenizer, split, batch_size, max_length, np.random.default_rng(seed))


def mask_gradients(
    model: BertForSequenceClassification, batches: list[Batch]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch loss gradients w.r.t. every head and neuron mask: ``[n, L, H]``, ``[n, L, F]``."""
    grads = list(supernet_mask_gradients(model, batches))
    return torch.stack([g[0] for g in grads]), torch.stack([g[1] for g in grads])


@dataclass
class StructuredScores:
    heads: torch.Tensor  # [L, H]; higher = more important
    neurons: torch.Tensor  # [L, F]
    head_finv: list[torch.Tensor] = field(default_factory=list)  # oBERT only: per layer [H, H]
    neuron_finv: list[torch.Tensor] = field(default_factory=list)


def obert_structured_scores(
    model: BertForSequenceClassification, batches: list[Batch], relative_damping: float
) -> StructuredScores:
    head_grads, neuron_grads = mask_gradients(model, batches)
    scores = StructuredScores(
        torch.zeros(head_grads.shape[1:]), torch.zeros(neuron_grads.shape[1:])
    )
    for layer in range(head_grads.shape[1]):
        for grads, target, finvs in (
            (head_grads[:, layer], scores.heads, scores.head_finv),
            (neuron_grads[:, layer], scores.neurons, scores.neuron_finv),
        ):
            damping = obert.relative_damping(grads, relative_damping)
            rho, finv = obert.structured_scores(grads, damping)
            target[layer] = rho.float()
            finvs.append(finv)
    return scores


def magnitude_structured_scores(model: BertForSequenceClassification) -> StructuredScores:
    """L2 norm of all weights that belong to a head / a neuron."""
    hd = model.config.hidden_size // model.config.num_attention_heads
    heads, neurons = [], []
    for layer in model.bert.encoder.layer:
        attn = layer.attention
        rows = sum(getattr(attn.self, p).weight.pow(2).sum(1) for p in ("query", "key", "value"))
        per_row = rows + attn.output.dense.weight.pow(2).sum(0)
        heads.append(per_row.view(-1, hd).sum(1).sqrt())
        ffn = layer.intermediate.dense.weight.pow(2).sum(1) + layer.output.dense.weight.pow(2).sum(
            0
        )
        neurons.append(ffn.sqrt())
    return StructuredScores(torch.stack(heads).detach(), torch.stack(neurons).detach())


# ---- choosing what to remove ----


def choose_global(scores: torch.Tensor, alive: torch.Tensor, keep_total: int) -> torch.Tensor:
    """Keep the ``keep_total`` best alive units across layers, at least one per layer."""
    masked = torch.where(alive, scores, torch.tensor(-float("inf")))
    keep = torch.zeros_like(alive)
    best_per_layer = masked.argmax(1)
    keep[torch.arange(len(keep)), best_per_layer] = True  # no layer loses all its units
    rest = masked.masked_fill(keep, -float("inf")).flatten()
    extra = max(0, keep_total - int(keep.sum()))
    if extra:
        keep.view(-1)[torch.topk(rest, extra).indices] = True
    return keep & alive


def choose_per_layer(
    scores: torch.Tensor, alive: torch.Tensor, keep_counts: list[int]
) -> torch.Tensor:
    keep = torch.zeros_like(alive)
    for layer, count in enumerate(keep_counts):
        masked = torch.where(alive[layer], scores[layer], torch.tensor(-float("inf")))
        keep[layer, torch.topk(masked, max(1, count)).indices] = True
    return keep & alive


@torch.no_grad()
def fold_obs_update(
    model: BertForSequenceClassification,
    scores: StructuredScores,
    before: UnitMasks,
    after: UnitMasks,
) -> None:
    """oBERT's correction of surviving units, folded into the output projections' columns."""
    hd = model.config.hidden_size // model.config.num_attention_heads
    for i, layer in enumerate(model.bert.encoder.layer):
        for finvs, was, now, weight, repeat in (
            (
                scores.head_finv,
                before.heads[i],
                after.heads[i],
                layer.attention.output.dense.weight,
                hd,
            ),
            (scores.neuron_finv, before.neurons[i], after.neurons[i], layer.output.dense.weight, 1),
        ):
            removed = torch.nonzero(was & ~now).flatten()
            if len(removed) == 0 or not finvs:
                continue
            scale = obert.structured_update(finvs[i], removed).float()
            weight.mul_(scale.repeat_interleave(repeat)[None, :])


# ---- the pruning loop ----


@dataclass
class PruneResult:
    model: torch.nn.Module  # structured: the smaller extracted model; else the masked dense one
    arch: ArchConfig
    units: UnitMasks | None
    masks: dict[str, torch.Tensor]
    log: list[dict[str, object]]
    layer_ratios: list[float] | None = None


def prune(
    teacher: BertForSequenceClassification,
    tokenizer: BertTokenizerFast,
    train: Split,
    config: PruneConfig,
    *,
    progress: Callable[[str], None] | None = None,
) -> PruneResult:
    """Prune a copy of ``teacher`` per ``config``, fine-tuning with distillation between stages."""
    say = progress or (lambda message: None)
    torch.manual_seed(config.seed)
    held_out, train_rest = _hold_out(train, config)
    data = training_batches(
        tokenizer, train_rest, config.batch_size, config.max_length, config.seed
    )
    fisher_data = training_batches(
        tokenizer, train_rest, config.fisher_batch_size, config.max_length, config.seed + 1
    )
    student = copy.deepcopy(teacher)
    if config.granularity != "structured":
        return _prune_weights(student, teacher, data, fisher_data, config, say)
    layer_ratios = None
    if config.method == "aebert":
        layer_ratios = search_layer_ratios(student, tokenizer, held_out, fisher_data, config, say)
    units = UnitMasks.full(student)
    log: list[dict[str, object]] = []
    for stage in range(1, config.stages + 1):
        ratio = obert.cubic_sparsity(stage, config.stages, 0.0, config.ratio)
        batches = [next(fisher_data) for _ in range(config.fisher_batches)]
        units = prune_structured(student, units, ratio, batches, config, layer_ratios)
        masks = weight_masks(student, units)
        apply_masks(student, masks)
        say(f"stage {stage}/{config.stages}: ratio {ratio:.3f}, arch {units.arch(student).key}")
        steps = config.finetune_steps // config.stages
        log += finetune_masked(student, teacher, data, masks, steps, config)
    arch = units.arch(student)
    return PruneResult(cut_out(student, units), arch, units, masks, log, layer_ratios)


def cut_out(model: BertForSequenceClassification, units: UnitMasks) -> torch.nn.Module:
    """The alive heads and neurons as a smaller dense model (same function as the masked one)."""
    order = Importance(
        heads=units.heads.float() * 2 - torch.arange(units.heads.shape[1]) / 1e3,
        neurons=units.neurons.float() * 2 - torch.arange(units.neurons.shape[1]) / 1e6,
        hidden=-torch.arange(model.config.hidden_size).float(),
    )
    reorder_by_importance(model, order)  # alive units first, otherwise in their order
    return extract(model, units.arch(model))


def _hold_out(train: Split, config: PruneConfig) -> tuple[Split, Split]:
    """AE-BERT scores candidates on training examples the pruned model is not tuned on."""
    n = min(config.aebert_eval_examples, len(train) // 5) if config.method == "aebert" else 0
    if n == 0:
        return Split((), ()), train
    rows = np.random.default_rng(config.seed).permutation(len(train))

    def pick(rows_: np.ndarray) -> Split:
        return Split(tuple(train.texts[i] for i in rows_), tuple(train.labels[i] for i in rows_))

    return pick(rows[:n]), pick(rows[n:])


def prune_structured(
    model: BertForSequenceClassification,
    units: UnitMasks,
    ratio: float,
    batches: list[Batch],
    config: PruneConfig,
    layer_ratios: list[float] | None = None,
) -> UnitMasks:
    """One pruning step to ``ratio`` of the original units (scores from the current model)."""
    if config.method == "magnitude":
        scores = magnitude_structured_scores(model)
    else:
        scores = obert_structured_scores(model, batches, config.relative_damping)
    after = UnitMasks(
        _keep(scores.heads, units.heads, ratio, layer_ratios),
        _keep(scores.neurons, units.neurons, ratio, layer_ratios, config.neuron_multiple),
    )
    fold_obs_update(model, scores, units, after)
    return after


def _keep(
    scores: torch.Tensor,
    alive: torch.Tensor,
    ratio: float,
    layer_ratios: list[float] | None,
    multiple: int = 1,
) -> torch.Tensor:
    per_layer = alive.shape[1]
    if layer_ratios is None:
        total = alive.numel() - obert.num_to_prune(ratio, alive.numel())
        keep = choose_global(scores, alive, total)
        if multiple <= 1:
            return keep
        counts = [int(c) for c in keep.sum(1)]
    else:
        # Stage ratio relative to the final one scales every layer's own ratio alike.
        scale = ratio / max(sum(layer_ratios) / len(layer_ratios), 1e-9)
        counts = [
            per_layer - obert.num_to_prune(min(r * scale, 0.99), per_layer) for r in layer_ratios
        ]
    return choose_per_layer(scores, alive, [_round_to(c, multiple, per_layer) for c in counts])


def _round_to(count: int, multiple: int, limit: int) -> int:
    """Nearest multiple of ``multiple`` (at least one multiple, at most ``limit``)."""
    if multiple <= 1 or limit < multiple:
        return count
    return min(max(multiple, round(count / multiple) * multiple), limit)


def finetune_masked(
    student: BertForSequenceClassification,
    teacher: BertForSequenceClassification,
    data: Iterator[Batch],
    masks: dict[str, torch.Tensor],
    steps: int,
    config: PruneConfig,
) -> list[dict[str, object]]:
    """Distillation (soft teacher logits) plus the task loss, masks re-applied every step."""
    if steps <= 0:
        return []
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=steps)
    log = []
    student.train()
    for step in range(steps):
        inputs, labels = next(data)
        with torch.no_grad():
            target = teacher(**inputs).logits
        logits = student(**inputs).logits
        kd = distillation_loss(logits, target, config.temperature)
        loss = 0.5 * kd + 0.5 * F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        apply_masks(student, masks)
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4)})
    student.eval()
    return log


# ---- AE-BERT: per-layer ratios ----


def search_layer_ratios(
    model: BertForSequenceClassification,
    tokenizer: BertTokenizerFast,
    held_out: Split,
    fisher_data: Iterator[Batch],
    config: PruneConfig,
    say: Callable[[str], None],
) -> list[float]:
    """Random per-layer ratios averaging ``config.ratio``, then mutations of the best few."""
    layers = model.config.num_hidden_layers
    rng = random.Random(config.seed)
    batches = [next(fisher_data) for _ in range(config.fisher_batches)]
    scores = obert_structured_scores(model, batches, config.relative_damping)
    scored: list[tuple[float, list[float]]] = []
    candidates = [[config.ratio] * layers] + [
        _balanced([rng.uniform(0, 1) for _ in range(layers)], config.ratio)
        for _ in range(config.aebert_candidates - 1)
    ]
    for round_ in range(config.aebert_rounds + 1):
        for ratios in candidates:
            scored.append(
                (_one_shot_accuracy(model, tokenizer, held_out, scores, ratios, config), ratios)
            )
        scored.sort(key=lambda item: -item[0])
        best, ratios = scored[0]
        say(f"aebert round {round_}: best held-out accuracy {best:.4f} with {_fmt(ratios)}")
        parents = [ratios for _, ratios in scored[:4]]
        candidates = [
            _balanced([r + rng.gauss(0, 0.1) for r in rng.choice(parents)], config.ratio)
            for _ in range(max(1, config.aebert_candidates // 2))
        ]
    return scored[0][1]


def _balanced(raw: list[float], ratio: float) -> list[float]:
    """Shift per-layer ratios so their mean is ``ratio``, each within [0, 0.95]."""
    values = np.clip(np.asarray(raw, dtype=float), 0, None)
    for _ in range(50):
        values = np.clip(values + (ratio - values.mean()), 0.0, 0.95)
        if abs(values.mean() - ratio) < 1e-6:
            break
    return [round(float(v), 4) for v in values]


def _fmt(ratios: list[float]) -> str:
    return "[" + ", ".join(f"{r:.2f}" for r in ratios) + "]"


def _one_shot_accuracy(
    model: BertForSequenceClassification,
    tokenizer: BertTokenizerFast,
    held_out: Split,
    scores: StructuredScores,
    ratios: list[float],
    config: PruneConfig,
) -> float:
    """The cheap evaluation: one-shot prune (with the OBS correction) and score, no training."""
    trial = copy.deepcopy(model)
    before = UnitMasks.full(trial)
    after = UnitMasks(
        _keep(scores.heads, before.heads, config.ratio, ratios),
        _keep(scores.neurons, before.neurons, config.ratio, ratios, config.neuron_multiple),
    )
    fold_obs_update(trial, scores, before, after)
    apply_masks(trial, weight_masks(trial, after))
    return accuracy(trial, tokenizer, held_out, config.max_length)


# ---- unstructured and 4-block oBERT / magnitude ----


def encoder_linears(model: BertForSequenceClassification) -> dict[str, torch.nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".encoder.layer." in name
    }


def _prune_weights(
    student: BertForSequenceClassification,
    teacher: BertForSequenceClassification,
    data: Iterator[Batch],
    fisher_data: Iterator[Batch],
    config: PruneConfig,
    say: Callable[[str], None],
) -> PruneResult:
    group = 4 if config.granularity == "block4" else 1
    masks: dict[str, torch.Tensor] = {}
    log: list[dict[str, object]] = []
    for stage in range(1, config.stages + 1):
        ratio = obert.cubic_sparsity(stage, config.stages, 0.0, config.ratio)
        grads = _weight_gradients(
            student, [next(fisher_data) for _ in range(config.fisher_batches)]
        )
        for name, linear in encoder_linears(student).items():
            masks[f"{name}.weight"] = _prune_linear(linear, grads.get(name), ratio, group, config)
        apply_masks(student, masks)
        say(f"stage {stage}/{config.stages}: {config.granularity} sparsity {ratio:.3f}")
        log += finetune_masked(
            student, teacher, data, masks, config.finetune_steps // config.stages, config
        )
    return PruneResult(student, full_arch(student), None, masks, log)


def _weight_gradients(
    model: BertForSequenceClassification, batches: list[Batch]
) -> dict[str, torch.Tensor]:
    """``[n, numel]`` loss gradients per encoder linear weight (the empirical Fisher's samples)."""
    linears = encoder_linears(model)
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    model.eval()
    for inputs, labels in batches:
        model.zero_grad()
        F.cross_entropy(model(**inputs).logits, labels).backward()
        for name, linear in linears.items():
            samples[name].append(linear.weight.grad.detach().flatten().clone())
    model.zero_grad()
    return {name: torch.stack(grads) for name, grads in samples.items()}


@torch.no_grad()
def _prune_linear(
    linear: torch.nn.Linear,
    grads: torch.Tensor | None,
    ratio: float,
    group: int,
    config: PruneConfig,
) -> torch.Tensor:
    w = linear.weight
    if config.method == "magnitude" or grads is None:
        new, keep = obert.magnitude_prune(w, ratio, group_size=group)
    else:
        new, keep = obert.prune_weights(
            w,
            grads,
            ratio,
            block_size=48 if group == 4 else 50,
            damping=obert.relative_damping(grads, config.relative_damping),
            group_size=group,
        )
    w.copy_(new)
    return keep.to(w.dtype)
