"""`dsa_ops.warmup(...)`: compile every kernel a model will use before CUDA-graph capture or timing.

Triton and CuTe-DSL compile on first use, and a compile inside `torch.cuda.graph(...)` would be captured or
fail. Kernels are specialised on static scalars only (dtype, head counts, head dims, flags), never on sequence
lengths, so one call at a tiny length compiles what every later length needs.
"""
from __future__ import annotations

from typing import Optional

import torch

from .testing import Shape, sample_args

# The ops a DSA layer runs, forward and backward (the backward ops run through autograd).
PIPELINE_OPS = ("indexer_topk", "indexer_topk_paged", "sparse_attention", "sparse_attention_decode",
                "sparse_attn_score", "indexer_loss", "sparse_indexer_score", "dense_attn_score",
                "dense_indexer_loss")
_DIFFERENTIABLE = ("sparse_attention", "indexer_loss", "dense_indexer_loss")


def warmup(device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.bfloat16, *, heads: int = 128,
           head_dim: int = 576, d_v: int = 512, index_heads: int = 64, index_dim: int = 128, topk: int = 64,
           ops: tuple[str, ...] = PIPELINE_OPS, cute: bool = True) -> list[str]:
    """Runs each op once (with and without its optional inputs, forward and backward) on tiny inputs of this
    configuration, so every kernel variant is compiled; with `cute`, also compiles every shipped CuTe-DSL
    variant when the DSL is installed. Returns the names of what ran. Synchronises the device at the end."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = Shape(B=1, Sq=8, Sk=max(2 * topk, 16), HI=index_heads, DI=index_dim, H=heads, D=head_dim, d_v=d_v,
                  K=topk)
    done = []
    for op in ops:
        for with_optionals in (True, False):
            differentiable = op in _DIFFERENTIABLE
            args = sample_args(op, device=device, dtype=dtype, shape=shape, requires_grad=differentiable,
                               with_optionals=with_optionals)
            out = getattr(torch.ops.dsa, op)(*args)
            if differentiable:
                first = out[0] if isinstance(out, tuple) else out
                first.float().sum().backward()
        done.append(op)
    if cute and device.type == "cuda":
        from csrc_dsl.cute.common import is_available
        if is_available():
            from csrc_dsl.cute.sm90 import sparse_attention_fwd, sparse_attn_score
            sparse_attention_fwd.warmup()
            done.append("cute-sm90:sparse_attention")
            sparse_attn_score.warmup()
            done.append("cute-sm90:sparse_attn_score")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done
