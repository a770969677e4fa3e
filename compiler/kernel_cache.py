"""Compile each distinct kernel once per process and link candidates from the cache.

A search builds hundreds of architectures whose kernels repeat: a packed dense
kernel depends on (M, K, N, epilogue) only, an attention kernel on (heads, seq,
head dim), a layer norm on the hidden size. :class:`KernelCache` keys every
lowered PrimFunc by its structural hash (without its name, which is a counter
that differs between modules), generates code for a kernel the first time it is
seen (an LLVM module, kept loaded, and its object file) and from then on links
the candidate's VM executable against the cached modules. Exporting links the
cached object files instead of generating the code again.

The Relax side (the VM bytecode) is still generated per candidate: it is cheap
and holds the candidate's own weights. Kernels are renamed to
``<first name seen>__<hash>`` so two structurally equal kernels of one module
share one symbol and no two different kernels ever share a name.
"""

from __future__ import annotations

import functools
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from canao.compiler.tir_pipeline import TIR_PIPELINE
from canao.compiler.tir_pipeline import register as register_tir_pipeline


@dataclass
class _Kernel:
    name: str
    func: Any  # tvm.tirx.PrimFunc, without global_symbol (for the collision check)
    module: Any  # tvm.runtime.Module (llvm), compiled once
    object_file: Path


@dataclass
class KernelStats:
    """What one build took from the cache."""

    kernels: int  # distinct kernels the candidate links
    reused: int  # of those, compiled by an earlier build
    compiled: int  # generated now

    def summary(self) -> dict[str, int]:
        return {"kernels": self.kernels, "reused": self.reused, "compiled": self.compiled}


@dataclass
class KernelCache:
    """Compiled kernels of one target, by structural hash, for the life of this process."""

    target: str  # str(tvm Target): a cache never mixes code generated for two targets
    # nor code from two TIR pipelines (pipelines.codegen_pipeline): canao's by default
    tir_pipeline: str = TIR_PIPELINE
    _kernels: dict[int, list[_Kernel]] = field(default_factory=dict, repr=False)
    _folder: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._kernels.values())

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="canao-kernels-")
        return Path(self._folder.name)

    def kernel(self, func: Any, name_hint: str, target: Any) -> tuple[_Kernel, bool]:
        """The cached kernel structurally equal to ``func``; (kernel, True) when compiled now."""
        import tvm_ffi

        if str(target) != self.target:
            raise ValueError(f"kernel cache for {self.target!r} asked to build for {target}")
        bare = func.without_attr("global_symbol")
        digest = tvm_ffi.structural_hash(bare) & 0xFFFF_FFFF_FFFF_FFFF
        with self._lock:
            entries = self._kernels.setdefault(digest, [])
            for entry in entries:
                # A 64-bit hash can collide; equality decides.
                if tvm_ffi.structural_equal(entry.func, bare):
                    return entry, False
            # The suffix keeps names unique even for two colliding kernels.
            name = f"{_base_name(name_hint)}__{digest:016x}{len(entries) or ''}"
            entry = self._compile(bare, name, target)
            entries.append(entry)
            return entry, True

    def _compile(self, bare: Any, name: str, target: Any) -> _Kernel:
        import tvm

        func = bare.with_attr("global_symbol", name)
        if self.tir_pipeline == TIR_PIPELINE:
            register_tir_pipeline()
        module = tvm.tirx.build(
            tvm.IRModule({name: func}), target=target, pipeline=self.tir_pipeline
        )
        object_file = self.folder / f"{name}.o"
        module.write_to_file(str(object_file))
        return _Kernel(name, bare, module, object_file)


def _base_name(name: str) -> str:
    # A readable stem; the hash makes the name unique. Symbols stay short for the linker.
    return name[:48]


_CACHES: dict[tuple[str, str], KernelCache] = {}
_CACHES_LOCK = threading.Lock()


def process_kernel_cache(target: Any, tir_pipeline: str = TIR_PIPELINE) -> KernelCache:
    """The one cache of this process for ``target`` and ``tir_pipeline`` (every build of a
    search shares it)."""
    key = (str(target), tir_pipeline)
    with _CACHES_LOCK:
        if key not in _CACHES:
            _CACHES[key] = KernelCache(*key)
        return _CACHES[key]


