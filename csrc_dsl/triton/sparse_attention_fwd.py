"""Triton kernels: sparse MQA attention forward (packed and paged decode) and the score-recompute ops.

Math: SPEC sections 0, 4 and 6. Signatures: docs/IMPLEMENTATIONS.md. Every function here takes validated,
contiguous tensors and allocates its outputs.

How the forward kernel works (read this first)
----------------------------------------------
MQA: all H heads of query t attend to the SAME K rows `kv[indices[t, :]]`. So one program takes one query
and a block of BLOCK_H heads, stacks those heads as the M dimension of a matrix product, and walks the K
selected rows in tiles of BLOCK_N gathered rows:

    S   = Q[BLOCK_H, D] @ KV_tile[BLOCK_N, D]^T        (D split as d_v + tail, so dot shapes stay powers of 2)
    P   = online softmax of S (base 2, scale folded into log2 units)
    acc += P @ KV_tile[:, :d_v]                          (V is the first d_v columns of the same rows)

Each gathered KV tile is loaded once and used for both products. Invalid slots (id < 0, id >= S_kv,
slot >= topk_length) are masked to -inf before the max and are never loaded (masked loads, clamped ids).

Split-K: when there are few programs (decode, or a short prefill), the K slots of each query are cut into
NUM_SPLITS contiguous chunks handled by separate programs; each writes a normalised partial output and its
base-2 LSE, and a small combine kernel merges them (fixed order, so results stay bitwise deterministic).
The number of splits depends only on shapes (no host sync, CUDA-graph safe).

Paged decode is the same kernel with one extra step: token position -> physical row of the cache through
the block table, done in the kernel.

The score ops (`sparse_attn_score`, `dense_attn_score`, SPEC section 6) are the same walk without the second
product: one program per (query row, block of up to 128 heads) holds the Q block, streams the query's keys past it
and writes sum_h exp(s - lse) per key; with more heads than one block, each block writes a partial row and torch
sums them in a fixed order (`_head_summed_scores_kernel`; launch settings in SCORE_LAUNCH, measured on an H200).

Tuning: `CONFIGS` names a few launch configurations; `DSA_TRITON_SPARSE_FWD_CONFIG` picks one by name
(e.g. `h64_n64_w8_s2`) or spells one out (`BLOCK_H=64,BLOCK_N=32,num_warps=8,num_stages=3`).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
ENV_CONFIG = "DSA_TRITON_SPARSE_FWD_CONFIG"
MAX_SPLITS = 64  # the combine kernel holds all partials of one (query, head) in one tile


# ------------------------------------------------------------------------------------------------------
# Launch configurations
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FwdConfig:
    BLOCK_H: int = 64     # heads stacked in the M dimension of one program (16, 32 or 64)
    BLOCK_N: int = 64     # gathered KV rows per loop step
    num_warps: int = 8
    num_stages: int = 2


CONFIGS = {
    "h64_n64_w8_s2": FwdConfig(64, 64, 8, 2),
    "h64_n64_w16_s2": FwdConfig(64, 64, 16, 2),
    "h64_n32_w8_s2": FwdConfig(64, 32, 8, 2),
    "h64_n32_w8_s3": FwdConfig(64, 32, 8, 3),
    "h64_n64_w8_s1": FwdConfig(64, 64, 8, 1),
    "h32_n32_w4_s2": FwdConfig(32, 32, 4, 2),
    "h32_n64_w4_s2": FwdConfig(32, 64, 4, 2),
    "h32_n64_w8_s2": FwdConfig(32, 64, 8, 2),
    "h16_n32_w4_s2": FwdConfig(16, 32, 4, 2),
    "h16_n32_w4_s3": FwdConfig(16, 32, 4, 3),
    "h16_n64_w4_s2": FwdConfig(16, 64, 4, 2),
}


def _parse_config(text: str) -> FwdConfig:
    """A config name from CONFIGS, or `KEY=VALUE,...` over FwdConfig's fields."""
    text = text.strip()
    if text in CONFIGS:
        return CONFIGS[text]
    fields = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key.strip() not in FwdConfig.__dataclass_fields__:
            raise ValueError(f"{ENV_CONFIG}: unknown key {key.strip()!r} in {text!r} "
                             f"(names: {sorted(CONFIGS)}, or keys {list(FwdConfig.__dataclass_fields__)})")
        fields[key.strip()] = int(value)
    return FwdConfig(**fields)


