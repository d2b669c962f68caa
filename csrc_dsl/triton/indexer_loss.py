"""Triton kernels for the indexer KL-distillation loss (SPEC section 6), sparse and dense forms.

Per query row t, over a key set S_t (the valid top-k slots, or every key visible under the ratio-causal mask):

    logit[t, j]   = sum_h w[t, h] * relu(z[t, h, j]),   z = scale * q_idx[t, h] . k_idx[key j]
    predict[t, j] = softmax_j(logit),   log_predict = logit - lse[t]
    loss          = loss_coeff / R * sum_t sum_j target[t, j] * (clip(log target) - clip(log predict))

clip = clamp to [-100, 0]; R = rows with a non-empty S_t (R = 0 gives 0). Backward (SPEC formula, as in
dsa_ops/reference/loss.py):

    g       = -max(target, e^-100) * 1[log predict >= -100] * loss_coeff / R * grad_loss
    dlogit  = g - predict * sum_j g
    dw_h    = sum_j dlogit * relu(z_hj);   ds_hj = dlogit * w_h * 1[z_hj > 0]
    dq_h    = scale * sum_j ds_hj k_j;     dk_j += scale * sum_h ds_hj q_h

Layout shared by every kernel: one program owns one query row and keeps its heads q_row [HI, DI] on chip. It
walks its keys in tiles of BLOCK keys; each tile's pre-activation is one MMA, z = keys [BLOCK, DI] @ q_row^T
[DI, HI] (keys are M, heads N, so the head sum of the logit is a row reduction of the MMA result). HI and DI are
padded to powers of two >= 16 inside the kernel by masked loads (zero weight), never by padded copies.

Sparse forward: pass 1 writes the K logits of the row to a scratch row and keeps an online max / sum (lse);
pass 2 reads them back with the targets and sums the clipped KL terms. Each row writes its partial KL and a
"row has a valid slot" flag; the loss is a torch sum over those buffers (fixed order for a given size, so the
forward is bitwise deterministic: no float atomics).

Sparse backward: R is counted first by a small torch op (no host sync). Per row: pass 1 logits + lse as above,
pass 2 sum_j g, pass 3 regathers the keys, recomputes z, and forms dw, dq (registers) and the per-slot dk rows.
dk is scattered with fp32 atomics, or, when torch.are_deterministic_algorithms_enabled(), written per slot to
a buffer [rows, K, DI] (a chunk of rows at a time, at most _DETERMINISTIC_CHUNK_BYTES) and summed into dk with
index_put_(accumulate=True), which is deterministic on CUDA (sort based).

Dense loss: the same row programs, streaming over the visible keys with an online softmax (the [Sq, HI, Sk]
pre-activation and the [Sq, Sk] logits are never stored). The clip of log predict needs the final lse, so the
forward makes two passes over the keys (lse, then the KL terms). The backward's row kernel makes three (lse,
sum_j g, then dq / dw) and stores lse and sum_j g per row; a second kernel owns one tile of keys and one range
of query rows per program and walks the rows that see the tile, recomputing predict from the stored row
statistics; the per-range partial dk are summed by torch. Every sum has a fixed order (deterministic, no
atomics).

Inputs: bf16 / fp16 / fp32 activations (fp32 uses exact "ieee" dots); fp64 (gradcheck) is left to the
reference. The public functions have exactly the signatures of docs/IMPLEMENTATIONS.md.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import dot_precision, num_sms, pad_pow2

# Tile sizes (keys per MMA tile). Tests patch them small to exercise several tiles on tiny shapes.
_BLOCK_SLOTS = 64         # sparse kernels: top-k slots per tile
_BLOCK_KEYS = 64          # dense kernels: keys per tile
_FWD_NUM_WARPS = 4
_BWD_NUM_WARPS = 8        # the backward keeps dq [HI, DI] fp32 in registers next to z
_NUM_STAGES = 2

# Deterministic sparse backward: bytes of the per-slot dk buffer [rows, K, DI] fp32 of one chunk of rows.
_DETERMINISTIC_CHUNK_BYTES = 256 * 1024 * 1024

# Dense dk: the query rows are split into up to this many ranges per key tile (at least _DENSE_DK_MIN_ROWS rows
# each) so that a few key tiles still fill the GPU; the per-range partial dk are summed by torch in range order.
_DENSE_DK_MAX_SPLITS = 32
_DENSE_DK_MIN_ROWS = 128

# clip() bounds of log-probabilities, and the probability floor e^-100 of the target in g (an fp32 denormal).
_LOG_FLOOR = tl.constexpr(-100.0)
_PROB_FLOOR = tl.constexpr(math.exp(-100.0))


# ----------------------------------------------------------------------------------------------------
# host helpers
# ----------------------------------------------------------------------------------------------------

def _empty(shape, dtype, device):
    """Allocation of outputs the kernels fully overwrite. Tests patch it to NaN-fill (catches unwritten
    elements)."""
    return torch.empty(shape, dtype=dtype, device=device)








def _shape_meta(q_idx: torch.Tensor) -> dict:
    _, _, heads, dim = q_idx.shape
    return dict(HI=heads, DI=dim, HI_PAD=pad_pow2(heads), DI_PAD=pad_pow2(dim),
                PRECISION=dot_precision(q_idx.dtype, "indexer-loss"))


def _loss_from_rows(row_kl: torch.Tensor, row_nonempty: torch.Tensor, loss_coeff: float) -> torch.Tensor:
    """loss_coeff / R * sum of the per-row KL terms; 0 when R = 0. On the device, no host sync.
    torch.sum of a fixed-size fp32 buffer reduces in a fixed order, so this is deterministic."""
    n_rows = row_nonempty.sum()
    total = row_kl.sum()
    loss = total * loss_coeff / n_rows.clamp_min(1).to(torch.float32)
    return torch.where(n_rows > 0, loss, torch.zeros_like(loss))


def _grad_factor(grad_loss: torch.Tensor, n_rows: torch.Tensor, loss_coeff: float) -> torch.Tensor:
    """loss_coeff / R * grad_loss as a 1-element fp32 device tensor (0 when R = 0, instead of inf * 0)."""
    factor = grad_loss.to(torch.float32) * loss_coeff / n_rows.clamp_min(1).to(torch.float32)
    return torch.where(n_rows > 0, factor, torch.zeros_like(factor)).reshape(1)


def _sparse_valid(indices: torch.Tensor, n_keys: int, topk_length) -> torch.Tensor:
    """bool [B, Sq, K]: id in [0, Sk) and slot j < topk_length (SPEC section 0)."""
    valid = (indices >= 0) & (indices < n_keys)
    if topk_length is not None:
        slot = torch.arange(indices.shape[-1], device=indices.device, dtype=torch.int32)
        valid &= slot < topk_length.unsqueeze(-1)
    return valid


def _query_starts(q_start, batch: int, n_queries: int, n_keys: int, ratio: int, device) -> torch.Tensor:
    """int32 [B]: absolute position of query row 0 (default: the queries are the last tokens)."""
    if q_start is None:
        return torch.full((batch,), n_keys * ratio - n_queries, dtype=torch.int32, device=device)
    return q_start


def _dense_rows_with_keys(starts: torch.Tensor, n_queries: int, n_keys: int, ratio: int) -> torch.Tensor:
    """R of the dense loss (0-dim int64 on the device): rows whose visible-key count is > 0."""
    pos_plus_1 = starts.to(torch.int64)[:, None] + torch.arange(n_queries, device=starts.device)[None, :] + 1
    n_visible = (pos_plus_1.clamp_min(0) // ratio).clamp_max(n_keys)
    return (n_visible > 0).sum()


# ----------------------------------------------------------------------------------------------------
# kernel helpers
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _load_row_heads(q_ptr, w_ptr, row, HI: tl.constexpr, DI: tl.constexpr,
                    HI_PAD: tl.constexpr, DI_PAD: tl.constexpr):
    """q_row [HI_PAD, DI_PAD] (input dtype) and w_row [HI_PAD] fp32 of one query row; padding is 0."""
    offs_h = tl.arange(0, HI_PAD)
    offs_d = tl.arange(0, DI_PAD)
    h_ok = offs_h < HI
    q_row = tl.load(q_ptr + row * (HI * DI) + offs_h[:, None] * DI + offs_d[None, :],
                    mask=h_ok[:, None] & (offs_d < DI)[None, :], other=0.0)
    w_row = tl.load(w_ptr + row * HI + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    return q_row, w_row


@triton.jit
def _load_keys(k_base, key_ids, key_ok, DI: tl.constexpr, DI_PAD: tl.constexpr):
    """keys [BLOCK, DI_PAD] at rows key_ids of k_base ([Sk, DI]); rows with key_ok False are 0."""
    offs_d = tl.arange(0, DI_PAD)
    return tl.load(k_base + key_ids.to(tl.int64)[:, None] * DI + offs_d[None, :],
                   mask=key_ok[:, None] & (offs_d < DI)[None, :], other=0.0)


@triton.jit
def _preactivation(keys, q_row, scale, PRECISION: tl.constexpr):
    """z [BLOCK, HI_PAD] fp32 = scale * keys @ q_row^T (one MMA; keys are M, heads N)."""
    return tl.dot(keys, tl.trans(q_row), input_precision=PRECISION) * scale


@triton.jit
def _logits_of(z, w_row, ok):
    """[BLOCK] logits sum_h w_h relu(z_h); -inf where ok is False."""
    logits = tl.sum(tl.maximum(z, 0.0) * w_row[None, :], axis=1)
    return tl.where(ok, logits, float("-inf"))


@triton.jit
def _online_lse_update(run_max, run_sum, logits):
    """One step of the streaming logsumexp: (max, sum of exp(x - max)) after adding a tile of logits."""
    new_max = tl.maximum(run_max, tl.max(logits, axis=0))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing valid yet: avoid -inf - -inf
    run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(logits - safe_max), axis=0)
    return new_max, run_sum


@triton.jit
def _final_lse(run_max, run_sum):
    """logsumexp of the row; 0 for a row without valid keys (its terms are all masked anyway)."""
    return tl.where(run_sum > 0.0, run_max + tl.log(tl.where(run_sum > 0.0, run_sum, 1.0)), 0.0)


@triton.jit
def _clipped_kl_terms(target, logits, lse, ok):
    """[BLOCK] target * (clip(log target) - clip(log predict)), 0 where ok is False.
    A target of 0 has clip(log 0) = -100 and adds 0 * finite = 0; tl.where drops whatever masked slots hold."""
    positive = target > 0.0
    log_target = tl.where(positive, tl.log(tl.where(positive, target, 1.0)), _LOG_FLOOR)
    log_target = tl.minimum(tl.maximum(log_target, _LOG_FLOOR), 0.0)
    log_predict = tl.minimum(tl.maximum(logits - lse, _LOG_FLOOR), 0.0)
    return tl.where(ok, target * (log_target - log_predict), 0.0)


@triton.jit
def _logit_grad_g(target, logits, lse, ok):
    """[BLOCK] g / factor = -max(target, e^-100) * 1[log predict >= -100], 0 where ok is False.

    factor = loss_coeff / R * grad_loss is applied to the final gradients instead: dlogit is linear in it, and
    leaving it out keeps ds (cast to the input dtype for the MMAs) far from fp16's underflow (factor ~ 1/R).
    The indicator is tested on log predict (as the reference does), not on an fp32-denormal predict."""
    keep = ok & ((logits - lse) >= _LOG_FLOOR)
    # e^-100 is below fp32's normal range, so Triton types the constant fp64: cast back (loop-carried sums
    # of g must stay fp32 on the GPU; the interpreter does not check this)
    return tl.where(keep, -tl.maximum(target, _PROB_FLOOR), 0.0).to(tl.float32)


# ----------------------------------------------------------------------------------------------------
# sparse loss: forward
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _sparse_slots(idx_ptr, row, offs_j, n_slots, K, Sk):
    """(ids, in_row, valid) of slot tile offs_j of a row: valid = id in [0, Sk) and j < n_slots."""
    in_row = offs_j < K
    ids = tl.load(idx_ptr + row * K + offs_j, mask=in_row, other=-1)
    valid = (ids >= 0) & (ids < Sk) & (offs_j < n_slots)
    return ids, in_row, valid


@triton.jit
def _sparse_logits_pass(q_row, w_row, k_base, idx_ptr, scratch_ptr, row, scratch_row, n_slots, K, Sk, scale,
                        DI: tl.constexpr, DI_PAD: tl.constexpr, BLOCK: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Pass 1 of a row: logits of its K slots into scratch (-inf on invalid slots); returns (lse, n_valid)."""
    run_max = tl.full((), float("-inf"), tl.float32)
    run_sum = tl.zeros((), tl.float32)
    n_valid = tl.zeros((), tl.int32)
    for j0 in range(0, K, BLOCK):
        offs_j = j0 + tl.arange(0, BLOCK)
        ids, in_row, valid = _sparse_slots(idx_ptr, row, offs_j, n_slots, K, Sk)
        keys = _load_keys(k_base, ids, valid, DI, DI_PAD)
        logits = _logits_of(_preactivation(keys, q_row, scale, PRECISION), w_row, valid)
        tl.store(scratch_ptr + scratch_row * K + offs_j, logits, mask=in_row)
        run_max, run_sum = _online_lse_update(run_max, run_sum, logits)
        n_valid += tl.sum(valid.to(tl.int32), axis=0)
    return _final_lse(run_max, run_sum), n_valid


