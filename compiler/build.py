"""Build an imported BERT for a target, export it, load it back.

One :class:`CompiledModel` per (model, input shapes, target, pipeline). The
exported artifact is a folder holding the deployable shared library
(``model.so``, weights inside) and ``manifest.json``: model, architecture,
target, pipeline, input shapes, kernel counts, numerics check and versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from canao.compiler.importer import INPUT_NAMES, InputSpec, import_bert
from canao.compiler.kernel_cache import CachedBuild, KernelCache, build_from_cache, export_cached
from canao.compiler.kernels import KernelReport, kernel_report
from canao.compiler.models import LoadedModel
from canao.compiler.pipelines import codegen_pipeline, get_pipeline, split_pipeline
from canao.compiler.segments import SegmentCache, compile_segments, stitchable
from canao.compiler.targets import TargetSpec, get_target
from canao.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
LIBRARY_NAME = "model.so"
MANIFEST_VERSION = 1


@dataclass
class CompiledModel:
    model: LoadedModel
    spec: InputSpec
    target: TargetSpec
    pipeline: str
    executable: Any  # tvm.relax.VMExecutable
    lowered: Any  # the IRModule after the pipeline, before VM codegen
    kernels: KernelReport
    build_seconds: float
    numerics: dict[str, float] | None = None  # filled by canao.compiler.verify
    # Linked from a search's kernel cache: export links its object files (None: built whole).
    cached: CachedBuild | None = None
    # Stitched from cached segments (compile_stitched): how many were lowered for this build.
    segments_lowered: int | None = None

    def artifact_hash(self) -> str:
        """What a latency cache key needs: same model, shapes, target, pipeline."""
        return self.model.fingerprint

    def int8_kernel(self) -> dict[str, Any] | None:
        """An int8 build's micro-kernel and activation bits (7 on AVX2's default kernel);
        None for float builds."""
        from canao.compiler.pipelines import INT8_PIPELINES
        from canao.compiler.quantized import int8_scheme

        if self.pipeline not in INT8_PIPELINES:
            return None
        scheme = int8_scheme(self.target.name, self.pipeline)
        return {"kernel": scheme.isa, "activation_bits": scheme.spec.levels.bit_length()}

    def manifest(self) -> dict[str, Any]:
        from canao.latency.environment import versions

        seq = self.spec.seq_len
        shape = [self.spec.batch, seq if seq is not None else "seq"]
        return {
            "format": MANIFEST_VERSION,
            "library": LIBRARY_NAME,
            "model": {
                "name": self.model.name,
                "source": self.model.source,
                "fingerprint": self.model.fingerprint,
                "class": type(self.model.module).__name__,
            },
            "arch": self.model.arch(),
            # Classifier width (None for an encoder without a head): what a loader must match.
            "num_labels": (
                int(self.model.config.num_labels)
                if type(self.model.module).__name__.endswith("ForSequenceClassification")
                else None
            ),
            "target": {
                "name": self.target.name,
                "tvm": str(self.target.tvm_target()),
                "triple": self.target.triple,
                "device_type": self.target.device_type,
            },
            "pipeline": self.pipeline,
            "int8": self.int8_kernel(),
            "inputs": [{"name": n, "shape": shape, "dtype": "int64"} for n in INPUT_NAMES],
            "kernels": self.kernels.summary(),
            "numerics": self.numerics,
            "build_seconds": round(self.build_seconds, 3),
            "versions": versions(),
        }


@contextmanager
def quiet_native_stderr():
    """Silence TVM's C++ log spam (one warning per function on export) for a block.

    The C++ runtime writes to file descriptor 2 directly, so Python-level
    redirection does not reach it.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def compile_model(
    model: LoadedModel,
    target: str | TargetSpec = "x86",
    pipeline: str = "default",
    spec: InputSpec | None = None,
    kernel_cache: KernelCache | None = None,
) -> CompiledModel:
    """Import ``model`` at ``spec``'s shapes, lower with ``pipeline``, generate code.

    With ``kernel_cache`` (CPU targets), a kernel compiled by an earlier build is linked
    instead of generated again (:mod:`canao.compiler.kernel_cache`); the output is
    the same, bit for bit.
    """

    target_spec = get_target(target) if isinstance(target, str) else target
    spec = spec or InputSpec()
    tvm_target = target_spec.tvm_target()
    pipeline_pass = get_pipeline(pipeline, tvm_target)  # fail fast on a bad name
    start = time.perf_counter()
    imported = import_bert(model.module, spec)
    # LegalizeOps logs a harmless "Fast mode segfaults" warning per embedding
    # lookup from C++; errors still surface as Python exceptions.
    with quiet_native_stderr(), tvm_target:  # type: ignore[attr-defined]
        lowered = pipeline_pass(imported)  # type: ignore[operator]
    executable, cached = _generate_code(lowered, target_spec, pipeline, kernel_cache)
    return CompiledModel(
        model=model,
        spec=spec,
        target=target_spec,
        pipeline=pipeline,
        executable=executable,
        lowered=lowered,
        kernels=kernel_report(lowered),
        build_seconds=time.perf_counter() - start,
        cached=cached,
    )


