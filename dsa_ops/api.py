"""The public Python API: one thin function per op (docs and defaults), each a call of `torch.ops.dsa.<op>`.

Calling `torch.ops.dsa.<op>` directly is equivalent. Math: SPEC.md (shared) and docs/IMPLEMENTATIONS.md.
Scalar arguments shown as `None` take the SPEC defaults (scale 1.0 for the indexer, `D**-0.5` for attention,
ratio 1, d_v 512, loss_coeff 1.0); see `_or` for why they are not written as float defaults.
Layouts: indexer tensors are batched (`q_idx [B,S_q,H_I,D_I]`, `k_idx [B,S_k,D_I]`, `w [B,S_q,H_I]`), attention
tensors packed (`q [T,H,D]`, `kv [S_kv,D]`, `indices [T,K]` rows of `kv`). Index tensors are int32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.dsa


def _or(value, default):
    """Scalar defaults are written `None` and resolved here: under torch.compile(dynamic=True) Dynamo treats a
    float taken from a function's __defaults__ as a symbolic input, and passing it to an op's `float` argument
    restarts the trace. A literal in the body is a plain constant."""
    return default if value is None else value


def indexer_logits(q_idx: Tensor, k_idx: Tensor, w: Tensor, scale: Optional[float] = None,
                   ratio: Optional[int] = None,
                   q_start: Optional[Tensor] = None) -> Tensor:
    """`scores[b,q,k] = sum_h w[b,q,h] * relu(scale * q_idx[b,q,h] . k_idx[b,k])`, fp32 `[B,S_q,S_k]`, `-inf`
    where the ratio-causal mask hides key k (query q sits at token `q_start[b] + q`; default: the last tokens).
    Differentiable in q_idx, k_idx, w."""
    return _ops.indexer_logits(q_idx, k_idx, w, _or(scale, 1.0), _or(ratio, 1), q_start)


def topk(scores: Tensor, k: int, lengths: Optional[Tensor] = None, sorted: bool = False) -> tuple[Tensor, Tensor]:
    """Exact top-k over the last dim: `(indices int32 [...,k], values fp32 [...,k])`. Ties: the smaller column
    wins; `-inf`/NaN never selected; rows short of k candidates pad with -1 / -inf. `lengths[...]` limits each row
    to its first columns."""
    return _ops.topk(scores, k, lengths, sorted)


def indexer_topk(q_idx: Tensor, k_idx: Tensor, w: Tensor, topk: int, scale: Optional[float] = None,
                 ratio: Optional[int] = None,
                 q_start: Optional[Tensor] = None, cu_seqlens_q: Optional[Tensor] = None,
                 cu_seqlens_k: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """`topk(indexer_logits(...), topk)` without ever holding the `[S_q,S_k]` score matrix. Ids are local to the
    sequence; in the packed form (`cu_seqlens_q/k` given, B=1) they are global rows of the packed keys."""
    return _ops.indexer_topk(q_idx, k_idx, w, topk, _or(scale, 1.0), _or(ratio, 1), q_start, cu_seqlens_q,
                             cu_seqlens_k)


def indexer_topk_paged(q_idx: Tensor, k_cache: Tensor, block_table: Tensor, seq_lens: Tensor, w: Tensor,
                       topk: int, scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Decode form of `indexer_topk` over a paged key cache `[num_pages, page_size, D_I]`; query j of sequence b
    sits at `seq_lens[b] - S_q + j`. Returns token positions. No host sync (CUDA-graph safe)."""
    return _ops.indexer_topk_paged(q_idx, k_cache, block_table, seq_lens, w, topk, _or(scale, 1.0))


