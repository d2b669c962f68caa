"""Pure-torch references of the DeepSeek-V4 hybrid-attention ops (SPEC section 7).

- `hca_compress`: HCA token compressor. Windows of `m` tokens, no overlap; entry `w` is the per-channel
  softmax(z)-weighted sum of the `m` tokens of window `w`.
- `csa_compress`: CSA token compressor. Each token carries `2d` channels `[a | b]`; entry `w` pools the
  `a` halves of window `w-1` and the `b` halves of window `w` (2m slots; m slots for `w = 0`).
- `merge_attention_with_sink`: merges attention branches computed over disjoint key sets (each with its
  own natural-log LSE, no sink) into one softmax that also has the sink in its denominator.

Conventions (as in reference/attention.py): math in fp32 (fp64 when an input is fp64, for gradcheck);
every function takes validated contiguous tensors and returns fresh outputs; work is chunked (over
windows, or over query rows for the merge) so the fp32 temporaries stay under CHUNK_BUDGET_ELEMENTS.
Both compressors share one pooled form: `out = sum_slots p * c`, `p = softmax_slots(z)`, whose gradient
is `dc = p * g`, `dz = p * g * (c - out)`.
"""
from __future__ import annotations

import torch

from ._common import compute_dtype, row_chunks

# Largest number of elements one chunk's fp32 temporaries may hold. A module global (the op signatures
# are fixed); tests monkeypatch it to force many chunks.
CHUNK_BUDGET_ELEMENTS = 32 * 1024 * 1024


def _pool(c_slots: torch.Tensor, z_slots: torch.Tensor) -> torch.Tensor:
    """[B, W, slots, d] -> [B, W, d]: softmax over the slot dim per channel, weights applied to c."""
    return (torch.softmax(z_slots, dim=2) * c_slots).sum(dim=2)


def _pool_backward(grad: torch.Tensor, c_slots: torch.Tensor, z_slots: torch.Tensor):
    """Gradient of `_pool` for grad [B, W, d]: returns (dc_slots, dz_slots), both [B, W, slots, d]."""
    p = torch.softmax(z_slots, dim=2)
    pooled = (p * c_slots).sum(dim=2, keepdim=True)
    g = grad.unsqueeze(2)
    dc = p * g
    # Absent (padding) slots have p = 0 and c = 0, so dz is exactly 0 there, never NaN.
    dz = dc * (c_slots - pooled)
    return dc, dz


# ----------------------------------------------------------------------------------------------
# HCA: non-overlapping windows of m tokens
# ----------------------------------------------------------------------------------------------


def _hca_windows(x: torch.Tensor, w0: int, w1: int, m: int, dtype: torch.dtype) -> torch.Tensor:
    """Tokens of windows [w0, w1) as [B, w1-w0, m, d] in the compute dtype."""
    B, _, d = x.shape
    return x[:, w0 * m:w1 * m].to(dtype).reshape(B, w1 - w0, m, d)


def hca_compress(c: torch.Tensor, z: torch.Tensor, m: int) -> torch.Tensor:
    """c, z [B, S, d] -> [B, S // m, d] in c's dtype; trailing tokens that do not fill a window are dropped."""
    B, S, d = c.shape
    W = S // m
    dtype = compute_dtype(c, z)
    out = torch.empty(B, W, d, dtype=c.dtype, device=c.device)
    for w0, w1 in row_chunks(W, 3 * B * m * d, CHUNK_BUDGET_ELEMENTS):  # c, z, p of one window
        out[:, w0:w1] = _pool(_hca_windows(c, w0, w1, m, dtype), _hca_windows(z, w0, w1, m, dtype)).to(c.dtype)
    return out


def hca_compress_backward(grad_out: torch.Tensor, c: torch.Tensor, z: torch.Tensor, m: int):
    """(dc, dz) of `hca_compress`, in the dtypes of c and z; trailing tokens get zero gradient."""
    B, S, d = c.shape
    W = S // m
    dtype = compute_dtype(c, z)
    dc = torch.zeros_like(c)
    dz = torch.zeros_like(z)
    for w0, w1 in row_chunks(W, 5 * B * m * d, CHUNK_BUDGET_ELEMENTS):
        g = grad_out[:, w0:w1].to(dtype)
        dc_w, dz_w = _pool_backward(g, _hca_windows(c, w0, w1, m, dtype), _hca_windows(z, w0, w1, m, dtype))
        dc[:, w0 * m:w1 * m] = dc_w.reshape(B, (w1 - w0) * m, d).to(c.dtype)
        dz[:, w0 * m:w1 * m] = dz_w.reshape(B, (w1 - w0) * m, d).to(z.dtype)
    return dc, dz