def _block_h_for(num_heads: int, largest: int = 64) -> int:
    """Smallest head block (>= 16, the smallest tl.dot M) covering the heads, capped at `largest`."""
    return min(largest, max(16, triton.next_power_of_2(num_heads)))


def default_config(num_heads: int, dim: int, dtype: torch.dtype, num_programs: int = 1 << 30,
                   num_sms: int = 132) -> FwdConfig:
    """Defaults measured on H100 (Triton 3.6, D=576, K=2048). `num_programs` = queries x head blocks."""
    env = os.environ.get(ENV_CONFIG)
    if env:
        config = _parse_config(env)
        # a forced config still never uses a head block much wider than the heads
        return replace(config, BLOCK_H=min(config.BLOCK_H, _block_h_for(num_heads, config.BLOCK_H)))
    block_h = _block_h_for(num_heads)
    if dtype == torch.float32:
        # 4-byte tiles: keep shared memory (Q + staged KV tiles) inside the 227 KB of an H100
        return FwdConfig(min(block_h, 32), 32 if dim > 256 else 64, 4, 1)
    if block_h >= 64:
        # 276 TFLOP/s at H=128; BLOCK_N=32, 4 or 16 warps, 1 or 3 stages: 1.3x-2.4x slower
        return FwdConfig(block_h, 64, 8, 2)
    if 2 * num_programs <= num_sms:
        # few programs -> split-K, memory bound: BLOCK_N=32 spills nothing and fits 4 CTAs per SM
        # (decode B=32, Sq=2, H=16: 97 us vs 154 us with BLOCK_N=64)
        return FwdConfig(block_h, 32, 4, 2)
    # many programs (prefill, H <= 32): BLOCK_N=64 is 1.2x faster than 32 despite a few spills at H=32
    return FwdConfig(block_h, 64, 4, 2)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter runs: small, so tests exercise the split path on tiny shapes
    return torch.cuda.get_device_properties(device).multi_processor_count


def _choose_num_splits(num_programs: int, topk: int, block_n: int, num_sms: int, heads_per_program: int) -> int:
    """Split K only when the (query, head block) programs fill less than half of the SMs. Measured on H100
    (decode, K = 2048): B=64 of 16 heads ran 1.6x faster with 4 splits; 64 heads x 128 programs ran best
    unsplit. Each split writes heads x d_v fp32 partials, so a split must gather enough rows to be worth
    that traffic: >= 4 rows per head (B=8, H=64: 8 splits 59 us, 32 splits 101 us). Powers of 2 split
    K = 2^n evenly."""
    if 2 * num_programs > num_sms:
        return 1
    wanted = triton.cdiv(2 * num_sms, max(num_programs, 1))
    wanted = 1 << (wanted.bit_length() - 1)  # round down to a power of 2
    worth_it = max(1, topk // max(block_n, 4 * heads_per_program))
    return max(1, min(wanted, worth_it, triton.cdiv(topk, block_n), MAX_SPLITS))


def _dim_split(dim: int, first: int) -> tuple[int, int, int, int]:
    """(first, padded first, tail, padded tail): the columns [0, first) and [first, dim) as tl.dot tiles."""
    tail = dim - first
    padded_tail = max(16, triton.next_power_of_2(tail)) if tail else 0
    return first, max(16, triton.next_power_of_2(first)), tail, padded_tail


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would miss the test tolerances); ignored for half inputs
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"triton sparse attention: unsupported dtype {x.dtype} (bf16, fp16, fp32)")


# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _gather_rows(ids, slot_ok, num_kv_rows, seq_id, seq_lens_ptr, block_table_ptr, max_pages, page_size,
                 PAGED: tl.constexpr, INT64_ROWS: tl.constexpr):
    """ids -> (valid, row of kv). Paged: ids are token positions mapped through the block table."""
    if PAGED:
        seq_len = tl.load(seq_lens_ptr + seq_id)
        valid = slot_ok & (ids >= 0) & (ids < seq_len)
        page_no = tl.where(valid, ids // page_size, 0)
        valid = valid & (page_no < max_pages)  # a seq_len past the table: never read beyond it
        page = tl.load(block_table_ptr + seq_id.to(tl.int64) * max_pages + page_no, mask=valid, other=0)
        if INT64_ROWS:
            page = page.to(tl.int64)
        rows = page * page_size + (ids % page_size)
        # a corrupt table entry (negative, past the cache, or overflowing int32): skip it, never read OOB
        valid = valid & (page >= 0) & (rows >= 0) & (rows < num_kv_rows)
    else:
        valid = slot_ok & (ids >= 0) & (ids < num_kv_rows)
        rows = ids
        if INT64_ROWS:
            rows = rows.to(tl.int64)
    return valid, tl.where(valid, rows, 0)


@triton.jit
def _sparse_mqa_fwd_kernel(
    q_ptr, kv_ptr, idx_ptr, sink_ptr, topk_len_ptr, block_table_ptr, seq_lens_ptr,
    out_ptr, lse_ptr,
    num_heads, topk, num_kv_rows, split_len, num_splits, num_head_blocks,
    queries_per_seq, max_pages, page_size,
    qk_scale_log2,
    DIM: tl.constexpr,           # q / kv row length D
    D_V: tl.constexpr,           # value columns: kv[:, :D_V]; also the first part of the score product
    BLOCK_DV: tl.constexpr,      # D_V rounded up to a power of 2
    D_TAIL: tl.constexpr,        # DIM - D_V (the RoPE part for DeepSeek-V3.2), may be 0
    BLOCK_TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SINK: tl.constexpr,
    HAS_TOPK_LENGTH: tl.constexpr,
    PAGED: tl.constexpr,
    SPLIT: tl.constexpr,         # True: write partial (out, lse2) per split for the combine kernel
    DOT_PRECISION: tl.constexpr,
    INT64_ROWS: tl.constexpr,    # row offsets in int64 only when rows * D may pass 2^31 (saves registers)
):
    # One flat grid axis (axis 1/2 are limited to 65535): head block fastest, so the programs that gather
    # the same rows for the other heads of this query run side by side and hit L2.
    pid = tl.program_id(0)
    head_block = pid % num_head_blocks
    split = (pid // num_head_blocks) % num_splits
    t = pid // (num_head_blocks * num_splits)
    t64 = t.to(tl.int64)

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    dv_cols = tl.arange(0, BLOCK_DV)

    # Q block [BLOCK_H, D], split in the d_v part and the tail; padded heads/columns read as 0.
    q_rows = q_ptr + (t64 * num_heads + heads)[:, None] * DIM
    q_mask = head_ok[:, None]
    if BLOCK_DV != D_V:
        q_mask = q_mask & (dv_cols[None, :] < D_V)
    q_main = tl.load(q_rows + dv_cols[None, :], mask=q_mask, other=0.0)
    if D_TAIL > 0:
        tail_cols = tl.arange(0, BLOCK_TAIL)
        q_tail_mask = head_ok[:, None]
        if BLOCK_TAIL != D_TAIL:
            q_tail_mask = q_tail_mask & (tail_cols[None, :] < D_TAIL)
        q_tail = tl.load(q_rows + D_V + tail_cols[None, :], mask=q_tail_mask, other=0.0)

    # The slots this program owns: [lo, hi) of this query's K slots.
    k_end = topk
    if HAS_TOPK_LENGTH:
        k_end = tl.minimum(tl.maximum(tl.load(topk_len_ptr + t), 0), topk)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, k_end)
    seq_id = t // queries_per_seq  # paged decode: the sequence of this query

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)   # running max, log2 units
    l_i = tl.zeros([BLOCK_H], tl.float32)                 # running sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)

    for start in range(lo, hi, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        slot_ok = slots < hi
        # The gather below depends on these ids, so Triton's pipeliner issues it only at the end of the
        # previous step (no tile of lead at 2 stages). With the ids loaded a step ahead it runs deeper, but only
        # smaller tiles then fit: measured slower (H100, session 20, docs/experiments/triton-ids-ahead.patch);
        # at these tiles, 4% slower at H = 128 and within 1% at H = 64 (session 22,
        # docs/experiments/triton-fwd-ids-ahead-n64.patch).
        ids = tl.load(idx_ptr + t64 * topk + slots, mask=slot_ok, other=-1)
        valid, rows = _gather_rows(ids, slot_ok, num_kv_rows, seq_id, seq_lens_ptr, block_table_ptr,
                                   max_pages, page_size, PAGED, INT64_ROWS)
        kv_rows = kv_ptr + rows[:, None] * DIM
        kv_mask = valid[:, None]
        if BLOCK_DV != D_V:
            kv_mask = kv_mask & (dv_cols[None, :] < D_V)
        kv_main = tl.load(kv_rows + dv_cols[None, :], mask=kv_mask, other=0.0)       # [BLOCK_N, BLOCK_DV]

        # With 64 heads on 8 warps both warpgroups compute all of S (Triton's chained-dot layout); splitting it
        # between them was slower and overflowed shared memory (docs/experiments/triton-fwd-split-scores.patch).
        s = tl.dot(q_main, tl.trans(kv_main), input_precision=DOT_PRECISION)         # [BLOCK_H, BLOCK_N]
        if D_TAIL > 0:
            kv_tail_mask = valid[:, None]
            if BLOCK_TAIL != D_TAIL:
                kv_tail_mask = kv_tail_mask & (tail_cols[None, :] < D_TAIL)
            kv_tail = tl.load(kv_rows + D_V + tail_cols[None, :], mask=kv_tail_mask, other=0.0)
            s = tl.dot(q_tail, tl.trans(kv_tail), acc=s, input_precision=DOT_PRECISION)
        s = tl.where(valid[None, :], s * qk_scale_log2, float("-inf"))

        # Online softmax. m_safe keeps rows that have seen no valid slot yet away from (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
        acc = tl.dot(p.to(kv_main.dtype), kv_main, acc=acc, input_precision=DOT_PRECISION)

    has_any = l_i > 0.0  # the max slot contributes 2^0 = 1, so l_i >= 1 once any slot was valid
    m_fin = tl.where(has_any, m_i, 0.0)
    out_mask = head_ok[:, None]
    if BLOCK_DV != D_V:
        out_mask = out_mask & (dv_cols[None, :] < D_V)
    if SPLIT:
        # partial: normalised output of this chunk and its base-2 LSE (-inf when the chunk is empty)
        row = (t64 * num_heads + heads) * num_splits + split
        part = tl.where(has_any[:, None], acc / tl.where(has_any, l_i, 1.0)[:, None], 0.0)
        tl.store(out_ptr + row[:, None] * D_V + dv_cols[None, :], part, mask=out_mask)
        tl.store(lse_ptr + row, tl.where(has_any, m_fin + tl.log2(tl.where(has_any, l_i, 1.0)),
                                         float("-inf")), mask=head_ok)
    else:
        denom = l_i
        if HAS_SINK:
            # the sink is one more logit in the denominator: 2^(sink2 - m) in this row's units
            sink = tl.load(sink_ptr + heads, mask=head_ok, other=float("-inf")).to(tl.float32)
            sink2 = sink * 1.4426950408889634  # log2(e)
            denom = denom + tl.exp2(sink2 - m_fin)
        out = tl.where(has_any[:, None], acc / tl.where(has_any, denom, 1.0)[:, None], 0.0)
        out_rows = out_ptr + (t64 * num_heads + heads)[:, None] * D_V
        tl.store(out_rows + dv_cols[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)
        lse = tl.where(has_any, (m_fin + tl.log2(tl.where(has_any, l_i, 1.0))) * 0.6931471805599453,
                       float("inf"))
        tl.store(lse_ptr + t64 * num_heads + heads, lse, mask=head_ok)


@triton.jit
def _combine_splits_kernel(
    part_out_ptr, part_lse_ptr, sink_ptr, out_ptr, lse_ptr,
    num_heads, num_splits,
    D_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_SPLITS: tl.constexpr, HAS_SINK: tl.constexpr,
):
    """One program per (query, head): out = sum_s 2^(lse_s - M) o_s / (sum_s 2^(lse_s - M) + 2^(sink - M))."""
    row = tl.program_id(0).to(tl.int64)  # t * num_heads + h
    head = row % num_heads
    splits = tl.arange(0, BLOCK_SPLITS)
    split_ok = splits < num_splits
    lse_s = tl.load(part_lse_ptr + row * num_splits + splits, mask=split_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.exp2(lse_s - m_safe)  # empty splits weigh 0
    total = tl.sum(weight, 0)

    cols = tl.arange(0, BLOCK_DV)
    col_ok = cols < D_V
    parts = tl.load(part_out_ptr + (row * num_splits + splits)[:, None] * D_V + cols[None, :],
                    mask=split_ok[:, None] & col_ok[None, :], other=0.0)
    numer = tl.sum(weight[:, None] * parts, 0)
    denom = total
    if HAS_SINK:
        sink2 = tl.load(sink_ptr + head).to(tl.float32) * 1.4426950408889634
        denom = denom + tl.exp2(sink2 - m_safe)
    has_any = total > 0.0
    out = tl.where(has_any, numer / tl.where(has_any, denom, 1.0), 0.0)
    tl.store(out_ptr + row * D_V + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)
    lse = tl.where(has_any, (m_safe + tl.log2(tl.where(has_any, total, 1.0))) * 0.6931471805599453,
                   float("inf"))
    tl.store(lse_ptr + row, lse)


# ------------------------------------------------------------------------------------------------------
# Forward launchers
# ------------------------------------------------------------------------------------------------------
def _sparse_mqa_forward(q3, kv2, idx2, scale, d_v, attn_sink, topk_length, paged=None,
                        config: Optional[FwdConfig] = None, num_splits: Optional[int] = None, out=None):
    """Shared launcher. q3 [T,H,D], kv2 [rows,D], idx2 [T,K]; paged = (block_table, seq_lens, Sq, page_size).

    `config` / `num_splits` override the defaults (tests, tuning); `out`: preallocated contiguous
    (out [T,H,d_v], lse [T,H]) to write instead of new tensors."""
    _check_dtype(q3)
    num_q, num_heads, dim = q3.shape
    topk = idx2.shape[1]
    if not 0 < d_v <= dim:
        raise ValueError(f"d_v={d_v} must be in (0, D={dim}]")
    if out is not None:
        out, lse = out
    else:
        out = torch.empty((num_q, num_heads, d_v), dtype=q3.dtype, device=q3.device)
        lse = torch.empty((num_q, num_heads), dtype=torch.float32, device=q3.device)
    if num_q == 0 or num_heads == 0:
        return out, lse

    num_sms = _num_sms(q3.device)
    if config is None:
        num_programs = num_q * triton.cdiv(num_heads, _block_h_for(num_heads))
        config = default_config(num_heads, dim, q3.dtype, num_programs, num_sms)
    block_h = min(config.BLOCK_H, _block_h_for(num_heads, config.BLOCK_H))
    num_head_blocks = triton.cdiv(num_heads, block_h)
    if num_splits is None:
        num_splits = _choose_num_splits(num_q * num_head_blocks, topk, config.BLOCK_N, num_sms,
                                        min(num_heads, block_h))
    num_splits = max(1, min(num_splits, MAX_SPLITS))
    # every split a whole number of tiles; recount so no split is left with nothing by construction
    split_len = triton.cdiv(triton.cdiv(max(topk, 1), num_splits), config.BLOCK_N) * config.BLOCK_N
    num_splits = max(1, triton.cdiv(topk, split_len))

    d_v_, block_dv, d_tail, block_tail = _dim_split(dim, d_v)
    if paged is None:
        block_table, seq_lens, queries_per_seq, page_size = idx2, idx2, 1, 1  # unused pointers
        max_pages = 0
    else:
        block_table, seq_lens, queries_per_seq, page_size = paged
        max_pages = block_table.shape[1]
    sink = attn_sink if attn_sink is not None else lse           # unused pointer when absent
    lengths = topk_length if topk_length is not None else idx2   # unused pointer when absent

    if num_splits > 1:
        part_out = torch.empty((num_q, num_heads, num_splits, d_v), dtype=torch.float32, device=q3.device)
        part_lse = torch.empty((num_q, num_heads, num_splits), dtype=torch.float32, device=q3.device)
        dest_out, dest_lse = part_out, part_lse
    else:
        dest_out, dest_lse = out, lse

    grid = (num_q * num_splits * num_head_blocks,)
    _sparse_mqa_fwd_kernel[grid](
        q3, kv2, idx2, sink, lengths, block_table, seq_lens, dest_out, dest_lse,
        num_heads, topk, kv2.shape[0], split_len, num_splits, num_head_blocks,
        queries_per_seq, max_pages, page_size,
        float(scale) * LOG2E,
        DIM=dim, D_V=d_v_, BLOCK_DV=block_dv, D_TAIL=d_tail, BLOCK_TAIL=block_tail,
        BLOCK_H=block_h, BLOCK_N=config.BLOCK_N,
        HAS_SINK=attn_sink is not None, HAS_TOPK_LENGTH=topk_length is not None,
        PAGED=paged is not None, SPLIT=num_splits > 1, DOT_PRECISION=_dot_precision(q3.dtype),
        INT64_ROWS=kv2.shape[0] * dim >= 2 ** 31,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_q * num_heads,)](
            part_out, part_lse, sink, out, lse, num_heads, num_splits,
            D_V=d_v, BLOCK_DV=block_dv, BLOCK_SPLITS=max(2, triton.next_power_of_2(num_splits)),
            HAS_SINK=attn_sink is not None, num_warps=4,
        )
    return out, lse


def sparse_attention(q, kv, indices, scale, d_v, attn_sink=None, topk_length=None):
    """q [T,H,D], kv [S,D], indices [T,K] int32 -> (out [T,H,d_v] q.dtype, lse [T,H] fp32). SPEC section 4."""
    return _sparse_mqa_forward(q, kv, indices, scale, d_v, attn_sink, topk_length)


def sparse_attention_decode(q, kv_cache, block_table, seq_lens, indices, scale, d_v, attn_sink=None,
                            topk_length=None, out=None):
    """Paged decode: q [B,Sq,H,D], kv_cache [P,page,D], block_table [B,maxp], seq_lens [B],
    indices [B,Sq,K] token positions (invalid if < 0 or >= seq_lens[b]) -> (out [B,Sq,H,d_v], lse [B,Sq,H]).
    No host sync; allocations depend on shapes only. `out`: preallocated contiguous (out, lse), written in
    place (the out variant of the op)."""
    batch, seq_q, num_heads, dim = q.shape
    topk = indices.shape[-1]
    num_pages, page_size, _ = kv_cache.shape
    flat_out = None if out is None else (out[0].view(batch * seq_q, num_heads, d_v),
                                         out[1].view(batch * seq_q, num_heads))
    o, lse = _sparse_mqa_forward(
        q.reshape(batch * seq_q, num_heads, dim), kv_cache.reshape(num_pages * page_size, dim),
        indices.reshape(batch * seq_q, topk), scale, d_v, attn_sink,
        None if topk_length is None else topk_length.reshape(batch * seq_q),
        paged=(block_table, seq_lens, seq_q, page_size), out=flat_out)
    return o.view(batch, seq_q, num_heads, d_v), lse.view(batch, seq_q, num_heads)


sparse_attention_decode.writes_out = True   # dsa::sparse_attention_decode_out passes its buffers as `out`


# ------------------------------------------------------------------------------------------------------
# Score recompute (SPEC section 6): sum over heads of the attention probabilities, without the sink
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _load_kv_tile(kv_ptr, rows, row_ok, DIM: tl.constexpr, D_A: tl.constexpr, BLOCK_A: tl.constexpr,
                  D_B: tl.constexpr, BLOCK_B: tl.constexpr):
    """kv rows split as columns [0, D_A) and [D_A, DIM); rows not ok read as 0."""
    cols_a = tl.arange(0, BLOCK_A)
    cols_b = tl.arange(0, BLOCK_B)
    kv_rows = kv_ptr + rows[:, None] * DIM
    mask_a = row_ok[:, None]
    if BLOCK_A != D_A:
        mask_a = mask_a & (cols_a[None, :] < D_A)
    kv_a = tl.load(kv_rows + cols_a[None, :], mask=mask_a, other=0.0)
    mask_b = row_ok[:, None] & (cols_b[None, :] < D_B)
    kv_b = tl.load(kv_rows + D_A + cols_b[None, :], mask=mask_b, other=0.0)
    return kv_a, kv_b


@triton.jit
def _head_summed_scores_kernel(
    q_ptr, kv_ptr, lse_ptr, idx_ptr, topk_len_ptr, q_start_ptr, target_ptr,
    num_heads, num_queries, row_len, num_kv_rows, num_head_blocks, qk_scale_log2, seq_q, ratio,
    DIM: tl.constexpr, D_A: tl.constexpr, BLOCK_A: tl.constexpr, D_B: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DENSE: tl.constexpr, HAS_TOPK_LENGTH: tl.constexpr,
    HAS_Q_START: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (query row, block of BLOCK_H heads), as the forward: its Q block is loaded once and the
    query's keys stream past it in tiles of BLOCK_N rows. It writes sum over its heads of
    2^(scale2 q[h].kv_j - lse2[h]) for every entry of row (head block, query row) of target_ptr
    [num_head_blocks, num_queries, row_len], 0 where invalid or masked.
    Sparse (DENSE=False): entry j is slot j of indices [T, row_len] (row of kv [num_kv_rows, D]).
    Dense: query rows are (batch, query) pairs of q [B, seq_q, H, D], entry j is key j of kv [B, row_len, D],
    visible iff j < (q_start[b] + query + 1) // ratio (SPEC section 6)."""
    pid = tl.program_id(0)
    head_block = pid % num_head_blocks
    t = (pid // num_head_blocks).to(tl.int64)
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    q_rows = q_ptr + (t * num_heads + heads)[:, None] * DIM
    cols_a = tl.arange(0, BLOCK_A)
    mask_a = head_ok[:, None]
    if BLOCK_A != D_A:
        mask_a = mask_a & (cols_a[None, :] < D_A)
    q_a = tl.load(q_rows + cols_a[None, :], mask=mask_a, other=0.0)
    if D_B > 0:
        cols_b = tl.arange(0, BLOCK_B)
        q_b = tl.load(q_rows + D_A + cols_b[None, :], mask=head_ok[:, None] & (cols_b[None, :] < D_B), other=0.0)
    # padded heads get lse = +inf, so they add 2^-inf = 0; a row with lse = +inf (no key) adds 0 too
    lse2 = tl.load(lse_ptr + t * num_heads + heads, mask=head_ok, other=float("inf")).to(tl.float32) \
        * 1.4426950408889634

    if DENSE:
        b = t // seq_q
        if HAS_Q_START:
            q_start = tl.load(q_start_ptr + b)
        else:
            q_start = row_len * ratio - seq_q
        # floor division of a non-negative count (no key is visible before position 0)
        k_end = tl.minimum(tl.maximum(q_start + (t % seq_q) + 1, 0) // ratio, row_len)
        kv_ptr += b * row_len * DIM
    else:
        k_end = row_len
        if HAS_TOPK_LENGTH:
            k_end = tl.minimum(tl.maximum(tl.load(topk_len_ptr + t), 0), row_len)
    out_row = target_ptr + (head_block * num_queries + t) * row_len
    for start in range(0, k_end, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        if DENSE:
            valid = slots < k_end
            rows = slots.to(tl.int64)
        else:
            ids = tl.load(idx_ptr + t * row_len + slots, mask=slots < k_end, other=-1)
            valid = (slots < k_end) & (ids >= 0) & (ids < num_kv_rows)
            rows = tl.where(valid, ids, 0).to(tl.int64)
        kv_a, kv_b = _load_kv_tile(kv_ptr, rows, valid, DIM, D_A, BLOCK_A, D_B, BLOCK_B)
        s = tl.dot(q_a, tl.trans(kv_a), input_precision=DOT_PRECISION)                  # [BLOCK_H, BLOCK_N]
        if D_B > 0:
            s = tl.dot(q_b, tl.trans(kv_b), acc=s, input_precision=DOT_PRECISION)
        total = tl.sum(tl.exp2(s * qk_scale_log2 - lse2[:, None]), 0)
        tl.store(out_row + slots, tl.where(valid, total, 0.0), mask=slots < row_len)
    # entries at or past k_end: 0 (the loop above wrote the tile that holds k_end)
    for start in range(tl.cdiv(k_end, BLOCK_N) * BLOCK_N, row_len, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        tl.store(out_row + slots, tl.zeros([BLOCK_N], tl.float32), mask=slots < row_len)


def _score_dims(dim: int) -> tuple[int, int, int, int]:
    """Score ops have no d_v: split D at its largest power of 2 (576 -> 512 + 64, 80 -> 64 + 16)."""
    first = 1 << (dim.bit_length() - 1)
    return _dim_split(dim, first)


# Score-op launch: the widest head block (SCORE_MAX_BLOCK_H) and, per head block, (BLOCK_N, num_warps, num_stages).
# The kv tile [BLOCK_N, D] is staged num_stages deep next to the Q block in shared memory.
# benchmarks/experiments/score_launch.py on the H200 (2026-12-04, V3.2: H=128, D=576; S=4096, K=2048), ms for
# sparse_attn_score / dense_attn_score: 128 heads x 64 x 8 warps x 1 stage 4.34 / 3.73 (cuDNN 2.95 / 2.61);
# 128 x 32 x 8 x 2: 5.05 / 4.07; 64 x 64 x 4 x 2: 5.58 / 4.15; 64 x 64 x 8 x 2: 8.58 / 7.11. One program
# per query then gathers each kv tile once for all 128 heads.
SCORE_MAX_BLOCK_H = 128
SCORE_LAUNCH = {128: (64, 8, 1), 64: (64, 4, 2), 32: (64, 4, 2), 16: (64, 4, 2)}


def sparse_attn_score(q, kv, lse, indices, scale, topk_length=None, *, block_h: Optional[int] = None,
                      block_n: Optional[int] = None):
    """target [T,K] fp32: sum_h exp(scale q[t,h].kv[id] - lse[t,h]) on valid slots, 0 elsewhere, divided by
    max(row sum, 1e-12). SPEC section 6."""
    _check_dtype(q)
    partial = _score_partials(q, indices.shape[0], indices.shape[1], block_h)
    head_summed_scores(q, kv, lse, indices, scale, topk_length, partial, block_n=block_n)
    target = _sum_partials(partial)
    # normalisation in torch: a fixed-order reduction, so the op stays deterministic
    return target / target.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def dense_attn_score(q, kv, lse, scale, ratio=1, q_start=None, *, block_h: Optional[int] = None,
                     block_n: Optional[int] = None):
    """(scores [B,Sq,Sk] fp32 with ratio-causally masked entries 0, l1 [B,Sq] = row sums). SPEC section 6."""
    _check_dtype(q)
    batch, seq_q, num_heads, dim = q.shape
    partial = _score_partials(q, batch * seq_q, kv.shape[1], block_h)
    head_summed_scores(q.view(batch * seq_q, num_heads, dim), kv, lse, None, scale, None, partial,
                       block_n=block_n, dense=(seq_q, int(ratio), q_start))
    scores = _sum_partials(partial).view(batch, seq_q, kv.shape[1])
    return scores, scores.sum(dim=-1)


def _score_partials(q, num_rows: int, row_len: int, block_h: Optional[int]) -> torch.Tensor:
    """Uninitialised [num_head_blocks, num_rows, row_len] fp32 for head_summed_scores."""
    block_h = _block_h_for(q.shape[-2], SCORE_MAX_BLOCK_H) if block_h is None else block_h
    if q.dtype == torch.float32:  # 4-byte tiles: Q block and kv tile must share the shared memory
        block_h = min(block_h, 32)
    return torch.empty((triton.cdiv(q.shape[-2], block_h), num_rows, row_len), dtype=torch.float32,
                       device=q.device)


def _sum_partials(partial: torch.Tensor) -> torch.Tensor:
    # With more heads than one block, each head block wrote its own partial row; torch sums them in a fixed
    # order (no atomics: the ops stay deterministic).
    return partial[0] if partial.shape[0] == 1 else partial.sum(0)


def head_summed_scores(q, kv, lse, indices, scale, topk_length, partial, *, block_n: Optional[int] = None,
                       dense: Optional[tuple] = None):
    """Fills partial [num_head_blocks, rows, row_len] (every entry): entry (b, r, j) = sum over head block b's
    heads of exp(scale q[r,h].kv_j - lse[r,h]), 0 where invalid or masked. The head block is H / num_head_blocks
    rounded up to a power of 2 (>= 16). Sparse: kv_j = kv[indices[r, j]]. Dense (dense = (seq_q, ratio,
    q_start or None), q as [B*seq_q, H, D]): kv_j = kv[r // seq_q, j] under the ratio-causal mask."""
    num_rows, num_heads, dim = q.shape
    num_head_blocks, _, row_len = partial.shape
    block_h = max(16, triton.next_power_of_2(triton.cdiv(num_heads, num_head_blocks)))
    if partial.numel() == 0:
        return partial
    d_a, block_a, d_b, block_b = _score_dims(dim)
    launch_n, num_warps, num_stages = SCORE_LAUNCH[block_h]
    if q.dtype == torch.float32:  # 4-byte tiles: one stage of a narrower tile fits shared memory
        launch_n, num_stages = 32, 1
    seq_q, ratio, q_start = dense if dense is not None else (1, 1, None)
    _head_summed_scores_kernel[(num_rows * num_head_blocks,)](
        q, kv, lse, indices if indices is not None else lse, topk_length if topk_length is not None else lse,
        q_start if q_start is not None else lse, partial,
        num_heads, num_rows, row_len, kv.shape[-2], num_head_blocks, float(scale) * LOG2E, seq_q, ratio,
        DIM=dim, D_A=d_a, BLOCK_A=block_a, D_B=d_b, BLOCK_B=max(block_b, 16),
        BLOCK_H=block_h, BLOCK_N=block_n or launch_n, DENSE=dense is not None,
        HAS_TOPK_LENGTH=topk_length is not None, HAS_Q_START=q_start is not None,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return partial
