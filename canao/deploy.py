"""Use a shipped model: ``canao.load(DIR).predict(texts)`` runs the compiled library.

``DIR`` is what ``canao search`` exports as its winner: ``model/`` (the Hugging Face
checkpoint and its tokenizer, whose config names the labels) and ``compiled/`` (``model.so``
and ``manifest.json``). A ``canao compile`` artifact folder works too when its manifest's model
source is a folder with a tokenizer, or when it holds a ``model/`` folder of its own.

Inference runs the compiled library through TVM's runtime (never PyTorch), in this process or
on a board over TVM RPC. Texts are tokenised with the saved tokenizer, padded or truncated to
the compiled sequence length, and run in batches of the compiled batch size (the last batch
padded with empty rows that are dropped). Before anything runs, the library is checked
against the manifest: its SHA-256, the label count and the vocabulary of the tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from canao.compiler.build import (
    LIBRARY_NAME,
    MANIFEST_NAME,
    file_sha256,
    quiet_native_stderr,
    read_manifest,
)
from canao.compiler.importer import INPUT_NAMES
from canao.errors import ArtifactError, DeviceUnreachableError

Text = str | tuple[str, str]


@dataclass(frozen=True)
class Prediction:
    label: str
    label_id: int
    probabilities: dict[str, float]  # every label's probability, in label-id order
    text: Text


@dataclass(frozen=True)
class ArtifactPaths:
    compiled: Path  # folder with model.so and manifest.json
    tokenizer: Path  # folder with the tokenizer (and the checkpoint's config.json)


def locate(folder: str | Path) -> ArtifactPaths:
    """Where the compiled library and the tokenizer of ``folder`` are, or one clear error."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ArtifactError(f"model folder {root} not found")
    if (root / "compiled" / MANIFEST_NAME).is_file():
        compiled = root / "compiled"
    elif (root / MANIFEST_NAME).is_file():
        compiled = root
    else:
        raise ArtifactError(
            f"{root} holds no compiled model: expected compiled/{MANIFEST_NAME} (a search "
            f"winner) or {MANIFEST_NAME} (a canao compile output)"
        )
    manifest = read_manifest(compiled)
    source = Path(str(manifest.get("model", {}).get("source", "")))
    for candidate in (root / "model", compiled.parent / "model", source):
        if (candidate / "tokenizer.json").is_file() or (candidate / "vocab.txt").is_file():
            return ArtifactPaths(compiled, candidate)
    raise ArtifactError(
        f"{root}: no tokenizer beside the compiled model (looked in {root / 'model'} and the "
        f"manifest's model source {source}); save one with tokenizer.save_pretrained"
    )