# ----------------------------------------------------------------------------------------------
# CSA: entry w pools the a halves of window w-1 and the b halves of window w
# ----------------------------------------------------------------------------------------------


def _csa_slots(x: torch.Tensor, w0: int, w1: int, m: int, dtype: torch.dtype, absent: float) -> torch.Tensor:
    """The 2m pooled slots of entries [w0, w1) as [B, w1-w0, 2m, d]: slots [0, m) are the a halves of the
    previous window, [m, 2m) the b halves of the entry's own window. Entry 0 has no previous window: its a
    slots are filled with `absent` (-inf for z, so softmax gives them weight 0; 0 for c)."""
    B, _, two_d = x.shape
    d = two_d // 2
    n = w1 - w0
    b_half = x[:, w0 * m:w1 * m, d:].to(dtype).reshape(B, n, m, d)
    a_start = max(w0 - 1, 0)
    a_half = x[:, a_start * m:(w1 - 1) * m, :d].to(dtype).reshape(B, n - (w0 == 0), m, d)
    if w0 == 0:
        pad = torch.full((B, 1, m, d), absent, dtype=dtype, device=x.device)
        a_half = torch.cat([pad, a_half], dim=1)
    return torch.cat([a_half, b_half], dim=2)


def csa_compress(c: torch.Tensor, z: torch.Tensor, m: int) -> torch.Tensor:
    """c, z [B, S, 2d] -> [B, S // m, d] in c's dtype."""
    B, S, two_d = c.shape
    d = two_d // 2
    W = S // m
    dtype = compute_dtype(c, z)
    out = torch.empty(B, W, d, dtype=c.dtype, device=c.device)
    for w0, w1 in row_chunks(W, 3 * B * 2 * m * d, CHUNK_BUDGET_ELEMENTS):
        c_slots = _csa_slots(c, w0, w1, m, dtype, 0.0)
        z_slots = _csa_slots(z, w0, w1, m, dtype, float("-inf"))
        out[:, w0:w1] = _pool(c_slots, z_slots).to(c.dtype)
    return out


def csa_compress_backward(grad_out: torch.Tensor, c: torch.Tensor, z: torch.Tensor, m: int):
    """(dc, dz) of `csa_compress`, in the dtypes of c and z.

    The tokens of window v feed two entries: their a halves to entry v+1, their b halves to entry v, so
    the a-half and b-half gradients land in disjoint channels and are written, not accumulated."""
    B, S, two_d = c.shape
    d = two_d // 2
    W = S // m
    dtype = compute_dtype(c, z)
    dc = torch.zeros_like(c)
    dz = torch.zeros_like(z)
    for w0, w1 in row_chunks(W, 5 * B * 2 * m * d, CHUNK_BUDGET_ELEMENTS):
        g = grad_out[:, w0:w1].to(dtype)
        c_slots = _csa_slots(c, w0, w1, m, dtype, 0.0)
        z_slots = _csa_slots(z, w0, w1, m, dtype, float("-inf"))
        dc_s, dz_s = _pool_backward(g, c_slots, z_slots)
        n = w1 - w0
        for grad, acc in ((dc_s, dc), (dz_s, dz)):
            # b slots of entries [w0, w1) -> b channels of windows [w0, w1)
            acc[:, w0 * m:w1 * m, d:] = grad[:, :, m:].reshape(B, n * m, d).to(acc.dtype)
            # a slots of entries [w0, w1) -> a channels of windows [w0-1, w1-1) (entry 0's are padding)
            first = 1 if w0 == 0 else 0
            a_grad = grad[:, first:, :m].reshape(B, (n - first) * m, d)
            acc[:, (w0 + first - 1) * m:(w1 - 1) * m, :d] = a_grad.to(acc.dtype)
    return dc, dz


# ----------------------------------------------------------------------------------------------
# Merge of attention branches with the sink
# ----------------------------------------------------------------------------------------------


def _merge_weights(lses: torch.Tensor, attn_sink: torch.Tensor | None, dtype: torch.dtype):
    """Per-branch weights and the merged LSE for lses [J, T, H].

    Returns (weights [J, T, H], lse [T, H], sink_prob [T, H] or None), with weight_j = e^(lse_j - L),
    L = log(e^sink + sum_j e^lse_j), and lse = logsumexp_j lse_j (keys only). An empty branch
    (lse = +inf, SPEC section 0) counts as -inf; a row with every branch empty gets weights 0 and lse +inf.
    """
    lse_keys = lses.to(dtype)
    lse_keys = torch.where(torch.isposinf(lse_keys), torch.full_like(lse_keys, float("-inf")), lse_keys)
    lse = torch.logsumexp(lse_keys, dim=0)  # -inf where every branch is empty
    denom = lse if attn_sink is None else torch.logaddexp(lse, attn_sink.to(dtype))
    # A row with no key and no sink has denom -inf: use 0 there so e^(-inf - 0) = 0, never NaN.
    safe_denom = torch.where(torch.isneginf(denom), torch.zeros_like(denom), denom)
    weights = torch.exp(lse_keys - safe_denom)
    sink_prob = None if attn_sink is None else torch.exp(attn_sink.to(dtype) - safe_denom)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    return weights, lse, sink_prob


