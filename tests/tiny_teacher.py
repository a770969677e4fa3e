"""A tiny random BERT classifier with MiniLM's vocabulary (so MiniLM's tokenizer fits it)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

TINY = BertConfig(
    hidden_size=64,
    num_attention_heads=4,
    intermediate_size=128,
    num_hidden_layers=3,
    vocab_size=30522,
    max_position_embeddings=64,
)


def tiny_teacher(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(TINY).eval()
