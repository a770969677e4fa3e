"""Weight-sharing super-network over the search space (DynaBERT / HAT style).

The super-network *is* the teacher's ``BertForSequenceClassification``; a
sub-network is a slice of its weights:
- depth ``L``: ``L`` of the teacher's layers (``ArchConfig.kept_layers``: evenly spaced by
  the search space's rule, as DistilBERT and DynaBERT keep layers);
- hidden size ``d``: the first ``d`` channels of the residual stream (every
  embedding, layer norm, projection and the pooler are sliced alike);
- heads ``h`` in a layer: the first ``h`` heads (rows of Q/K/V, columns of the
  attention output);
- FFN size ``f``: the first ``f`` neurons;
- read-out: a sub-network shallower than the teacher reads its logits through its depth's own
  pooler and classifier when the super-network has them (:func:`add_depth_heads`).

"First" is made meaningful by :func:`reorder_by_importance`, which permutes
heads, neurons and hidden channels so the most important come first; the
permutation leaves the full network's function unchanged (tested), so the
largest sub-network is exactly the teacher. :func:`subnet_logits` runs a
sub-network straight from the shared weights (gradients flow into them, which
is how the super-network is trained); :func:`extract` copies the same slices
into a standalone :class:`~canao.nas.modeling.CanaoBertForSequenceClassification`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification
from transformers.activations import ACT2FN

from canao.nas import obert
from canao.nas.modeling import (
    CanaoBertConfig,
    CanaoBertForSequenceClassification,
    arch_config,
)
from canao.nas.space import ArchConfig, InvalidArchitectureError


@dataclass
class Masks:
    """Multiplicative masks of ones whose gradients give first-order importance (Michel et al.)."""

    heads: torch.Tensor  # [layers, heads]
    neurons: torch.Tensor  # [layers, ffn]
    hidden: torch.Tensor  # [hidden]

    @classmethod
    def ones(cls, model: BertForSequenceClassification) -> Masks:
        cfg = model.config
        return cls(
            torch.ones(cfg.num_hidden_layers, cfg.num_attention_heads, requires_grad=True),
            torch.ones(cfg.num_hidden_layers, cfg.intermediate_size, requires_grad=True),
            torch.ones(cfg.hidden_size, requires_grad=True),
        )


def full_arch(model: BertForSequenceClassification) -> ArchConfig:
    """The teacher itself as an architecture (the super-network's largest point)."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    layers = cfg.num_hidden_layers
    return ArchConfig(
        cfg.hidden_size,
        (cfg.num_attention_heads,) * layers,
        (cfg.intermediate_size,) * layers,
        head_dim,
    )


def check_fits(model: BertForSequenceClassification, arch: ArchConfig) -> None:
    """Raise unless ``arch`` is a slice of ``model`` (same head dim, nothing larger)."""
    arch.validate()
    full = full_arch(model)
    problems = []
    if arch.head_dim != full.head_dim:
        problems.append(f"head dim {arch.head_dim} != teacher's {full.head_dim}")
    if arch.num_layers > full.num_layers or arch.kept_layers[-1] >= full.num_layers:
        problems.append(
            f"layers {list(arch.kept_layers)} not all among the teacher's {full.num_layers}"
        )
    if arch.hidden_size > full.hidden_size:
        problems.append(f"hidden {arch.hidden_size} > teacher's {full.hidden_size}")
    if max(arch.heads) > full.heads[0]:
        problems.append(f"{max(arch.heads)} heads > teacher's {full.heads[0]}")
    if max(arch.ffn) > full.ffn[0]:
        problems.append(f"FFN {max(arch.ffn)} > teacher's {full.ffn[0]}")
    if problems:
        raise InvalidArchitectureError(f"{arch.key} is not a sub-network: " + "; ".join(problems))


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, d: int) -> torch.Tensor:
    return F.layer_norm(x, (d,), norm.weight[:d], norm.bias[:d], norm.eps)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training) if training and p > 0 else x


