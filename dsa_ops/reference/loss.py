"""Pure-torch reference implementations of the indexer training loss (SPEC section 6).

The indexer is distilled towards the main attention: for each query row ``t`` both
distributions live on a key set ``S_t`` (the top-k slots for the sparse loss, all visible keys
for the dense loss)::

    predict[t, j] = softmax_j(logit[t, j])                 (indexer logits, SPEC section 1)
    loss          = loss_coeff / R * sum_t sum_j target[t, j] * (clip(log target) - clip(log predict))

with ``clip`` = clamp to ``[-100, 0]`` and ``R`` = number of rows whose ``S_t`` is not empty
(``R = 0`` gives a loss of 0). The backward is the SPEC formula for the gradient of the
clipped form, on ``S_t`` only::

    g[t, j]      = -max(target, e^-100) * 1[predict >= e^-100] * loss_coeff / R * grad_loss
    dlogit[t, j] = g[t, j] - predict[t, j] * sum_j' g[t, j']

then through ``logit = sum_h w_h * relu(s_h)``, ``s_h = scale * q_h . k``:
``dw_h = sum_j dlogit * relu(s_hj)``, ``ds_hj = dlogit * w_h * 1[s_hj > 0]``,
``dq_h = scale * sum_j ds_hj k_j``, ``dk_j += scale * sum_h ds_hj q_h``.

Dtypes: bf16/fp16/fp32 inputs are computed in fp32, fp64 inputs stay fp64 (gradcheck). The
backwards walk the query rows in chunks so no ``[rows, H_I, K or S_k]`` intermediate bigger
than ``_CHUNK_ELEMENTS`` is made.
"""

from __future__ import annotations

import math

import torch

from ._common import compute_dtype, row_chunks, valid_slots
from .indexer import gather_indexer_logits, indexer_logits

# Upper bound on the elements of one chunk's biggest intermediate. Tests patch it small to
# prove that the chunking changes nothing.
_CHUNK_ELEMENTS = 1 << 24

# clip() bounds of log-probabilities, and the matching probability floor e^-100.
_LOG_FLOOR = -100.0
_PROB_FLOOR = math.exp(_LOG_FLOOR)


# --------------------------------------------------------------------------------------
# helpers shared by the sparse and the dense loss
# --------------------------------------------------------------------------------------

def _row_chunks(n_rows: int, elements_per_row: int):
    """Row ranges whose temporaries stay within _CHUNK_ELEMENTS (read at call time: tests shrink it)."""
    return row_chunks(n_rows, elements_per_row, _CHUNK_ELEMENTS)


def _query_starts(q_start, batch: int, n_queries: int, n_keys: int, ratio: int) -> list[int]:
    """Absolute position of query row 0 of each sequence (default: queries are the last tokens).

    Read on the host: the loss is a training op, a sync here costs nothing that matters.
    """
    if q_start is None:
        return [n_keys * ratio - n_queries] * batch
    return [int(v) for v in q_start.tolist()]


def _visible_count(first_position: int, n_rows: int, n_keys: int, ratio: int,
                   device) -> torch.Tensor:
    """Number of visible keys (int64 [n_rows]) of consecutive query rows: min((pos+1)//ratio, Sk).

    Floor division keeps rows before the first complete key (negative positions) at 0.
    """
    positions = first_position + torch.arange(n_rows, device=device, dtype=torch.int64)
    limit = torch.div(positions + 1, ratio, rounding_mode="floor")
    return limit.clamp(min=0, max=n_keys)