def sparse_attention(q: Tensor, kv: Tensor, indices: Tensor, scale: Optional[float] = None, d_v: Optional[int] = None,
                     attn_sink: Optional[Tensor] = None,
                     topk_length: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Sparse MQA attention over the selected rows of the shared latent `kv`: `(out [T,H,d_v], lse [T,H] fp32)`.
    `scale` defaults to `D**-0.5`. The sink joins the softmax denominator only; lse covers the selected keys only.
    Differentiable in q, kv, attn_sink, through `out` and `lse`."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _ops.sparse_attention(q, kv, indices, scale, _or(d_v, 512), attn_sink, topk_length)


def sparse_attention_backward(dout: Tensor, q: Tensor, kv: Tensor, out: Tensor, lse: Tensor, indices: Tensor,
                              scale: float, d_v: Optional[int] = None, attn_sink: Optional[Tensor] = None,
                              topk_length: Optional[Tensor] = None, deterministic: bool = False,
                              grad_lse: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """`(dq, dkv, d_sink)` of `sparse_attention`; `deterministic=True` gives a bitwise reproducible dkv;
    `grad_lse` adds the gradient that reaches `lse` (merged split branches)."""
    return _ops.sparse_attention_backward(dout, q, kv, out, lse, indices, scale, _or(d_v, 512), attn_sink,
                                          topk_length, deterministic, grad_lse)


def sparse_attention_decode(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, indices: Tensor,
                            scale: Optional[float] = None, d_v: Optional[int] = None, attn_sink: Optional[Tensor] = None,
                            topk_length: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """`sparse_attention` for decode over a paged cache `[num_pages, page_size, D]`; `indices [B,S_q,K]` are
    token positions (invalid if `>= seq_lens[b]`). No host sync (CUDA-graph safe)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _ops.sparse_attention_decode(q, kv_cache, block_table, seq_lens, indices, scale, _or(d_v, 512), attn_sink,
                                        topk_length)


def indexer_topk_paged_out(q_idx: Tensor, k_cache: Tensor, block_table: Tensor, seq_lens: Tensor, w: Tensor,
                           topk: int, indices: Tensor, values: Tensor, scale: Optional[float] = None) -> None:
    """`indexer_topk_paged` writing into preallocated `indices [B,S_q,topk]` int32 and `values` fp32 (CUDA graphs
    that reuse fixed buffers)."""
    _ops.indexer_topk_paged_out(q_idx, k_cache, block_table, seq_lens, w, topk, _or(scale, 1.0), indices, values)


def sparse_attention_decode_out(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                                indices: Tensor, out: Tensor, lse: Tensor, scale: Optional[float] = None,
                                d_v: Optional[int] = None, attn_sink: Optional[Tensor] = None,
                                topk_length: Optional[Tensor] = None) -> None:
    """`sparse_attention_decode` writing into preallocated `out [B,S_q,H,d_v]` and `lse [B,S_q,H]` fp32."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    _ops.sparse_attention_decode_out(q, kv_cache, block_table, seq_lens, indices, scale, _or(d_v, 512), attn_sink,
                                     topk_length, out, lse)


def sparse_attn_score(q: Tensor, kv: Tensor, lse: Tensor, indices: Tensor, scale: float,
                      topk_length: Optional[Tensor] = None) -> Tensor:
    """Indexer-loss target over the selected keys: head-summed attention probabilities, normalised per row."""
    return _ops.sparse_attn_score(q, kv, lse, indices, scale, topk_length)


def sparse_indexer_score(q_idx: Tensor, k_idx: Tensor, w: Tensor, indices: Tensor, scale: Optional[float] = None,
                         topk_length: Optional[Tensor] = None) -> Tensor:
    """Indexer prediction over the selected keys: softmax of the indexer logits over valid slots."""
    return _ops.sparse_indexer_score(q_idx, k_idx, w, indices, _or(scale, 1.0), topk_length)


def indexer_loss(q_idx: Tensor, k_idx: Tensor, w: Tensor, indices: Tensor, target: Tensor, scale: Optional[float] = None,
                 loss_coeff: Optional[float] = None, topk_length: Optional[Tensor] = None) -> Tensor:
    """Clipped KL(target || predict) over the top-k set, averaged over non-empty rows. Trains q_idx, k_idx, w."""
    return _ops.indexer_loss(q_idx, k_idx, w, indices, target, _or(scale, 1.0), _or(loss_coeff, 1.0), topk_length)


def dense_attn_score(q: Tensor, kv: Tensor, lse: Tensor, scale: float, ratio: Optional[int] = None,
                     q_start: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Dense warm-up target: `(scores [B,S_q,S_k] masked 0, l1 [B,S_q])`, head-summed attention probabilities."""
    return _ops.dense_attn_score(q, kv, lse, scale, _or(ratio, 1), q_start)


def dense_indexer_loss(q_idx: Tensor, k_idx: Tensor, w: Tensor, attn_scores: Tensor, attn_l1: Tensor,
                       scale: Optional[float] = None, ratio: Optional[int] = None, loss_coeff: Optional[float] = None,
                       q_start: Optional[Tensor] = None) -> Tensor:
    """Clipped KL over all visible keys (dense warm-up). Trains q_idx, k_idx, w."""
    return _ops.dense_indexer_loss(q_idx, k_idx, w, attn_scores, attn_l1, _or(scale, 1.0), _or(ratio, 1),
                                   _or(loss_coeff, 1.0), q_start)


# DeepSeek-V4 hybrid attention (SPEC section 7)
def hca_compress(c: Tensor, z: Tensor, m: Optional[int] = None) -> Tensor:
    """HCA token compressor: `c, z [B,S,d]` -> `[B, S // m, d]` in c's dtype (m defaults to 128). Entry w is
    `sum_{r<m} softmax_r(z[b, w*m + r]) * c[b, w*m + r]`, softmax per channel in fp32; trailing tokens that do
    not fill a window make no entry. z may be fp32 while c is bf16. Differentiable in c, z."""
    return _ops.hca_compress(c, z, _or(m, 128))


def csa_compress(c: Tensor, z: Tensor, m: Optional[int] = None) -> Tensor:
    """CSA token compressor: `c, z [B,S,2d] = [a | b]` -> `[B, S // m, d]` (m defaults to 4). Entry w pools, per
    channel, the a halves of window w-1 and the b halves of window w (entry 0: the b halves only) with a softmax
    of the matching halves of z. Differentiable in c, z."""
    return _ops.csa_compress(c, z, _or(m, 4))


def merge_attention_with_sink(outs: Tensor, lses: Tensor,
                              attn_sink: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Merges J attention branches over disjoint key sets (`outs [J,T,H,d_v]`, each branch's own `lses [J,T,H]`,
    computed without a sink; +inf = empty branch) into one softmax with the sink:
    `out = sum_j e^(lse_j - M) o_j / (e^(sink - M) + sum_j e^(lse_j - M))`; returns `(out [T,H,d_v],
    lse [T,H] = logsumexp_j lse_j)`, equal to sparse_attention with the sink over the concatenated index lists.
    Differentiable in outs, lses, attn_sink (the merged lse carries no gradient). The gradient equals that of one
    softmax only if the branch lses carry theirs; `sparse_attention`'s lse does not, so for training attend over
    the concatenated index list in one `sparse_attention` call."""
    return _ops.merge_attention_with_sink(outs, lses, attn_sink)


# Native Sparse Attention (SPEC section 8)
def nsa_compress(k: Tensor, block: Optional[int] = None, stride: Optional[int] = None) -> Tensor:
    """NSA compression pooling: `k [B,S,G,D]` -> `[B,N,G,D]` in k's dtype, `N = max(0, (S - block) // stride + 1)`
    (block 32, stride 16 by default; the stride divides the block). Entry i is the mean of tokens
    `[i*stride, i*stride + block)`; only complete blocks make an entry (query t may see entry i iff
    `t >= i*stride + block - 1`). The optional per-head projection stays in torch. Differentiable in k."""
    return _ops.nsa_compress(k, _or(block, 32), _or(stride, 16))


def nsa_gate_combine(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor) -> Tensor:
    """Gated sum of the three NSA branches: `o = sum_b sigmoid(gates[..., b]) * o_b` for b = (compressed, selected,
    window); `o_* [B,S,H,d_v]`, raw `gates [B,S,H,3]` (fp32, or the dtype of the outputs). Output in o_cmp's dtype.
    Differentiable in all four inputs."""
    return _ops.nsa_gate_combine(o_cmp, o_slc, o_win, gates)


def nsa_select(p_cmp: Tensor, groups: int, n: Optional[int] = None, block: Optional[int] = None,
               stride: Optional[int] = None, select_block: Optional[int] = None,
               local_blocks: Optional[int] = None) -> Tensor:
    """NSA block selection: compressed-branch probabilities `p_cmp [B,S,H,N]` (query t at token t, H = groups *
    heads per group) -> int32 selection-block ids `[B,S,groups,n]`, ascending, `-1`-padded. Scores: p summed over
    a group's heads (visible entries only), each compressed entry's score spread over the selection blocks of
    `select_block` tokens it overlaps, in proportion to the overlap. Block 0 and the `local_blocks` blocks ending
    with the query's own are always kept; blocks starting after the query never; the rest by top-n, the smaller
    id winning ties. Defaults n 16, block 32, stride 16, select_block 64, local_blocks 2. No gradient."""
    return _ops.nsa_select(p_cmp, groups, _or(n, 16), _or(block, 32), _or(stride, 16), _or(select_block, 64),
                           _or(local_blocks, 2))
