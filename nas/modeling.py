"""A Hugging Face BERT whose layers may differ in heads and FFN size.

The search's sub-networks keep the teacher's head dimension and vary heads
and FFN size per layer. Heads per layer are standard ``transformers``:
``config.pruned_heads`` records the removed heads and ``from_pretrained``
re-applies it. A per-layer FFN size is not, so :class:`CanaoBertConfig` adds
``layer_intermediate_sizes`` and the model classes below resize each layer's
two FFN projections. Everything else is stock ``BertModel``: checkpoints are
``save_pretrained`` folders (safetensors) that load with ``from_pretrained`` or
``AutoModelForSequenceClassification`` once this module is imported.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)

from canao.nas.space import ArchConfig


class CanaoBertConfig(BertConfig):
    """``BertConfig`` plus ``layer_intermediate_sizes`` (one FFN size per layer, or None)."""

    model_type = "canao_bert"

    def __init__(self, layer_intermediate_sizes: Sequence[int] | None = None, **kwargs: object):
        super().__init__(**kwargs)
        sizes = (
            None if layer_intermediate_sizes is None else [int(s) for s in layer_intermediate_sizes]
        )
        if sizes is not None and len(sizes) != self.num_hidden_layers:
            raise ValueError(
                f"layer_intermediate_sizes has {len(sizes)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        self.layer_intermediate_sizes = sizes


def _resize_ffn(model: BertModel, config: CanaoBertConfig) -> None:
    """Give each layer its own FFN width; new weights are random until a checkpoint loads."""
    if config.layer_intermediate_sizes is None:
        return
    for layer, size in zip(model.encoder.layer, config.layer_intermediate_sizes, strict=True):
        layer.intermediate.dense = nn.Linear(config.hidden_size, size)
        layer.output.dense = nn.Linear(size, config.hidden_size)
        for linear in (layer.intermediate.dense, layer.output.dense):
            nn.init.normal_(linear.weight, std=config.initializer_range)
            nn.init.zeros_(linear.bias)


class CanaoBertModel(BertModel):
    config_class = CanaoBertConfig

    def __init__(self, config: CanaoBertConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        _resize_ffn(self, config)


class CanaoBertForSequenceClassification(BertForSequenceClassification):
    config_class = CanaoBertConfig

    def __init__(self, config: CanaoBertConfig):
        super().__init__(config)
        _resize_ffn(self.bert, config)


def arch_config(arch: ArchConfig, base: BertConfig) -> CanaoBertConfig:
    """``base`` (vocabulary, activation, labels, ...) with ``arch``'s sizes.

    Each layer's head slots are ``hidden / head_dim``; the heads ``arch`` does
    not keep are recorded in ``pruned_heads`` (the last ones, which is where
    importance reordering puts the least important).
    """
    arch.validate()
    fields = base.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    slots = arch.hidden_size // arch.head_dim
    fields.update(
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=slots,
        intermediate_size=max(arch.ffn),
        layer_intermediate_sizes=list(arch.ffn),
        pruned_heads={i: list(range(h, slots)) for i, h in enumerate(arch.heads) if h < slots},
    )
    return CanaoBertConfig(**fields)


AutoConfig.register("canao_bert", CanaoBertConfig, exist_ok=True)
AutoModel.register(CanaoBertConfig, CanaoBertModel, exist_ok=True)
AutoModelForSequenceClassification.register(
    CanaoBertConfig, CanaoBertForSequenceClassification, exist_ok=True
)
