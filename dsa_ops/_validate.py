"""Argument checks shared by the real implementations and the fakes.

Every op calls one `check_<op>` function before it dispatches, and its fake calls the same function, so a
bad call fails with the same message in eager mode, under torch.compile and under fake-tensor tracing.
The checks read metadata only (dtype, device, shape, strides); the one value check (`cu_seqlens`) is
skipped on fake tensors. Messages name the op, the argument, what was expected and what was given.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

# Activations (q, kv, q_idx, k_idx, dout): half precision for the kernels; fp32 and fp64 are accepted so that
# the reference (and gradcheck in fp64) can run every op.
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# Weights, sinks, LSE, targets, scores: fp32 normally, fp64 for gradcheck; bf16/fp16 accepted for w.
FLOAT_DTYPES = ACTIVATION_DTYPES
INDEX_DTYPE = torch.int32
# The largest k any op accepts. The kernels advertise their own limits through the dispatch table;
# a k above this is a user error, not a fallback.
MAX_TOPK = 16384


class DSAArgumentError(ValueError):
    """A call to a dsa op with arguments it cannot accept."""


def fail(op: str, arg: str, expected: str, got: str) -> None:
    raise DSAArgumentError(f"dsa.{op}: argument '{arg}': expected {expected}, got {got}")


def _is_fake(t: torch.Tensor) -> bool:
    return t.device.type == "meta" or isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def tensor(
    op: str,
    name: str,
    t: torch.Tensor,
    ndim: int,
    dtypes: Sequence[torch.dtype],
    device: Optional[torch.device] = None,
) -> None:
    """Rank, dtype, device and contiguity of one tensor argument."""
    if not isinstance(t, torch.Tensor):
        fail(op, name, "a Tensor", type(t).__name__)
    if t.dim() != ndim:
        fail(op, name, f"a {ndim}-D tensor", f"{t.dim()}-D with shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        fail(op, name, "dtype in (" + ", ".join(str(d) for d in dtypes) + ")", str(t.dtype))
    if device is not None and t.device != device:
        fail(op, name, f"a tensor on {device} (the device of the first input)", f"{t.device}")
    if not t.is_contiguous():
        fail(op, name, "a contiguous tensor (call .contiguous())", f"strides {tuple(t.stride())}")


def shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        fail(op, name, f"shape {tuple(expected)} ({what})", f"{tuple(t.shape)}")


def same_dtype(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        fail(op, name, f"the dtype of '{ref_name}' ({ref.dtype})", str(t.dtype))


def positive(op: str, name: str, value: int, limit: Optional[int] = None) -> None:
    if value < 1 or (limit is not None and value > limit):
        bound = f"1 <= {name} <= {limit}" if limit is not None else f"{name} >= 1"
        fail(op, name, bound, str(value))


def optional_index(op: str, name: str, t: Optional[torch.Tensor], expected_shape, what: str, device) -> None:
    """An optional int32 tensor such as q_start, topk_length or lengths."""
    if t is None:
        return
    tensor(op, name, t, len(expected_shape), (INDEX_DTYPE,), device)
    shape(op, name, t, expected_shape, what)


def cu_seqlens(op: str, name: str, t: torch.Tensor, total: int, device) -> int:
    """Checks a `cu_seqlens` vector [B+1]; returns B. Values are checked when the tensor is real."""
    tensor(op, name, t, 1, (INDEX_DTYPE,), device)
    if t.shape[0] < 2:
        fail(op, name, "shape [B+1] with B >= 1", f"{tuple(t.shape)}")
    if not _is_fake(t):
        values = t.tolist()  # host sync: packed forms document it
        if values[0] != 0:
            fail(op, name, "cu_seqlens[0] == 0", str(values[0]))
        if any(b < a for a, b in zip(values, values[1:])):
            fail(op, name, "non-decreasing offsets", str(values))
        if values[-1] != total:
            fail(op, name, f"cu_seqlens[-1] == {total} (rows of the packed tensor)", str(values[-1]))
    return t.shape[0] - 1


# ---------------------------------------------------------------------------------------------------------
# Indexer family: q_idx [B,Sq,HI,DI], k_idx [B,Sk,DI], w [B,Sq,HI]
# ---------------------------------------------------------------------------------------------------------
def indexer_inputs(op: str, q_idx, k_idx, w) -> tuple[int, int, int, int, int]:
    """Checks the three indexer tensors; returns (B, Sq, Sk, HI, DI)."""
    tensor(op, "q_idx", q_idx, 4, ACTIVATION_DTYPES)
    dev = q_idx.device
    B, Sq, HI, DI = q_idx.shape
    tensor(op, "k_idx", k_idx, 3, ACTIVATION_DTYPES, dev)
    same_dtype(op, "k_idx", k_idx, "q_idx", q_idx)
    if k_idx.shape[0] != B or k_idx.shape[2] != DI:
        fail(op, "k_idx", f"shape [B={B}, S_k, D_I={DI}]", f"{tuple(k_idx.shape)}")
    tensor(op, "w", w, 3, FLOAT_DTYPES, dev)
    shape(op, "w", w, (B, Sq, HI), "[B, S_q, H_I]")
    return B, Sq, k_idx.shape[1], HI, DI


def mask_args(op: str, ratio: int, q_start, B: int, dev) -> None:
    positive(op, "ratio", ratio)
    optional_index(op, "q_start", q_start, (B,), "[B] int32", dev)


def check_indexer_logits(q_idx, k_idx, w, scale, ratio, q_start):
    B, *_ = indexer_inputs("indexer_logits", q_idx, k_idx, w)
    mask_args("indexer_logits", ratio, q_start, B, q_idx.device)


def check_indexer_logits_backward(grad_scores, q_idx, k_idx, w, scale, ratio, q_start):
    op = "indexer_logits_backward"
    B, Sq, Sk, _, _ = indexer_inputs(op, q_idx, k_idx, w)
    mask_args(op, ratio, q_start, B, q_idx.device)
    tensor(op, "grad_scores", grad_scores, 3, FLOAT_DTYPES, q_idx.device)
    shape(op, "grad_scores", grad_scores, (B, Sq, Sk), "[B, S_q, S_k]")


def check_topk(scores, k, lengths, sorted):
    op = "topk"
    if not isinstance(scores, torch.Tensor) or scores.dim() < 1:
        fail(op, "scores", "a tensor [..., C] with at least 1 dim", repr(getattr(scores, "shape", scores)))
    tensor(op, "scores", scores, scores.dim(), (torch.float32, torch.float64))
    positive(op, "k", k, MAX_TOPK)
    optional_index(op, "lengths", lengths, tuple(scores.shape[:-1]), "scores.shape[:-1], int32", scores.device)


def check_indexer_topk(q_idx, k_idx, w, topk, scale, ratio, q_start, cu_seqlens_q, cu_seqlens_k):
    op = "indexer_topk"
    B, Sq, Sk, _, _ = indexer_inputs(op, q_idx, k_idx, w)
    positive(op, "topk", topk, MAX_TOPK)
    positive(op, "ratio", ratio)
    dev = q_idx.device
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        fail(op, "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q",
             "cu_seqlens_q and cu_seqlens_k given together", "only one of them")
    if cu_seqlens_q is None:
        optional_index(op, "q_start", q_start, (B,), "[B] int32", dev)
        return
    if B != 1:
        fail(op, "q_idx", "batch dim 1 in the packed form (cu_seqlens given)", f"B={B}")
    nq = cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, Sq, dev)
    nk = cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, Sk, dev)
    if nq != nk:
        fail(op, "cu_seqlens_k", f"{nq + 1} entries like cu_seqlens_q", f"{nk + 1}")
    optional_index(op, "q_start", q_start, (nq,), "[num_sequences] int32", dev)


def paged_cache(op: str, name: str, cache, block_table, seq_lens, B: int, dim: int, dtype, dev) -> None:
    tensor(op, name, cache, 3, ACTIVATION_DTYPES, dev)
    if cache.dtype != dtype:
        fail(op, name, f"dtype {dtype} (the dtype of the queries)", str(cache.dtype))
    if cache.shape[2] != dim:
        fail(op, name, f"shape [num_pages, page_size, {dim}]", f"{tuple(cache.shape)}")
    tensor(op, "block_table", block_table, 2, (INDEX_DTYPE,), dev)
    if block_table.shape[0] != B:
        fail(op, "block_table", f"shape [B={B}, max_pages]", f"{tuple(block_table.shape)}")
    tensor(op, "seq_lens", seq_lens, 1, (INDEX_DTYPE,), dev)
    shape(op, "seq_lens", seq_lens, (B,), "[B] int32")


def check_indexer_topk_paged(q_idx, k_cache, block_table, seq_lens, w, topk, scale):
    op = "indexer_topk_paged"
    tensor(op, "q_idx", q_idx, 4, ACTIVATION_DTYPES)
    B, Sq, HI, DI = q_idx.shape
    dev = q_idx.device
    paged_cache(op, "k_cache", k_cache, block_table, seq_lens, B, DI, q_idx.dtype, dev)
    tensor(op, "w", w, 3, FLOAT_DTYPES, dev)
    shape(op, "w", w, (B, Sq, HI), "[B, S_q, H_I]")
    positive(op, "topk", topk, MAX_TOPK)


def gathered_indices(op: str, indices, topk_length, lead: tuple, dev, what: str) -> None:
    tensor(op, "indices", indices, len(lead) + 1, (INDEX_DTYPE,), dev)
    if tuple(indices.shape[:-1]) != lead:
        fail(op, "indices", f"shape [{what}, K] with leading dims {lead}", f"{tuple(indices.shape)}")
    if indices.shape[-1] < 1:
        fail(op, "indices", "K >= 1 slots", f"{tuple(indices.shape)}")
    optional_index(op, "topk_length", topk_length, lead, f"[{what}] int32", dev)


def check_sparse_indexer_score(q_idx, k_idx, w, indices, scale, topk_length):
    op = "sparse_indexer_score"
    B, Sq, _, _, _ = indexer_inputs(op, q_idx, k_idx, w)
    gathered_indices(op, indices, topk_length, (B, Sq), q_idx.device, "B, S_q")


def loss_target(op: str, target, indices) -> None:
    tensor(op, "target", target, 3, FLOAT_DTYPES, indices.device)
    shape(op, "target", target, tuple(indices.shape), "the shape of 'indices'")


def check_indexer_loss(q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length):
    op = "indexer_loss"
    B, Sq, _, _, _ = indexer_inputs(op, q_idx, k_idx, w)
    gathered_indices(op, indices, topk_length, (B, Sq), q_idx.device, "B, S_q")
    loss_target(op, target, indices)


def grad_scalar(op: str, grad, dev) -> None:
    tensor(op, "grad_loss", grad, 0, FLOAT_DTYPES, dev)


def check_indexer_loss_backward(grad_loss, q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length):
    check_indexer_loss(q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length)
    grad_scalar("indexer_loss_backward", grad_loss, q_idx.device)


def check_dense_indexer_loss(q_idx, k_idx, w, attn_scores, attn_l1, scale, ratio, loss_coeff, q_start):
    op = "dense_indexer_loss"
    B, Sq, Sk, _, _ = indexer_inputs(op, q_idx, k_idx, w)
    dev = q_idx.device
    mask_args(op, ratio, q_start, B, dev)
    tensor(op, "attn_scores", attn_scores, 3, FLOAT_DTYPES, dev)
    shape(op, "attn_scores", attn_scores, (B, Sq, Sk), "[B, S_q, S_k]")
    tensor(op, "attn_l1", attn_l1, 2, FLOAT_DTYPES, dev)
    shape(op, "attn_l1", attn_l1, (B, Sq), "[B, S_q]")


def check_dense_indexer_loss_backward(grad_loss, q_idx, k_idx, w, attn_scores, attn_l1, scale, ratio,
                                      loss_coeff, q_start):
    check_dense_indexer_loss(q_idx, k_idx, w, attn_scores, attn_l1, scale, ratio, loss_coeff, q_start)
    grad_scalar("dense_indexer_loss_backward", grad_loss, q_idx.device)


# ---------------------------------------------------------------------------------------------------------
# Attention family: q [T,H,D], kv [S_kv,D], indices [T,K]
# ---------------------------------------------------------------------------------------------------------
def attention_inputs(op: str, q, kv, indices, d_v: int, attn_sink, topk_length) -> tuple[int, int, int]:
    """Checks the packed attention inputs; returns (T, H, D)."""
    tensor(op, "q", q, 3, ACTIVATION_DTYPES)
    T, H, D = q.shape
    dev = q.device
    tensor(op, "kv", kv, 2, ACTIVATION_DTYPES, dev)
    same_dtype(op, "kv", kv, "q", q)
    if kv.shape[1] != D:
        fail(op, "kv", f"shape [S_kv, D={D}] (D of q)", f"{tuple(kv.shape)}")
    if not 1 <= d_v <= D:
        fail(op, "d_v", f"1 <= d_v <= D={D}", str(d_v))
    gathered_indices(op, indices, topk_length, (T,), dev, "T")
    sink(op, attn_sink, H, dev)
    return T, H, D


def sink(op: str, attn_sink, H: int, dev) -> None:
    if attn_sink is not None:
        tensor(op, "attn_sink", attn_sink, 1, (torch.float32, torch.float64), dev)
        shape(op, "attn_sink", attn_sink, (H,), "[H] fp32")


def check_sparse_attention(q, kv, indices, scale, d_v, attn_sink, topk_length):
    attention_inputs("sparse_attention", q, kv, indices, d_v, attn_sink, topk_length)


def forward_outputs(op: str, grad: tuple, like: tuple, out, lse, grad_lse, T: int, H: int, d_v: int) -> None:
    """A backward op's view of its forward: the output gradient and `out` [T,H,d_v] in the dtype of `like`,
    `lse` [T,H] and the optional `grad_lse` [T,H] in fp32/fp64."""
    like_name, like_t = like
    for name, t in (grad, ("out", out)):
        tensor(op, name, t, 3, ACTIVATION_DTYPES, like_t.device)
        same_dtype(op, name, t, like_name, like_t)
        shape(op, name, t, (T, H, d_v), "[T, H, d_v]")
    tensor(op, "lse", lse, 2, (torch.float32, torch.float64), like_t.device)
    shape(op, "lse", lse, (T, H), "[T, H] fp32")
    if grad_lse is not None:
        tensor(op, "grad_lse", grad_lse, 2, (torch.float32, torch.float64), like_t.device)
        shape(op, "grad_lse", grad_lse, (T, H), "[T, H] fp32, the shape of lse")


def check_sparse_attention_backward(dout, q, kv, out, lse, indices, scale, d_v, attn_sink, topk_length,
                                    deterministic, grad_lse):
    op = "sparse_attention_backward"
    T, H, _ = attention_inputs(op, q, kv, indices, d_v, attn_sink, topk_length)
    forward_outputs(op, ("dout", dout), ("q", q), out, lse, grad_lse, T, H, d_v)


def check_sparse_attention_decode(q, kv_cache, block_table, seq_lens, indices, scale, d_v, attn_sink,
                                  topk_length):
    op = "sparse_attention_decode"
    tensor(op, "q", q, 4, ACTIVATION_DTYPES)
    B, Sq, H, D = q.shape
    dev = q.device
    paged_cache(op, "kv_cache", kv_cache, block_table, seq_lens, B, D, q.dtype, dev)
    if not 1 <= d_v <= D:
        fail(op, "d_v", f"1 <= d_v <= D={D}", str(d_v))
    gathered_indices(op, indices, topk_length, (B, Sq), dev, "B, S_q")
    sink(op, attn_sink, H, dev)


def check_sparse_attn_score(q, kv, lse, indices, scale, topk_length):
    op = "sparse_attn_score"
    T, H, _ = attention_inputs(op, q, kv, indices, q.shape[-1] if q.dim() == 3 else 1, None, topk_length)
    tensor(op, "lse", lse, 2, (torch.float32, torch.float64), q.device)
    shape(op, "lse", lse, (T, H), "[T, H] fp32")


def check_dense_attn_score(q, kv, lse, scale, ratio, q_start):
    op = "dense_attn_score"
    tensor(op, "q", q, 4, ACTIVATION_DTYPES)
    B, Sq, H, D = q.shape
    dev = q.device
    tensor(op, "kv", kv, 3, ACTIVATION_DTYPES, dev)
    same_dtype(op, "kv", kv, "q", q)
    if kv.shape[0] != B or kv.shape[2] != D:
        fail(op, "kv", f"shape [B={B}, S_k, D={D}]", f"{tuple(kv.shape)}")
    tensor(op, "lse", lse, 3, (torch.float32, torch.float64), dev)
    shape(op, "lse", lse, (B, Sq, H), "[B, S_q, H] fp32")
    mask_args(op, ratio, q_start, B, dev)


# ---------------------------------------------------------------------------------------------------------
# DeepSeek-V4 family (SPEC section 7): compressors c, z [B,S,d] (CSA: [B,S,2d]); merge outs [J,T,H,d_v]
# ---------------------------------------------------------------------------------------------------------
def compressor_inputs(op: str, c, z, m: int, split_halves: bool) -> tuple[int, int, int]:
    """Checks c, z and the window length m; returns (B, S // m, output channels)."""
    tensor(op, "c", c, 3, ACTIVATION_DTYPES)
    B, S, channels = c.shape
    tensor(op, "z", z, 3, ACTIVATION_DTYPES, c.device)
    # The gate logits may stay fp32 while c is bf16 (softmax runs in fp32 anyway).
    if z.dtype not in (c.dtype, torch.float32):
        fail(op, "z", f"the dtype of 'c' ({c.dtype}) or torch.float32", str(z.dtype))
    shape(op, "z", z, (B, S, channels), "the shape of 'c'")
    if split_halves and (channels < 2 or channels % 2):
        fail(op, "c", "shape [B, S, 2d]: an even channel count (the [a | b] halves)", f"{tuple(c.shape)}")
    positive(op, "m", m)
    return B, S // m, channels // 2 if split_halves else channels


def compressor_grad(op: str, grad_out, c, expected: tuple) -> None:
    tensor(op, "grad_out", grad_out, 3, ACTIVATION_DTYPES, c.device)
    same_dtype(op, "grad_out", grad_out, "c", c)
    shape(op, "grad_out", grad_out, expected, "[B, S // m, d], the shape of the output")


def check_hca_compress(c, z, m):
    compressor_inputs("hca_compress", c, z, m, split_halves=False)


def check_hca_compress_backward(grad_out, c, z, m):
    op = "hca_compress_backward"
    compressor_grad(op, grad_out, c, compressor_inputs(op, c, z, m, split_halves=False))


def check_csa_compress(c, z, m):
    compressor_inputs("csa_compress", c, z, m, split_halves=True)


def check_csa_compress_backward(grad_out, c, z, m):
    op = "csa_compress_backward"
    compressor_grad(op, grad_out, c, compressor_inputs(op, c, z, m, split_halves=True))


def merge_inputs(op: str, outs, lses, attn_sink) -> tuple[int, int, int, int]:
    """Checks the branch outputs, their LSEs and the sink; returns (J, T, H, d_v)."""
    tensor(op, "outs", outs, 4, ACTIVATION_DTYPES)
    J, T, H, d_v = outs.shape
    if J < 1:
        fail(op, "outs", "shape [J, T, H, d_v] with J >= 1 branches", f"{tuple(outs.shape)}")
    tensor(op, "lses", lses, 3, (torch.float32, torch.float64), outs.device)
    shape(op, "lses", lses, (J, T, H), "[J, T, H] fp32")
    sink(op, attn_sink, H, outs.device)
    return J, T, H, d_v


def check_merge_attention_with_sink(outs, lses, attn_sink):
    merge_inputs("merge_attention_with_sink", outs, lses, attn_sink)


def check_merge_attention_with_sink_backward(grad_out, outs, lses, out, lse, attn_sink, grad_lse):
    op = "merge_attention_with_sink_backward"
    _, T, H, d_v = merge_inputs(op, outs, lses, attn_sink)
    forward_outputs(op, ("grad_out", grad_out), ("outs", outs), out, lse, grad_lse, T, H, d_v)


# ---------------------------------------------------------------------------------------------------------
# Native Sparse Attention family (SPEC section 8): keys k [B,S,G,D], branch outputs o_* [B,S,H,d_v],
# gates [B,S,H,3], compressed-branch probabilities p_cmp [B,S,H,N]
# ---------------------------------------------------------------------------------------------------------
def nsa_blocks(op: str, block: int, stride: int) -> None:
    """Compression block length and stride; SPEC section 8: the stride divides the block length."""
    positive(op, "block", block)
    positive(op, "stride", stride)
    if block % stride:
        fail(op, "stride", f"a divisor of block={block} (SPEC section 8)", str(stride))


def nsa_compress_inputs(op: str, k, block: int, stride: int) -> tuple[int, int, int, int]:
    """Checks k and the block geometry; returns the output shape (B, N, G, D)."""
    tensor(op, "k", k, 4, ACTIVATION_DTYPES)
    nsa_blocks(op, block, stride)
    B, S, G, D = k.shape
    return B, max(0, (S - block) // stride + 1), G, D


def check_nsa_compress(k, block, stride):
    nsa_compress_inputs("nsa_compress", k, block, stride)


def check_nsa_compress_backward(grad_out, k, block, stride):
    op = "nsa_compress_backward"
    expected = nsa_compress_inputs(op, k, block, stride)
    tensor(op, "grad_out", grad_out, 4, ACTIVATION_DTYPES, k.device)
    same_dtype(op, "grad_out", grad_out, "k", k)
    shape(op, "grad_out", grad_out, expected, "[B, N, G, D], the shape of the output")


def gate_inputs(op: str, o_cmp, o_slc, o_win, gates) -> tuple[int, int, int, int]:
    """Checks the three branch outputs and the raw gates; returns (B, S, H, d_v)."""
    tensor(op, "o_cmp", o_cmp, 4, ACTIVATION_DTYPES)
    B, S, H, d_v = o_cmp.shape
    for name, t in (("o_slc", o_slc), ("o_win", o_win)):
        tensor(op, name, t, 4, ACTIVATION_DTYPES, o_cmp.device)
        same_dtype(op, name, t, "o_cmp", o_cmp)
        shape(op, name, t, (B, S, H, d_v), "the shape of 'o_cmp'")
    tensor(op, "gates", gates, 4, ACTIVATION_DTYPES, o_cmp.device)
    # The gate logits may stay fp32 while the branch outputs are bf16 (sigmoid runs in fp32 anyway).
    if gates.dtype not in (o_cmp.dtype, torch.float32):
        fail(op, "gates", f"the dtype of 'o_cmp' ({o_cmp.dtype}) or torch.float32", str(gates.dtype))
    shape(op, "gates", gates, (B, S, H, 3), "[B, S, H, 3]: one raw gate per branch")
    return B, S, H, d_v


def check_nsa_gate_combine(o_cmp, o_slc, o_win, gates):
    gate_inputs("nsa_gate_combine", o_cmp, o_slc, o_win, gates)


def check_nsa_gate_combine_backward(grad_out, o_cmp, o_slc, o_win, gates):
    op = "nsa_gate_combine_backward"
    expected = gate_inputs(op, o_cmp, o_slc, o_win, gates)
    tensor(op, "grad_out", grad_out, 4, ACTIVATION_DTYPES, o_cmp.device)
    same_dtype(op, "grad_out", grad_out, "o_cmp", o_cmp)
    shape(op, "grad_out", grad_out, expected, "[B, S, H, d_v], the shape of the output")


def check_nsa_select(p_cmp, groups, n, block, stride, select_block, local_blocks):
    op = "nsa_select"
    tensor(op, "p_cmp", p_cmp, 4, (torch.float32, torch.float64))
    H = p_cmp.shape[2]
    positive(op, "groups", groups)
    if H % groups:
        fail(op, "groups", f"a divisor of H={H} (p_cmp [B, S, H, N], H = groups * heads per group)", str(groups))
    nsa_blocks(op, block, stride)
    positive(op, "select_block", select_block)
    positive(op, "local_blocks", local_blocks)
    if n < local_blocks + 1 or n > MAX_TOPK:
        fail(op, "n", f"local_blocks + 1 = {local_blocks + 1} <= n <= {MAX_TOPK} (block 0 and the local blocks "
             "are always kept)", str(n))


# ---------------------------------------------------------------------------------------------------------
# Preallocated-output (out=) variants of the decode ops: the inputs' checks, then the outputs'
# ---------------------------------------------------------------------------------------------------------
def out_tensor(op: str, name: str, t, expected_shape, dtype, dev) -> None:
    tensor(op, name, t, len(expected_shape), (dtype,), dev)
    shape(op, name, t, expected_shape, f"the {name} the functional op returns")


def check_indexer_topk_paged_out(q_idx, k_cache, block_table, seq_lens, w, topk, scale, indices, values):
    op = "indexer_topk_paged_out"
    check_indexer_topk_paged(q_idx, k_cache, block_table, seq_lens, w, topk, scale)
    lead = (*q_idx.shape[:2], topk)
    out_tensor(op, "indices", indices, lead, INDEX_DTYPE, q_idx.device)
    out_tensor(op, "values", values, lead, torch.float64 if q_idx.dtype == torch.float64 else torch.float32,
               q_idx.device)


def check_sparse_attention_decode_out(q, kv_cache, block_table, seq_lens, indices, scale, d_v, attn_sink,
                                      topk_length, out, lse):
    op = "sparse_attention_decode_out"
    check_sparse_attention_decode(q, kv_cache, block_table, seq_lens, indices, scale, d_v, attn_sink, topk_length)
    B, Sq, H, _ = q.shape
    out_tensor(op, "out", out, (B, Sq, H, d_v), q.dtype, q.device)
    out_tensor(op, "lse", lse, (B, Sq, H), torch.float64 if q.dtype == torch.float64 else torch.float32, q.device)
