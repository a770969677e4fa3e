"""Training batches grouped by length: same rows per epoch, far less padding, keyed caches."""

from __future__ import annotations

import numpy as np
import pytest

from canao.compiler.models import minilm_path
from canao.nas.distill import SupernetConfig, batches
from canao.nas.finetune import FinetuneConfig, epoch_batches, token_lengths
from canao.nas.retrain import RetrainConfig
from canao.nas.tasks import Split


def padded_tokens(cut: list[np.ndarray], lengths: np.ndarray) -> int:
    """What the model computes: every batch pads to its longest row."""
    return int(sum(lengths[rows].max() * len(rows) for rows in cut))


def skewed_lengths(count: int, seed: int = 0) -> np.ndarray:
    """Mostly short sentences and a tail of long ones, as SST-2's training phrases."""
    return np.minimum(np.random.default_rng(seed).geometric(1 / 14, count) + 2, 64)


def test_ungrouped_epoch_is_the_permutation_cut_in_order() -> None:
    # The recipe caches made before grouping existed were trained with: unchanged.
    count, size = 103, 16
    order = np.random.default_rng(5).permutation(count)
    cut = epoch_batches(count, size, np.random.default_rng(5))
    assert [list(rows) for rows in cut] == [
        list(order[s : s + size]) for s in range(0, count, size)
    ]
    dropped = epoch_batches(count, size, np.random.default_rng(5), drop_last=True)
    assert [list(rows) for rows in dropped] == [
        list(order[s : s + size]) for s in range(0, count - size + 1, size)
    ]


@pytest.mark.parametrize("drop_last", [False, True])
def test_grouped_epoch_sees_every_row_once_and_pads_far_less(drop_last: bool) -> None:
    count, size = 4000, 32
    lengths = skewed_lengths(count)
    grouped = epoch_batches(count, size, np.random.default_rng(1), lengths, drop_last)
    rows = np.concatenate(grouped)
    expected = count - count % size if drop_last else count
    assert len(rows) == expected and len(set(rows.tolist())) == expected
    if drop_last:
        assert all(len(batch) == size for batch in grouped)
    plain = epoch_batches(count, size, np.random.default_rng(1), None, drop_last)
    assert padded_tokens(grouped, lengths) < 0.6 * padded_tokens(plain, lengths)
    assert padded_tokens(grouped, lengths) < 1.1 * lengths[rows].sum()
    # Batches are shuffled, not served shortest first: the epoch's first quarter holds
    # long and short batches alike.
    firsts = [lengths[batch].max() for batch in grouped[: len(grouped) // 4]]
    assert max(firsts) > 2 * min(firsts)


def test_grouped_training_batches_are_shorter_with_the_same_rows() -> None:
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(minilm_path()), local_files_only=True)
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "slow", "the", "a", "fine"]
    texts = tuple((" ".join(rng.choice(words, size=int(n))),) for n in skewed_lengths(256))
    split = Split(texts=texts, labels=tuple(int(i % 2) for i in range(len(texts))))
    lengths = token_lengths(tokenizer, split.texts, 64)
    assert lengths.max() <= 64 and lengths.min() >= 3  # [CLS] word [SEP] at least

    def epoch(group: bool) -> list[tuple[int, int]]:
        stream = batches(tokenizer, split, 16, 64, np.random.default_rng(3), group)
        return [
            (int(inputs["input_ids"].numel()), int(inputs["attention_mask"].sum()))
            for inputs, _ in (next(stream) for _ in range(len(texts) // 16))
        ]

    grouped, plain = epoch(True), epoch(False)
    # The same tokens are seen (one whole epoch each), with far less padding.
    assert sum(real for _, real in grouped) == sum(real for _, real in plain)
    assert sum(total for total, _ in grouped) < 0.7 * sum(total for total, _ in plain)


def test_grouping_is_part_of_every_cache_key_but_ungrouped_keys_stay_as_before() -> None:
    for config, off in [
        (FinetuneConfig(), FinetuneConfig(group_by_length=False)),
        (SupernetConfig(), SupernetConfig(group_by_length=False)),
    ]:
        assert config.cache_fields()["group_by_length"] is True
        assert "group_by_length" not in off.cache_fields()
    assert RetrainConfig().group_by_length
