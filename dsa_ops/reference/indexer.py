"""Pure-torch reference implementations of the indexer ops (SPEC sections 0-3 and 6).

These are the oracles the kernels are tested against and the CPU implementations of the ops.
They favour plain, obviously-correct torch over speed, but they stay memory-bounded: every
function walks the query rows in chunks, so no ``[S_q, H_I, S_k]`` (or ``[S_q, S_k]``, where that
is not the output) intermediate larger than ``_CHUNK_ELEMENTS`` is ever made.

Math (SPEC section 1)::

    scores[b, q, k] = sum_h w[b, q, h] * relu(scale * q_idx[b, q, h, :] . k_idx[b, k, :])

with ``-inf`` where the ratio-causal mask hides key ``k`` from query ``q``: query ``q`` sits at
absolute position ``pos = q_start[b] + q`` and sees key ``k`` iff ``k < (pos + 1) // ratio``.

Dtypes: bf16/fp16/fp32 inputs are computed in fp32; fp64 inputs stay fp64 (for gradcheck).
"""

from __future__ import annotations

import torch

from ._common import compute_dtype, row_chunks, valid_slots

# Upper bound on the number of elements of one chunk's biggest intermediate (e.g. the
# [rows, H_I, S_k] pre-activation). Tests patch it small to prove the chunking is exact.
_CHUNK_ELEMENTS = 1 << 26


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------

def _row_chunks(n_rows: int, elements_per_row: int):
    """Row ranges whose temporaries stay within _CHUNK_ELEMENTS (read at call time: tests shrink it)."""
    return row_chunks(n_rows, elements_per_row, _CHUNK_ELEMENTS)


def _visible(positions: torch.Tensor, n_keys: int, ratio: int) -> torch.Tensor:
    """Ratio-causal mask: bool [rows, n_keys], True where key k < (pos + 1) // ratio.

    Floor division keeps negative positions (queries before the first key) fully masked.
    """
    limit = torch.div(positions + 1, ratio, rounding_mode="floor")
    keys = torch.arange(n_keys, device=positions.device)
    return keys[None, :] < limit[:, None]


def _query_positions(q_start, b: int, n_queries: int, n_keys: int, ratio: int,
                     device) -> torch.Tensor:
    """Absolute positions (int64 [n_queries]) of the query rows of sequence b.

    q_start None means the queries are the last tokens: q_start = n_keys * ratio - n_queries.
    q_start[b] is used as a 0-dim tensor, so no host sync happens.
    """
    rows = torch.arange(n_queries, device=device, dtype=torch.int64)
    if q_start is None:
        return rows + (n_keys * ratio - n_queries)
    return rows + q_start[b].to(torch.int64)


