from __future__ import annotations

import random

import pytest
from transformers import BertConfig

from canao.nas.space import ArchConfig, InvalidArchitectureError, SearchSpace

MINILM = BertConfig(
    hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6
)


@pytest.fixture
def space() -> SearchSpace:
    return SearchSpace.from_teacher(MINILM)


def test_choices_follow_the_teacher(space: SearchSpace) -> None:
    assert space.head_dim == 32
    assert space.layer_choices == (1, 2, 3, 4, 5, 6)
    assert space.hidden_choices == (192, 256, 288, 320, 384)
    assert all(h % 32 == 0 for h in space.hidden_choices)
    assert space.head_choices == (3, 6, 9, 12)
    assert space.ffn_choices == (384, 768, 1152, 1536)
    assert space.largest().key == "L6-H384-d32-a12.12.12.12.12.12-f1536.1536.1536.1536.1536.1536"
    assert space.smallest().key == "L1-H192-d32-a3-f384"


def test_samples_are_valid_and_round_trip(space: SearchSpace) -> None:
    rng = random.Random(0)
    for _ in range(300):
        arch = space.sample(rng)
        space.contains(arch)  # raises if not
        assert all(h * arch.head_dim <= arch.hidden_size for h in arch.heads)
        assert ArchConfig.from_key(arch.key) == arch
        assert space.decode(space.encode(arch)) == arch


def test_decode_clips_heads_to_the_hidden_size(space: SearchSpace) -> None:
    params = space.encode(space.largest())
    params.update(hidden=192, layers=2)  # 192 / 32 = 6 head slots
    arch = space.decode(params)
    assert arch.heads == (6, 6)
    assert arch.num_layers == 2 and arch.ffn == (1536, 1536)


def test_dimensions_are_fixed_length(space: SearchSpace) -> None:
    dims = space.dimensions()
    assert list(dims)[:2] == ["layers", "hidden"]
    assert len(dims) == 2 + 2 * space.max_layers


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        (ArchConfig(100, (2,), (64,), 32), "not a multiple of head dim"),
        (ArchConfig(64, (3,), (64,), 32), "3 heads"),
        (ArchConfig(64, (1, 1), (64,), 32), "2 head counts but 1 FFN sizes"),
        (ArchConfig(64, (), (), 32), "at least one layer"),
        (ArchConfig(64, (1,), (0,), 32), "FFN size 0"),
    ],
)
def test_impossible_architectures_are_named(arch: ArchConfig, message: str) -> None:
    with pytest.raises(InvalidArchitectureError, match="impossible architecture") as err:
        arch.validate()
    assert message in str(err.value)


def test_outside_the_space(space: SearchSpace) -> None:
    with pytest.raises(InvalidArchitectureError, match=r"outside the search space.*7 layers"):
        space.contains(ArchConfig(384, (12,) * 7, (1536,) * 7, 32))
    with pytest.raises(InvalidArchitectureError, match="FFN 1000"):
        space.contains(ArchConfig(384, (12,), (1000,), 32))


@pytest.mark.parametrize("key", ["L2-H64", "nonsense", "L3-H64-d32-a1.1-f64.64"])
def test_malformed_keys(key: str) -> None:
    with pytest.raises(InvalidArchitectureError):
        ArchConfig.from_key(key)


def test_uniform_shrinking(space: SearchSpace) -> None:
    half = space.uniform(6, 0.5)
    assert half.hidden_size == 192 and set(half.heads) == {6} and set(half.ffn) == {768}
    assert space.uniform(3, 1.0) == ArchConfig(384, (12,) * 3, (1536,) * 3, 32, (0, 2, 4))


def test_encoder_params_of_minilm(space: SearchSpace) -> None:
    # MiniLM-L6's encoder: 6 x (4 * 384^2 + 2 * 384 * 1536 + biases and norms) = 10.6M
    # (the other 11.7M of its 22.7M weights are embeddings).
    per_layer = 4 * 384 * 384 + 4 * 384 + 2 * 384 * 1536 + 1536 + 384 + 4 * 384
    assert space.largest().encoder_params() == 6 * per_layer == 10_646_784


def test_depth_is_by_layer_choice_evenly_spaced(space: SearchSpace) -> None:
    from canao.nas.space import spaced_layers

    assert spaced_layers(3, 6) == (0, 2, 4) and spaced_layers(6, 12) == (0, 2, 4, 6, 8, 10)
    assert spaced_layers(1, 6) == (0,) and spaced_layers(6, 6) == tuple(range(6))
    small = space.smallest()
    assert small.kept_layers == (0,) and space.largest().layer_ids is None
    four = space.decode({**space.encode(space.largest()), "layers": 4})
    assert four.kept_layers == (0, 1, 3, 4) and four.key.endswith("-l0.1.3.4")
    assert ArchConfig.from_key(four.key) == four and four.shape_key == four.key[: -len("-l0.1.3.4")]
    assert ArchConfig(64, (2, 2), (8, 8), 32, (0, 1)).layer_ids is None  # first L: one spelling
    first = SearchSpace(**{**space.__dict__, "depth_rule": "first"})
    assert first.smallest().kept_layers == (0,) and first.uniform(3, 1.0).layer_ids is None
    with pytest.raises(InvalidArchitectureError, match="increasing"):
        ArchConfig(64, (2, 2), (8, 8), 32, (3, 1)).validate()
    with pytest.raises(InvalidArchitectureError, match="beyond 6 layers"):
        space.contains(ArchConfig(384, (12,) * 2, (1536,) * 2, 32, (0, 7)))
    with pytest.raises(InvalidArchitectureError, match="unknown depth rule"):
        SearchSpace(**{**space.__dict__, "depth_rule": "random"})
