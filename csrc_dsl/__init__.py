"""Kernels: `triton/` (portable GPU path, one file per op family) and `cute/` (CuTe-DSL, per arch).

A kernel module knows nothing of torch.library: it exposes launchers with the signatures of
docs/IMPLEMENTATIONS.md, and `dsa_ops.dispatch` decides when they run.
"""