class Predictor:
    """A compiled classifier, its tokenizer and label names; ``predict(texts)`` runs it."""

    def __init__(self, paths: ArtifactPaths, runner: Any, manifest: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        self.paths = paths
        self.manifest = manifest
        self._runner = runner
        self.tokenizer = AutoTokenizer.from_pretrained(str(paths.tokenizer), local_files_only=True)
        self.batch, self.seq = _compiled_shape(manifest)
        self.labels = _label_names(paths.tokenizer, manifest)
        _check_vocabulary(self.tokenizer, manifest, paths)

    @property
    def device(self) -> str:
        return str(self._runner.label)

    def logits(self, texts: Sequence[Text]) -> np.ndarray:
        """Raw outputs of the compiled library, one row per text."""
        rows = [_as_pair(text) for text in texts]
        if not rows:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        kinds = {len(row) for row in rows}
        if len(kinds) != 1:
            raise ValueError("mix of single texts and pairs: give one kind per call")
        outputs = []
        for start in range(0, len(rows), self.batch):
            chunk = rows[start : start + self.batch]
            outputs.append(self._run(chunk)[: len(chunk)])
        return np.concatenate(outputs, axis=0)

    def predict(self, texts: Sequence[Text] | Text) -> list[Prediction]:
        """Label names and probabilities; a pair ``(a, b)`` is one sentence-pair example."""
        if isinstance(texts, str) or (isinstance(texts, tuple) and _is_pair(texts)):
            texts = [texts]  # type: ignore[list-item]
        items = list(texts)  # type: ignore[arg-type]
        probabilities = softmax(self.logits(items))
        return [
            Prediction(
                label=self.labels[int(row.argmax())],
                label_id=int(row.argmax()),
                probabilities={name: float(p) for name, p in zip(self.labels, row, strict=True)},
                text=text,
            )
            for text, row in zip(items, probabilities, strict=True)
        ]

    def _run(self, rows: list[tuple[str, ...]]) -> np.ndarray:
        padded = rows + [tuple("" for _ in rows[0])] * (self.batch - len(rows))
        columns = [list(column) for column in zip(*padded, strict=True)]
        seq = self.seq or _longest(self.tokenizer, columns)
        encoded = self.tokenizer(
            *columns, truncation=True, max_length=seq, padding="max_length", return_tensors="np"
        )
        inputs = {name: np.asarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}
        return np.asarray(self._runner.run(inputs, INPUT_NAMES))

    def close(self) -> None:
        self._runner.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(
    folder: str | Path,
    rpc: str | Any | None = None,
    key: str | None = None,
    timeout_s: float = 60.0,
) -> Predictor:
    """Load a shipped model for inference: here, or on the board at ``rpc`` ("HOST:PORT")."""
    from canao.latency.rpc import RPCAddress, remote_runner
    from canao.latency.runner import local_runner

    paths = locate(folder)
    manifest = read_manifest(paths.compiled)
    library = paths.compiled / str(manifest.get("library", LIBRARY_NAME))
    _check_library(library, manifest)
    device_type = str(manifest["target"].get("device_type", "cpu"))
    if rpc is not None:
        address = rpc if isinstance(rpc, RPCAddress) else RPCAddress.parse(str(rpc), key)
        runner = remote_runner(library, address, device_type, timeout_s)
    else:
        _check_runs_here(manifest)
        # The VM logs a "Scope Loaded" warning from C++ on load; errors still raise.
        with quiet_native_stderr():
            runner = local_runner(library, device_type)
    return Predictor(paths, runner, manifest)


def read_texts(
    texts: Sequence[str],
    file: Path | None = None,
    pairs: bool = False,
    text_columns: tuple[str, ...] | None = None,
) -> list[Text]:
    """What ``canao predict`` classifies: its TEXT arguments, or a file's texts."""
    from canao.errors import CanaoError

    if file is not None and texts:
        raise CanaoError("give texts as arguments or with --file, not both")
    if file is not None:
        rows = _file_texts(file, text_columns)
    elif pairs:
        if len(texts) % 2:
            raise CanaoError(f"--pairs takes texts two by two; got {len(texts)} texts")
        rows = [(texts[i], texts[i + 1]) for i in range(0, len(texts), 2)]
    else:
        rows = list(texts)
    if not rows:
        raise CanaoError("no texts to classify: give TEXT arguments or --file")
    return rows


def _file_texts(path: Path, text_columns: tuple[str, ...] | None) -> list[Text]:
    from canao.nas.datafiles import (
        BUILDERS,
        DataColumns,
        TaskDataError,
        read_files,
        text_columns_by_name,
    )

    if not path.is_file():
        raise TaskDataError(f"text file {path} not found")
    if path.suffix.lower() not in BUILDERS:
        lines = [line.rstrip("\r\n") for line in path.open(encoding="utf-8")]
        return [tuple(line.split("\t")[:2]) if "\t" in line else line for line in lines if line]
    frame = read_files([path], DataColumns(text_columns))
    columns = text_columns or text_columns_by_name(frame.columns) or (str(frame.columns[0]),)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TaskDataError(f"{path}: no column {missing[0]!r}; has {list(frame.columns)}")
    if len(columns) == 1:
        return [str(v) for v in frame[columns[0]]]
    return [(str(a), str(b)) for a, b in zip(frame[columns[0]], frame[columns[1]], strict=True)]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


# --- checks ------------------------------------------------------------------------------------


def _check_library(library: Path, manifest: dict[str, Any]) -> None:
    expected = manifest.get("library_sha256")
    if expected is not None and file_sha256(library) != expected:
        raise ArtifactError(
            f"{library} is not the library its manifest describes (SHA-256 differs): "
            "rebuild it, or copy the folder again"
        )


def _check_runs_here(manifest: dict[str, Any]) -> None:
    import platform

    triple = str(manifest["target"].get("triple", ""))
    machine = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    if triple and not triple.startswith(machine):
        raise DeviceUnreachableError(
            f"this model is compiled for {triple}, not this {machine} machine: run it on the "
            "board with --rpc HOST:PORT (the board needs only the TVM runtime)"
        )


def _compiled_shape(manifest: dict[str, Any]) -> tuple[int, int | None]:
    shape = manifest["inputs"][0]["shape"]
    batch = int(shape[0])
    seq = int(shape[1]) if isinstance(shape[1], int) else None
    return batch, seq


def _label_names(tokenizer_dir: Path, manifest: dict[str, Any]) -> tuple[str, ...]:
    """The checkpoint's ``id2label``, checked against the compiled model's label count."""
    config_path = tokenizer_dir / "config.json"
    if manifest.get("num_labels") is None and "num_labels" in manifest:
        raise ArtifactError(
            f"the compiled model ({manifest['model'].get('class')}) has no classifier head: "
            "there are no labels to predict"
        )
    labels = int(manifest.get("num_labels") or 0)
    names: dict[int, str] = {}
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        names = {int(i): str(n) for i, n in (config.get("id2label") or {}).items()}
    if not labels:
        labels = len(names)
    if names and len(names) != labels:
        raise ArtifactError(
            f"{config_path} names {len(names)} labels but the compiled model has {labels}"
        )
    return tuple(names.get(i, f"LABEL_{i}") for i in range(labels))


def _check_vocabulary(tokenizer: Any, manifest: dict[str, Any], paths: ArtifactPaths) -> None:
    vocab = manifest.get("arch", {}).get("vocab")
    if vocab is not None and len(tokenizer) > int(vocab):
        raise ArtifactError(
            f"tokenizer in {paths.tokenizer} has {len(tokenizer)} tokens, more than the "
            f"compiled model's vocabulary of {vocab}: they do not belong together"
        )


def _as_pair(text: Text) -> tuple[str, ...]:
    if isinstance(text, str):
        return (text,)
    if isinstance(text, (tuple, list)) and 1 <= len(text) <= 2:
        return tuple(str(t) for t in text)
    raise ValueError(f"a text is a string or a pair of strings, got {text!r}")


def _is_pair(value: tuple[Any, ...]) -> bool:
    return len(value) == 2 and all(isinstance(v, str) for v in value)


def _longest(tokenizer: Any, columns: Iterable[list[str]]) -> int:
    encoded = tokenizer(*columns, truncation=True, max_length=tokenizer.model_max_length)
    return max(len(ids) for ids in encoded["input_ids"])
