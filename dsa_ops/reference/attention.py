"""Pure-torch reference implementations of the attention ops (SPEC sections 0, 4, 5, 6).

These are the CPU kernels and the test oracles for the GPU kernels, so they favour plain, checkable
math over speed. Every function takes already-validated contiguous tensors (see
docs/IMPLEMENTATIONS.md) and returns fresh outputs.

Shared conventions:
- Math runs in fp32 for bf16/fp16/fp32 inputs and in fp64 for fp64 inputs (gradcheck).
- An index slot `j` of row `t` is *invalid* when its id is < 0 or >= S_kv, or when
  `j >= topk_length[t]`. Invalid slots are gathered from row 0 (a safe address) and then masked,
  so no tensor shape ever depends on tensor values (no host sync; decode needs that).
- Work is chunked over query rows so the per-chunk gather `[rows, K, D]` (and the per-chunk score
  block) stays under GATHER_BUDGET_ELEMENTS elements. Tests shrink the budget to force many chunks.
"""

from __future__ import annotations

import torch

from ._common import compute_dtype, row_chunks, valid_slots

# Largest number of elements one chunk's temporaries (the [rows, K, D] gather and friends) may hold.
# A module global, not an argument, because the op signatures are fixed; tests monkeypatch it.
GATHER_BUDGET_ELEMENTS = 64 * 1024 * 1024


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _chunks(num_rows: int, elements_per_row: int):
    """Row ranges within GATHER_BUDGET_ELEMENTS (read at call time: tests shrink it)."""
    return row_chunks(num_rows, elements_per_row, GATHER_BUDGET_ELEMENTS)


def _valid_slots(indices: torch.Tensor, num_kv_rows: int, topk_length: torch.Tensor | None):
    """Return (safe_ids int64 [..., K], valid bool [..., K]).

    `safe_ids` equals the id on valid slots and 0 elsewhere, so it can always be gathered.
    `indices` is [..., K]; `topk_length`, if given, has the leading shape of `indices`.
    """
    ids = indices.long()
    valid = valid_slots(ids, num_kv_rows, topk_length)
    safe_ids = torch.where(valid, ids, torch.zeros_like(ids))
    return safe_ids, valid