@triton.jit
def _sparse_loss_fwd_kernel(
    q_ptr, k_ptr, w_ptr, idx_ptr, len_ptr, target_ptr,
    scratch_ptr,        # fp32 [B*Sq, K]: the row's logits between the two passes
    row_kl_ptr,         # fp32 [B*Sq]: sum of the row's clipped KL terms
    row_nonempty_ptr,   # int32 [B*Sq]: 1 if the row has a valid slot
    Sq, Sk, K, scale,
    HI: tl.constexpr, DI: tl.constexpr, HI_PAD: tl.constexpr, DI_PAD: tl.constexpr,
    BLOCK: tl.constexpr, HAS_LEN: tl.constexpr, PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * Sq + q
    b = row // Sq
    k_base = k_ptr + b * Sk * DI
    q_row, w_row = _load_row_heads(q_ptr, w_ptr, row, HI, DI, HI_PAD, DI_PAD)
    n_slots = K
    if HAS_LEN:
        n_slots = tl.minimum(tl.load(len_ptr + row), K)

    lse, n_valid = _sparse_logits_pass(q_row, w_row, k_base, idx_ptr, scratch_ptr, row, row, n_slots, K, Sk,
                                       scale, DI, DI_PAD, BLOCK, PRECISION)
    tl.debug_barrier()  # pass 2 reads logits that other threads of this program wrote

    kl = tl.zeros((), tl.float32)
    for j0 in range(0, K, BLOCK):
        offs_j = j0 + tl.arange(0, BLOCK)
        ids, in_row, valid = _sparse_slots(idx_ptr, row, offs_j, n_slots, K, Sk)
        logits = tl.load(scratch_ptr + row * K + offs_j, mask=in_row, other=float("-inf"))
        target = tl.load(target_ptr + row * K + offs_j, mask=valid, other=0.0).to(tl.float32)
        kl += tl.sum(_clipped_kl_terms(target, logits, lse, valid), axis=0)
    tl.store(row_kl_ptr + row, kl)
    tl.store(row_nonempty_ptr + row, (n_valid > 0).to(tl.int32))


def indexer_loss(q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length):
    """Sparse indexer KL loss (SPEC section 6): 0-dim fp32. Bitwise deterministic."""
    B, Sq, HI, DI = q_idx.shape
    Sk = k_idx.shape[1]
    K = indices.shape[2]
    meta = _shape_meta(q_idx)
    device = q_idx.device
    n_rows = B * Sq
    if n_rows == 0 or K == 0:
        return torch.zeros((), dtype=torch.float32, device=device)
    scratch = torch.empty((n_rows, K), dtype=torch.float32, device=device)
    row_kl = _empty((n_rows,), torch.float32, device)
    row_nonempty = _empty((n_rows,), torch.int32, device)
    has_len = topk_length is not None
    _sparse_loss_fwd_kernel[(n_rows,)](
        q_idx, k_idx, w, indices, topk_length if has_len else indices, target,
        scratch, row_kl, row_nonempty,
        Sq, Sk, K, float(scale),
        BLOCK=_BLOCK_SLOTS, HAS_LEN=has_len, **meta,
        num_warps=_FWD_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    return _loss_from_rows(row_kl, row_nonempty, loss_coeff)


# ----------------------------------------------------------------------------------------------------
# sparse loss: backward
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _sparse_loss_bwd_kernel(
    q_ptr, k_ptr, w_ptr, idx_ptr, len_ptr, target_ptr,
    factor_ptr,         # fp32 [1]: loss_coeff / R * grad_loss (applied to the final gradients)
    scratch_ptr,        # fp32 [rows of this launch, K]: logits between the passes
    dq_ptr, dw_ptr,     # [B*Sq, HI, DI] (q dtype), [B*Sq, HI] (w dtype)
    dk_ptr,             # ATOMIC_DK: fp32 accumulator [B, Sk, DI]; else fp32 per-slot rows [rows of launch, K, DI]
    row0,               # first row (of B*Sq) of this launch
    Sq, Sk, K, scale,
    HI: tl.constexpr, DI: tl.constexpr, HI_PAD: tl.constexpr, DI_PAD: tl.constexpr,
    BLOCK: tl.constexpr, HAS_LEN: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DK: tl.constexpr,
):
    local_row = tl.program_id(0).to(tl.int64)
    row = row0 + local_row
    b = row // Sq
    k_base = k_ptr + b * Sk * DI
    offs_h = tl.arange(0, HI_PAD)
    offs_d = tl.arange(0, DI_PAD)
    d_ok = offs_d < DI
    q_row, w_row = _load_row_heads(q_ptr, w_ptr, row, HI, DI, HI_PAD, DI_PAD)
    n_slots = K
    if HAS_LEN:
        n_slots = tl.minimum(tl.load(len_ptr + row), K)
    factor = tl.load(factor_ptr)

    # Pass 1: logits (scratch) and lse.
    lse, n_valid = _sparse_logits_pass(q_row, w_row, k_base, idx_ptr, scratch_ptr, row, local_row, n_slots,
                                       K, Sk, scale, DI, DI_PAD, BLOCK, PRECISION)
    tl.debug_barrier()

    # Pass 2: sum_j g (dlogit needs it for every slot).
    g_sum = tl.zeros((), tl.float32)
    for j0 in range(0, K, BLOCK):
        offs_j = j0 + tl.arange(0, BLOCK)
        ids, in_row, valid = _sparse_slots(idx_ptr, row, offs_j, n_slots, K, Sk)
        logits = tl.load(scratch_ptr + local_row * K + offs_j, mask=in_row, other=float("-inf"))
        target = tl.load(target_ptr + row * K + offs_j, mask=valid, other=0.0).to(tl.float32)
        g_sum += tl.sum(_logit_grad_g(target, logits, lse, valid), axis=0)

    # Pass 3: dlogit, then through the logits to w, q and the gathered keys.
    dq_acc = tl.zeros((HI_PAD, DI_PAD), tl.float32)
    dw_acc = tl.zeros((HI_PAD,), tl.float32)
    for j0 in range(0, K, BLOCK):
        offs_j = j0 + tl.arange(0, BLOCK)
        ids, in_row, valid = _sparse_slots(idx_ptr, row, offs_j, n_slots, K, Sk)
        logits = tl.load(scratch_ptr + local_row * K + offs_j, mask=in_row, other=float("-inf"))
        target = tl.load(target_ptr + row * K + offs_j, mask=valid, other=0.0).to(tl.float32)
        predict = tl.where(valid, tl.exp(logits - lse), 0.0)
        dlogit = _logit_grad_g(target, logits, lse, valid) - predict * g_sum      # [BLOCK]

        keys = _load_keys(k_base, ids, valid, DI, DI_PAD)
        z = _preactivation(keys, q_row, scale, PRECISION)                                  # [BLOCK, HI_PAD]
        dw_acc += tl.sum(dlogit[:, None] * tl.maximum(z, 0.0), axis=0)
        ds = tl.where(z > 0.0, dlogit[:, None] * w_row[None, :], 0.0).to(q_row.dtype)
        dq_acc += tl.dot(tl.trans(ds), keys, input_precision=PRECISION)                   # [HI_PAD, DI_PAD]
        dk_rows = tl.dot(ds, q_row, input_precision=PRECISION) * (scale * factor)         # [BLOCK, DI_PAD]
        if ATOMIC_DK:
            # Duplicate ids in one tile are fine: every element is its own atomic add.
            tl.atomic_add(dk_ptr + (b * Sk + ids.to(tl.int64))[:, None] * DI + offs_d[None, :],
                          dk_rows, mask=valid[:, None] & d_ok[None, :], sem="relaxed")
        else:
            slot_rows = local_row * K + offs_j.to(tl.int64)
            tl.store(dk_ptr + slot_rows[:, None] * DI + offs_d[None, :],
                     tl.where(valid[:, None], dk_rows, 0.0), mask=in_row[:, None] & d_ok[None, :])

    hd_ok = (offs_h < HI)[:, None] & d_ok[None, :]
    tl.store(dq_ptr + row * (HI * DI) + offs_h[:, None] * DI + offs_d[None, :],
             (dq_acc * (scale * factor)).to(dq_ptr.dtype.element_ty), mask=hd_ok)
    tl.store(dw_ptr + row * HI + offs_h, (dw_acc * factor).to(dw_ptr.dtype.element_ty), mask=offs_h < HI)


def indexer_loss_backward(grad_loss, q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length):
    """(dq_idx, dk_idx, dw) of the sparse indexer loss, in the dtypes of q_idx, k_idx, w.

    dk: fp32 atomics by default; deterministic (per-slot rows + sort-based index_put_) when
    torch.are_deterministic_algorithms_enabled(). dq and dw are always deterministic.
    """
    B, Sq, HI, DI = q_idx.shape
    Sk = k_idx.shape[1]
    K = indices.shape[2]
    meta = _shape_meta(q_idx)
    device = q_idx.device
    n_rows = B * Sq
    if n_rows == 0 or K == 0 or Sk == 0:  # no valid slot anywhere: the loss is the constant 0
        return torch.zeros_like(q_idx), torch.zeros_like(k_idx), torch.zeros_like(w)

    valid = _sparse_valid(indices, Sk, topk_length)
    factor = _grad_factor(grad_loss, valid.any(dim=-1).sum(), loss_coeff)
    dq = _empty(q_idx.shape, q_idx.dtype, device)
    dw = _empty(w.shape, w.dtype, device)
    dk_acc = torch.zeros((B, Sk, DI), dtype=torch.float32, device=device)
    has_len = topk_length is not None
    deterministic = torch.are_deterministic_algorithms_enabled()

    def launch(row0, n_launch_rows, dk_target, atomic):
        scratch = torch.empty((n_launch_rows, K), dtype=torch.float32, device=device)
        _sparse_loss_bwd_kernel[(n_launch_rows,)](
            q_idx, k_idx, w, indices, topk_length if has_len else indices, target, factor, scratch,
            dq, dw, dk_target, row0, Sq, Sk, K, float(scale),
            BLOCK=_BLOCK_SLOTS, HAS_LEN=has_len, ATOMIC_DK=atomic, **meta,
            num_warps=_BWD_NUM_WARPS, num_stages=_NUM_STAGES,
        )

    if not deterministic:
        launch(0, n_rows, dk_acc, True)
    else:
        # Key row of every slot in the flattened [B*Sk, DI] accumulator; invalid slots add their zero rows to
        # row 0 of their batch (adding +0.0 changes nothing).
        batch_base = (torch.arange(B, device=device, dtype=torch.int64) * Sk)[:, None, None]
        flat_ids = (torch.where(valid, indices, 0).to(torch.int64) + batch_base).reshape(n_rows, K)
        dk_flat = dk_acc.view(B * Sk, DI)
        rows_per_chunk = max(1, _DETERMINISTIC_CHUNK_BYTES // (K * DI * 4))
        for row0 in range(0, n_rows, rows_per_chunk):
            n_chunk = min(rows_per_chunk, n_rows - row0)
            slot_rows = torch.empty((n_chunk, K, DI), dtype=torch.float32, device=device)
            launch(row0, n_chunk, slot_rows, False)
            dk_flat.index_put_((flat_ids[row0:row0 + n_chunk].reshape(-1),), slot_rows.view(-1, DI),
                               accumulate=True)
    return dq, dk_acc.to(k_idx.dtype), dw


# ----------------------------------------------------------------------------------------------------
# dense loss (all visible keys): forward
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _visible_keys(starts_ptr, b, r, ratio, Sk):
    """Keys visible to query row r of batch b: min((q_start[b] + r + 1) // ratio, Sk), >= 0."""
    pos_plus_1 = tl.load(starts_ptr + b) + r + 1
    return tl.minimum(tl.maximum(pos_plus_1, 0) // ratio, Sk)


@triton.jit
def _dense_lse_pass(q_row, w_row, k_base, n_vis, scale,
                    DI: tl.constexpr, DI_PAD: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """Streaming logsumexp of the row's logits over its n_vis visible keys (0 if none)."""
    run_max = tl.full((), float("-inf"), tl.float32)
    run_sum = tl.zeros((), tl.float32)
    for k0 in range(0, n_vis, BLOCK):
        offs_k = k0 + tl.arange(0, BLOCK)
        vis = offs_k < n_vis
        keys = _load_keys(k_base, offs_k, vis, DI, DI_PAD)
        logits = _logits_of(_preactivation(keys, q_row, scale, PRECISION), w_row, vis)
        run_max, run_sum = _online_lse_update(run_max, run_sum, logits)
    return _final_lse(run_max, run_sum)


@triton.jit
def _dense_loss_fwd_kernel(
    q_ptr, k_ptr, w_ptr, scores_ptr, l1_ptr, starts_ptr,
    row_kl_ptr, row_nonempty_ptr,
    Sq, Sk, scale, ratio,
    HI: tl.constexpr, DI: tl.constexpr, HI_PAD: tl.constexpr, DI_PAD: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = b * Sq + r
    k_base = k_ptr + b * Sk * DI
    q_row, w_row = _load_row_heads(q_ptr, w_ptr, row, HI, DI, HI_PAD, DI_PAD)
    n_vis = _visible_keys(starts_ptr, b, r, ratio, Sk)

    lse = _dense_lse_pass(q_row, w_row, k_base, n_vis, scale, DI, DI_PAD, BLOCK, PRECISION)
    inv_l1 = 1.0 / tl.maximum(tl.load(l1_ptr + row).to(tl.float32), 1e-12)
    kl = tl.zeros((), tl.float32)
    for k0 in range(0, n_vis, BLOCK):
        offs_k = k0 + tl.arange(0, BLOCK)
        vis = offs_k < n_vis
        keys = _load_keys(k_base, offs_k, vis, DI, DI_PAD)
        logits = _logits_of(_preactivation(keys, q_row, scale, PRECISION), w_row, vis)
        target = tl.load(scores_ptr + row * Sk + offs_k, mask=vis, other=0.0).to(tl.float32) * inv_l1
        kl += tl.sum(_clipped_kl_terms(target, logits, lse, vis), axis=0)
    tl.store(row_kl_ptr + row, kl)
    tl.store(row_nonempty_ptr + row, (n_vis > 0).to(tl.int32))


def dense_indexer_loss(q_idx, k_idx, w, attn_scores, attn_l1, scale, ratio, loss_coeff, q_start):
    """Dense indexer KL loss over all visible keys (SPEC section 6): 0-dim fp32. Bitwise deterministic."""
    B, Sq, HI, DI = q_idx.shape
    Sk = k_idx.shape[1]
    meta = _shape_meta(q_idx)
    device = q_idx.device
    if B * Sq == 0 or Sk == 0:
        return torch.zeros((), dtype=torch.float32, device=device)
    starts = _query_starts(q_start, B, Sq, Sk, ratio, device)
    row_kl = _empty((B * Sq,), torch.float32, device)
    row_nonempty = _empty((B * Sq,), torch.int32, device)
    _dense_loss_fwd_kernel[(Sq, B)](
        q_idx, k_idx, w, attn_scores, attn_l1, starts, row_kl, row_nonempty,
        Sq, Sk, float(scale), int(ratio),
        BLOCK=_BLOCK_KEYS, **meta, num_warps=_FWD_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    return _loss_from_rows(row_kl, row_nonempty, loss_coeff)


# ----------------------------------------------------------------------------------------------------
# dense loss: backward
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _dense_dlogit(z, w_row, vis, scores_ptr, row, offs_k, Sk, inv_l1, lse, g_sum):
    """dlogit / factor [BLOCK] of one key tile of one row, from its pre-activation z and the row statistics."""
    logits = _logits_of(z, w_row, vis)
    target = tl.load(scores_ptr + row * Sk + offs_k, mask=vis, other=0.0).to(tl.float32) * inv_l1
    predict = tl.where(vis, tl.exp(logits - lse), 0.0)
    return _logit_grad_g(target, logits, lse, vis) - predict * g_sum


@triton.jit
def _dense_loss_bwd_rows_kernel(
    q_ptr, k_ptr, w_ptr, scores_ptr, l1_ptr, starts_ptr, factor_ptr,
    dq_ptr, dw_ptr,
    row_lse_ptr, row_gsum_ptr,   # fp32 [B*Sq]: lse and sum_j g of each row, for the dk kernel
    Sq, Sk, scale, ratio,
    HI: tl.constexpr, DI: tl.constexpr, HI_PAD: tl.constexpr, DI_PAD: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per query row: lse (pass 1), sum_j g (pass 2), dq and dw (pass 3)."""
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = b * Sq + r
    k_base = k_ptr + b * Sk * DI
    offs_h = tl.arange(0, HI_PAD)
    offs_d = tl.arange(0, DI_PAD)
    q_row, w_row = _load_row_heads(q_ptr, w_ptr, row, HI, DI, HI_PAD, DI_PAD)
    n_vis = _visible_keys(starts_ptr, b, r, ratio, Sk)
    factor = tl.load(factor_ptr)
    inv_l1 = 1.0 / tl.maximum(tl.load(l1_ptr + row).to(tl.float32), 1e-12)

    lse = _dense_lse_pass(q_row, w_row, k_base, n_vis, scale, DI, DI_PAD, BLOCK, PRECISION)

    g_sum = tl.zeros((), tl.float32)
    for k0 in range(0, n_vis, BLOCK):
        offs_k = k0 + tl.arange(0, BLOCK)
        vis = offs_k < n_vis
        keys = _load_keys(k_base, offs_k, vis, DI, DI_PAD)
        logits = _logits_of(_preactivation(keys, q_row, scale, PRECISION), w_row, vis)
        target = tl.load(scores_ptr + row * Sk + offs_k, mask=vis, other=0.0).to(tl.float32) * inv_l1
        g_sum += tl.sum(_logit_grad_g(target, logits, lse, vis), axis=0)
    tl.store(row_lse_ptr + row, lse)
    tl.store(row_gsum_ptr + row, g_sum)

    dq_acc = tl.zeros((HI_PAD, DI_PAD), tl.float32)
    dw_acc = tl.zeros((HI_PAD,), tl.float32)
    for k0 in range(0, n_vis, BLOCK):
        offs_k = k0 + tl.arange(0, BLOCK)
        vis = offs_k < n_vis
        keys = _load_keys(k_base, offs_k, vis, DI, DI_PAD)
        z = _preactivation(keys, q_row, scale, PRECISION)
        dlogit = _dense_dlogit(z, w_row, vis, scores_ptr, row, offs_k, Sk, inv_l1, lse, g_sum)
        dw_acc += tl.sum(dlogit[:, None] * tl.maximum(z, 0.0), axis=0)
        ds = tl.where(z > 0.0, dlogit[:, None] * w_row[None, :], 0.0).to(q_row.dtype)
        dq_acc += tl.dot(tl.trans(ds), keys, input_precision=PRECISION)

    hd_ok = (offs_h < HI)[:, None] & (offs_d < DI)[None, :]
    tl.store(dq_ptr + row * (HI * DI) + offs_h[:, None] * DI + offs_d[None, :],
             (dq_acc * (scale * factor)).to(dq_ptr.dtype.element_ty), mask=hd_ok)
    tl.store(dw_ptr + row * HI + offs_h, (dw_acc * factor).to(dw_ptr.dtype.element_ty), mask=offs_h < HI)


@triton.jit
def _dense_loss_bwd_keys_kernel(
    q_ptr, k_ptr, w_ptr, scores_ptr, l1_ptr, starts_ptr, factor_ptr,
    row_lse_ptr, row_gsum_ptr,
    dk_part_ptr,        # fp32 [splits, B, Sk, DI]: this program's partial dk goes to [split, b, tile]
    Sq, Sk, scale, ratio, rows_per_split,
    HI: tl.constexpr, DI: tl.constexpr, HI_PAD: tl.constexpr, DI_PAD: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (key tile, row range, batch): the tile's dk summed, in row order, over the rows of its
    range that see the tile (deterministic: no atomics). A range with no such row writes zeros."""
    k0 = tl.program_id(0) * BLOCK
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_batch = tl.num_programs(2)
    offs_k = k0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, DI_PAD)
    k_base = k_ptr + b * Sk * DI
    keys = _load_keys(k_base, offs_k, offs_k < Sk, DI, DI_PAD)
    factor = tl.load(factor_ptr)
    # Rows see a growing prefix of the keys: the first row that sees key k0 has q_start + r + 1 >= (k0+1)*ratio.
    first_row = tl.maximum((k0 + 1) * ratio - 1 - tl.load(starts_ptr + b), split * rows_per_split)
    end_row = tl.minimum(split * rows_per_split + rows_per_split, Sq)

    dk_acc = tl.zeros((BLOCK, DI_PAD), tl.float32)
    for r in range(first_row, end_row):
        row = b * Sq + r
        q_row, w_row = _load_row_heads(q_ptr, w_ptr, row, HI, DI, HI_PAD, DI_PAD)
        vis = offs_k < _visible_keys(starts_ptr, b, r, ratio, Sk)
        inv_l1 = 1.0 / tl.maximum(tl.load(l1_ptr + row).to(tl.float32), 1e-12)
        z = _preactivation(keys, q_row, scale, PRECISION)
        dlogit = _dense_dlogit(z, w_row, vis, scores_ptr, row, offs_k, Sk, inv_l1,
                               tl.load(row_lse_ptr + row), tl.load(row_gsum_ptr + row))
        ds = tl.where(z > 0.0, dlogit[:, None] * w_row[None, :], 0.0).to(q_row.dtype)
        dk_acc += tl.dot(ds, q_row, input_precision=PRECISION)

    part_base = dk_part_ptr + (split * n_batch + b) * Sk * DI
    tl.store(part_base + offs_k.to(tl.int64)[:, None] * DI + offs_d[None, :], dk_acc * (scale * factor),
             mask=(offs_k < Sk)[:, None] & (offs_d < DI)[None, :])


def dense_indexer_loss_backward(grad_loss, q_idx, k_idx, w, attn_scores, attn_l1, scale, ratio, loss_coeff,
                                q_start):
    """(dq_idx, dk_idx, dw) of the dense indexer loss, in the dtypes of q_idx, k_idx, w. Deterministic
    (no atomics): dq / dw per query row, dk per key tile."""
    B, Sq, HI, DI = q_idx.shape
    Sk = k_idx.shape[1]
    meta = _shape_meta(q_idx)
    device = q_idx.device
    if B * Sq == 0 or Sk == 0:
        return torch.zeros_like(q_idx), torch.zeros_like(k_idx), torch.zeros_like(w)
    starts = _query_starts(q_start, B, Sq, Sk, ratio, device)
    factor = _grad_factor(grad_loss, _dense_rows_with_keys(starts, Sq, Sk, ratio), loss_coeff)
    dq = _empty(q_idx.shape, q_idx.dtype, device)
    dw = _empty(w.shape, w.dtype, device)
    row_lse = torch.empty((B * Sq,), dtype=torch.float32, device=device)
    row_gsum = torch.empty((B * Sq,), dtype=torch.float32, device=device)
    common = dict(BLOCK=_BLOCK_KEYS, **meta, num_warps=_BWD_NUM_WARPS, num_stages=_NUM_STAGES)
    _dense_loss_bwd_rows_kernel[(Sq, B)](
        q_idx, k_idx, w, attn_scores, attn_l1, starts, factor, dq, dw, row_lse, row_gsum,
        Sq, Sk, float(scale), int(ratio), **common)

    n_key_tiles = triton.cdiv(Sk, _BLOCK_KEYS)
    n_splits = min(_DENSE_DK_MAX_SPLITS, triton.cdiv(Sq, _DENSE_DK_MIN_ROWS),
                   triton.cdiv(4 * num_sms(device), n_key_tiles * B))
    rows_per_split = triton.cdiv(Sq, n_splits)
    n_splits = triton.cdiv(Sq, rows_per_split)
    dk_parts = _empty((n_splits, B, Sk, DI), torch.float32, device)
    _dense_loss_bwd_keys_kernel[(n_key_tiles, n_splits, B)](
        q_idx, k_idx, w, attn_scores, attn_l1, starts, factor, row_lse, row_gsum, dk_parts,
        Sq, Sk, float(scale), int(ratio), rows_per_split, **common)
    # Fixed-shape torch reduction over the row ranges: same order every run.
    dk = dk_parts[0] if n_splits == 1 else dk_parts.sum(dim=0)
    return dq, dk.to(k_idx.dtype), dw
