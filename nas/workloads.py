"""Latency workloads: seeded random-weight BERTs assembled from parts made once.

Latency does not depend on weight values, so a candidate is timed with seeded
random weights. Building a fresh ``BertForSequenceClassification`` per candidate
cost about a second (mostly initialising the 30522-row embedding table); here
each part (the embeddings, a layer of given sizes, the head) is made once and
shared by every candidate that has it, and the model is a real Hugging Face
model whose modules are those parts, so it is what PyTorch checks a build against.

A part's key says what it is: ``layer-H384-d64-a6-f1536#1`` is the second layer of
those sizes within one model. Two layers of the same sizes in one model get
different weights, as in any real model (sharing one layer's weights would let a
candidate that repeats a layer keep them in cache and time faster than it runs).
The key also seeds the part's weights, so a part made again is the same part;
:mod:`canao.compiler.segments` caches lowered code under the same keys.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertPooler

from canao.compiler.models import LoadedModel
from canao.nas.modeling import CanaoBertForSequenceClassification, arch_config
from canao.nas.space import ArchConfig


def segment_keys(arch: ArchConfig) -> list[str]:
    """One key per segment, in call order: embeddings, each layer, the head."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    seen: Counter[str] = Counter()
    layers = []
    for heads, ffn in zip(arch.heads, arch.ffn, strict=True):
        sizes = f"layer-H{hidden}-d{head_dim}-a{heads}-f{ffn}"
        layers.append(f"{sizes}#{seen[sizes]}")
        seen[sizes] += 1
    return [f"embeddings-H{hidden}", *layers, f"head-H{hidden}"]


def _layer(config: BertConfig, heads: int, ffn: int) -> nn.Module:
    """A ``BertLayer`` keeping the first ``heads`` heads, with an FFN of ``ffn``."""
    sized = copy.deepcopy(config)
    sized.intermediate_size, sized.pruned_heads = ffn, {}
    layer = BertLayer(sized)
    slots = config.num_attention_heads  # hidden / head_dim (arch_config)
    if heads < slots:
        layer.attention.prune_heads(list(range(heads, slots)))
    return layer


class _Head(nn.Module):
    def __init__(self, pooler: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler
        self.classifier = classifier


@dataclass
class SeededWorkloads:
    """Random-weight models of one base config, sharing parts (least recently used go)."""

    base: BertConfig
    max_parts: int = 160
    _parts: OrderedDict[str, nn.Module] = field(default_factory=OrderedDict, repr=False)

    def model(self, arch: ArchConfig) -> tuple[LoadedModel, list[str]]:
        """``arch`` as a Hugging Face model made of cached parts, and its segment keys."""
        config = arch_config(arch, self.base)
        pruned = config.pruned_heads
        # The skeleton only (every module in it is replaced): on the meta device it costs
        # nothing, but head pruning cannot run there, so the parts prune their own.
        config.pruned_heads = {}
        with torch.device("meta"):
            skeleton = CanaoBertForSequenceClassification(config)
        config.pruned_heads = pruned
        init = skeleton._init_weights
        keys = segment_keys(arch)
        bert = skeleton.bert
        bert.embeddings = self._part(keys[0], lambda: BertEmbeddings(config), init)
        bert.encoder.layer = nn.ModuleList(
            self._part(key, lambda h=heads, f=ffn: _layer(config, h, f), init)
            for key, heads, ffn in zip(keys[1:-1], arch.heads, arch.ffn, strict=True)
        )

        def head() -> _Head:
            return _Head(BertPooler(config), nn.Linear(config.hidden_size, config.num_labels))

        parts = self._part(keys[-1], head, init)
        bert.pooler, skeleton.classifier = parts.pooler, parts.classifier
        fingerprint = hashlib.sha256(
            "|".join([*keys, self.base.to_json_string()]).encode()
        ).hexdigest()[:16]
        return LoadedModel(arch.shape_key, "seeded", skeleton.eval(), fingerprint), keys

    def _part(
        self, key: str, make: Callable[[], nn.Module], init: Callable[[nn.Module], None]
    ) -> nn.Module:
        if key in self._parts:
            self._parts.move_to_end(key)
            return self._parts[key]
        part = make()
        torch.manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
        with torch.no_grad():
            part.apply(init)
        self._parts[key] = part.eval()
        while len(self._parts) > self.max_parts:
            self._parts.popitem(last=False)  # made again, identically, if needed
        return part
