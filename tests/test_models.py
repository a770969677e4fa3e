from __future__ import annotations

from pathlib import Path

import pytest
from transformers import BertForSequenceClassification, BertModel

from canao.compiler.models import PRESETS, load_model, minilm_path
from canao.errors import InvalidModelConfigError, ModelNotFoundError
from tests.conftest import write_config


def test_default_model_is_the_pretrained_minilm() -> None:
    loaded = load_model()
    assert loaded.source.startswith("pretrained:")
    assert loaded.arch()["layers"] == 6 and loaded.arch()["hidden"] == 384
    assert (minilm_path() / "config.json").is_file()


def test_bert_base_preset_has_exact_shapes() -> None:
    arch = load_model("bert-base").arch()
    assert (arch["layers"], arch["hidden"], arch["heads"], arch["ffn"]) == (12, 768, 12, 3072)
    assert arch["vocab"] == 30522
    assert set(PRESETS) >= {"bert-base", "bert-tiny"}


def test_fingerprint_is_stable_and_weight_sensitive(tiny_config: Path) -> None:
    first, second = load_model(tiny_config), load_model(tiny_config)
    assert first.fingerprint == second.fingerprint
    assert load_model(tiny_config, seed=1).fingerprint != first.fingerprint


def test_local_hf_folder_round_trip(tmp_path: Path, tiny_config: Path) -> None:
    original = load_model(tiny_config, head="classification", num_labels=3)
    original.module.save_pretrained(tmp_path / "ckpt")
    reloaded = load_model(tmp_path / "ckpt", head="classification", num_labels=3)
    assert isinstance(reloaded.module, BertForSequenceClassification)
    assert reloaded.fingerprint == original.fingerprint


def test_in_memory_module(tiny_config: Path) -> None:
    module = load_model(tiny_config).module
    loaded = load_model(module)
    assert isinstance(loaded.module, BertModel) and loaded.source == "module"


def test_missing_path_names_the_path_and_the_choices() -> None:
    with pytest.raises(ModelNotFoundError, match=r"'no/such/model' not found.*bert-base"):
        load_model("no/such/model")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        load_model(tmp_path)


def test_malformed_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidModelConfigError, match="not valid JSON"):
        load_model(bad)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hidden_size": 100, "num_attention_heads": 3}, "not divisible"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"intermediate_size": "big"}, "intermediate_size must be a positive integer"),
    ],
)
def test_impossible_architecture(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(InvalidModelConfigError, match=message):
        load_model(write_config(tmp_path, **fields))