def _preactivation(q_rows: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * q . k for every (row, head, key): [rows, H, D] x [S_k, D] -> [rows, H, S_k]."""
    rows, heads, dim = q_rows.shape
    dots = q_rows.reshape(rows * heads, dim) @ keys.transpose(0, 1)
    return dots.view(rows, heads, keys.shape[0]) * scale


def _logits_block(q_rows: torch.Tensor, keys: torch.Tensor, w_rows: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """Unmasked indexer logits of a block of query rows: [rows, S_k].

    q_rows [rows, H, D], keys [S_k, D], w_rows [rows, H], all in the compute dtype.
    """
    activation = torch.relu(_preactivation(q_rows, keys, scale))
    # Weighted sum over heads as a batched matmul: [rows, 1, H] @ [rows, H, S_k].
    return torch.bmm(w_rows.unsqueeze(1), activation).squeeze(1)


# --------------------------------------------------------------------------------------
# gather_indexer_logits: the indexer logits at given key ids (differentiable)
# --------------------------------------------------------------------------------------

def gather_indexer_logits(q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor,
                          indices: torch.Tensor, scale: float,
                          topk_length: torch.Tensor | None = None) -> torch.Tensor:
    """Indexer logits at the selected keys: logits[b, q, j] = scores[b, q, indices[b, q, j]].

    q_idx [B, Sq, H, D], k_idx [B, Sk, D], w [B, Sq, H], indices [B, Sq, K] (local ids),
    topk_length [B, Sq] or None. Returns [B, Sq, K] in fp32 (fp64 for fp64 inputs), ``-inf``
    on invalid slots (id < 0, id >= Sk, or j >= topk_length). No causal mask is applied: the
    caller's ids decide which keys count. Duplicate ids give the same logit in each slot.

    Pure torch and differentiable with respect to q_idx, k_idx and w (invalid slots get no
    gradient). Chunked over query rows so the [rows, K, D] gather stays bounded.
    """
    batch, n_queries, heads, dim = q_idx.shape
    n_keys = k_idx.shape[1]
    n_slots = indices.shape[-1]
    dtype = compute_dtype(q_idx, k_idx, w)
    valid = valid_slots(indices, n_keys, topk_length)
    # Invalid ids point at key 0 for the gather; torch.where below discards them, and its
    # backward sends them no gradient.
    safe_ids = torch.where(valid, indices, torch.zeros_like(indices)).to(torch.int64)
    minus_inf = torch.tensor(float("-inf"), dtype=dtype, device=q_idx.device)
    if n_keys == 0:  # nothing to gather: every slot is invalid
        return torch.full((batch, n_queries, n_slots), float("-inf"), dtype=dtype,
                          device=q_idx.device)

    per_batch = []
    for b in range(batch):
        keys = k_idx[b].to(dtype)
        chunks = []
        for start, end in _row_chunks(n_queries, n_slots * max(heads, dim)):
            gathered = keys[safe_ids[b, start:end]]                    # [rows, K, D]
            q_rows = q_idx[b, start:end].to(dtype)                     # [rows, H, D]
            pre = torch.bmm(q_rows, gathered.transpose(1, 2)) * scale  # [rows, H, K]
            w_rows = w[b, start:end].to(dtype).unsqueeze(1)            # [rows, 1, H]
            logits = torch.bmm(w_rows, torch.relu(pre)).squeeze(1)    # [rows, K]
            chunks.append(torch.where(valid[b, start:end], logits, minus_inf))
        if chunks:
            per_batch.append(torch.cat(chunks, dim=0))
        else:
            per_batch.append(torch.empty(0, n_slots, dtype=dtype, device=q_idx.device))
    if not per_batch:
        return torch.empty(0, n_queries, n_slots, dtype=dtype, device=q_idx.device)
    return torch.stack(per_batch, dim=0)


# --------------------------------------------------------------------------------------
# indexer_logits and its backward (SPEC section 1)
# --------------------------------------------------------------------------------------

def indexer_logits(q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor,
                   scale: float = 1.0, ratio: int = 1,
                   q_start: torch.Tensor | None = None) -> torch.Tensor:
    """Masked indexer logits ``scores [B, Sq, Sk]`` (SPEC section 1).

    q_idx [B, Sq, H, D], k_idx [B, Sk, D], w [B, Sq, H], q_start [B] int32 or None
    (default Sk * ratio - Sq). fp32 output (fp64 for fp64 inputs), ``-inf`` where the
    ratio-causal mask hides the key.
    """
    batch, n_queries, heads, _ = q_idx.shape
    n_keys = k_idx.shape[1]
    dtype = compute_dtype(q_idx, k_idx, w)
    scores = torch.empty(batch, n_queries, n_keys, dtype=dtype, device=q_idx.device)
    for b in range(batch):
        keys = k_idx[b].to(dtype)
        positions = _query_positions(q_start, b, n_queries, n_keys, ratio, q_idx.device)
        for start, end in _row_chunks(n_queries, heads * n_keys):
            block = _logits_block(q_idx[b, start:end].to(dtype), keys,
                                  w[b, start:end].to(dtype), scale)
            hidden = ~_visible(positions[start:end], n_keys, ratio)
            scores[b, start:end] = block.masked_fill(hidden, float("-inf"))
    return scores


def indexer_logits_backward(grad_scores: torch.Tensor, q_idx: torch.Tensor,
                            k_idx: torch.Tensor, w: torch.Tensor, scale: float = 1.0,
                            ratio: int = 1, q_start: torch.Tensor | None = None):
    """Analytic gradient of indexer_logits: returns ``(dq_idx, dk_idx, dw)``.

    With ``pre = scale * q . k`` and ``g = grad_scores`` (zeroed where the mask hides a key,
    whatever it holds there, NaN or inf included):

        dw[q, h]    = sum_k g[q, k] * relu(pre[q, h, k])
        dpre        = g[q, k] * w[q, h] * 1[pre > 0]        (ReLU passes gradient where pre > 0)
        dq_idx[q,h] = scale * sum_k dpre[q, h, k] * k_idx[k]
        dk_idx[k]   = scale * sum_{q,h} dpre[q, h, k] * q_idx[q, h]

    Outputs are in the dtypes of q_idx, k_idx, w; accumulation in fp32 (fp64 for fp64 inputs).
    """
    batch, n_queries, heads, dim = q_idx.shape
    n_keys = k_idx.shape[1]
    dtype = compute_dtype(q_idx, k_idx, w, grad_scores)
    device = q_idx.device
    dq = torch.empty(q_idx.shape, dtype=dtype, device=device)
    dk = torch.zeros(k_idx.shape, dtype=dtype, device=device)
    dw = torch.empty(w.shape, dtype=dtype, device=device)
    for b in range(batch):
        keys = k_idx[b].to(dtype)
        positions = _query_positions(q_start, b, n_queries, n_keys, ratio, device)
        for start, end in _row_chunks(n_queries, heads * n_keys):
            rows = end - start
            q_rows = q_idx[b, start:end].to(dtype)
            w_rows = w[b, start:end].to(dtype)
            grad = grad_scores[b, start:end].to(dtype)
            # torch.where (not a multiply) so NaN/inf gradient at masked keys cannot leak.
            grad = torch.where(_visible(positions[start:end], n_keys, ratio), grad, 0.0)
            pre = _preactivation(q_rows, keys, scale)                      # [rows, H, Sk]
            dw[b, start:end] = torch.bmm(torch.relu(pre), grad.unsqueeze(-1)).squeeze(-1)
            d_pre = torch.where(pre > 0, w_rows.unsqueeze(-1) * grad.unsqueeze(1), 0.0)
            d_pre = d_pre.reshape(rows * heads, n_keys)
            dq[b, start:end] = (d_pre @ keys).view(rows, heads, dim) * scale
            dk[b] += (d_pre.transpose(0, 1) @ q_rows.reshape(rows * heads, dim)) * scale
    return dq.to(q_idx.dtype), dk.to(k_idx.dtype), dw.to(w.dtype)


# --------------------------------------------------------------------------------------
# top-k with the exact tie rule (SPEC section 2)
# --------------------------------------------------------------------------------------

def _topk_rows(values: torch.Tensor, k: int, limits: torch.Tensor | None = None):
    """Top-k of each row of a 2-D block [rows, C] already in the compute dtype.

    Returns (ids int32 [rows, k], values [rows, k]), sorted by value descending then id
    ascending. A stable descending sort keeps the smaller column first among equal values,
    which is exactly the SPEC tie rule (-0.0 and +0.0 compare equal, so they tie too).
    """
    n_rows, n_cols = values.shape
    values = values.masked_fill(torch.isnan(values), float("-inf"))  # NaN: never selected
    if limits is not None:
        columns = torch.arange(n_cols, device=values.device)
        values = values.masked_fill(columns[None, :] >= limits[:, None].to(torch.int64),
                                    float("-inf"))
    take = min(k, n_cols)
    ordered, order = torch.sort(values, dim=-1, descending=True, stable=True)
    top_values = ordered[:, :take]
    top_ids = order[:, :take].masked_fill(top_values == float("-inf"), -1)
    out_ids = torch.full((n_rows, k), -1, dtype=torch.int32, device=values.device)
    out_values = torch.full((n_rows, k), float("-inf"), dtype=values.dtype,
                            device=values.device)
    out_ids[:, :take] = top_ids.to(torch.int32)
    out_values[:, :take] = top_values
    return out_ids, out_values


def topk(scores: torch.Tensor, k: int, lengths: torch.Tensor | None = None,
         sorted: bool = False):
    """Exact top-k over the last dim of ``scores [..., C]`` (SPEC section 2).

    For each row: the k largest entries among its first ``lengths[...]`` columns (all columns
    when lengths is None). Ties: the smaller column wins. ``-inf`` is never selected, and NaN
    is treated as ``-inf`` (never selected). Rows with fewer than k candidates (k may exceed
    C) pad with id -1 and value -inf. Returns (indices int32 [..., k], values [..., k]) with
    values fp32 (fp64 for fp64 scores). The output is always sorted (value descending, then
    id ascending), also when ``sorted=False`` (the order is then merely unspecified by the op).
    Deterministic; chunked over rows so the sort workspace stays bounded.
    """
    leading = scores.shape[:-1]
    n_cols = scores.shape[-1]
    n_rows = 1
    for size in leading:
        n_rows *= size
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    rows = scores.reshape(n_rows, n_cols)
    limits = lengths.reshape(n_rows) if lengths is not None else None
    out_ids = torch.empty(n_rows, k, dtype=torch.int32, device=scores.device)
    out_values = torch.empty(n_rows, k, dtype=dtype, device=scores.device)
    for start, end in _row_chunks(n_rows, n_cols):
        ids, values = _topk_rows(rows[start:end].to(dtype), k,
                                 limits[start:end] if limits is not None else None)
        out_ids[start:end] = ids
        out_values[start:end] = values
    return out_ids.view(*leading, k), out_values.view(*leading, k)


# --------------------------------------------------------------------------------------
# fused indexer top-k (SPEC section 3): never holds the [Sq, Sk] score matrix
# --------------------------------------------------------------------------------------

def _indexer_topk_rows(q_rows: torch.Tensor, keys: torch.Tensor, w_rows: torch.Tensor,
                       positions: torch.Tensor, k: int, scale: float, ratio: int):
    """Top-k keys for the query rows of one sequence, one chunk of rows at a time.

    q_rows [S, H, D], keys [Sk, D], w_rows [S, H], positions int64 [S]. Only a chunk's
    logits [rows, Sk] exist at once; the result is (ids int32 [S, k], values [S, k]).
    The chunking matches indexer_logits, so the scores (and hence the picks) are bitwise
    those of topk(indexer_logits(...)).
    """
    n_queries, heads, _ = q_rows.shape
    n_keys = keys.shape[0]
    dtype = compute_dtype(q_rows, keys, w_rows)
    keys = keys.to(dtype)
    out_ids = torch.empty(n_queries, k, dtype=torch.int32, device=q_rows.device)
    out_values = torch.empty(n_queries, k, dtype=dtype, device=q_rows.device)
    for start, end in _row_chunks(n_queries, heads * n_keys):
        block = _logits_block(q_rows[start:end].to(dtype), keys, w_rows[start:end].to(dtype),
                              scale)
        hidden = ~_visible(positions[start:end], n_keys, ratio)
        ids, values = _topk_rows(block.masked_fill(hidden, float("-inf")), k)
        out_ids[start:end] = ids
        out_values[start:end] = values
    return out_ids, out_values


def indexer_topk(q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor, topk: int,
                 scale: float = 1.0, ratio: int = 1, q_start: torch.Tensor | None = None,
                 cu_seqlens_q: torch.Tensor | None = None,
                 cu_seqlens_k: torch.Tensor | None = None):
    """Fused ``topk(indexer_logits(...), topk)`` without the [Sq, Sk] score matrix.

    Batch form: q_idx [B, Sq, H, D], k_idx [B, Sk, D], w [B, Sq, H], q_start [B] or None;
    returns (indices int32 [B, Sq, topk] local key ids, values [B, Sq, topk]).

    Packed form (cu_seqlens_q and cu_seqlens_k [B+1] given): q_idx [1, Tq, H, D],
    k_idx [1, Tk, D], w [1, Tq, H]; sequence s owns query rows cu_seqlens_q[s]:[s+1] and key
    rows cu_seqlens_k[s]:[s+1]; q_start [B] is per sequence (default Sk_s * ratio - Sq_s).
    Returned ids are GLOBAL key rows (cu_seqlens_k[s] + local); -1 padding stays -1. Reads
    cu_seqlens on the host (a sync; fine for a reference).
    """
    batch, n_queries, _, _ = q_idx.shape
    dtype = compute_dtype(q_idx, k_idx, w)
    device = q_idx.device
    if cu_seqlens_q is None and cu_seqlens_k is None:
        out_ids = torch.empty(batch, n_queries, topk, dtype=torch.int32, device=device)
        out_values = torch.empty(batch, n_queries, topk, dtype=dtype, device=device)
        n_keys = k_idx.shape[1]
        for b in range(batch):
            positions = _query_positions(q_start, b, n_queries, n_keys, ratio, device)
            out_ids[b], out_values[b] = _indexer_topk_rows(q_idx[b], k_idx[b], w[b], positions,
                                                           topk, scale, ratio)
        return out_ids, out_values

    if cu_seqlens_q is None or cu_seqlens_k is None or batch != 1:
        raise ValueError("packed indexer_topk needs both cu_seqlens_q and cu_seqlens_k, and B == 1")
    query_bounds = cu_seqlens_q.tolist()
    key_bounds = cu_seqlens_k.tolist()
    # Rows outside every sequence (if any) keep the padding.
    out_ids = torch.full((1, n_queries, topk), -1, dtype=torch.int32, device=device)
    out_values = torch.full((1, n_queries, topk), float("-inf"), dtype=dtype, device=device)
    for s in range(len(query_bounds) - 1):
        q_begin, q_end = query_bounds[s], query_bounds[s + 1]
        k_begin, k_end = key_bounds[s], key_bounds[s + 1]
        positions = _query_positions(q_start, s, q_end - q_begin, k_end - k_begin, ratio, device)
        ids, values = _indexer_topk_rows(q_idx[0, q_begin:q_end], k_idx[0, k_begin:k_end],
                                         w[0, q_begin:q_end], positions, topk, scale, ratio)
        out_ids[0, q_begin:q_end] = torch.where(ids >= 0, ids + k_begin, ids)
        out_values[0, q_begin:q_end] = values
    return out_ids, out_values


def indexer_topk_paged(q_idx: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, w: torch.Tensor, topk: int, scale: float = 1.0):
    """Decode form of indexer_topk over a paged key cache; no host sync.

    q_idx [B, Sq, H, D], k_cache [P, page, D], block_table [B, max_pages] int32,
    seq_lens [B] int32, w [B, Sq, H]. Token t of sequence b lives at
    k_cache[block_table[b, t // page], t % page]; query j sits at pos = seq_lens[b] - Sq + j
    and sees tokens 0..pos. Returns (indices int32 [B, Sq, topk] local token ids, values).

    Each sequence's max_pages * page tokens are gathered with one vectorised index (table
    entries are clamped into range: unused ones may hold anything, and the causal mask hides
    every token >= seq_lens[b] anyway), so the shapes never depend on tensor values.
    """
    batch, n_queries, _, dim = q_idx.shape
    n_pages, page_size, _ = k_cache.shape
    max_pages = block_table.shape[1]
    dtype = compute_dtype(q_idx, k_cache, w)
    device = q_idx.device
    pages = block_table.to(torch.int64).clamp(0, max(n_pages - 1, 0))
    out_ids = torch.empty(batch, n_queries, topk, dtype=torch.int32, device=device)
    out_values = torch.empty(batch, n_queries, topk, dtype=dtype, device=device)
    for b in range(batch):
        keys = k_cache[pages[b]].reshape(max_pages * page_size, dim)    # row t = token t
        positions = (torch.arange(n_queries, device=device, dtype=torch.int64)
                     + seq_lens[b].to(torch.int64) - n_queries)
        out_ids[b], out_values[b] = _indexer_topk_rows(q_idx[b], keys, w[b], positions, topk,
                                                       scale, ratio=1)
    return out_ids, out_values


# --------------------------------------------------------------------------------------
# sparse_indexer_score: the indexer's distribution over the selected keys (SPEC section 6)
# --------------------------------------------------------------------------------------

def _softmax_over_valid(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where -inf marks an invalid slot (probability 0).

    A row with no valid slot comes out all 0 (not NaN).
    """
    if logits.shape[-1] == 0:
        return torch.empty_like(logits)
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
    weights = torch.exp(logits - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, weights / total, 0.0)


def sparse_indexer_score(q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor,
                         indices: torch.Tensor, scale: float = 1.0,
                         topk_length: torch.Tensor | None = None) -> torch.Tensor:
    """Indexer probabilities over the given key slots: ``predict [B, Sq, K]``.

    predict[b, q, :] = softmax over the valid slots of gather_indexer_logits(...); invalid
    slots (id < 0, id >= Sk, j >= topk_length) get 0, rows with no valid slot are all 0.
    A duplicate id counts once per slot. fp32 (fp64 for fp64 inputs).
    """
    with torch.no_grad():
        logits = gather_indexer_logits(q_idx, k_idx, w, indices, scale, topk_length)
    return _softmax_over_valid(logits)
