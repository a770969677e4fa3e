from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.postgres import postgres_server  # noqa: F401 (a fixture, shared by the tests)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep tests from reading or writing the user's latency cache.

    The emulated arm64 root (~450 MB, built once) is shared on purpose: it is
    versioned and rebuilt when stale, and rebuilding it per test run would only
    cost time.
    """
    from canao.latency.arm_emulation import default_root

    monkeypatch.setenv("CANAO_ARM64_ROOT", str(default_root()))
    monkeypatch.setenv("CANAO_CACHE_DIR", str(tmp_path_factory.mktemp("canao-cache")))


def write_config(folder: Path, **fields: int) -> Path:
    """A small random-weight BERT as a BertConfig JSON file."""
    config = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1000,
        "max_position_embeddings": 128,
    }
    config.update(fields)
    path = folder / "tiny.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    return write_config(tmp_path)
