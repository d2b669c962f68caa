"""Sparse MQA attention ops: forward (with its autograd), backward, paged decode, score recompute."""
from __future__ import annotations

import torch

from .. import _validate as V
from ._library import define, define_out_variant, input_grads, no_gradient, register_autograd

define("sparse_attention",
       "(Tensor q, Tensor kv, Tensor indices, float scale, int d_v=512, Tensor? attn_sink=None, "
       "Tensor? topk_length=None) -> (Tensor, Tensor)",
       V.check_sparse_attention)
define("sparse_attention_backward",
       "(Tensor dout, Tensor q, Tensor kv, Tensor out, Tensor lse, Tensor indices, float scale, int d_v=512, "
       "Tensor? attn_sink=None, Tensor? topk_length=None, bool deterministic=False, Tensor? grad_lse=None) "
       "-> (Tensor, Tensor, Tensor)",
       V.check_sparse_attention_backward)
define("sparse_attention_decode",
       "(Tensor q, Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor indices, float scale, "
       "int d_v=512, Tensor? attn_sink=None, Tensor? topk_length=None) -> (Tensor, Tensor)",
       V.check_sparse_attention_decode)
define_out_variant("sparse_attention_decode_out", "sparse_attention_decode",
                   "(Tensor q, Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor indices, float scale, "
                   "int d_v, Tensor? attn_sink, Tensor? topk_length, Tensor(a!) out, Tensor(b!) lse) -> ()",
                   V.check_sparse_attention_decode_out)
define("sparse_attn_score",
       "(Tensor q, Tensor kv, Tensor lse, Tensor indices, float scale, Tensor? topk_length=None) -> Tensor",
       V.check_sparse_attn_score)
define("dense_attn_score",
       "(Tensor q, Tensor kv, Tensor lse, float scale, int ratio=1, Tensor? q_start=None) -> (Tensor, Tensor)",
       V.check_dense_attn_score)


# sparse_attention: gradient to q, kv, attn_sink through dsa::sparse_attention_backward, from `out` and
# from `lse` (merging split branches, SPEC section 7, differentiates through each branch's lse). Grads are
# not materialised, so an unused lse arrives as None (the kernels then skip the Delta shift it needs).
def _attention_setup(ctx, inputs, output):
    q, kv, indices, scale, d_v, attn_sink, topk_length = inputs
    out, lse = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, kv, indices, attn_sink, topk_length, out, lse)
    ctx.scale, ctx.d_v = scale, d_v


def _attention_backward(ctx, dout, dlse):
    q, kv, indices, attn_sink, topk_length, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dq, dkv, d_sink = torch.ops.dsa.sparse_attention_backward(
        dout, q, kv, out, lse, indices, ctx.scale, ctx.d_v, attn_sink, topk_length,
        torch.are_deterministic_algorithms_enabled(), None if dlse is None else dlse.contiguous())
    return input_grads(ctx, {0: dq, 1: dkv, 5: d_sink})


register_autograd("sparse_attention", _attention_backward, _attention_setup)
for _name in ("sparse_attention_decode", "sparse_attn_score", "dense_attn_score"):
    no_gradient(_name)
