"""Fakes of the indexer-loss ops: a 0-dim loss, gradients shaped like the indexer inputs."""
from __future__ import annotations

import torch

from dsa_ops import _validate as V

from ._common import fake, score_dtype


def _indexer_grads(q_idx, k_idx, w):
    return torch.empty_like(q_idx), torch.empty_like(k_idx), torch.empty_like(w)


@fake("indexer_loss")
def indexer_loss(q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length):
    V.check_indexer_loss(q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length)
    return q_idx.new_empty((), dtype=score_dtype(q_idx))


@fake("indexer_loss_backward")
def indexer_loss_backward(grad_loss, q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length):
    V.check_indexer_loss_backward(grad_loss, q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length)
    return _indexer_grads(q_idx, k_idx, w)


@fake("dense_indexer_loss")
def dense_indexer_loss(q_idx, k_idx, w, attn_scores, attn_l1, scale, ratio, loss_coeff, q_start):
    V.check_dense_indexer_loss(q_idx, k_idx, w, attn_scores, attn_l1, scale, ratio, loss_coeff, q_start)
    return q_idx.new_empty((), dtype=score_dtype(q_idx))


@fake("dense_indexer_loss_backward")
def dense_indexer_loss_backward(grad_loss, q_idx, k_idx, w, attn_scores, attn_l1, scale, ratio, loss_coeff,
                                q_start):
    V.check_dense_indexer_loss_backward(grad_loss, q_idx, k_idx, w, attn_scores, attn_l1, scale, ratio,
                                        loss_coeff, q_start)
    return _indexer_grads(q_idx, k_idx, w)
