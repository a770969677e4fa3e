"""A tiny random BERT classifier with MiniLM's vocabulary (so MiniLM's tokenizer fits it)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from canao.nas.distill import SuperNet
from canao.nas.tasks import Split

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


def toy_supernet(folder: Path, examples: int = 32) -> tuple[SuperNet, Split]:
    """A 2-layer random classifier teacher saved under ``folder/teacher`` (MiniLM's tokenizer,
    labels bad/good), its one-step super-network, and the toy training split it saw."""
    from canao.compiler.models import minilm_path
    from canao.nas.distill import SupernetConfig, train_supernet
    from tests.test_deploy import classifier_config

    tokenizer = BertTokenizerFast.from_pretrained(str(minilm_path()), local_files_only=True)
    config = classifier_config(tokenizer, ("bad", "good"), hidden=64, layers=2, heads=4)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder / "teacher")
    tokenizer.save_pretrained(folder / "teacher")
    texts = tuple((f"a {'good' if i % 2 else 'bad'} film number {i}",) for i in range(examples))
    train = Split(texts, tuple(i % 2 for i in range(examples)), ("bad", "good"))
    config_ = SupernetConfig(steps=1, batch_size=8, importance_batches=1)
    return train_supernet(folder / "teacher", train, "toy", config=config_), train
