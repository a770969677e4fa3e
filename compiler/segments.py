"""Build a BERT by stitching separately lowered segments: embeddings, each layer, the head.

A search builds hundreds of architectures that are made of the same few layers:
a layer's code depends only on (hidden size, heads, FFN size) and the input
shapes. :mod:`canao.compiler.kernel_cache` already compiles each kernel once,
but every candidate still paid the ``torch.export`` import and canao's graph
passes over the whole model (2-5 s by depth). Here each segment is imported and
lowered once, up to the last stage before VM lowering, and cached by a key the
caller gives (equal key: same module, same weights). A candidate's module is its
segments' Relax functions called in order from a small ``main`` and inlined into
it, plus the union of their kernels; only the last, cheap ``lower`` stage (memory
planning, VM shape lowering) runs on it.

Every pass before ``lower`` works inside one layer (the Q/K/V merge, the
attention kernel, the residual + layer-norm kernel, the packed dense epilogues),
so a stitched build launches the same kernels and VM builtins as a whole build of
the same model; a test checks that, and every stitched build is checked against
PyTorch like any other.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs

_SEGMENT_PREFIX = "canao_segment"


class EmbeddingSegment(nn.Module):
    """Input ids -> (embedding output, the additive attention mask every layer takes)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.bert.embeddings(
            input_ids=input_ids, position_ids=positions, token_type_ids=token_type_ids
        )
        return hidden, extended_mask(self.bert, attention_mask, hidden)


def extended_mask(bert: Any, attention_mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The mask ``BertModel.forward`` hands its layers (both of its branches)."""
    from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask_for_sdpa

    sdpa = bert.attn_implementation == "sdpa" and bert.position_embedding_type == "absolute"
    if sdpa:
        return _prepare_4d_attention_mask_for_sdpa(
            attention_mask, hidden.dtype, tgt_len=hidden.shape[1]
        )
    return bert.get_extended_attention_mask(attention_mask, tuple(attention_mask.shape))


class LayerSegment(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.layer(hidden, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out


class HeadSegment(nn.Module):
    """Last hidden state -> logits (pooler, then classifier; dropout is off in eval)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.pooler = model.bert.pooler
        self.classifier = model.classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(hidden))


def stitchable(model: PreTrainedModel, spec: InputSpec) -> bool:
    """Whether :func:`compile_stitched` can build ``model`` (a BERT classifier, fixed shapes)."""
    bert = getattr(model, "bert", None)
    return (
        spec.seq_len is not None
        and bert is not None
        and getattr(bert, "pooler", None) is not None
        and hasattr(model, "classifier")
        and not model.config.is_decoder
    )


def segment_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The export wrappers, in call order: embeddings, each layer, the head."""
    layers = [LayerSegment(layer) for layer in model.bert.encoder.layer]
    return [EmbeddingSegment(model.bert), *layers, HeadSegment(model)]


@dataclass
class _Lowered:
    """One segment after every pipeline stage but ``lower``: a Relax function and its kernels."""

    function: Any  # relax.Function, private (no global_symbol)
    kernels: dict[str, tuple[Any, Any]]  # canonical name -> (its GlobalVar, the PrimFunc)


@dataclass
class SegmentCache:
    """Lowered segments of one (target, pipeline, input shapes), for the life of a process."""

    target: str
    pipeline: str
    shapes: str
    # Each holds its weights as constants (7 MB for a MiniLM layer, 28 MB for BERT-base's):
    # the least recently used go first.
    max_segments: int = 160
    _segments: OrderedDict[str, _Lowered] = field(default_factory=OrderedDict, repr=False)
    # Structural hash -> [(PrimFunc, canonical name)]: equal kernels of different segments
    # get one name, so the stitched module holds each kernel once.
    _names: dict[int, list[tuple[Any, str]]] = field(default_factory=dict, repr=False)
    _gvars: dict[str, Any] = field(default_factory=dict, repr=False)  # one GlobalVar per name
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __len__(self) -> int:
        return len(self._segments)

    def __contains__(self, key: str) -> bool:
        return key in self._segments

    def check(self, target: Any, pipeline: str, spec: InputSpec) -> None:
        asked = (str(target), pipeline, spec.shapes())
        if asked != (self.target, self.pipeline, self.shapes):
            raise ValueError(f"segment cache for {self} asked to build {asked}")

    def segment(
        self,
        key: str,
        module: nn.Module,
        sample: Callable[[], tuple[torch.Tensor, ...]],
        stages: Any,
    ) -> tuple[_Lowered, bool]:
        """The lowered segment for ``key``; ``module`` is traced on ``sample()`` the first time."""
        with self._lock:
            if key in self._segments:
                self._segments.move_to_end(key)
                return self._segments[key], False
        lowered = _lower_segment(module, sample(), stages)
        with self._lock:
            entry = self._segments.setdefault(key, self._canonical(lowered))
            while len(self._segments) > self.max_segments:
                self._segments.popitem(last=False)  # an evicted segment is lowered again if needed
            return entry, True

    def _canonical(self, module: Any) -> _Lowered:
        """The segment's Relax function, its kernels renamed ``<name>__<structural hash>``."""
        import tvm
        import tvm_ffi
        from tvm import relax

        renames: dict[Any, Any] = {}
        kernels: dict[str, Any] = {}
        for gvar, func in module.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            bare = func.without_attr("global_symbol")
            digest = tvm_ffi.structural_hash(bare) & 0xFFFF_FFFF_FFFF_FFFF
            entries = self._names.setdefault(digest, [])
            name = next((n for f, n in entries if tvm_ffi.structural_equal(f, bare)), None)
            if name is None:
                name = f"{gvar.name_hint[:48]}__{digest:016x}{len(entries) or ''}"
                entries.append((bare, name))
            if name not in self._gvars:
                self._gvars[name] = _global_var(name, gvar)
            renames[gvar] = self._gvars[name]
            kernels[name] = (self._gvars[name], bare.with_attr("global_symbol", name))
        main = module["main"].without_attr("global_symbol")
        function = _rename_callees(main, renames)
        assert isinstance(function, relax.Function)
        return _Lowered(function, kernels)