def _generate_code(
    lowered: Any, target: TargetSpec, pipeline: str, kernel_cache: KernelCache | None
) -> tuple[Any, CachedBuild | None]:
    """The VM executable of a lowered module: linked from ``kernel_cache`` (CPU), or whole."""
    from tvm import relax

    tvm_target = target.tvm_target()
    tir_pipeline = codegen_pipeline(pipeline, target.device_type)
    with quiet_native_stderr(), tvm_target:  # type: ignore[attr-defined]
        if kernel_cache is not None and target.device_type == "cpu":
            if kernel_cache.tir_pipeline != tir_pipeline:
                raise ValueError(  # a caller's bug: its kernels would differ from a whole build
                    f"this kernel cache generates code with TIR pipeline "
                    f"{kernel_cache.tir_pipeline!r}; pipeline {pipeline!r} needs {tir_pipeline!r}"
                )
            cached = build_from_cache(lowered, tvm_target, kernel_cache)
            return cached.executable, cached
        executable = relax.build(
            lowered, tvm_target, relax_pipeline=None, tir_pipeline=tir_pipeline
        )
        return executable, None


def can_stitch(model: LoadedModel, target: TargetSpec, pipeline: str, spec: InputSpec) -> bool:
    """Whether :func:`compile_stitched` builds this (a canao CPU pipeline, a BERT classifier)."""
    return (
        target.device_type == "cpu"
        and split_pipeline(pipeline, target.tvm_target()) is not None
        and stitchable(model.module, spec)
    )


def compile_stitched(
    model: LoadedModel,
    segment_keys: list[str],
    segments: SegmentCache,
    target: str | TargetSpec = "x86",
    pipeline: str = "fast",
    spec: InputSpec | None = None,
    kernel_cache: KernelCache | None = None,
) -> CompiledModel:
    """:func:`compile_model`, from segments lowered once and cached (:mod:`.segments`).

    ``segment_keys`` name the embeddings, each layer and the head; equal keys must mean
    equal modules with equal weights (a search's seeded latency workloads do).
    """
    target_spec = get_target(target) if isinstance(target, str) else target
    spec = spec or InputSpec()
    tvm_target = target_spec.tvm_target()
    if not can_stitch(model, target_spec, pipeline, spec):
        raise ValueError(f"{model.name} cannot be stitched for {target_spec.name}/{pipeline}")
    segments.check(tvm_target, pipeline, spec)
    before_lower, lower = split_pipeline(pipeline, tvm_target)  # type: ignore[misc]
    start = time.perf_counter()
    with quiet_native_stderr(), tvm_target:  # type: ignore[attr-defined]
        stitched, fresh = compile_segments(model.module, segment_keys, segments, before_lower, spec)
        lowered = lower(stitched)  # type: ignore[operator]
    executable, cached = _generate_code(lowered, target_spec, pipeline, kernel_cache)
    return CompiledModel(
        model=model,
        spec=spec,
        target=target_spec,
        pipeline=pipeline,
        executable=executable,
        lowered=lowered,
        kernels=kernel_report(lowered),
        build_seconds=time.perf_counter() - start,
        cached=cached,
        segments_lowered=fresh,
    )


def export_library(compiled: CompiledModel, path: Path) -> Path:
    """Write the deployable shared library (linked for the target's machine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_native_stderr():
        if compiled.cached is not None:
            return export_cached(compiled.cached, path, compiled.target.linker())
        compiled.executable.export_library(str(path), fcompile=compiled.target.linker())
    return path


def export_artifact(compiled: CompiledModel, out_dir: str | Path) -> Path:
    """Write ``model.so`` and ``manifest.json`` into ``out_dir``; return the folder."""
    folder = Path(out_dir)
    library = export_library(compiled, folder / LIBRARY_NAME)
    # The library's digest, so a loader can tell the .so is the one this manifest describes.
    fields = {**compiled.manifest(), "library_sha256": file_sha256(library)}
    manifest = json.dumps(fields, indent=2, sort_keys=True)
    (folder / MANIFEST_NAME).write_text(manifest + "\n", encoding="utf-8")
    return folder


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an exported artifact, with a clear error if the folder is not one."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactError(f"{folder} is not a canao artifact: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{manifest_path}: malformed JSON ({err.msg})") from None
    missing = {"library", "target", "inputs", "pipeline"} - set(manifest)
    if missing:
        raise ArtifactError(f"{manifest_path}: missing fields {sorted(missing)}")
    if not (folder / manifest["library"]).is_file():
        raise ArtifactError(f"{folder}: library {manifest['library']} is missing")
    return manifest
