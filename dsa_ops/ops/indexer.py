"""Indexer ops: lightning-indexer logits, top-k, fused indexer top-k (dense and paged), sparse scores."""
from __future__ import annotations

import torch

from .. import _validate as V
from ._library import define, define_out_variant, input_grads, no_gradient, register_autograd

define("indexer_logits",
       "(Tensor q_idx, Tensor k_idx, Tensor w, float scale=1.0, int ratio=1, Tensor? q_start=None) -> Tensor",
       V.check_indexer_logits)
define("indexer_logits_backward",
       "(Tensor grad_scores, Tensor q_idx, Tensor k_idx, Tensor w, float scale=1.0, int ratio=1, "
       "Tensor? q_start=None) -> (Tensor, Tensor, Tensor)",
       V.check_indexer_logits_backward)
define("topk",
       "(Tensor scores, int k, Tensor? lengths=None, bool sorted=False) -> (Tensor, Tensor)",
       V.check_topk)
define("indexer_topk",
       "(Tensor q_idx, Tensor k_idx, Tensor w, int topk, float scale=1.0, int ratio=1, Tensor? q_start=None, "
       "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None) -> (Tensor, Tensor)",
       V.check_indexer_topk)
define("indexer_topk_paged",
       "(Tensor q_idx, Tensor k_cache, Tensor block_table, Tensor seq_lens, Tensor w, int topk, "
       "float scale=1.0) -> (Tensor, Tensor)",
       V.check_indexer_topk_paged)
define_out_variant("indexer_topk_paged_out", "indexer_topk_paged",
                   "(Tensor q_idx, Tensor k_cache, Tensor block_table, Tensor seq_lens, Tensor w, int topk, "
                   "float scale, Tensor(a!) indices, Tensor(b!) values) -> ()",
                   V.check_indexer_topk_paged_out)
define("sparse_indexer_score",
       "(Tensor q_idx, Tensor k_idx, Tensor w, Tensor indices, float scale=1.0, Tensor? topk_length=None) -> Tensor",
       V.check_sparse_indexer_score)


# indexer_logits: gradient to q_idx, k_idx, w through dsa::indexer_logits_backward.
def _logits_setup(ctx, inputs, output):
    q_idx, k_idx, w, scale, ratio, q_start = inputs
    ctx.save_for_backward(q_idx, k_idx, w, q_start)
    ctx.scale, ctx.ratio = scale, ratio


def _logits_backward(ctx, grad_scores):
    q_idx, k_idx, w, q_start = ctx.saved_tensors
    dq, dk, dw = torch.ops.dsa.indexer_logits_backward(
        grad_scores.contiguous(), q_idx, k_idx, w, ctx.scale, ctx.ratio, q_start)
    return input_grads(ctx, {0: dq, 1: dk, 2: dw})


register_autograd("indexer_logits", _logits_backward, _logits_setup)
for _name in ("topk", "indexer_topk", "indexer_topk_paged", "sparse_indexer_score"):
    no_gradient(_name)
