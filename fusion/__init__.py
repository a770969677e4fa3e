"""canao.fusion: polynomial layer fusion passes (exact algebra) and the fusion report.

Passes (each a ``tvm.transform.Pass`` on high-level Relax, before LegalizeOps):

- :func:`~canao.fusion.algebraic.simplify_elementwise`
- :func:`~canao.fusion.algebraic.fold_scale_into_dense`
- :func:`~canao.fusion.merge_dense.merge_parallel_dense`
- :func:`~canao.fusion.residual_layernorm.fuse_residual_layer_norm`
- :func:`~canao.fusion.attention.fuse_attention` (after ``pack_dense``)

Bias and GELU epilogues are fused into the dense kernels by
:mod:`canao.compiler.schedules.pack_dense`. The ``fast`` pipeline runs them
all; ``fast-tvm-fusion`` runs none, for comparison.
"""
