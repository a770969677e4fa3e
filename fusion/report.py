"""The fusion report: the dataflow graph after each pass, as networkx graphs.

For one model and one of canao's CPU pipelines, every stage's module is read
into a :class:`networkx.DiGraph` (one node per operator or kernel call, one
edge per tensor passed between them) and summarised:

- ``operators``: calls in the graph (Relax operators and kernels);
- ``kernel_calls``: calls of TIR kernels (after TVM's FuseOps: the kernels
  launched per inference, plus views such as reshape remain operators);
- ``intermediate_bytes``: bytes of every tensor a node writes that is not the
  model's output, i.e. what goes to memory between operators/kernels;
- ``edges``: tensors passed between nodes.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
import pandas as pd

# After TVM's FuseOps the graph is kernels; later stages only schedule and lower them.
_LAST_GRAPH_STAGE = "tvm_fuse_ops"


def _tensor_bytes(ty: Any) -> int:
    try:
        return int(np.prod([int(d) for d in ty.shape.values])) * (
            np.dtype(str(ty.dtype)).itemsize if str(ty.dtype) != "bool" else 1
        )
    except (TypeError, AttributeError, ValueError):
        return 0  # symbolic shape, tuple, or non-tensor


def _callee(call: Any) -> str:
    import tvm
    from tvm import relax

    if isinstance(call.op, tvm.ir.Op):
        if call.op.name == "relax.call_tir":
            return call.args[0].name_hint
        return call.op.name.removeprefix("relax.")
    if isinstance(call.op, relax.ExternFunc):
        return str(call.op.global_symbol)
    return getattr(call.op, "name_hint", str(call.op))


def dataflow_graph(mod: Any, entry: str = "main") -> nx.DiGraph:
    """One node per call binding of ``entry`` (attrs: ``op``, ``bytes``), edges by data."""
    from tvm import relax

    func = mod[entry]
    graph = nx.DiGraph()
    producer: dict[Any, str] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Var) and value in producer:
                producer[binding.var] = producer[value]  # an alias, e.g. the output binding
                continue
            if not isinstance(value, relax.Call):
                continue
            # Rewrites reuse names (lv, lv1, ...): number the nodes to keep them apart.
            node = f"{binding.var.name}#{graph.number_of_nodes()}"  # .name: name_hint < 0.27
            is_kernel = getattr(value.op, "name", "") == "relax.call_tir"
            graph.add_node(
                node, op=_callee(value), kernel=is_kernel, bytes=_tensor_bytes(binding.var.ty)
            )
            producer[binding.var] = node
            for arg in _flat_args(value):
                if arg in producer:
                    graph.add_edge(producer[arg], node)
    outputs = {producer[v] for v in _returned_vars(func.body.body) if v in producer}
    nx.set_node_attributes(graph, {n: n in outputs for n in graph.nodes}, "is_output")
    return graph


def _flat_args(call: Any) -> list[Any]:
    from tvm import relax

    found = []
    for arg in call.args:
        if isinstance(arg, relax.Tuple):
            found.extend(arg.fields)
        else:
            found.append(arg)
    return found


def _returned_vars(expr: Any) -> list[Any]:
    from tvm import relax

    return list(expr.fields) if isinstance(expr, relax.Tuple) else [expr]


def graph_summary(graph: nx.DiGraph, kernels_only: bool = False) -> dict[str, int]:
    """Counts and bytes; ``kernels_only``: count bytes written by kernels only (views are free)."""
    intermediate = sum(
        data["bytes"]
        for _, data in graph.nodes(data=True)
        if not data["is_output"] and (data["kernel"] or not kernels_only)
    )
    return {
        "operators": graph.number_of_nodes(),
        "kernel_calls": sum(1 for _, data in graph.nodes(data=True) if data["kernel"]),
        "edges": graph.number_of_edges(),
        "intermediate_bytes": int(intermediate),
    }


def fusion_report(imported: Any, target: Any, canao_fusion: bool = True) -> pd.DataFrame:
    """One row per stage of canao's CPU pipeline applied to ``imported`` (a Relax module)."""
    from tvm import relax

    from canao.compiler.kernels import kernel_report
    from canao.compiler.pipelines import cpu_stages

    rows = [{"stage": "imported", **graph_summary(dataflow_graph(imported))}]
    mod = imported
    graphs_done = False
    with target:
        for name, stage in cpu_stages(target, canao_fusion):
            mod = stage(mod)
            if graphs_done:
                continue  # scheduling and lowering: run them for the final count below
            if name == _LAST_GRAPH_STAGE:
                # As the VM will run it: reshape kernels become views (no launch, no copy).
                viewed = relax.transform.RewriteDataflowReshape()(mod)
                rows.append({"stage": name, **graph_summary(dataflow_graph(viewed), True)})
                graphs_done = True
            else:
                rows.append({"stage": name, **graph_summary(dataflow_graph(mod))})
    final = kernel_report(mod)
    rows.append(
        {"stage": "lowered: kernels launched per inference", "kernel_calls": final.kernel_launches}
    )
    return pd.DataFrame(rows)