def _log_softmax_over(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log softmax over the slots where keep is True, along the last dim.

    Other slots hold junk (finite); callers mask them. A row with no kept slot does not
    produce NaN (its junk is simply never used).
    """
    masked = torch.where(keep, logits, float("-inf"))
    log_norm = torch.logsumexp(masked, dim=-1, keepdim=True)
    log_norm = torch.where(torch.isfinite(log_norm), log_norm, 0.0)
    return torch.where(keep, logits, 0.0) - log_norm


def _clipped_kl_sum(target: torch.Tensor, log_predict: torch.Tensor,
                    keep: torch.Tensor) -> torch.Tensor:
    """sum over kept slots of target * (clip(log target) - clip(log predict)).

    log(0) = -inf clips to -100, so a zero target gives 0 * finite = 0, never NaN.
    torch.where (not a multiply) drops whatever the dropped slots hold, NaN included.
    """
    safe_target = torch.where(keep, target, 0.0)
    log_target = torch.log(safe_target).clamp(_LOG_FLOOR, 0.0)
    terms = safe_target * (log_target - log_predict.clamp(_LOG_FLOOR, 0.0))
    return torch.where(keep, terms, 0.0).sum()


def _logit_gradient(target: torch.Tensor, log_predict: torch.Tensor, keep: torch.Tensor,
                    factor: torch.Tensor) -> torch.Tensor:
    """SPEC dlogit on the kept slots (0 elsewhere); factor = loss_coeff / R * grad_loss.

    The test predict >= e^-100 is done as log predict >= -100: the same condition, without
    rounding predict to an fp32 denormal first.
    """
    predict = torch.where(keep, torch.exp(log_predict), 0.0)
    g = -torch.clamp(target, min=_PROB_FLOOR) * (log_predict >= _LOG_FLOOR) * factor
    g = torch.where(keep, g, 0.0)
    return g - predict * g.sum(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------
# sparse loss: S_t = the valid top-k slots of row t
# --------------------------------------------------------------------------------------

def indexer_loss(q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor,
                 indices: torch.Tensor, target: torch.Tensor, scale: float = 1.0,
                 loss_coeff: float = 1.0, topk_length: torch.Tensor | None = None) -> torch.Tensor:
    """Clipped KL(target || predict) over the valid slots of ``indices`` (SPEC section 6).

    q_idx [B, Sq, H, D], k_idx [B, Sk, D], w [B, Sq, H], indices int32 [B, Sq, K] (local key
    ids), target [B, Sq, K] (already normalised by the caller; used as is on valid slots and
    ignored on invalid ones), topk_length int32 [B, Sq] or None. A slot is invalid if its id
    is < 0 or >= Sk or its slot number j >= topk_length. A duplicate id counts once per slot.
    Returns a 0-dim fp32 loss (fp64 for fp64 inputs).
    """
    dtype = compute_dtype(q_idx, k_idx, w, target)
    valid = valid_slots(indices, k_idx.shape[1], topk_length)
    n_rows = int(valid.any(dim=-1).sum())
    if n_rows == 0:
        return torch.zeros((), dtype=dtype, device=q_idx.device)
    # The gathered logits are [B, Sq, K], the size of the inputs: no chunking needed here.
    logits = gather_indexer_logits(q_idx, k_idx, w, indices, scale, topk_length).to(dtype)
    log_predict = _log_softmax_over(logits, valid)
    total = _clipped_kl_sum(target.to(dtype), log_predict, valid)
    return total * (loss_coeff / n_rows)


def indexer_loss_backward(grad_loss: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
                          w: torch.Tensor, indices: torch.Tensor, target: torch.Tensor,
                          scale: float = 1.0, loss_coeff: float = 1.0,
                          topk_length: torch.Tensor | None = None):
    """Gradient of indexer_loss by the SPEC formula: returns ``(dq_idx, dk_idx, dw)``.

    Invalid slots get no gradient; a key picked by several slots gets the sum of their
    gradients. Outputs are in the dtypes of q_idx, k_idx, w.
    """
    batch, n_queries, heads, dim = q_idx.shape
    n_keys = k_idx.shape[1]
    n_slots = indices.shape[-1]
    dtype = compute_dtype(q_idx, k_idx, w, target)
    device = q_idx.device
    dq = torch.zeros(q_idx.shape, dtype=dtype, device=device)
    dk = torch.zeros(k_idx.shape, dtype=dtype, device=device)
    dw = torch.zeros(w.shape, dtype=dtype, device=device)
    valid = valid_slots(indices, n_keys, topk_length)
    n_rows = int(valid.any(dim=-1).sum())
    if n_rows == 0:  # no row has a key: the loss is the constant 0
        return dq.to(q_idx.dtype), dk.to(k_idx.dtype), dw.to(w.dtype)
    factor = grad_loss.to(dtype) * (loss_coeff / n_rows)
    # Invalid ids gather key 0; their dlogit is 0 and their key gradient is masked out.
    safe_ids = torch.where(valid, indices, 0).to(torch.int64)

    for b in range(batch):
        keys_all = k_idx[b].to(dtype)
        for start, end in _row_chunks(n_queries, n_slots * (heads + dim)):
            rows = slice(start, end)
            keep = valid[b, rows]                                          # [c, K]
            logits = gather_indexer_logits(
                q_idx[b:b + 1, rows], k_idx[b:b + 1], w[b:b + 1, rows], indices[b:b + 1, rows],
                scale, None if topk_length is None else topk_length[b:b + 1, rows])[0]
            log_predict = _log_softmax_over(logits.to(dtype), keep)
            dlogit = _logit_gradient(target[b, rows].to(dtype), log_predict, keep, factor)

            q_rows = q_idx[b, rows].to(dtype)                              # [c, H, D]
            w_rows = w[b, rows].to(dtype)                                  # [c, H]
            keys = keys_all[safe_ids[b, rows]]                             # [c, K, D]
            s = torch.einsum("chd,ckd->chk", q_rows, keys) * scale         # [c, H, K]
            dw[b, rows] = torch.einsum("ck,chk->ch", dlogit, torch.relu(s))
            ds = torch.where(s > 0, dlogit[:, None, :] * w_rows[:, :, None], 0.0)
            dq[b, rows] = torch.einsum("chk,ckd->chd", ds, keys) * scale
            dk_slots = torch.einsum("chk,chd->ckd", ds, q_rows) * scale    # [c, K, D]
            dk_slots = torch.where(keep[..., None], dk_slots, 0.0)
            # Scatter-add: duplicate ids each add their own slot's gradient.
            dk[b].index_add_(0, safe_ids[b, rows].reshape(-1), dk_slots.reshape(-1, dim))
    return dq.to(q_idx.dtype), dk.to(k_idx.dtype), dw.to(w.dtype)


# --------------------------------------------------------------------------------------
# dense loss: S_t = every key visible to row t under the ratio-causal mask
# --------------------------------------------------------------------------------------

def _dense_chunk(q_idx, k_idx, w, attn_scores, attn_l1, scale, ratio, b, start, end,
                 first_position, dtype):
    """Shared forward part of one chunk of rows of sequence b.

    Returns (visible bool [c, Sk], target [c, Sk], log_predict [c, Sk]), junk off visible keys.
    """
    n_keys = k_idx.shape[1]
    device = q_idx.device
    chunk_start = torch.tensor([first_position + start], dtype=torch.int32, device=device)
    logits = indexer_logits(q_idx[b:b + 1, start:end], k_idx[b:b + 1], w[b:b + 1, start:end],
                            scale, ratio, chunk_start)[0].to(dtype)
    n_visible = _visible_count(first_position + start, end - start, n_keys, ratio, device)
    visible = torch.arange(n_keys, device=device)[None, :] < n_visible[:, None]
    l1 = attn_l1[b, start:end].to(dtype).clamp(min=1e-12)
    target = attn_scores[b, start:end].to(dtype) / l1[:, None]
    return visible, target, _log_softmax_over(logits, visible)


def _dense_rows_with_keys(batch, n_queries, n_keys, ratio, starts, device) -> int:
    """R of the dense loss: rows that see at least one key."""
    return sum(int((_visible_count(starts[b], n_queries, n_keys, ratio, device) > 0).sum())
               for b in range(batch))


def dense_indexer_loss(q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor,
                       attn_scores: torch.Tensor, attn_l1: torch.Tensor, scale: float = 1.0,
                       ratio: int = 1, loss_coeff: float = 1.0,
                       q_start: torch.Tensor | None = None) -> torch.Tensor:
    """Clipped KL(target || predict) over all visible keys of each row (SPEC section 6).

    q_idx [B, Sq, H, D], k_idx [B, Sk, D], w [B, Sq, H], attn_scores [B, Sq, Sk] (the raw
    attention scores; only visible keys are read), attn_l1 [B, Sq] (their row sums),
    q_start int32 [B] or None (default Sk * ratio - Sq). target = attn_scores /
    max(attn_l1, 1e-12) on visible keys; predict = softmax of indexer_logits over the same keys
    (scale applied once, inside the logits). Returns a 0-dim fp32 loss (fp64 for fp64 inputs).
    """
    batch, n_queries, heads, _ = q_idx.shape
    n_keys = k_idx.shape[1]
    dtype = compute_dtype(q_idx, k_idx, w, attn_scores)
    device = q_idx.device
    starts = _query_starts(q_start, batch, n_queries, n_keys, ratio)
    n_rows = _dense_rows_with_keys(batch, n_queries, n_keys, ratio, starts, device)
    total = torch.zeros((), dtype=dtype, device=device)
    if n_rows == 0:
        return total
    for b in range(batch):
        for start, end in _row_chunks(n_queries, heads * n_keys):
            visible, target, log_predict = _dense_chunk(
                q_idx, k_idx, w, attn_scores, attn_l1, scale, ratio, b, start, end,
                starts[b], dtype)
            total = total + _clipped_kl_sum(target, log_predict, visible)
    return total * (loss_coeff / n_rows)


def dense_indexer_loss_backward(grad_loss: torch.Tensor, q_idx: torch.Tensor,
                                k_idx: torch.Tensor, w: torch.Tensor, attn_scores: torch.Tensor,
                                attn_l1: torch.Tensor, scale: float = 1.0, ratio: int = 1,
                                loss_coeff: float = 1.0, q_start: torch.Tensor | None = None):
    """Gradient of dense_indexer_loss by the SPEC formula: returns ``(dq_idx, dk_idx, dw)``.

    Hidden keys get no gradient. Outputs are in the dtypes of q_idx, k_idx, w.
    """
    batch, n_queries, heads, dim = q_idx.shape
    n_keys = k_idx.shape[1]
    dtype = compute_dtype(q_idx, k_idx, w, attn_scores)
    device = q_idx.device
    dq = torch.zeros(q_idx.shape, dtype=dtype, device=device)
    dk = torch.zeros(k_idx.shape, dtype=dtype, device=device)
    dw = torch.zeros(w.shape, dtype=dtype, device=device)
    starts = _query_starts(q_start, batch, n_queries, n_keys, ratio)
    n_rows = _dense_rows_with_keys(batch, n_queries, n_keys, ratio, starts, device)
    if n_rows == 0:
        return dq.to(q_idx.dtype), dk.to(k_idx.dtype), dw.to(w.dtype)
    factor = grad_loss.to(dtype) * (loss_coeff / n_rows)

    for b in range(batch):
        keys_all = k_idx[b].to(dtype)
        for start, end in _row_chunks(n_queries, heads * n_keys):
            rows = slice(start, end)
            visible, target, log_predict = _dense_chunk(
                q_idx, k_idx, w, attn_scores, attn_l1, scale, ratio, b, start, end,
                starts[b], dtype)
            dlogit = _logit_gradient(target, log_predict, visible, factor)   # [c, Sk]
            # Rows see a prefix of the keys, longest for the last row: keys past it have
            # dlogit 0 in every row of the chunk, so skip them.
            n_seen = int(visible.sum(dim=-1).max())
            dlogit = dlogit[:, :n_seen]
            keys = keys_all[:n_seen]                                         # [n, D]

            q_rows = q_idx[b, rows].to(dtype)                                # [c, H, D]
            w_rows = w[b, rows].to(dtype)                                    # [c, H]
            s = torch.einsum("chd,kd->chk", q_rows, keys) * scale            # [c, H, n]
            dw[b, rows] = torch.einsum("ck,chk->ch", dlogit, torch.relu(s))
            ds = torch.where(s > 0, dlogit[:, None, :] * w_rows[:, :, None], 0.0)
            dq[b, rows] = torch.einsum("chk,kd->chd", ds, keys) * scale
            dk[b, :n_seen] += torch.einsum("chk,chd->kd", ds, q_rows) * scale
    return dq.to(q_idx.dtype), dk.to(k_idx.dtype), dw.to(w.dtype)