def _gather_rows(kv: torch.Tensor, safe_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """kv[safe_ids] in the compute dtype; an empty kv (S_kv = 0) yields zeros (all slots are invalid)."""
    if kv.shape[0] == 0:  # a shape test, not a value test: no host sync
        return torch.zeros(*safe_ids.shape, kv.shape[1], dtype=dtype, device=kv.device)
    # Gather in the storage dtype first, then upcast: the upcast copy is only [rows, K, D].
    return kv[safe_ids].to(dtype)


def _softmax_denominator(lse: torch.Tensor, attn_sink: torch.Tensor | None) -> torch.Tensor:
    """L = logaddexp(lse, sink): the log of the full softmax denominator (lse itself without a sink)."""
    if attn_sink is None:
        return lse
    return torch.logaddexp(lse, attn_sink.to(lse.dtype))


def _probabilities(scores: torch.Tensor, denom: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """P = exp(s - L) on valid slots, exactly 0 on invalid ones.

    scores [rows, H, K], denom [rows, H], valid [rows, K]. A row with no valid slot and no sink has
    L = -inf; `s - L` would be NaN there, so L is replaced by 0 for that row (all its P are masked).
    """
    safe_denom = torch.where(torch.isneginf(denom), torch.zeros_like(denom), denom)
    probs = torch.exp(scores - safe_denom.unsqueeze(-1))
    return probs.masked_fill(~valid.unsqueeze(1), 0.0)


def _scatter_add_rows(acc: torch.Tensor, row_ids: torch.Tensor, rows: torch.Tensor,
                      deterministic: bool) -> None:
    """acc[row_ids[i]] += rows[i] for every i (duplicates accumulate).

    On CPU, index_add_ walks the ids in order, so it is deterministic. On CUDA, index_add_ uses
    float atomics (order varies run to run); index_put_(accumulate=True) instead always takes
    PyTorch's sort-based CUDA path (stable sort of the ids, then each run of equal ids is summed
    in sorted order), which is bitwise reproducible; it is the path PyTorch itself uses for
    index_add_ under torch.use_deterministic_algorithms(True).
    """
    if deterministic and acc.is_cuda:
        acc.index_put_((row_ids,), rows, accumulate=True)
    else:
        acc.index_add_(0, row_ids, rows)


def visible_mask(num_q: int, num_k: int, ratio: int, q_start: torch.Tensor | None = None,
                 rows: range | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Ratio-causal visibility (SPEC section 0) as a bool tensor [B, len(rows), num_k].

    Query q of batch b sits at token position pos = q_start[b] + q; compressed key k is visible iff
    k < (pos + 1) // ratio (and k < num_k, true by construction). q_start None means
    num_k * ratio - num_q for every batch; the result then has B = 1 (it broadcasts).
    `rows` picks a range of query rows (all rows by default) so callers can build one chunk.
    """
    if rows is None:
        rows = range(num_q)
    if q_start is None:
        starts = torch.full((1,), num_k * ratio - num_q, dtype=torch.long, device=device)
    else:
        starts = q_start.long()  # q_start's device is authoritative
        device = starts.device
    query = torch.arange(rows.start, rows.stop, dtype=torch.long, device=device)
    pos = starts.unsqueeze(1) + query.unsqueeze(0)  # [B, rows]
    # Floor division; for pos + 1 < 0 the limit is negative and nothing is visible, as it should be.
    limit = torch.div(pos + 1, ratio, rounding_mode="floor")
    key = torch.arange(num_k, dtype=torch.long, device=device)
    return key.view(1, 1, -1) < limit.unsqueeze(-1)


# ----------------------------------------------------------------------------------------------
# Sparse attention forward (SPEC section 4)
# ----------------------------------------------------------------------------------------------


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float,
                     d_v: int, attn_sink: torch.Tensor | None, topk_length: torch.Tensor | None):
    """Returns (out [T, H, d_v] in q.dtype, lse [T, H] fp32; fp64 for fp64 inputs).

    lse is over the valid slots only (the sink never enters it); rows with no valid slot get
    out = 0 and lse = +inf.
    """
    num_rows, num_heads, head_dim = q.shape
    num_kv_rows = kv.shape[0]
    num_slots = indices.shape[1]
    cdtype = compute_dtype(q)
    sink = None if attn_sink is None else attn_sink.to(cdtype)

    out = torch.empty(num_rows, num_heads, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_rows, num_heads, dtype=cdtype, device=q.device)
    safe_ids, valid = _valid_slots(indices, num_kv_rows, topk_length)

    # Per row: the [K, D] gather plus the [H, K] scores and probabilities.
    for start, stop in _chunks(num_rows, num_slots * head_dim + 2 * num_heads * num_slots):
        kv_sel = _gather_rows(kv, safe_ids[start:stop], cdtype)  # [c, K, D]
        chunk_valid = valid[start:stop]  # [c, K]
        q_chunk = q[start:stop].to(cdtype)  # [c, H, D]

        scores = scale * torch.einsum("chd,ckd->chk", q_chunk, kv_sel)
        scores = scores.masked_fill(~chunk_valid.unsqueeze(1), float("-inf"))
        chunk_lse = torch.logsumexp(scores, dim=-1)  # -inf for a row with no valid slot
        probs = _probabilities(scores, _softmax_denominator(chunk_lse, sink), chunk_valid)

        out[start:stop] = torch.einsum("chk,ckv->chv", probs, kv_sel[..., :d_v]).to(q.dtype)
        # SPEC: an empty row reports lse = +inf (so exp(s - lse) is 0 for any consumer).
        lse[start:stop] = torch.where(torch.isneginf(chunk_lse),
                                      torch.full_like(chunk_lse, float("inf")), chunk_lse)
    return out, lse


# ----------------------------------------------------------------------------------------------
# Sparse attention backward (SPEC section 5)
# ----------------------------------------------------------------------------------------------


def sparse_attention_backward(dout: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, indices: torch.Tensor,
                              scale: float, d_v: int, attn_sink: torch.Tensor | None,
                              topk_length: torch.Tensor | None, deterministic: bool,
                              grad_lse: torch.Tensor | None = None):
    """Returns (dq in q.dtype, dkv in kv.dtype, d_sink [H]).

    Uses the forward's `out` and `lse` as given (only P is recomputed). d_sink is in attn_sink's
    dtype (as autograd needs), or zeros in the compute dtype when there is no sink.
    `grad_lse` [T, H] (optional) is the gradient reaching `lse` (e.g. through merge_attention_with_sink):
    d lse / d s_j = exp(s_j - lse) = P_j * exp(L - lse), so it only shifts Delta per (t, h).
    """
    num_rows, num_heads, head_dim = q.shape
    num_kv_rows = kv.shape[0]
    num_slots = indices.shape[1]
    cdtype = compute_dtype(q)
    sink = None if attn_sink is None else attn_sink.to(cdtype)

    dq = torch.empty_like(q)
    dkv_acc = torch.zeros(num_kv_rows, head_dim, dtype=cdtype, device=kv.device)
    d_sink_acc = torch.zeros(num_heads, dtype=cdtype, device=q.device)
    safe_ids, valid = _valid_slots(indices, num_kv_rows, topk_length)

    # Per row: the [K, D] gather, the [K, D] per-slot dkv, and about four [H, K] blocks.
    for start, stop in _chunks(num_rows, 2 * num_slots * head_dim + 4 * num_heads * num_slots):
        chunk_ids = safe_ids[start:stop]
        chunk_valid = valid[start:stop]
        kv_sel = _gather_rows(kv, chunk_ids, cdtype)  # [c, K, D]
        v_sel = kv_sel[..., :d_v]
        q_chunk = q[start:stop].to(cdtype)
        dout_chunk = dout[start:stop].to(cdtype)

        # The forward stores +inf for empty rows; turn it back into the logsumexp of nothing.
        chunk_lse = lse[start:stop].to(cdtype)
        chunk_lse = torch.where(torch.isposinf(chunk_lse),
                                torch.full_like(chunk_lse, float("-inf")), chunk_lse)
        denom = _softmax_denominator(chunk_lse, sink)  # [c, H]

        scores = scale * torch.einsum("chd,ckd->chk", q_chunk, kv_sel)
        probs = _probabilities(scores, denom, chunk_valid)  # [c, H, K], 0 on invalid slots

        delta = (out[start:stop].to(cdtype) * dout_chunk).sum(-1)  # [c, H]
        shifted = delta
        if grad_lse is not None:
            has_keys = torch.isfinite(chunk_lse)  # empty rows: lse carries nothing back
            lse_weight = torch.exp(torch.where(has_keys, denom - chunk_lse, torch.zeros_like(denom)))
            shifted = delta - torch.where(has_keys, grad_lse[start:stop].to(cdtype) * lse_weight, 0.0)
        dprobs = torch.einsum("chv,ckv->chk", dout_chunk, v_sel)
        dscores = probs * (dprobs - shifted.unsqueeze(-1))  # 0 on invalid slots since P is

        dq[start:stop] = (scale * torch.einsum("chk,ckd->chd", dscores, kv_sel)).to(q.dtype)

        # Per-slot gradient of the gathered row: the key part (all D dims) plus the value part.
        dkv_slots = scale * torch.einsum("chk,chd->ckd", dscores, q_chunk)
        dkv_slots[..., :d_v] += torch.einsum("chk,chv->ckv", probs, dout_chunk)
        # Invalid slots already carry zeros, but zero them explicitly (they point at row 0).
        dkv_slots = dkv_slots.masked_fill(~chunk_valid.unsqueeze(-1), 0.0)
        if num_kv_rows > 0:
            _scatter_add_rows(dkv_acc, chunk_ids.reshape(-1), dkv_slots.reshape(-1, head_dim),
                              deterministic)

        if sink is not None:
            # d out / d sink = -P_sink * out, so d_sink = -sum_t P_sink * (out . dout).
            safe_denom = torch.where(torch.isneginf(denom), torch.zeros_like(denom), denom)
            sink_prob = torch.exp(sink.unsqueeze(0) - safe_denom)
            d_sink_acc -= (sink_prob * delta).sum(0)

    d_sink_dtype = cdtype if attn_sink is None else attn_sink.dtype
    return dq, dkv_acc.to(kv.dtype), d_sink_acc.to(d_sink_dtype)


# ----------------------------------------------------------------------------------------------
# Paged decode (SPEC section 4 on a paged cache)
# ----------------------------------------------------------------------------------------------


def sparse_attention_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                            seq_lens: torch.Tensor, indices: torch.Tensor, scale: float, d_v: int,
                            attn_sink: torch.Tensor | None, topk_length: torch.Tensor | None):
    """Returns (out [B, Sq, H, d_v] in q.dtype, lse [B, Sq, H]).

    Ids are token positions of the sequence; token t of sequence b lives at
    kv_cache[block_table[b, t // page], t % page]. The ids are mapped to rows of the flattened
    cache (invalid ones to -1) and the packed sparse_attention does the rest. No host sync.
    """
    batch, num_q, num_heads, head_dim = q.shape
    num_pages, page_size, _ = kv_cache.shape
    num_slots = indices.shape[-1]

    tokens = indices.long()  # [B, Sq, K]
    valid = (tokens >= 0) & (tokens < seq_lens.long().view(batch, 1, 1))
    if topk_length is not None:
        slot = torch.arange(num_slots, device=indices.device)
        valid = valid & (slot < topk_length.long().unsqueeze(-1))
    safe_tokens = torch.where(valid, tokens, torch.zeros_like(tokens))

    # Page of each slot, looked up per sequence. The clamp only matters if seq_lens claimed more
    # pages than block_table has: it keeps the lookup in bounds (an out-of-bounds gather is a
    # device assert on CUDA). Entries of unused pages may hold junk (-1, huge): only invalid slots
    # read them, and those become -1 below; a junk physical row would be >= S_kv or < 0 and so
    # invalid in sparse_attention anyway.
    page_slot = (safe_tokens // page_size).view(batch, num_q * num_slots)
    page_slot = page_slot.clamp(max=max(block_table.shape[1] - 1, 0))
    if block_table.shape[1] > 0:
        pages = torch.gather(block_table.long(), 1, page_slot).view(batch, num_q, num_slots)
    else:
        pages = torch.zeros_like(safe_tokens)
    physical_rows = pages * page_size + safe_tokens % page_size
    physical_rows = torch.where(valid, physical_rows, torch.full_like(physical_rows, -1))

    out, lse = sparse_attention(
        q.reshape(batch * num_q, num_heads, head_dim),
        kv_cache.reshape(num_pages * page_size, head_dim),
        physical_rows.view(batch * num_q, num_slots),
        scale, d_v, attn_sink, None)
    return out.view(batch, num_q, num_heads, d_v), lse.view(batch, num_q, num_heads)


# ----------------------------------------------------------------------------------------------
# Indexer-training targets (SPEC section 6)
# ----------------------------------------------------------------------------------------------


def sparse_attn_score(q: torch.Tensor, kv: torch.Tensor, lse: torch.Tensor, indices: torch.Tensor,
                      scale: float, topk_length: torch.Tensor | None) -> torch.Tensor:
    """target [T, K] (fp32; fp64 for fp64 inputs): head-summed attention probabilities on the
    selected keys, 0 on invalid slots, each row divided by max(row sum, 1e-12).

    Uses all D dims of kv for the scores; lse = +inf rows give 0.
    """
    num_rows, num_heads, head_dim = q.shape
    num_slots = indices.shape[1]
    cdtype = compute_dtype(q)

    target = torch.empty(num_rows, num_slots, dtype=cdtype, device=q.device)
    safe_ids, valid = _valid_slots(indices, kv.shape[0], topk_length)

    for start, stop in _chunks(num_rows, num_slots * head_dim + 2 * num_heads * num_slots):
        chunk_valid = valid[start:stop]
        kv_sel = _gather_rows(kv, safe_ids[start:stop], cdtype)
        q_chunk = q[start:stop].to(cdtype)
        chunk_lse = lse[start:stop].to(cdtype)

        scores = scale * torch.einsum("chd,ckd->chk", q_chunk, kv_sel)
        probs = torch.exp(scores - chunk_lse.unsqueeze(-1))  # exp(s - inf) = 0 for empty rows
        summed = probs.sum(1).masked_fill(~chunk_valid, 0.0)  # [c, K]
        row_sum = summed.sum(-1, keepdim=True).clamp_min(1e-12)
        target[start:stop] = summed / row_sum
    return target


def dense_attn_score(q: torch.Tensor, kv: torch.Tensor, lse: torch.Tensor, scale: float,
                     ratio: int, q_start: torch.Tensor | None):
    """Returns (scores [B, Sq, Sk], l1 [B, Sq]), fp32 (fp64 for fp64 inputs).

    scores[b, i, k] = sum_h exp(scale * q[b, i, h] . kv[b, k] - lse[b, i, h]) where the
    ratio-causal mask shows key k to query i, else 0; l1 is the row sum.
    """
    batch, num_q, num_heads, head_dim = q.shape
    num_k = kv.shape[1]
    cdtype = compute_dtype(q)

    scores = torch.empty(batch, num_q, num_k, dtype=cdtype, device=q.device)
    kv_c = kv.to(cdtype)
    # Per query row: the [B, H, Sk] block of per-head scores.
    for start, stop in _chunks(num_q, 2 * batch * num_heads * num_k):
        q_chunk = q[:, start:stop].to(cdtype)  # [B, c, H, D]
        chunk_lse = lse[:, start:stop].to(cdtype)  # [B, c, H]
        logits = scale * torch.einsum("bchd,bkd->bchk", q_chunk, kv_c)
        summed = torch.exp(logits - chunk_lse.unsqueeze(-1)).sum(2)  # [B, c, Sk]
        mask = visible_mask(num_q, num_k, ratio, q_start, range(start, stop), q.device)
        scores[:, start:stop] = summed.masked_fill(~mask, 0.0)
    return scores, scores.sum(-1)