def _branch_outputs(outs: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """outs [J, rows, H, d_v] in the compute dtype, with empty branches (weight 0) read as 0 so a stray
    value (even NaN) in an empty branch's output cannot leak into the merge."""
    return torch.where(weights.unsqueeze(-1) > 0, outs.to(dtype), torch.zeros((), dtype=dtype, device=outs.device))


def merge_attention_with_sink(outs: torch.Tensor, lses: torch.Tensor, attn_sink: torch.Tensor | None):
    """outs [J, T, H, d_v], lses [J, T, H] -> (out [T, H, d_v] in outs' dtype, lse [T, H] in lses' dtype)."""
    J, T, H, d_v = outs.shape
    dtype = compute_dtype(outs, lses)
    out = torch.empty(T, H, d_v, dtype=outs.dtype, device=outs.device)
    lse = torch.empty(T, H, dtype=lses.dtype, device=lses.device)
    for t0, t1 in row_chunks(T, 2 * J * H * d_v, CHUNK_BUDGET_ELEMENTS):
        weights, lse_rows, _ = _merge_weights(lses[:, t0:t1], attn_sink, dtype)
        o = _branch_outputs(outs[:, t0:t1], weights, dtype)
        out[t0:t1] = (weights.unsqueeze(-1) * o).sum(dim=0).to(outs.dtype)
        lse[t0:t1] = lse_rows.to(lses.dtype)
    return out, lse


def merge_attention_with_sink_backward(grad_out: torch.Tensor, outs: torch.Tensor, lses: torch.Tensor,
                                       out: torch.Tensor, lse: torch.Tensor, attn_sink: torch.Tensor | None,
                                       grad_lse: torch.Tensor | None = None):
    """(d_outs, d_lses, d_sink) of `merge_attention_with_sink`; d_sink is zeros when attn_sink is None.

    With weight_j = e^(lse_j - L) and a_j = grad . o_j: d o_j = weight_j * grad,
    d lse_j = weight_j * (a_j - grad . out), d sink[h] = -sum_t e^(sink - L) * (grad . out) (as in SPEC
    section 5). `out` is the merged output saved by the forward. `grad_lse` (optional) reaches the merged
    lse = logsumexp_j lse_j: d lse_j += grad_lse * e^(lse_j - lse) over non-empty branches."""
    J, T, H, d_v = outs.shape
    dtype = compute_dtype(outs, lses)
    d_outs = torch.empty_like(outs)
    d_lses = torch.empty_like(lses)
    sink_dtype = attn_sink.dtype if attn_sink is not None else lses.dtype
    d_sink = torch.zeros(H, dtype=dtype, device=outs.device)
    for t0, t1 in row_chunks(T, 3 * J * H * d_v, CHUNK_BUDGET_ELEMENTS):
        weights, _, sink_prob = _merge_weights(lses[:, t0:t1], attn_sink, dtype)
        g = grad_out[t0:t1].to(dtype)
        o = _branch_outputs(outs[:, t0:t1], weights, dtype)
        delta = (g * out[t0:t1].to(dtype)).sum(-1)  # [rows, H]
        branch_dot = (g.unsqueeze(0) * o).sum(-1)  # [J, rows, H]
        d_outs[:, t0:t1] = (weights.unsqueeze(-1) * g.unsqueeze(0)).to(outs.dtype)
        d_branch_lse = weights * (branch_dot - delta)
        if grad_lse is not None:
            merged = lse[t0:t1].to(dtype)
            branch = lses[:, t0:t1].to(dtype)
            counts = torch.isfinite(branch) & torch.isfinite(merged).unsqueeze(0)  # +inf lse: empty, no gradient
            share = torch.exp(torch.where(counts, branch - merged.unsqueeze(0), torch.zeros_like(branch)))
            d_branch_lse = d_branch_lse + torch.where(counts, share * grad_lse[t0:t1].to(dtype).unsqueeze(0), 0.0)
        d_lses[:, t0:t1] = d_branch_lse.to(lses.dtype)
        if sink_prob is not None:
            d_sink -= (sink_prob * delta).sum(0)
    return d_outs, d_lses, d_sink.to(sink_dtype)
