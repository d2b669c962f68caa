"""Fakes of the DeepSeek-V4 ops: compressed entries [B, S // m, d], merged outputs [T, H, d_v]."""
from __future__ import annotations

import torch

from dsa_ops import _validate as V

from ._common import fake


@fake("hca_compress")
def hca_compress(c, z, m):
    V.check_hca_compress(c, z, m)
    B, S, d = c.shape
    return c.new_empty((B, S // m, d))


@fake("hca_compress_backward")
def hca_compress_backward(grad_out, c, z, m):
    V.check_hca_compress_backward(grad_out, c, z, m)
    return torch.empty_like(c), torch.empty_like(z)


@fake("csa_compress")
def csa_compress(c, z, m):
    V.check_csa_compress(c, z, m)
    B, S, two_d = c.shape
    return c.new_empty((B, S // m, two_d // 2))


@fake("csa_compress_backward")
def csa_compress_backward(grad_out, c, z, m):
    V.check_csa_compress_backward(grad_out, c, z, m)
    return torch.empty_like(c), torch.empty_like(z)


@fake("merge_attention_with_sink")
def merge_attention_with_sink(outs, lses, attn_sink):
    V.check_merge_attention_with_sink(outs, lses, attn_sink)
    _, T, H, d_v = outs.shape
    return outs.new_empty((T, H, d_v)), lses.new_empty((T, H))


@fake("merge_attention_with_sink_backward")
def merge_attention_with_sink_backward(grad_out, outs, lses, out, lse, attn_sink, grad_lse):
    V.check_merge_attention_with_sink_backward(grad_out, outs, lses, out, lse, attn_sink, grad_lse)
    sink_dtype = attn_sink.dtype if attn_sink is not None else lses.dtype
    return torch.empty_like(outs), torch.empty_like(lses), outs.new_empty((outs.shape[2],), dtype=sink_dtype)