def subnet_logits(
    model: BertForSequenceClassification,
    arch: ArchConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    *,
    masks: Masks | None = None,
    dropout: float = 0.0,
    hidden_states: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits of sub-network ``arch``, computed from slices of ``model``'s weights.

    ``hidden_states``, when given, receives the embeddings' output and each layer's (the
    tensors hidden-state distillation compares with the teacher's).
    """
    bert, d, hd = model.bert, arch.hidden_size, arch.head_dim
    training = dropout > 0 and model.training
    x = _embed(bert.embeddings, input_ids, token_type_ids, d)
    x = _dropout(_hidden_masked(x, masks, d), dropout, training)
    if hidden_states is not None:
        hidden_states.append(x)
    # Additive mask as BertModel builds it for SDPA: 0 where attended, dtype-min where padded.
    additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    act = ACT2FN[model.config.hidden_act]
    for position, index in enumerate(arch.kept_layers):
        layer = bert.encoder.layer[index]  # layer choice: the teacher layer this one is cut from
        heads, ffn = arch.heads[position], arch.ffn[position]
        attended = _attention(layer.attention.self, x, additive, heads, hd, d)
        if masks is not None:
            attended = attended * masks.heads[index, :heads].repeat_interleave(hd)
        out = layer.attention.output
        a = F.linear(attended, out.dense.weight[:d, : heads * hd], out.dense.bias[:d])
        x = _hidden_masked(
            _layer_norm(_dropout(a, dropout, training) + x, out.LayerNorm, d), masks, d
        )
        inner = layer.intermediate.dense
        f = act(F.linear(x, inner.weight[:ffn, :d], inner.bias[:ffn]))
        if masks is not None:
            f = f * masks.neurons[index, :ffn]
        out = layer.output
        o = F.linear(f, out.dense.weight[:d, :ffn], out.dense.bias[:d])
        x = _hidden_masked(
            _layer_norm(_dropout(o, dropout, training) + x, out.LayerNorm, d), masks, d
        )
        if hidden_states is not None:
            hidden_states.append(x)
    pooler, classifier = readout(model, arch.num_layers)
    pooled = torch.tanh(F.linear(x[:, 0], pooler.weight[:d, :d], pooler.bias[:d]))
    return F.linear(_dropout(pooled, dropout, training), classifier.weight[:, :d], classifier.bias)


# ---- depth heads: a read-out (pooler + classifier) per depth ----

DEPTH_HEADS = "canao_depth_heads"  # the attribute (and state-dict prefix) they live under


def add_depth_heads(model: BertForSequenceClassification, depths: Iterable[int]) -> None:
    """Give each depth below the full one its own pooler and classifier, copied from the model's.

    Why: with one shared read-out, a 1-layer sub-network's pooler reads the output of the
    teacher's first layer through weights tuned for its last, and the shared weights cannot
    serve both; in the quick-start super-network every 1- and 2-layer sub-network scored the
    majority class. Per-depth read-outs are a few hundred thousand parameters and cost nothing
    at inference: an extracted sub-network is a plain BERT with its depth's read-out.
    """
    full = model.config.num_hidden_layers
    heads = torch.nn.ModuleDict(
        {
            str(depth): torch.nn.ModuleDict(
                {
                    "pooler": copy.deepcopy(model.bert.pooler.dense),
                    "classifier": copy.deepcopy(model.classifier),
                }
            )
            for depth in sorted(set(depths))
            if depth < full
        }
    )
    setattr(model, DEPTH_HEADS, heads)


def depth_heads(model: BertForSequenceClassification) -> torch.nn.ModuleDict | None:
    return getattr(model, DEPTH_HEADS, None)


DEPTH_HEADS_FILE = "depth_heads.safetensors"


def save_depth_heads(model: BertForSequenceClassification, folder: Path) -> None:
    """Write the depth heads beside a ``save_pretrained`` folder (which leaves them out)."""
    heads = depth_heads(model)
    if heads is not None:
        state = {k: v.detach().contiguous() for k, v in heads.state_dict().items()}
        save_file(state, str(folder / DEPTH_HEADS_FILE))


def load_depth_heads(model: BertForSequenceClassification, folder: Path) -> None:
    """Re-attach the depth heads saved in ``folder``, if it has any."""
    path = folder / DEPTH_HEADS_FILE
    if not path.is_file():
        return
    state = load_file(str(path))
    add_depth_heads(model, {int(name.split(".", 1)[0]) for name in state})
    depth_heads(model).load_state_dict(state)  # type: ignore[union-attr]


def readout(
    model: BertForSequenceClassification, depth: int
) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """The pooler and classifier a sub-network of ``depth`` layers reads its logits through."""
    heads = depth_heads(model)
    if heads is not None and str(depth) in heads:
        head = heads[str(depth)]
        return head["pooler"], head["classifier"]
    return model.bert.pooler.dense, model.classifier


def _embed(
    embeddings: torch.nn.Module, ids: torch.Tensor, types: torch.Tensor | None, d: int
) -> torch.Tensor:
    positions = torch.arange(ids.shape[1], device=ids.device)
    types = torch.zeros_like(ids) if types is None else types
    x = (
        F.embedding(ids, embeddings.word_embeddings.weight[:, :d])
        + F.embedding(positions, embeddings.position_embeddings.weight[:, :d])
        + F.embedding(types, embeddings.token_type_embeddings.weight[:, :d])
    )
    return _layer_norm(x, embeddings.LayerNorm, d)


def _hidden_masked(x: torch.Tensor, masks: Masks | None, d: int) -> torch.Tensor:
    return x if masks is None else x * masks.hidden[:d]


def _attention(
    attn: torch.nn.Module, x: torch.Tensor, additive: torch.Tensor, heads: int, hd: int, d: int
) -> torch.Tensor:
    batch, seq, _ = x.shape
    inner = heads * hd

    def project(linear: torch.nn.Linear) -> torch.Tensor:
        y = F.linear(x, linear.weight[:inner, :d], linear.bias[:inner])
        return y.view(batch, seq, heads, hd).transpose(1, 2)

    q, k, v = project(attn.query), project(attn.key), project(attn.value)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    return context.transpose(1, 2).reshape(batch, seq, inner)


# ---- extraction: the same slices as a standalone transformers BERT ----


def sub_config(model: BertForSequenceClassification, arch: ArchConfig) -> CanaoBertConfig:
    """Config of the extracted model: the teacher's, with ``arch``'s sizes and pruned heads."""
    check_fits(model, arch)
    return arch_config(arch, model.config)


def sliced_state(model: BertForSequenceClassification, arch: ArchConfig) -> dict[str, torch.Tensor]:
    """State dict of the sub-network, named as in ``CanaoBertForSequenceClassification``."""
    d, hd = arch.hidden_size, arch.head_dim
    state: dict[str, torch.Tensor] = {}
    cuts: dict[str, tuple[slice, ...]] = {
        "bert.embeddings.word_embeddings.weight": (slice(None), slice(d)),
        "bert.embeddings.position_embeddings.weight": (slice(None), slice(d)),
        "bert.embeddings.token_type_embeddings.weight": (slice(None), slice(d)),
        "bert.embeddings.LayerNorm.weight": (slice(d),),
        "bert.embeddings.LayerNorm.bias": (slice(d),),
        "bert.pooler.dense.weight": (slice(d), slice(d)),
        "bert.pooler.dense.bias": (slice(d),),
        "classifier.weight": (slice(None), slice(d)),
        "classifier.bias": (slice(None),),
    }
    sources: dict[str, str] = {}  # extracted layer i's weights come from teacher layer ids[i]
    for i, (heads, ffn) in enumerate(zip(arch.heads, arch.ffn, strict=True)):
        p, inner = f"bert.encoder.layer.{i}.", heads * hd
        sources[p] = f"bert.encoder.layer.{arch.kept_layers[i]}."
        for proj in ("query", "key", "value"):
            cuts[f"{p}attention.self.{proj}.weight"] = (slice(inner), slice(d))
            cuts[f"{p}attention.self.{proj}.bias"] = (slice(inner),)
        cuts[f"{p}attention.output.dense.weight"] = (slice(d), slice(inner))
        cuts[f"{p}intermediate.dense.weight"] = (slice(ffn), slice(d))
        cuts[f"{p}intermediate.dense.bias"] = (slice(ffn),)
        cuts[f"{p}output.dense.weight"] = (slice(d), slice(ffn))
        for norm in ("attention.output.dense.bias", "output.dense.bias"):
            cuts[f"{p}{norm}"] = (slice(d),)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            cuts[f"{p}{norm}.weight"] = (slice(d),)
            cuts[f"{p}{norm}.bias"] = (slice(d),)
    full = model.state_dict()
    pooler, classifier = readout(model, arch.num_layers)
    full = {
        **full,
        "bert.pooler.dense.weight": pooler.weight.detach(),
        "bert.pooler.dense.bias": pooler.bias.detach(),
        "classifier.weight": classifier.weight.detach(),
        "classifier.bias": classifier.bias.detach(),
    }
    for name, cut in cuts.items():
        prefix = next((p for p in sources if name.startswith(p)), None)
        source = name if prefix is None else sources[prefix] + name[len(prefix) :]
        state[name] = full[source][cut].clone()
    return state


def extract(
    model: BertForSequenceClassification, arch: ArchConfig
) -> CanaoBertForSequenceClassification:
    """Sub-network ``arch`` as a standalone model (eval mode), equal to :func:`subnet_logits`."""
    sub = CanaoBertForSequenceClassification(sub_config(model, arch))
    missing, unexpected = sub.load_state_dict(sliced_state(model, arch), strict=False)
    # Only buffers BertModel rebuilds itself (position/token-type id tables) may be absent.
    weights_missing = [m for m in missing if not m.endswith(("position_ids", "token_type_ids"))]
    if weights_missing or unexpected:
        raise InvalidArchitectureError(
            f"extracting {arch.key}: missing {weights_missing}, unexpected {unexpected}"
        )
    return sub.eval()


# ---- importance and reordering ----


@dataclass
class Importance:
    """Scores per head, FFN neuron and hidden channel (higher = keep first)."""

    heads: torch.Tensor  # [layers, heads]
    neurons: torch.Tensor  # [layers, ffn]
    hidden: torch.Tensor  # [hidden]


def mask_gradients(
    model: BertForSequenceClassification,
    batches: list[tuple[Mapping[str, torch.Tensor], torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch: task-loss gradients w.r.t. the head, neuron and hidden masks (all ones).

    First-order importance sums their magnitudes; oBERT's structured saliency
    builds an empirical Fisher from them (:mod:`canao.nas.prune`).
    """
    arch = full_arch(model)
    model.eval()
    for inputs, labels in batches:
        masks = Masks.ones(model)
        logits = subnet_logits(
            model,
            arch,
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs.get("token_type_ids"),
            masks=masks,
        )
        loss = F.cross_entropy(logits, labels)
        heads, neurons, hidden = torch.autograd.grad(
            loss, [masks.heads, masks.neurons, masks.hidden]
        )
        yield heads, neurons, hidden


def first_order_importance(
    model: BertForSequenceClassification,
    batches: list[tuple[Mapping[str, torch.Tensor], torch.Tensor]],
) -> Importance:
    """|dL/dmask| summed over batches: the change in task loss from removing each unit.

    This is the head importance of Michel et al. (2019) that DynaBERT uses,
    applied alike to FFN neurons and hidden channels.
    """
    grads = list(mask_gradients(model, batches))
    return Importance(*(torch.stack(g).abs().sum(0) for g in zip(*grads, strict=True)))


def obert_importance(
    model: BertForSequenceClassification,
    batches: list[tuple[Mapping[str, torch.Tensor], torch.Tensor]],
    relative_damping: float = 1e-3,
) -> Importance:
    """oBERT's structured saliency ``1 / (2 [F^-1]_jj)`` per unit, from the same mask gradients.

    The empirical Fisher is built per layer over its heads (and over its
    neurons, and over the hidden channels), so a unit whose loss gradient is
    correlated with its neighbours' scores lower than first-order importance
    would rank it: the others can make up for its removal (Kurtic et al. 2022).
    """
    grads = [torch.stack(g) for g in zip(*mask_gradients(model, batches), strict=True)]
    heads, neurons, hidden = grads  # [n, L, H], [n, L, F], [n, d]

    def saliency(layer_grads: torch.Tensor) -> torch.Tensor:
        damping = obert.relative_damping(layer_grads, relative_damping)
        return obert.structured_scores(layer_grads, damping)[0].float()

    return Importance(
        torch.stack([saliency(heads[:, layer]) for layer in range(heads.shape[1])]),
        torch.stack([saliency(neurons[:, layer]) for layer in range(neurons.shape[1])]),
        saliency(hidden),
    )


IMPORTANCE = {"first-order": first_order_importance, "obert": obert_importance}


@torch.no_grad()
def reorder_by_importance(model: BertForSequenceClassification, importance: Importance) -> None:
    """Permute heads, neurons and hidden channels (in place) so that important ones come first.

    Every permutation is applied to both sides of the weights it touches, so
    the full network computes exactly the same function as before.
    """
    hd = model.config.hidden_size // model.config.num_attention_heads
    for index, layer in enumerate(model.bert.encoder.layer):
        heads = torch.argsort(importance.heads[index], descending=True, stable=True)
        rows = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        for proj in (
            layer.attention.self.query,
            layer.attention.self.key,
            layer.attention.self.value,
        ):
            _permute(proj.weight, rows, 0)
            _permute(proj.bias, rows, 0)
        _permute(layer.attention.output.dense.weight, rows, 1)
        neurons = torch.argsort(importance.neurons[index], descending=True, stable=True)
        _permute(layer.intermediate.dense.weight, neurons, 0)
        _permute(layer.intermediate.dense.bias, neurons, 0)
        _permute(layer.output.dense.weight, neurons, 1)
    _permute_hidden(model, torch.argsort(importance.hidden, descending=True, stable=True))


def _permute(tensor: torch.Tensor, order: torch.Tensor, dim: int) -> None:
    tensor.copy_(tensor.index_select(dim, order))


def _permute_hidden(model: BertForSequenceClassification, order: torch.Tensor) -> None:
    """The residual stream's channels: every tensor that reads or writes it."""
    emb = model.bert.embeddings
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        _permute(table.weight, order, 1)
    _permute(emb.LayerNorm.weight, order, 0)
    _permute(emb.LayerNorm.bias, order, 0)
    for layer in model.bert.encoder.layer:
        for proj in (
            layer.attention.self.query,
            layer.attention.self.key,
            layer.attention.self.value,
        ):
            _permute(proj.weight, order, 1)
        for writer in (layer.attention.output, layer.output):
            _permute(writer.dense.weight, order, 0)
            _permute(writer.dense.bias, order, 0)
            _permute(writer.LayerNorm.weight, order, 0)
            _permute(writer.LayerNorm.bias, order, 0)
        _permute(layer.intermediate.dense.weight, order, 1)
    pooler = model.bert.pooler.dense
    _permute(pooler.weight, order, 0)
    _permute(pooler.weight, order, 1)
    _permute(pooler.bias, order, 0)
    _permute(model.classifier.weight, order, 1)
