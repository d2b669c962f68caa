"""Fakes of the attention ops."""
from __future__ import annotations

import torch

from dsa_ops import _validate as V

from ._common import fake, score_dtype


@fake("sparse_attention")
def sparse_attention(q, kv, indices, scale, d_v, attn_sink, topk_length):
    V.check_sparse_attention(q, kv, indices, scale, d_v, attn_sink, topk_length)
    T, H, _ = q.shape
    return q.new_empty((T, H, d_v)), q.new_empty((T, H), dtype=score_dtype(q))


@fake("sparse_attention_backward")
def sparse_attention_backward(dout, q, kv, out, lse, indices, scale, d_v, attn_sink, topk_length, deterministic,
                              grad_lse):
    V.check_sparse_attention_backward(dout, q, kv, out, lse, indices, scale, d_v, attn_sink, topk_length,
                                      deterministic, grad_lse)
    sink_dtype = attn_sink.dtype if attn_sink is not None else score_dtype(q)
    return torch.empty_like(q), torch.empty_like(kv), q.new_empty((q.shape[1],), dtype=sink_dtype)


@fake("sparse_attention_decode")
def sparse_attention_decode(q, kv_cache, block_table, seq_lens, indices, scale, d_v, attn_sink, topk_length):
    V.check_sparse_attention_decode(q, kv_cache, block_table, seq_lens, indices, scale, d_v, attn_sink,
                                    topk_length)
    B, Sq, H, _ = q.shape
    return q.new_empty((B, Sq, H, d_v)), q.new_empty((B, Sq, H), dtype=score_dtype(q))


@fake("sparse_attn_score")
def sparse_attn_score(q, kv, lse, indices, scale, topk_length):
    V.check_sparse_attn_score(q, kv, lse, indices, scale, topk_length)
    return q.new_empty(indices.shape, dtype=score_dtype(q))


@fake("dense_attn_score")
def dense_attn_score(q, kv, lse, scale, ratio, q_start):
    V.check_dense_attn_score(q, kv, lse, scale, ratio, q_start)
    B, Sq = q.shape[:2]
    dtype = score_dtype(q)
    return q.new_empty((B, Sq, kv.shape[1]), dtype=dtype), q.new_empty((B, Sq), dtype=dtype)


@fake("sparse_attention_decode_out")
def sparse_attention_decode_out(q, kv_cache, block_table, seq_lens, indices, scale, d_v, attn_sink, topk_length,
                                out, lse):
    V.check_sparse_attention_decode_out(q, kv_cache, block_table, seq_lens, indices, scale, d_v, attn_sink,
                                        topk_length, out, lse)
