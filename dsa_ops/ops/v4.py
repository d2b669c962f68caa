"""DeepSeek-V4 hybrid-attention ops (SPEC section 7): the HCA and CSA token compressors and the merge of
attention branches with the sink, each with a backward op and its autograd."""
from __future__ import annotations

import torch

from .. import _validate as V
from ._library import define, input_grads, register_autograd

define("hca_compress", "(Tensor c, Tensor z, int m=128) -> Tensor", V.check_hca_compress)
define("hca_compress_backward", "(Tensor grad_out, Tensor c, Tensor z, int m=128) -> (Tensor, Tensor)",
       V.check_hca_compress_backward)
define("csa_compress", "(Tensor c, Tensor z, int m=4) -> Tensor", V.check_csa_compress)
define("csa_compress_backward", "(Tensor grad_out, Tensor c, Tensor z, int m=4) -> (Tensor, Tensor)",
       V.check_csa_compress_backward)
define("merge_attention_with_sink",
       "(Tensor outs, Tensor lses, Tensor? attn_sink=None) -> (Tensor, Tensor)",
       V.check_merge_attention_with_sink)
define("merge_attention_with_sink_backward",
       "(Tensor grad_out, Tensor outs, Tensor lses, Tensor out, Tensor lse, Tensor? attn_sink=None, "
       "Tensor? grad_lse=None) -> (Tensor, Tensor, Tensor)",
       V.check_merge_attention_with_sink_backward)


# Compressors: gradient to c and z through dsa::<name>_backward (both take the same arguments).
def _compress_setup(ctx, inputs, output):
    c, z, m = inputs
    ctx.save_for_backward(c, z)
    ctx.m = m


def _compress_autograd(name: str) -> None:
    backward_op = getattr(torch.ops.dsa, f"{name}_backward")

    def backward(ctx, grad_out):
        c, z = ctx.saved_tensors
        dc, dz = backward_op(grad_out.contiguous(), c, z, ctx.m)
        return input_grads(ctx, {0: dc, 1: dz})

    register_autograd(name, backward, _compress_setup)


for _name in ("hca_compress", "csa_compress"):
    _compress_autograd(_name)


# merge_attention_with_sink: gradient to outs, lses, attn_sink, from the merged out and the merged lse (keys
# only, so merges compose). Grads are not materialised: an unused output arrives as None.
def _merge_setup(ctx, inputs, output):
    outs, lses, attn_sink = inputs
    out, lse = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(outs, lses, attn_sink, out, lse)


def _merge_backward(ctx, grad_out, grad_lse):
    outs, lses, attn_sink, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    d_outs, d_lses, d_sink = torch.ops.dsa.merge_attention_with_sink_backward(
        grad_out, outs, lses, out, lse, attn_sink, None if grad_lse is None else grad_lse.contiguous())
    return input_grads(ctx, {0: d_outs, 1: d_lses, 2: d_sink})


register_autograd("merge_attention_with_sink", _merge_backward, _merge_setup)
