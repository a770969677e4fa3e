"""Count what one inference launches, read off the lowered Relax module.

- ``primfuncs``: distinct TIR kernels in the module (code size).
- ``kernel_launches``: calls of those kernels from ``main``. BERT's graph has
  no control flow, so each call site runs exactly once per inference.
- ``vm_builtins``: runtime helper calls (``vm.builtin.*`` packed calls and
  ``relax.vm.*`` ops such as storage/tensor allocation): interpreter work
  between kernels that fusion also removes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelReport:
    primfuncs: int
    kernel_launches: int
    vm_builtins: int
    launches_by_kernel: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        return {
            "primfuncs": self.primfuncs,
            "kernel_launches": self.kernel_launches,
            "vm_builtins": self.vm_builtins,
        }


def kernel_report(lowered: object, entry: str = "main") -> KernelReport:
    """Kernel counts of a module produced by a pipeline in :mod:`canao.compiler.pipelines`."""
    import tvm
    from tvm import relax

    primfunc_names = {
        gvar.name_hint
        for gvar, func in lowered.functions.items()  # type: ignore[attr-defined]
        if isinstance(func, tvm.tirx.PrimFunc)
    }
    launches: Counter[str] = Counter()
    builtins = 0

    def visit(node: object) -> None:
        nonlocal builtins
        if not isinstance(node, relax.Call):
            return
        op = node.op
        if isinstance(op, tvm.ir.GlobalVar) and op.name_hint in primfunc_names:
            launches[op.name_hint] += 1
        elif isinstance(op, relax.ExternFunc) or (
            isinstance(op, tvm.ir.Op) and op.name.startswith("relax.vm.")
        ):
            builtins += 1
        elif isinstance(op, tvm.ir.Op) and op.name == "relax.call_tir":
            # Not yet lowered (a module straight after FuseTIR): the callee is args[0].
            launches[node.args[0].name_hint] += 1

    relax.analysis.post_order_visit(lowered[entry].body, visit)  # type: ignore[index]
    return KernelReport(
        primfuncs=len(primfunc_names),
        kernel_launches=sum(launches.values()),
        vm_builtins=builtins,
        launches_by_kernel=dict(launches),
    )
