"""Import a PyTorch BERT into a Relax IRModule through ``torch.export``.

The exported function takes ``input_ids``, ``attention_mask`` and
``token_type_ids`` (int64, ``[batch, seq]``) and returns one float32 tensor:
the last hidden state of a ``BertModel``, or the logits of a
``BertForSequenceClassification``. Weights are embedded as constants, so the
compiled library is self-contained.

With ``seq_len=None`` the sequence length is symbolic. BERT slices its
``position_ids`` buffer by the input length, which TVM 0.27's LegalizeOps
cannot do for a symbolic length; the wrapper therefore builds position ids
with ``arange`` instead of slicing the buffer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class BertExportWrapper(nn.Module):
    """Positional-argument, single-tensor-output view of a HF BERT for ``torch.export``."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=positions,
        )
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


@dataclass(frozen=True)
class InputSpec:
    """Fixed batch; fixed sequence length, or None for a symbolic one."""

    batch: int = 1
    seq_len: int | None = 128

    def __post_init__(self) -> None:
        if self.batch < 1 or (self.seq_len is not None and self.seq_len < 1):
            raise ValueError(f"batch and seq_len must be positive, got {self}")

    def shapes(self) -> str:
        """Canonical text form, part of every cache key: ``input_ids=1x128,...``."""
        seq = "S" if self.seq_len is None else str(self.seq_len)
        return ",".join(f"{name}={self.batch}x{seq}" for name in INPUT_NAMES)


def example_inputs(
    vocab_size: int, batch: int, seq_len: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Deterministic int64 inputs; the mask pads the tail of the last row, as real batches do."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, seq_len), dtype=np.int64)
    mask = np.ones((batch, seq_len), dtype=np.int64)
    mask[-1, max(1, seq_len * 3 // 4) :] = 0  # exercise the attention mask
    types = np.zeros((batch, seq_len), dtype=np.int64)
    types[:, seq_len // 2 :] = 1  # a sentence-pair layout
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def torch_reference(model: PreTrainedModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """PyTorch's output for ``inputs``: the ground truth every build is checked against."""
    wrapper = BertExportWrapper(model).eval()
    with torch.no_grad():
        args = [torch.from_numpy(inputs[name]) for name in INPUT_NAMES]
        return wrapper(*args).numpy()


def import_bert(model: PreTrainedModel, spec: InputSpec) -> object:
    """``torch.export`` the model at ``spec``'s shapes and convert it to a Relax IRModule."""
    from tvm.relax.frontend.torch import from_exported_program

    wrapper = BertExportWrapper(model).eval()
    seq_len = spec.seq_len or 16  # trace shape for a symbolic length
    sample = example_inputs(model.config.vocab_size, spec.batch, seq_len)
    args = tuple(torch.from_numpy(sample[name]) for name in INPUT_NAMES)
    dynamic_shapes = None
    if spec.seq_len is None:
        seq = torch.export.Dim("seq", min=2, max=model.config.max_position_embeddings)
        dynamic_shapes = {name: {1: seq} for name in INPUT_NAMES}
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13 deprecation chatter from its own pytree internals, not ours.
        warnings.simplefilter("ignore", FutureWarning)
        exported = torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes)
        return from_exported_program(exported, unwrap_unit_return_tuple=True)
