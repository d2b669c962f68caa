"""Fakes of the Native Sparse Attention ops: compressed keys [B, N, G, D], combined outputs [B, S, H, d_v],
selected block ids int32 [B, S, groups, n]."""
from __future__ import annotations

import torch

from dsa_ops import _validate as V

from ._common import fake


@fake("nsa_compress")
def nsa_compress(k, block, stride):
    V.check_nsa_compress(k, block, stride)
    B, S, G, D = k.shape
    return k.new_empty((B, max(0, (S - block) // stride + 1), G, D))


@fake("nsa_compress_backward")
def nsa_compress_backward(grad_out, k, block, stride):
    V.check_nsa_compress_backward(grad_out, k, block, stride)
    return torch.empty_like(k)


@fake("nsa_gate_combine")
def nsa_gate_combine(o_cmp, o_slc, o_win, gates):
    V.check_nsa_gate_combine(o_cmp, o_slc, o_win, gates)
    return torch.empty_like(o_cmp)


@fake("nsa_gate_combine_backward")
def nsa_gate_combine_backward(grad_out, o_cmp, o_slc, o_win, gates):
    V.check_nsa_gate_combine_backward(grad_out, o_cmp, o_slc, o_win, gates)
    return torch.empty_like(o_cmp), torch.empty_like(o_slc), torch.empty_like(o_win), torch.empty_like(gates)


@fake("nsa_select")
def nsa_select(p_cmp, groups, n, block, stride, select_block, local_blocks):
    V.check_nsa_select(p_cmp, groups, n, block, stride, select_block, local_blocks)
    B, S, _, _ = p_cmp.shape
    return p_cmp.new_empty((B, S, groups, n), dtype=torch.int32)
