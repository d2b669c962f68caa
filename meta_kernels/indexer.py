"""Fakes of the indexer ops: validate, then allocate outputs of the exact shape, dtype and strides."""
from __future__ import annotations

import torch

from dsa_ops import _validate as V

from ._common import fake, score_dtype


@fake("indexer_logits")
def indexer_logits(q_idx, k_idx, w, scale, ratio, q_start):
    V.check_indexer_logits(q_idx, k_idx, w, scale, ratio, q_start)
    B, Sq = q_idx.shape[:2]
    return q_idx.new_empty((B, Sq, k_idx.shape[1]), dtype=score_dtype(q_idx))


@fake("indexer_logits_backward")
def indexer_logits_backward(grad_scores, q_idx, k_idx, w, scale, ratio, q_start):
    V.check_indexer_logits_backward(grad_scores, q_idx, k_idx, w, scale, ratio, q_start)
    return torch.empty_like(q_idx), torch.empty_like(k_idx), torch.empty_like(w)


def _selection(like: torch.Tensor, lead, k: int):
    return (like.new_empty((*lead, k), dtype=torch.int32),
            like.new_empty((*lead, k), dtype=score_dtype(like)))


@fake("topk")
def topk(scores, k, lengths, sorted):
    V.check_topk(scores, k, lengths, sorted)
    return _selection(scores, scores.shape[:-1], k)


@fake("indexer_topk")
def indexer_topk(q_idx, k_idx, w, topk, scale, ratio, q_start, cu_seqlens_q, cu_seqlens_k):
    V.check_indexer_topk(q_idx, k_idx, w, topk, scale, ratio, q_start, cu_seqlens_q, cu_seqlens_k)
    return _selection(q_idx, q_idx.shape[:2], topk)


@fake("indexer_topk_paged")
def indexer_topk_paged(q_idx, k_cache, block_table, seq_lens, w, topk, scale):
    V.check_indexer_topk_paged(q_idx, k_cache, block_table, seq_lens, w, topk, scale)
    return _selection(q_idx, q_idx.shape[:2], topk)


@fake("sparse_indexer_score")
def sparse_indexer_score(q_idx, k_idx, w, indices, scale, topk_length):
    V.check_sparse_indexer_score(q_idx, k_idx, w, indices, scale, topk_length)
    return q_idx.new_empty(indices.shape, dtype=score_dtype(q_idx))


@fake("indexer_topk_paged_out")
def indexer_topk_paged_out(q_idx, k_cache, block_table, seq_lens, w, topk, scale, indices, values):
    V.check_indexer_topk_paged_out(q_idx, k_cache, block_table, seq_lens, w, topk, scale, indices, values)
