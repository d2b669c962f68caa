"""Triton kernels for the DeepSeek lightning indexer (SPEC sections 1, 3 and 6).

    scores[b, q, k] = sum_h w[b,q,h] * relu(scale * q_idx[b,q,h,:] . k_idx[b,k,:])     (-inf where masked)

Layout of the main kernel (``_logits_kernel``). One program owns one tile of BLOCK_K keys and a run of
query rows. It loads its key tile once, then walks the rows one query at a time:

    s   = k_tile [BLOCK_K, DI] @ q_row^T [DI, HI]        (tensor cores, fp32 accumulate)
    row = sum_h relu(s)[:, h] * (scale * w[q, h])         ([BLOCK_K], a reduction inside the MMA layout)

Keys are the MMA's M dimension and heads its N dimension, so the head reduction stays inside a warp
(no shared-memory round trip) and the ratio-causal mask is applied to the reduced [BLOCK_K] vector, where
it costs nothing. Rows whose query sees none of the tile get a fast -inf fill and no MMA. Heads are
padded to a power of two >= 16 inside the kernel by masked loads (zero weight), never by a padded copy.

The public functions follow docs/IMPLEMENTATIONS.md exactly: plain functions on validated, contiguous
tensors, returning fresh outputs. bf16, fp16 and fp32 inputs are supported (fp32 uses exact "ieee" dots);
fp64 (gradcheck) is left to the reference implementation.

The fused top-k (``indexer_topk``) never holds the [S_q, S_k] score matrix: it computes the scores of a
chunk of query rows into a reusable workspace of at most ``WORKSPACE_BYTES`` and hands each chunk to the
team's Triton top-k (csrc_dsl/triton/topk.py) with per-row lengths, so the masked tail is never scanned.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_precision, num_sms, pad_pow2

# Upper bound on the score workspace used by the fused top-k (bytes). Its rows are reused chunk after
# chunk, so the extra memory of indexer_topk is this plus the O(S_q * topk) outputs.
WORKSPACE_BYTES = 256 * 1024 * 1024

# Tile choices, measured on H100 (`python -m benchmarks.bench_indexer --sweep`; HI=64, DI=128, bf16):
# 256 keys x 4 warps x 3 stages with >= 128 rows a program was best (BLOCK_K 128 or 512, 8 warps, 4 stages,
# two queries per MMA and fewer/more rows were 2-25% slower). Fixed, not autotuned, so a first call inside
# CUDA-graph capture never runs a tuning sweep.
_FWD_BLOCK_K = 256
_FWD_NUM_WARPS = 4       # 8 when BLOCK_K * HI_PAD > 256 * 64 (the fp32 [BLOCK_K, HI_PAD] tile must fit)
_FWD_NUM_STAGES = 3
_FILL_ROWS = 16
_MIN_ROWS_PER_PROG = 128


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------







def _default_q_start(B: int, Sq: int, Sk: int, ratio: int, device) -> torch.Tensor:
    # Queries are the last tokens of the sequence (SPEC section 0).
    return torch.full((B,), Sk * ratio - Sq, dtype=torch.int32, device=device)


def _visible_counts(q_start: torch.Tensor, q_rows: torch.Tensor, ratio: int, Sk: int) -> torch.Tensor:
    """Number of visible keys per (batch, query row): clamp((q_start + q + 1) // ratio, 0, Sk), int32."""
    pos_plus_1 = q_start.to(torch.int64)[:, None] + q_rows.to(torch.int64)[None, :] + 1
    return (pos_plus_1.clamp_min(0) // ratio).clamp_max(Sk).to(torch.int32)


# ----------------------------------------------------------------------------------------------------
# forward logits (dense keys or paged cache)
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _logits_kernel(
    q_ptr, k_ptr, w_ptr, out_ptr,
    q_start_ptr,           # int32 [B]: q_start per batch (dense) or seq_lens (paged)
    block_table_ptr,       # int32 [B, max_pages] (paged only)
    n_rows,                # query rows in this launch
    row0,                  # index, within its sequence, of this launch's first query row
    Sk,                    # key columns of the output (dense: S_k; paged: max_pages * PAGE)
    q_start_bias,          # added to the loaded q_start (paged: -S_q, so q_start = seq_len - S_q)
    stride_qb, stride_qs,  # q_idx [B, *, HI, DI] (head and dim strides are DI and 1)
    stride_kb,             # dense k_idx [B, Sk, DI]
    stride_wb, stride_ws,  # w [B, *, HI]
    stride_ob, stride_os,  # out [B, *, Sk] (column stride 1)
    stride_bt,             # block_table row stride (paged only)
    w_scale,               # scale, folded into the head weights
    ratio,
    rows_per_prog,
    HI: tl.constexpr, DI: tl.constexpr, HI_PAD: tl.constexpr, DI_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, FILL_ROWS: tl.constexpr,
    NEG_SCALE: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
    PRECISION: tl.constexpr,
    FILL_HIDDEN: tl.constexpr = True,  # False: rows that see none of the tile are left unwritten (the fused
                                       # top-k reads each row only up to its visible length)
):
    pid_k = tl.program_id(0)
    pid_q = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, HI_PAD)
    offs_d = tl.arange(0, DI_PAD)
    h_ok = offs_h < HI
    d_ok = offs_d < DI

    q_start = tl.load(q_start_ptr + b) + q_start_bias
    if PAGED:
        key_limit = tl.load(q_start_ptr + b)  # seq_len: cache slots past it are never read
    else:
        key_limit = Sk

    row_lo = pid_q * rows_per_prog
    row_hi = tl.minimum(row_lo + rows_per_prog, n_rows)
    # First row whose query sees key k0: (q_start + row0 + r + 1) // ratio > k0.
    first_vis = (k0 + 1) * ratio - 1 - q_start - row0
    row_mid = tl.minimum(tl.maximum(first_vis, row_lo), row_hi)
    if k0 >= key_limit:
        row_mid = row_hi  # the whole tile lies past the keys that exist

    out_base = out_ptr + b * stride_ob
    col_ok = offs_k < Sk

    # Rows that see none of this tile: -inf, no MMA.
    if FILL_HIDDEN:
        neg_inf_block = tl.full((FILL_ROWS, BLOCK_K), float("-inf"), tl.float32)
        for r0 in range(row_lo, row_mid, FILL_ROWS):
            rows = r0 + tl.arange(0, FILL_ROWS)
            ptrs = out_base + rows.to(tl.int64)[:, None] * stride_os + offs_k[None, :]
            tl.store(ptrs, neg_inf_block, mask=(rows < row_mid)[:, None] & col_ok[None, :])

    if row_mid < row_hi:
        key_ok = offs_k < key_limit
        if PAGED:
            page_ids = tl.load(block_table_ptr + b * stride_bt + offs_k // PAGE, mask=key_ok, other=0)
            k_rows = page_ids.to(tl.int64) * PAGE + offs_k % PAGE
            k_ptrs = k_ptr + k_rows[:, None] * DI + offs_d[None, :]
        else:
            k_ptrs = k_ptr + b * stride_kb + offs_k.to(tl.int64)[:, None] * DI + offs_d[None, :]
        k_tile = tl.load(k_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)

        # Row pointers advance by their stride each step (64-bit pointer arithmetic, no i32 overflow).
        first = row_mid.to(tl.int64)
        q_ptrs = q_ptr + b * stride_qb + first * stride_qs + offs_h[:, None] * DI + offs_d[None, :]
        w_ptrs = w_ptr + b * stride_wb + first * stride_ws + offs_h
        out_ptrs = out_base + first * stride_os + offs_k
        for r in range(row_mid, row_hi):
            q_row = tl.load(q_ptrs, mask=h_ok[:, None] & d_ok[None, :], other=0.0)
            w_row = tl.load(w_ptrs, mask=h_ok, other=0.0).to(tl.float32) * w_scale
            s = tl.dot(k_tile, tl.trans(q_row), input_precision=PRECISION)  # [BLOCK_K, HI_PAD] fp32
            # relu(scale*s) * w == relu(s) * (scale*w) for scale >= 0, and min(s, 0) * (scale*w) else.
            if NEG_SCALE:
                s = tl.minimum(s, 0.0)
            else:
                s = tl.maximum(s, 0.0)
            logits = tl.sum(s * w_row[None, :], axis=1)
            n_vis = tl.minimum(tl.maximum(q_start + row0 + r + 1, 0) // ratio, key_limit)
            logits = tl.where(offs_k < n_vis, logits, float("-inf"))
            tl.store(out_ptrs, logits, mask=col_ok)
            q_ptrs += stride_qs
            w_ptrs += stride_ws
            out_ptrs += stride_os


def _rows_per_program(n_rows: int, n_key_tiles: int, B: int, device) -> int:
    # Enough programs for ~8 waves (causal tiles are uneven), but rows long enough to amortise the key tile.
    target_programs = 8 * num_sms(device)
    n_chunks = max(1, triton.cdiv(target_programs, max(1, n_key_tiles * B)))
    return max(min(n_rows, _MIN_ROWS_PER_PROG), triton.cdiv(n_rows, n_chunks))


def _fwd_num_warps(block_k: int, hi_pad: int) -> int:
    # 128 fp32 registers a thread for the score tile at most; more heads need more threads.
    return max(_FWD_NUM_WARPS, block_k * hi_pad // (32 * 128))


def _launch_logits(q, k, w, out, q_start, ratio, scale, row0=0, *, block_table=None, page=1, fill_hidden=True):
    """Scores of the query rows in ``q`` ([B, n_rows, HI, DI]) into ``out`` ([B, n_rows, Sk] view with
    column stride 1). ``row0``: position of q's first row within its sequence (for the mask).
    ``fill_hidden=False``: whole tiles a row cannot see stay unwritten (only for readers that stop at the
    row's visible length, as the fused top-k does); the masked part of a partly visible tile is still -inf.
    Paged: ``k`` is the cache [P, page, DI], ``q_start`` holds seq_lens and Sk = max_pages * page."""
    B, n_rows, HI, DI = q.shape
    Sk = out.shape[2]
    if B == 0 or n_rows == 0 or Sk == 0:
        return out
    precision = dot_precision(q.dtype, "indexer")
    BLOCK_K = _FWD_BLOCK_K
    n_key_tiles = triton.cdiv(Sk, BLOCK_K)
    rows_per_prog = _rows_per_program(n_rows, n_key_tiles, B, q.device)
    grid = (n_key_tiles, triton.cdiv(n_rows, rows_per_prog), B)
    paged = block_table is not None
    _logits_kernel[grid](
        q, k, w, out, q_start, block_table if paged else q_start,
        n_rows, row0, Sk, -n_rows if paged else 0,
        q.stride(0), q.stride(1),
        0 if paged else k.stride(0),
        w.stride(0), w.stride(1),
        out.stride(0), out.stride(1),
        block_table.stride(0) if paged else 0,
        float(scale), int(ratio), rows_per_prog,
        HI=HI, DI=DI, HI_PAD=pad_pow2(HI), DI_PAD=pad_pow2(DI),
        BLOCK_K=BLOCK_K, FILL_ROWS=_FILL_ROWS,
        NEG_SCALE=bool(scale < 0), PAGED=paged, PAGE=int(page),
        PRECISION=precision, FILL_HIDDEN=bool(fill_hidden),
        num_warps=_fwd_num_warps(BLOCK_K, pad_pow2(HI)), num_stages=_FWD_NUM_STAGES,
    )
    return out


def indexer_logits(q_idx, k_idx, w, scale, ratio, q_start):
    """scores [B, Sq, Sk] fp32 (SPEC section 1), -inf where the ratio-causal mask hides a key."""
    B, Sq, HI, DI = q_idx.shape
    Sk = k_idx.shape[1]
    dot_precision(q_idx.dtype, "indexer")
    if q_start is None:
        q_start = _default_q_start(B, Sq, Sk, ratio, q_idx.device)
    scores = torch.empty((B, Sq, Sk), dtype=torch.float32, device=q_idx.device)
    return _launch_logits(q_idx, k_idx, w, scores, q_start, ratio, scale)


# ----------------------------------------------------------------------------------------------------
# backward of the logits
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _logits_bwd_dq_dw_kernel(
    grad_ptr, q_ptr, k_ptr, w_ptr, q_start_ptr, dq_ptr, dw_ptr,
    Sq, Sk, scale, ratio,
    HI: tl.constexpr, DI: tl.constexpr, HI_PAD: tl.constexpr, DI_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (query, batch): dq[q] and dw[q] from a walk over the visible keys."""
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, HI_PAD)
    offs_d = tl.arange(0, DI_PAD)
    hd_ok = (offs_h < HI)[:, None] & (offs_d < DI)[None, :]
    row = b * Sq + r

    q_row = tl.load(q_ptr + row * HI * DI + offs_h[:, None] * DI + offs_d[None, :], mask=hd_ok, other=0.0)
    w_row = tl.load(w_ptr + row * HI + offs_h, mask=offs_h < HI, other=0.0).to(tl.float32)
    q_start = tl.load(q_start_ptr + b)
    n_vis = tl.minimum(tl.maximum(q_start + r + 1, 0) // ratio, Sk)

    dq_acc = tl.zeros((HI_PAD, DI_PAD), tl.float32)
    dw_acc = tl.zeros((HI_PAD,), tl.float32)
    for k0 in range(0, n_vis, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        vis = offs_k < n_vis
        k_tile = tl.load(k_ptr + b * Sk * DI + offs_k.to(tl.int64)[:, None] * DI + offs_d[None, :],
                         mask=vis[:, None] & (offs_d < DI)[None, :], other=0.0)
        g = tl.load(grad_ptr + row * Sk + offs_k, mask=vis, other=0.0).to(tl.float32)
        z = scale * tl.dot(k_tile, tl.trans(q_row), input_precision=PRECISION)  # [BLOCK_K, HI_PAD]
        dw_acc += tl.sum(g[:, None] * tl.maximum(z, 0.0), axis=0)
        ds = tl.where(z > 0.0, g[:, None] * w_row[None, :], 0.0)
        dq_acc += tl.dot(tl.trans(ds).to(k_tile.dtype), k_tile, input_precision=PRECISION)

    dq = (dq_acc * scale).to(dq_ptr.dtype.element_ty)
    tl.store(dq_ptr + row * HI * DI + offs_h[:, None] * DI + offs_d[None, :], dq, mask=hd_ok)
    tl.store(dw_ptr + row * HI + offs_h, dw_acc.to(dw_ptr.dtype.element_ty), mask=offs_h < HI)


@triton.jit
def _logits_bwd_dk_kernel(
    grad_ptr, q_ptr, k_ptr, w_ptr, q_start_ptr, dk_ptr,
    Sq, Sk, scale, ratio,
    HI: tl.constexpr, DI: tl.constexpr, HI_PAD: tl.constexpr, DI_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (key tile, batch): dk of the tile from a walk over the queries that see it."""
    k0 = tl.program_id(0) * BLOCK_K
    b = tl.program_id(1).to(tl.int64)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, HI_PAD)
    offs_d = tl.arange(0, DI_PAD)
    kd_ok = (offs_k < Sk)[:, None] & (offs_d < DI)[None, :]
    hd_ok = (offs_h < HI)[:, None] & (offs_d < DI)[None, :]

    kd_offs = b * Sk * DI + offs_k.to(tl.int64)[:, None] * DI + offs_d[None, :]
    k_tile = tl.load(k_ptr + kd_offs, mask=kd_ok, other=0.0)
    q_start = tl.load(q_start_ptr + b)
    first_row = tl.minimum(tl.maximum((k0 + 1) * ratio - 1 - q_start, 0), Sq)

    dk_acc = tl.zeros((BLOCK_K, DI_PAD), tl.float32)
    for r in range(first_row, Sq):
        row = b * Sq + r
        q_row = tl.load(q_ptr + row * HI * DI + offs_h[:, None] * DI + offs_d[None, :], mask=hd_ok, other=0.0)
        w_row = tl.load(w_ptr + row * HI + offs_h, mask=offs_h < HI, other=0.0).to(tl.float32)
        n_vis = tl.minimum(tl.maximum(q_start + r + 1, 0) // ratio, Sk)
        g = tl.load(grad_ptr + row * Sk + offs_k, mask=offs_k < n_vis, other=0.0).to(tl.float32)
        z = scale * tl.dot(k_tile, tl.trans(q_row), input_precision=PRECISION)  # [BLOCK_K, HI_PAD]
        ds = tl.where(z > 0.0, g[:, None] * w_row[None, :], 0.0)
        dk_acc += tl.dot(ds.to(q_row.dtype), q_row, input_precision=PRECISION)

    tl.store(dk_ptr + kd_offs, (dk_acc * scale).to(dk_ptr.dtype.element_ty), mask=kd_ok)


def indexer_logits_backward(grad_scores, q_idx, k_idx, w, scale, ratio, q_start):
    """(dq_idx, dk_idx, dw) of indexer_logits; masked positions carry no gradient. Deterministic
    (no atomics): dq/dw walk keys per query, dk walks queries per key tile."""
    B, Sq, HI, DI = q_idx.shape
    Sk = k_idx.shape[1]
    precision = dot_precision(q_idx.dtype, "indexer")
    if q_start is None:
        q_start = _default_q_start(B, Sq, Sk, ratio, q_idx.device)
    grad_scores = grad_scores.contiguous()
    dq = torch.empty_like(q_idx)
    dk = torch.empty_like(k_idx)
    dw = torch.empty_like(w)
    meta = dict(HI=HI, DI=DI, HI_PAD=pad_pow2(HI), DI_PAD=pad_pow2(DI), PRECISION=precision)
    if B * Sq > 0:
        _logits_bwd_dq_dw_kernel[(Sq, B)](grad_scores, q_idx, k_idx, w, q_start, dq, dw,
                                          Sq, Sk, float(scale), int(ratio), BLOCK_K=64, **meta,
                                          num_warps=4, num_stages=2)
    if B * Sk > 0:
        _logits_bwd_dk_kernel[(triton.cdiv(Sk, 64), B)](grad_scores, q_idx, k_idx, w, q_start, dk,
                                                       Sq, Sk, float(scale), int(ratio), BLOCK_K=64, **meta,
                                                       num_warps=4, num_stages=2)
    return dq, dk, dw


# ----------------------------------------------------------------------------------------------------
# fused top-k
# ----------------------------------------------------------------------------------------------------

def _team_topk(scores, k, lengths, out=None):
    """The team's Triton top-k (SPEC section 2 tie rule: smaller index wins, -inf never selected)."""
    from csrc_dsl.triton.topk import topk
    return topk(scores, k, lengths, False, out=out)


def _topk_dense_batch(q_idx, k_idx, w, topk, scale, ratio, q_start, out_idx, out_val, workspace_bytes):
    """Fused top-k of one dense batch into out_idx/out_val ([B, Sq, topk]; prefilled with -1/-inf only when
    topk > S_k or packed: otherwise the top-k writes every slot).
    Scores are made a chunk of rows at a time in one reused workspace."""
    B, Sq, HI, DI = q_idx.shape
    Sk = k_idx.shape[1]
    if B == 0 or Sq == 0 or Sk == 0:
        return
    k_eff = min(topk, Sk)  # a row has at most Sk candidates; the tail stays -1/-inf
    rows_budget = max(1, workspace_bytes // (Sk * 4))
    if rows_budget >= Sq:
        batches_per_chunk, rows_per_chunk = min(B, rows_budget // Sq), Sq
    else:
        batches_per_chunk, rows_per_chunk = 1, rows_budget
    workspace = torch.empty(batches_per_chunk * rows_per_chunk * Sk, dtype=torch.float32, device=q_idx.device)
    all_rows = torch.arange(Sq, dtype=torch.int32, device=q_idx.device)

    for b0 in range(0, B, batches_per_chunk):
        b1 = min(B, b0 + batches_per_chunk)
        for r0 in range(0, Sq, rows_per_chunk):
            r1 = min(Sq, r0 + rows_per_chunk)
            scores = workspace[: (b1 - b0) * (r1 - r0) * Sk].view(b1 - b0, r1 - r0, Sk)
            # (the top-k reads each row up to its visible length only: hidden tiles are never written)
            _launch_logits(q_idx[b0:b1, r0:r1], k_idx[b0:b1], w[b0:b1, r0:r1], scores,
                           q_start[b0:b1], ratio, scale, row0=r0, fill_hidden=False)
            lengths = _visible_counts(q_start[b0:b1], all_rows[r0:r1], ratio, Sk)
            dst = (out_idx[b0:b1, r0:r1], out_val[b0:b1, r0:r1])
            if k_eff == topk and dst[0].is_contiguous() and dst[1].is_contiguous():
                _team_topk(scores, k_eff, lengths, out=dst)   # straight into the result, no copy
            else:
                idx, val = _team_topk(scores, k_eff, lengths)
                dst[0][..., :k_eff] = idx
                dst[1][..., :k_eff] = val


def indexer_topk(q_idx, k_idx, w, topk, scale, ratio, q_start, cu_seqlens_q=None, cu_seqlens_k=None,
                 workspace_bytes=None):
    """(indices int32 [B,Sq,topk], values fp32) = topk(indexer_logits(...)) without the score matrix.

    Extra memory: the outputs plus one score workspace of at most ``workspace_bytes`` (default
    WORKSPACE_BYTES; a single row of S_k scores if S_k*4 exceeds it). Order within a row: unspecified.
    Packed form (cu_seqlens given, B == 1): ids are global rows (cu_seqlens_k[b] + local; -1 stays -1).
    It reads cu_seqlens on the host (one sync) to slice the sequences, so it is not CUDA-graph safe;
    the batch form syncs nowhere.
    """
    if workspace_bytes is None:
        workspace_bytes = WORKSPACE_BYTES
    dot_precision(q_idx.dtype, "indexer")
    B, Sq = q_idx.shape[:2]
    device = q_idx.device
    # The top-k kernels write every one of a row's k slots (padding included), so the dense form with
    # topk <= S_k needs no prefill (two fills of 32 MiB each at S_q=4096, topk=2048); otherwise the slots
    # past a row's candidates (or a skipped empty sequence) keep the -1 / -inf of the prefill.
    if cu_seqlens_q is None and 0 < topk <= k_idx.shape[1]:
        out_idx = torch.empty((B, Sq, topk), dtype=torch.int32, device=device)
        out_val = torch.empty((B, Sq, topk), dtype=torch.float32, device=device)
    else:
        out_idx = torch.full((B, Sq, topk), -1, dtype=torch.int32, device=device)
        out_val = torch.full((B, Sq, topk), float("-inf"), dtype=torch.float32, device=device)
    if topk == 0:
        return out_idx, out_val

    if cu_seqlens_q is None:
        Sk = k_idx.shape[1]
        if q_start is None:
            q_start = _default_q_start(B, Sq, Sk, ratio, device)
        _topk_dense_batch(q_idx, k_idx, w, topk, scale, ratio, q_start, out_idx, out_val, workspace_bytes)
        return out_idx, out_val

    # Packed: sequence b owns query rows cu_q[b]:cu_q[b+1] and key rows cu_k[b]:cu_k[b+1] of batch 0.
    cu_q = cu_seqlens_q.tolist()
    cu_k = cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if qe == qs:
            continue
        if q_start is None:
            seq_q_start = torch.full((1,), (ke - ks) * ratio - (qe - qs), dtype=torch.int32, device=device)
        else:
            seq_q_start = q_start[b:b + 1]
        seq_idx = out_idx[:, qs:qe]
        _topk_dense_batch(q_idx[:, qs:qe], k_idx[:, ks:ke], w[:, qs:qe], topk, scale, ratio, seq_q_start,
                          seq_idx, out_val[:, qs:qe], workspace_bytes)
        seq_idx.add_(torch.where(seq_idx >= 0, ks, 0).to(torch.int32))  # local -> global row ids
    return out_idx, out_val


def indexer_topk_paged(q_idx, k_cache, block_table, seq_lens, w, topk, scale, out=None):
    """Decode top-k over a paged key cache; ids are token positions within each sequence.

    Query j of sequence b sits at pos = seq_lens[b] - Sq + j and sees tokens 0..pos. CUDA-graph safe:
    the workspace is [B, Sq, max_pages * page] (static shapes), no host sync. `out`: preallocated contiguous
    (indices, values) [B, Sq, topk] written in place (the out variant of the op), else new tensors.
    """
    B, Sq, HI, DI = q_idx.shape
    page = k_cache.shape[1]
    n_cols = block_table.shape[1] * page
    device = q_idx.device
    dot_precision(q_idx.dtype, "indexer")
    if out is None:
        out = (torch.empty((B, Sq, topk), dtype=torch.int32, device=device),
               torch.empty((B, Sq, topk), dtype=torch.float32, device=device))
    out_idx, out_val = out
    k_eff = min(topk, n_cols)
    if k_eff < topk:  # the top-k kernel pads short rows itself, but not past k_eff columns
        out_idx.fill_(-1)
        out_val.fill_(float("-inf"))
    if k_eff == 0 or B * Sq == 0:
        return out_idx, out_val
    scores = torch.empty((B, Sq, n_cols), dtype=torch.float32, device=device)
    _launch_logits(q_idx, k_cache, w, scores, seq_lens, 1, scale, block_table=block_table, page=page)
    pos = seq_lens.to(torch.int64)[:, None] - Sq + torch.arange(Sq, device=device)[None, :]
    lengths = (pos + 1).clamp(0, n_cols).to(torch.int32)
    if k_eff == topk:
        _team_topk(scores, k_eff, lengths, out=(out_idx, out_val))
    else:
        idx, val = _team_topk(scores, k_eff, lengths)
        out_idx[:, :, :k_eff] = idx
        out_val[:, :, :k_eff] = val
    return out_idx, out_val


indexer_topk_paged.writes_out = True   # dsa::indexer_topk_paged_out passes its buffers as `out`


# ----------------------------------------------------------------------------------------------------
# sparse indexer score (predict of the KL loss, SPEC section 6)
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _sparse_score_kernel(
    q_ptr, k_ptr, w_ptr, idx_ptr, len_ptr, out_ptr,
    Sq, Sk, K, w_scale,
    HI: tl.constexpr, DI: tl.constexpr, HI_PAD: tl.constexpr, DI_PAD: tl.constexpr,
    BLOCK_J: tl.constexpr, HAS_LEN: tl.constexpr, NEG_SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per query row: logits of its K selected keys, then a softmax over the valid slots.
    Pass 1 writes the raw logits and keeps an online max / sum; pass 2 rescales them in place."""
    row = tl.program_id(0).to(tl.int64)  # b * Sq + q
    b = row // Sq
    offs_h = tl.arange(0, HI_PAD)
    offs_d = tl.arange(0, DI_PAD)
    d_ok = offs_d < DI
    q_row = tl.load(q_ptr + row * HI * DI + offs_h[:, None] * DI + offs_d[None, :],
                    mask=(offs_h < HI)[:, None] & d_ok[None, :], other=0.0)
    w_row = tl.load(w_ptr + row * HI + offs_h, mask=offs_h < HI, other=0.0).to(tl.float32) * w_scale
    if HAS_LEN:
        n_slots = tl.minimum(tl.load(len_ptr + row), K)
    else:
        n_slots = K

    run_max = tl.full((), float("-inf"), tl.float32)
    run_sum = tl.zeros((), tl.float32)
    for j0 in range(0, K, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        ids = tl.load(idx_ptr + row * K + offs_j, mask=offs_j < K, other=-1)
        valid = (ids >= 0) & (ids < Sk) & (offs_j < n_slots)
        keys = tl.load(k_ptr + b * Sk * DI + ids.to(tl.int64)[:, None] * DI + offs_d[None, :],
                       mask=valid[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(keys, tl.trans(q_row), input_precision=PRECISION)  # [BLOCK_J, HI_PAD]
        if NEG_SCALE:
            s = tl.minimum(s, 0.0)
        else:
            s = tl.maximum(s, 0.0)
        logits = tl.where(valid, tl.sum(s * w_row[None, :], axis=1), float("-inf"))
        tl.store(out_ptr + row * K + offs_j, logits, mask=offs_j < K)
        new_max = tl.maximum(run_max, tl.max(logits, axis=0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: avoid inf - inf
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(logits - safe_max), axis=0)
        run_max = new_max

    tl.debug_barrier()  # pass 2 reads logits that other threads of this program wrote
    safe_max = tl.where(run_max == float("-inf"), 0.0, run_max)
    inv_sum = tl.where(run_sum > 0.0, 1.0 / tl.where(run_sum > 0.0, run_sum, 1.0), 0.0)
    for j0 in range(0, K, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        logits = tl.load(out_ptr + row * K + offs_j, mask=offs_j < K, other=float("-inf"))
        prob = tl.where(logits == float("-inf"), 0.0, tl.exp(logits - safe_max) * inv_sum)
        tl.store(out_ptr + row * K + offs_j, prob, mask=offs_j < K)


def sparse_indexer_score(q_idx, k_idx, w, indices, scale, topk_length):
    """predict [B, Sq, K] fp32: softmax of the indexer logits over each row's valid slots
    (id < 0, id >= Sk or j >= topk_length -> 0). A row with no valid slot is all 0."""
    B, Sq, HI, DI = q_idx.shape
    Sk = k_idx.shape[1]
    K = indices.shape[2]
    precision = dot_precision(q_idx.dtype, "indexer")
    predict = torch.empty((B, Sq, K), dtype=torch.float32, device=q_idx.device)
    if B * Sq == 0 or K == 0:
        return predict
    has_len = topk_length is not None
    _sparse_score_kernel[(B * Sq,)](
        q_idx, k_idx, w, indices, topk_length if has_len else indices, predict,
        Sq, Sk, K, float(scale),
        HI=HI, DI=DI, HI_PAD=pad_pow2(HI), DI_PAD=pad_pow2(DI),
        BLOCK_J=64, HAS_LEN=has_len, NEG_SCALE=bool(scale < 0), PRECISION=precision,
        num_warps=4, num_stages=2,
    )
    return predict