@dataclass
class CachedBuild:
    """A VM executable linked from cached kernels, and the object files that export needs."""

    executable: Any  # tvm.relax.VMExecutable
    object_files: list[Path]
    llvm_target: str  # the kernels' LLVM target string, for packing the VM's bytecode
    stats: KernelStats


def build_from_cache(lowered: Any, target: Any, cache: KernelCache) -> CachedBuild:
    """``relax.build(lowered, target, relax_pipeline=None)``, with kernels from ``cache``."""
    import tvm
    from tvm import relax
    from tvm.relax import vm_build

    renamed, kernels, compiled_now = _link_kernels(lowered, target, cache)
    attrs = dict(renamed.attrs) if renamed.attrs else {}
    builder = relax.ExecBuilder()
    bytecode_only = vm_build._vmcodegen(builder, renamed, "bytecode")
    leftover = [g for g, f in bytecode_only.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    if len({k.name for k in kernels}) != len(leftover):
        raise RuntimeError("VM codegen left kernels the cache did not link")  # a bug, not input
    executable = vm_build._vmlink(
        builder,
        target,
        tir_mod=None,
        ext_libs=[*attrs.get("external_mods", []), *(k.module for k in kernels)],
        params=dict(attrs.get("const_name_to_constant", {})),
    )
    llvm_target = kernels[0].module.get_function("_get_target_string")() if kernels else ""
    stats = KernelStats(len(kernels), len(kernels) - compiled_now, compiled_now)
    return CachedBuild(executable, [k.object_file for k in kernels], llvm_target, stats)


def _link_kernels(lowered: Any, target: Any, cache: KernelCache) -> tuple[Any, list[_Kernel], int]:
    """``lowered`` with every PrimFunc renamed to its cached kernel; the kernels it uses."""
    import tvm
    from tvm import relax

    renames: dict[Any, Any] = {}
    kernels: dict[str, _Kernel] = {}
    compiled_now = 0
    for gvar, func in lowered.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        kernel, fresh = cache.kernel(func, gvar.name_hint, target)
        compiled_now += fresh
        if kernel.name not in kernels:
            kernels[kernel.name] = kernel
        renames[gvar] = kernel.name
    new_vars: dict[str, Any] = {}
    for old, name in renames.items():
        if name not in new_vars:
            new_vars[name] = tvm.ir.GlobalVar(name)
            # A callee's type (its PrimFunc signature) is what Relax normalisation checks.
            relax.expr._update_type(new_vars[name], old.ty)
    by_old = {old: new_vars[name] for old, name in renames.items()}
    functions: dict[Any, Any] = {}
    for gvar, func in lowered.functions.items():
        if isinstance(func, relax.Function):
            functions[gvar] = _rename_callees(func, by_old)
    for name, kernel in kernels.items():
        functions[new_vars[name]] = kernel.func.with_attr("global_symbol", name)
    module = tvm.IRModule(functions, attrs=lowered.attrs)
    return module, list(kernels.values()), compiled_now


@functools.cache
def _rename_callees_class() -> type:
    from tvm import relax

    @relax.expr_functor.mutator
    class RenameCallees(relax.PyExprMutator):
        """Point every reference to an old kernel GlobalVar at its cached kernel's."""

        def __init__(self, by_old: dict[Any, Any]) -> None:
            super().__init__()
            self.by_old = by_old

        def visit_global_var_(self, op: Any) -> Any:
            return self.by_old.get(op, op)

    return RenameCallees


def _rename_callees(func: Any, by_old: dict[Any, Any]) -> Any:
    return _rename_callees_class()(by_old).visit_expr(func)


def export_cached(build: CachedBuild, path: Path, fcompile: Any | None = None) -> Path:
    """Write the shared library: the cached kernels' objects plus the packed VM bytecode.

    What ``export_library`` does, except that it links the object files written when
    each kernel was first compiled instead of generating every kernel's code again.
    """
    from tvm.runtime import _ffi_api
    from tvm.support import cc

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="canao-link-") as workspace:
        packed = Path(workspace) / "devc.o"
        blob = _ffi_api.ModulePackImportsToLLVM(build.executable.mod, False, build.llvm_target, "")
        blob.write_to_file(str(packed))
        link = fcompile or cc.create_shared
        link(str(path), [*map(str, build.object_files), str(packed)])
    return path
