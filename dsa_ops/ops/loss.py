"""Indexer training loss (KL distillation, SPEC section 6): sparse and dense forms, with autograd."""
from __future__ import annotations

import torch

from .. import _validate as V
from ._library import define, input_grads, register_autograd

define("indexer_loss",
       "(Tensor q_idx, Tensor k_idx, Tensor w, Tensor indices, Tensor target, float scale=1.0, "
       "float loss_coeff=1.0, Tensor? topk_length=None) -> Tensor",
       V.check_indexer_loss)
define("indexer_loss_backward",
       "(Tensor grad_loss, Tensor q_idx, Tensor k_idx, Tensor w, Tensor indices, Tensor target, float scale=1.0, "
       "float loss_coeff=1.0, Tensor? topk_length=None) -> (Tensor, Tensor, Tensor)",
       V.check_indexer_loss_backward)
define("dense_indexer_loss",
       "(Tensor q_idx, Tensor k_idx, Tensor w, Tensor attn_scores, Tensor attn_l1, float scale=1.0, int ratio=1, "
       "float loss_coeff=1.0, Tensor? q_start=None) -> Tensor",
       V.check_dense_indexer_loss)
define("dense_indexer_loss_backward",
       "(Tensor grad_loss, Tensor q_idx, Tensor k_idx, Tensor w, Tensor attn_scores, Tensor attn_l1, "
       "float scale=1.0, int ratio=1, float loss_coeff=1.0, Tensor? q_start=None) -> (Tensor, Tensor, Tensor)",
       V.check_dense_indexer_loss_backward)


# Both losses train the indexer only: gradient to q_idx, k_idx, w; the attention-side inputs (target,
# attn_scores, attn_l1) are data (SPEC section 6: the main attention is not trained by this loss).
def _sparse_setup(ctx, inputs, output):
    q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length = inputs
    ctx.save_for_backward(q_idx, k_idx, w, indices, target, topk_length)
    ctx.scale, ctx.loss_coeff = scale, loss_coeff


def _sparse_backward(ctx, grad_loss):
    q_idx, k_idx, w, indices, target, topk_length = ctx.saved_tensors
    dq, dk, dw = torch.ops.dsa.indexer_loss_backward(
        grad_loss.contiguous(), q_idx, k_idx, w, indices, target, ctx.scale, ctx.loss_coeff, topk_length)
    return input_grads(ctx, {0: dq, 1: dk, 2: dw})


def _dense_setup(ctx, inputs, output):
    q_idx, k_idx, w, attn_scores, attn_l1, scale, ratio, loss_coeff, q_start = inputs
    ctx.save_for_backward(q_idx, k_idx, w, attn_scores, attn_l1, q_start)
    ctx.scale, ctx.ratio, ctx.loss_coeff = scale, ratio, loss_coeff


def _dense_backward(ctx, grad_loss):
    q_idx, k_idx, w, attn_scores, attn_l1, q_start = ctx.saved_tensors
    dq, dk, dw = torch.ops.dsa.dense_indexer_loss_backward(
        grad_loss.contiguous(), q_idx, k_idx, w, attn_scores, attn_l1, ctx.scale, ctx.ratio, ctx.loss_coeff,
        q_start)
    return input_grads(ctx, {0: dq, 1: dk, 2: dw})


register_autograd("indexer_loss", _sparse_backward, _sparse_setup)
register_autograd("dense_indexer_loss", _dense_backward, _dense_setup)