def _global_var(name: str, like: Any) -> Any:
    import tvm
    from tvm import relax

    gvar = tvm.ir.GlobalVar(name)
    relax.expr._update_type(gvar, like.ty)  # the PrimFunc signature Relax normalisation checks
    return gvar


def _rename_callees(func: Any, by_old: dict[Any, Any]) -> Any:
    from canao.compiler.kernel_cache import _rename_callees as rename

    return rename(func, by_old)


def _lower_segment(module: nn.Module, sample: tuple[torch.Tensor, ...], stages: Any) -> Any:
    from tvm.relax.frontend.torch import from_exported_program

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree chatter
        exported = torch.export.export(module.eval(), sample)
        imported = from_exported_program(exported, unwrap_unit_return_tuple=True)
    return stages(imported)


def segment_samples(model: PreTrainedModel, spec: InputSpec) -> list[tuple[torch.Tensor, ...]]:
    """Trace inputs of each segment: the real intermediate tensors of one forward pass."""
    assert spec.seq_len is not None
    sample = example_inputs(model.config.vocab_size, spec.batch, spec.seq_len)
    args = tuple(torch.from_numpy(sample[name]) for name in INPUT_NAMES)
    segments = segment_modules(model)
    samples: list[tuple[torch.Tensor, ...]] = [args]
    with torch.no_grad():
        hidden, mask = segments[0].eval()(*args)
        for layer in segments[1:-1]:
            samples.append((hidden, mask))
            hidden = layer.eval()(hidden, mask)
        samples.append((hidden,))
    return samples


def stitch(lowered: list[_Lowered], spec: InputSpec) -> Any:
    """One IRModule: the segments' functions, their kernels, and ``main`` calling them in order."""
    import tvm
    from tvm import relax

    assert spec.seq_len is not None
    functions: dict[Any, Any] = {}
    for segment in lowered:
        functions.update(segment.kernels.values())
    calls = []
    for index, segment in enumerate(lowered):
        gvar = _global_var(f"{_SEGMENT_PREFIX}{index}", segment.function)
        functions[gvar] = segment.function
        calls.append(gvar)
    builder = relax.BlockBuilder(tvm.IRModule(functions))
    shape = (spec.batch, spec.seq_len)
    params = [relax.Var(name, relax.TensorType(shape, "int64")) for name in INPUT_NAMES]
    with builder.function("main", params):
        embedded = builder.emit(relax.Call(calls[0], params))
        hidden = builder.emit(relax.TupleGetItem(embedded, 0))
        mask = builder.emit(relax.TupleGetItem(embedded, 1))
        for layer in calls[1:-1]:
            hidden = builder.emit(relax.Call(layer, [hidden, mask]))
        builder.emit_func_output(builder.emit(relax.Call(calls[-1], [hidden])))
    # Inlined, main is one graph again: memory planning can reuse one layer's buffers in
    # the next, as in a whole build (separate functions each held their own, ~2% slower).
    return relax.transform.InlinePrivateFunctions()(builder.get())


def compile_segments(
    model: PreTrainedModel,
    keys: list[str],
    cache: SegmentCache,
    stages: Any,
    spec: InputSpec,
) -> tuple[Any, int]:
    """The stitched, not yet lowered module of ``model``; and how many segments were new.

    ``keys[i]`` names segment i (embeddings, each layer, head): equal keys must mean
    equal modules with equal weights, which is the caller's promise.
    """
    segments = segment_modules(model)
    if len(keys) != len(segments):
        raise ValueError(f"{len(keys)} segment keys for {len(segments)} segments")
    # Trace inputs (one PyTorch forward) are only computed when some segment is new.
    samples = functools.cache(lambda: segment_samples(model, spec))
    lowered, fresh = [], 0
    for index, (key, module) in enumerate(zip(keys, segments, strict=True)):
        entry, new = cache.segment(key, module, lambda i=index: samples()[i], stages)
        lowered.append(entry)
        fresh += new
    return stitch(lowered, spec), fresh
