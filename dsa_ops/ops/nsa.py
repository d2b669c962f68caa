"""Native Sparse Attention ops (SPEC section 8): the compression pooling and the gated combination of the three
branches, each with a backward op and its autograd, and the block selection (no gradient)."""
from __future__ import annotations

import torch

from .. import _validate as V
from ._library import define, input_grads, no_gradient, register_autograd

define("nsa_compress", "(Tensor k, int block=32, int stride=16) -> Tensor", V.check_nsa_compress)
define("nsa_compress_backward", "(Tensor grad_out, Tensor k, int block=32, int stride=16) -> Tensor",
       V.check_nsa_compress_backward)
define("nsa_gate_combine", "(Tensor o_cmp, Tensor o_slc, Tensor o_win, Tensor gates) -> Tensor",
       V.check_nsa_gate_combine)
define("nsa_gate_combine_backward",
       "(Tensor grad_out, Tensor o_cmp, Tensor o_slc, Tensor o_win, Tensor gates) -> (Tensor, Tensor, Tensor, Tensor)",
       V.check_nsa_gate_combine_backward)
define("nsa_select",
       "(Tensor p_cmp, int groups, int n=16, int block=32, int stride=16, int select_block=64, "
       "int local_blocks=2) -> Tensor",
       V.check_nsa_select)


# nsa_compress: gradient to k through dsa::nsa_compress_backward.
def _compress_setup(ctx, inputs, output):
    k, block, stride = inputs
    ctx.save_for_backward(k)
    ctx.block, ctx.stride = block, stride


def _compress_backward(ctx, grad_out):
    (k,) = ctx.saved_tensors
    dk = torch.ops.dsa.nsa_compress_backward(grad_out.contiguous(), k, ctx.block, ctx.stride)
    return input_grads(ctx, {0: dk})


register_autograd("nsa_compress", _compress_backward, _compress_setup)


# nsa_gate_combine: gradient to the three branch outputs and the raw gates.
def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx, grad_out):
    grads = torch.ops.dsa.nsa_gate_combine_backward(grad_out.contiguous(), *ctx.saved_tensors)
    return input_grads(ctx, dict(enumerate(grads)))


register_autograd("nsa_gate_combine", _combine_backward, _combine_setup)

# nsa_select returns block ids: no gradient.
no_gradient("nsa_select")
