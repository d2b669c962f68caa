"""Triton kernels: backward of sparse MQA attention (SPEC section 5).

Forward (SPEC section 4), for the valid slots j of query t (idx = indices[t, j]):
    s[t,h,j] = scale * q[t,h] . kv[idx]        P = exp(s - L),   L = logaddexp(lse, sink[h])
    out[t,h] = sum_j P[t,h,j] * kv[idx, :d_v]
Backward:
    Delta[t,h] = out[t,h] . dout[t,h]
    dP = dout[t,h] . kv[idx, :d_v];   dS = P * (dP - Delta)
    dq[t,h]      = scale * sum_j dS * kv[idx]
    dkv[idx]    += scale * sum_h dS * q[t,h]   +   sum_h P * dout[t,h]   (second term: first d_v dims)
    d_sink[h]    = -sum_t exp(sink[h] - L[t,h]) * Delta[t,h]
With a gradient g = grad_lse[t,h] of lse (merged split branches): d lse / d s_j = exp(s_j - lse)
= P_j * exp(L - lse), so dS uses Delta - g * exp(L - lse) (= Delta - g without a sink; rows with no
key: no shift). lse excludes the sink, so d_sink keeps the plain Delta.

Why three kernels and not one. A single kernel per (query, head block) must keep dq [64 heads,
576] in fp32 registers (56% of the register file) while it recomputes the scores of each tile and
forms that tile's dkv block: on Hopper, Triton then spills, cannot double-buffer the gathered kv
tiles in shared memory, and (its scores feeding another product) makes both warpgroups compute
the same scores. Split at the two [T, H, K] matrices P and dS instead, which the products consume
in 16 bits anyway (the fused form rounds them to bf16 before its tensor-core products):

  1. _scores_kernel, per (query t, BLOCK_H heads): S = q kv^T and dP = dout v^T over tiles of
     gathered kv rows, then P and dS (softmax scale folded in) into a bf16 workspace. Also Delta
     (shifted by grad_lse when given) and this query's share of d_sink. For 64-head blocks of
     16-bit inputs (SCORE_STACKED) q and dout are stacked in M, so S and dP are one [128, BLOCK_N]
     product whose halves the two warpgroups compute side by side.
  2. _dkv_kernel, per (query t, block of latent columns), ALL heads at once: dkv^T = q^T dS +
     dout^T P with the heads as the reduction dim (no kv gather). One scatter per (slot, column)
     for all heads: half the scatters of a per-head-block kernel at H = 128.
  3. _dq_kernel, per (query t, BLOCK_H heads): dq = dS @ kv[idx] over the gathered rows; with
     more than 64 heads (DQ_SPLIT), per (query t, up to 128 heads, half of the columns) instead,
     so that each kv row is gathered once per query.
Together they do exactly the FLOPs of the math, 2*T*H*K*(3*D + 2*d_v); the price is the workspace
(4 bytes per (t, h, slot) for bf16 inputs), written once and read twice. Queries go in chunks so
that the workspace stays under a budget (WORKSPACE_ENV, default 2 GiB).

dkv accumulation, two modes:
- fast (deterministic=False): _dkv_kernel adds into an fp32 [S, D] accumulator with fp32 atomics
  (vectorized red.v4.f32; the accumulator stays in L2).
- deterministic: _dkv_kernel stores each slot's dkv row (fp32, D values) into a partial buffer
  [chunk * K, D]; _reduce_kernel then sums, for each kv row, the partial rows of the slots that
  selected it in ascending slot order (an inverse index built once per call with a stable
  torch.sort on the device; no host sync), into the fp32 accumulator which it owns row by row.
  No float atomics, so every run gives the same bits. Rejected alternative: 64-bit fixed-point
  integer atomics are also order-free, but L2 executes them at about a quarter of the element
  rate of vectorized fp32 atomics (196 vs 823 G elements/s measured on an H100), which doubled
  the whole backward; the partial buffer costs one write and one read of T*K*D fp32 instead.

The latent dim D is handled as a value part [0, d_v) and a rope part [d_v, D) (absent when
D == d_v), each padded to a power of two with masks (Triton tiles are powers of two).
"""

from __future__ import annotations

import os
import re

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------------
# Tile configuration
# --------------------------------------------------------------------------------------------
# BLOCK_H:   heads per program in kernels 1 and 3 (the M of their products).
# SCORE_*:   kernel 1 (scores): kv rows per tile, warps, pipeline stages. SCORE_STACKED=1: S and
#            dP as one product over q and dO stacked in M, on 8 warps, for 64-head blocks of 16-bit
#            inputs (each warpgroup runs one of the two wgmma chains instead of one warpgroup running
#            both), on STACKED_BLOCK_N-slot tiles with STACKED_STAGES stages. 64-slot tiles, one
#            stage: the kernel took 8.66 ms instead of 10.49 at H = 128 (4.34 instead of 5.32 at
#            H = 64; H100, Triton 3.6, BENCHMARKS.md session 21). STACKED_IDS_AHEAD=1: each tile's
#            ids loaded a step ahead (at one stage nothing else hides their L2 round trip before the
#            gather): 4.08 ms instead of 4.43 at H = 64, 8.31 instead of 8.56 at H = 128. The
#            default only under Triton 3.6, where it was measured (220 registers, no spill):
#            Triton 3.9 spills 264 bytes of it, and it has not been timed there.
# DKV_*:     kernel 2 (dkv): latent columns per program, slots per tile, warps, stages. 32-slot
#            tiles, not 64: at H = 128 Triton 3.6 then fits two CTAs per SM instead of one (114 KB
#            of shared memory instead of 147 KB), and the kernel took 10.9 ms instead of 14.3
#            (H = 64: 7.3 instead of 8.5; H100, BENCHMARKS.md session 19). DET_BLOCK_N: the
#            same in deterministic mode, where the kernel stores its rows instead of adding them
#            and 64-slot tiles measured faster at H = 64 (27.3 ms against 29.0 for the whole
#            backward; H = 128: 39.3 against 38.7).
# DQ_*:      kernel 3 (dq): kv rows per tile, warps, stages. DQ_SPLIT=1: for more than 64 heads
#            of 16-bit inputs, one program per query, block of up to DQ_SPLIT_BLOCK_H heads and half
#            of the columns, instead of one per 64-head block and all columns, so that each kv row
#            is gathered once per query instead of once per head block: at H = 128 the kernel took
#            3.69 ms instead of 3.93 (H100, BENCHMARKS.md session 21; 3.62 on 16 warps, not tested
#            on the GPU); less than the halved gather traffic suggested, so the gather's L2 reads
#            are not all that bounds it. Tried and not kept (BENCHMARKS.md session 22): dq formed by
#            the dkv programs, no dq kernel (10.2 ms at H = 64 against 7.3 + 2.0 for dkv and dq;
#            docs/experiments/triton-bwd-dq-in-dkv.patch), and the dq kernel on a second stream
#            beside the dkv kernel (within 1%: each fills the GPU, so they hardly overlap;
#            docs/experiments/triton-bwd-dq-stream.patch).
# REDUCE_*:  deterministic reduction: latent columns per program, slots summed per step.
def _triton_minor_version() -> tuple[int, int]:
    """(major, minor) of this Triton; (99, 99), newer than any, when its version string is unusual."""
    found = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return (int(found[1]), int(found[2])) if found else (99, 99)


_STACKED_MEASURED = _triton_minor_version() == (3, 6)
_H100 = dict(
    BLOCK_H=64,
    SCORE_BLOCK_N=32, SCORE_WARPS=4, SCORE_STAGES=2,
    SCORE_STACKED=int(_STACKED_MEASURED), STACKED_BLOCK_N=64, STACKED_STAGES=1, STACKED_IDS_AHEAD=1,
    DKV_BLOCK_D=128, DKV_BLOCK_N=32, DKV_DET_BLOCK_N=64, DKV_WARPS=8, DKV_STAGES=2,
    DQ_BLOCK_N=64, DQ_WARPS=8, DQ_STAGES=2, DQ_SPLIT=1, DQ_SPLIT_BLOCK_H=128,
    REDUCE_BLOCK_D=64, REDUCE_BLOCK_E=16,
)
CONFIGS = {
    "default": _H100,
    "score8w": dict(_H100, SCORE_WARPS=8),
    "dkv256_32": dict(_H100, DKV_BLOCK_D=256, DKV_BLOCK_N=32),
    "dkv256_32_s3": dict(_H100, DKV_BLOCK_D=256, DKV_BLOCK_N=32, DKV_STAGES=3),
    "dkv512_32": dict(_H100, DKV_BLOCK_D=512, DKV_BLOCK_N=32),
    "dkv512_16": dict(_H100, DKV_BLOCK_D=512, DKV_BLOCK_N=16),
    "dkv128_64_s3": dict(_H100, DKV_BLOCK_N=64, DKV_STAGES=3),
    "dq_n32": dict(_H100, DQ_BLOCK_N=32, DQ_STAGES=3),
}

# Environment variable that overrides the configuration, for tuning: a name from CONFIGS,
# optionally followed by overrides, e.g. "default,SCORE_BLOCK_N=64,SCORE_STAGES=1".
CONFIG_ENV = "DSA_SPARSE_ATTN_BWD_CONFIG"
# Workspace budget in MiB (the P / dS buffers, and the deterministic partial rows).
WORKSPACE_ENV = "DSA_SPARSE_ATTN_BWD_WORKSPACE_MB"
_DEFAULT_WORKSPACE_MB = 2048
# Workspace rows are padded to a multiple of this many slots (zeros past each query's slots);
# the BLOCK_N of every kernel that writes or reads the workspace must divide it.
_WS_PAD = 128


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def pick_config(num_heads: int, spec: str | None = None) -> dict:
    """The tile configuration for a call: CONFIGS["default"], overridable through CONFIG_ENV (or
    through `spec`, in the same syntax, which tools pass instead of setting the environment)."""
    config = dict(CONFIGS["default"])
    override = (os.environ.get(CONFIG_ENV, "") if spec is None else spec).strip()
    for item in [part.strip() for part in override.split(",") if part.strip()]:
        if "=" not in item:
            if item not in CONFIGS:
                raise ValueError(f"{CONFIG_ENV}: unknown config {item!r} (known: {sorted(CONFIGS)})")
            config = dict(CONFIGS[item])
            continue
        key, value = (part.strip() for part in item.split("="))
        if key not in config:
            raise ValueError(f"{CONFIG_ENV}: unknown key {key!r} (known: {sorted(config)})")
        config[key] = int(value)
    # Heads per program: a power of two >= 16 (tl.dot needs >= 16), no more than needed.
    config["BLOCK_H"] = max(16, min(config["BLOCK_H"], _next_pow2(num_heads)))
    for key in ("SCORE_BLOCK_N", "STACKED_BLOCK_N", "DKV_BLOCK_N", "DKV_DET_BLOCK_N", "DQ_BLOCK_N",
                "DKV_BLOCK_D", "DQ_SPLIT_BLOCK_H"):
        if config[key] < 16 or config[key] & (config[key] - 1):
            raise ValueError(f"{key} must be a power of two >= 16, got {config[key]}")
    for key in ("SCORE_BLOCK_N", "STACKED_BLOCK_N", "DKV_BLOCK_N", "DKV_DET_BLOCK_N", "DQ_BLOCK_N"):
        if _WS_PAD % config[key]:
            raise ValueError(f"{key} must divide {_WS_PAD}, got {config[key]}")
    return config


def score_launch(config: dict, block_h: int, element_size: int) -> tuple[bool, int, int, int, bool]:
    """(stacked, warps, kv rows per tile, stages, ids a step ahead) of the score kernel: the stacked
    product (SCORE_STACKED) only for 64-head blocks of 16-bit inputs (fp32 tiles would not fit in
    shared memory), always on 8 warps and its own tile size, stages and ids loading."""
    if config["SCORE_STACKED"] and block_h == 64 and element_size == 2:
        return (True, 8, config["STACKED_BLOCK_N"], config["STACKED_STAGES"],
                bool(config["STACKED_IDS_AHEAD"]))
    return False, config["SCORE_WARPS"], config["SCORE_BLOCK_N"], config["SCORE_STAGES"], False


def dq_launch(config: dict, num_heads: int, element_size: int, dv_block: int, d_rope: int,
              has_rope: bool) -> tuple[int, int]:
    """(heads per program, column parts) of the dq kernel: the column split (DQ_SPLIT) only for more
    heads than one BLOCK_H block, 16-bit inputs and halves of at least 16 columns (tl.dot's
    smallest N)."""
    if (config["DQ_SPLIT"] and num_heads > config["BLOCK_H"] and element_size == 2 and dv_block >= 32
            and (not has_rope or d_rope >= 32)):
        return min(config["DQ_SPLIT_BLOCK_H"], max(16, _next_pow2(num_heads))), 2
    return config["BLOCK_H"], 1


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_2d(base_ptr, row_offsets, row_mask, col_start, col_end: tl.constexpr,
             NUM_COLS: tl.constexpr, STATIC_COLS: tl.constexpr):
    """[rows, NUM_COLS] tile of base_ptr[row_offsets + col] for col in col_start.. (< col_end).
    STATIC_COLS: the caller knows every column is < col_end, so no column mask (saves registers)."""
    cols = col_start + tl.arange(0, NUM_COLS)
    if STATIC_COLS:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & (cols < col_end)[None, :]
    return tl.load(base_ptr + row_offsets[:, None] + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _slot_ids(indices_ptr, t, topk, slots, num_slots, num_kv_rows):
    """kv row ids of the given slots of query t, and which slots are valid (SPEC invalid index)."""
    ids = tl.load(indices_ptr + t * topk + slots, mask=slots < num_slots, other=-1)
    valid = (slots < num_slots) & (ids >= 0) & (ids < num_kv_rows)
    return tl.where(valid, ids, 0), valid


@triton.jit
def _num_slots(topk_length_ptr, t, topk, HAS_TOPK_LENGTH: tl.constexpr):
    if HAS_TOPK_LENGTH:
        return tl.minimum(tl.maximum(tl.load(topk_length_ptr + t), 0), topk)
    else:
        return topk


# --------------------------------------------------------------------------------------------
# Kernel 1: P and dS into the workspace
# --------------------------------------------------------------------------------------------
@triton.jit
def _scores_kernel(
    q_ptr, kv_ptr, dout_ptr, out_ptr, lse_ptr, sink_ptr, indices_ptr, topk_length_ptr,
    grad_lse_ptr, p_ptr, ds_ptr, dsink_part_ptr,
    t_start, num_heads, num_kv_rows, topk, ws_stride, scale,
    D: tl.constexpr, D_V: tl.constexpr, DV_BLOCK: tl.constexpr, D_ROPE: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_SINK: tl.constexpr, HAS_TOPK_LENGTH: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, WS_PAD: tl.constexpr, STACKED: tl.constexpr, IDS_AHEAD: tl.constexpr,
):
    t_local = tl.program_id(0).to(tl.int64)  # row of the workspace chunk
    t = t_start + t_local
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < num_heads
    q_rows = (t * num_heads + heads) * D
    o_rows = (t * num_heads + heads) * D_V
    dv_exact: tl.constexpr = DV_BLOCK == D_V

    # L = logaddexp(lse, sink), kept as +inf for a row without keys (lse = +inf): P = 0 there.
    lse = tl.load(lse_ptr + t * num_heads + heads, mask=head_mask, other=float("inf"))
    if HAS_SINK:
        sink = tl.load(sink_ptr + heads, mask=head_mask, other=float("-inf"))
        top = tl.maximum(lse, sink)
        safe_top = tl.where(top == float("inf"), 0.0, top)  # avoid inf - inf
        big_l = tl.where(lse == float("inf"), float("inf"),
                         top + tl.log(tl.exp(lse - safe_top) + tl.exp(sink - safe_top)))
    else:
        big_l = lse
    big_l = tl.where(head_mask, big_l, float("inf"))
    row_has_keys = big_l < float("inf")
    big_l_log2 = big_l * 1.4426950408889634

    dout = _load_2d(dout_ptr, o_rows, head_mask, 0, D_V, DV_BLOCK, dv_exact)
    out = _load_2d(out_ptr, o_rows, head_mask, 0, D_V, DV_BLOCK, dv_exact)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), axis=1)
    if HAS_SINK:
        # This query's share of d_sink; summed over t afterwards (a fixed-order torch sum).
        sink_weight = tl.where(row_has_keys, tl.exp(sink - big_l), 0.0)
        tl.store(dsink_part_ptr + t * num_heads + heads, -sink_weight * delta, mask=head_mask)
    if HAS_GRAD_LSE:
        # d lse / d s_j = exp(s_j - lse) = P_j * exp(L - lse): a shift of Delta (not of d_sink: the
        # sink is not in lse). exp(L - lse) = 1 + exp(sink - lse), which has no inf - inf on rows
        # without keys (lse = +inf); those get no shift (their P is 0).
        grad_lse = tl.load(grad_lse_ptr + t * num_heads + heads, mask=head_mask, other=0.0)
        if HAS_SINK:
            grad_lse = grad_lse * (1.0 + tl.exp(sink - lse))
        delta = delta - tl.where(row_has_keys, grad_lse, 0.0)

    if STACKED:
        # One [2 * BLOCK_H, BLOCK_N] product gives S (rows < BLOCK_H) and dP (the rest): A stacks
        # q and dO of the same heads, so on 8 warps each warpgroup owns one of the two products.
        stack_rows = tl.arange(0, 2 * BLOCK_H)
        stack_heads = tl.program_id(1) * BLOCK_H + stack_rows % BLOCK_H
        stack_ok = stack_heads < num_heads
        is_q_row = stack_rows < BLOCK_H
        stack_base = tl.where(is_q_row, q_ptr + (t * num_heads + stack_heads) * D,
                              dout_ptr + (t * num_heads + stack_heads) * D_V)
        value_cols = tl.arange(0, DV_BLOCK)
        stacked_value = tl.load(stack_base[:, None] + value_cols[None, :],
                                mask=stack_ok[:, None] & (value_cols < D_V)[None, :], other=0.0)
        if HAS_ROPE:
            # dO has no rope part: its rows are zeros here and add nothing to dP.
            rope_cols = D_V + tl.arange(0, D_ROPE)
            stacked_rope = tl.load(stack_base[:, None] + rope_cols[None, :],
                                   mask=(stack_ok & is_q_row)[:, None] & (rope_cols < D)[None, :],
                                   other=0.0)
    else:
        q_value = _load_2d(q_ptr, q_rows, head_mask, 0, D_V, DV_BLOCK, dv_exact)
        if HAS_ROPE:
            q_rope = _load_2d(q_ptr, q_rows, head_mask, D_V, D, D_ROPE, False)

    num_slots = _num_slots(topk_length_ptr, t, topk, HAS_TOPK_LENGTH)
    scale_log2 = scale * 1.4426950408889634
    # Workspace rows (t_local, h), ws_stride slots each (a multiple of WS_PAD >= K). This kernel
    # also writes zeros up to the next multiple of WS_PAD past num_slots, so that the readers
    # mask by head only: a mask that varies along a row would stop Triton from vectorizing and
    # pipelining their loads.
    ws_rows = (t_local * num_heads + heads) * ws_stride
    padded_slots = tl.minimum(tl.cdiv(num_slots, WS_PAD) * WS_PAD, ws_stride)
    if IDS_AHEAD:
        next_ids, next_valid = _slot_ids(indices_ptr, t, topk, tl.arange(0, BLOCK_N), num_slots,
                                         num_kv_rows)
    for start in range(0, padded_slots, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        if IDS_AHEAD:
            # one stage (no pipeliner): the next tile's ids load while this tile computes, so
            # the gather waits for one L2 round trip instead of two
            ids, slot_valid = next_ids, next_valid
            next_ids, next_valid = _slot_ids(indices_ptr, t, topk, slots + BLOCK_N, num_slots,
                                             num_kv_rows)
        else:
            # ids loaded in the step that gathers with them: a step ahead, the pipelined gather
            # runs deeper but only on smaller tiles, measured slower (docs/experiments/
            # triton-ids-ahead.patch)
            ids, slot_valid = _slot_ids(indices_ptr, t, topk, slots, num_slots, num_kv_rows)
        kv_rows = ids.to(tl.int64) * D
        kv_value = _load_2d(kv_ptr, kv_rows, slot_valid, 0, D_V, DV_BLOCK, dv_exact)
        if STACKED:
            both = tl.dot(stacked_value, tl.trans(kv_value), input_precision=DOT_PRECISION)
            if HAS_ROPE:
                kv_rope = _load_2d(kv_ptr, kv_rows, slot_valid, D_V, D, D_ROPE, False)
                both = tl.dot(stacked_rope, tl.trans(kv_rope), both, input_precision=DOT_PRECISION)
            # rows [0, BLOCK_H) and [BLOCK_H, 2 BLOCK_H) side by side: [BLOCK_H, BLOCK_N, 2]
            scores, dp = tl.split(tl.permute(tl.reshape(both, (2, BLOCK_H, BLOCK_N)), (1, 2, 0)))
        else:
            scores = tl.dot(q_value, tl.trans(kv_value), input_precision=DOT_PRECISION)
            if HAS_ROPE:
                kv_rope = _load_2d(kv_ptr, kv_rows, slot_valid, D_V, D, D_ROPE, False)
                # A separate product, added: a dot feeding another dot makes Triton put all warps
                # along M, which for M = 64 on 8 warps computes the value part twice.
                scores += tl.dot(q_rope, tl.trans(kv_rope), input_precision=DOT_PRECISION)
            dp = tl.dot(dout, tl.trans(kv_value), input_precision=DOT_PRECISION)

        live = slot_valid[None, :] & row_has_keys[:, None]
        p = tl.where(live, tl.exp2(scores * scale_log2 - big_l_log2[:, None]), 0.0)
        ds = p * (dp - delta[:, None]) * scale  # the softmax scale, folded in once
        ws_offsets = ws_rows[:, None] + slots[None, :]
        tl.store(p_ptr + ws_offsets, p.to(p_ptr.dtype.element_ty), mask=head_mask[:, None])
        tl.store(ds_ptr + ws_offsets, ds.to(ds_ptr.dtype.element_ty), mask=head_mask[:, None])


# --------------------------------------------------------------------------------------------
# Kernel 2: dkv = q^T dS + dout^T P, all heads at once
# --------------------------------------------------------------------------------------------
@triton.jit
def _dkv_kernel(
    q_ptr, dout_ptr, p_ptr, ds_ptr, indices_ptr, topk_length_ptr, dkv_ptr,
    t_start, num_heads, num_kv_rows, topk, ws_stride,
    D: tl.constexpr, D_V: tl.constexpr, COL_START: tl.constexpr, COL_END: tl.constexpr,
    WITH_P_TERM: tl.constexpr, HAS_TOPK_LENGTH: tl.constexpr, DETERMINISTIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HEADS_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Columns [col0, col0 + BLOCK_D) of dkv (col0 = COL_START + program_id(0) * BLOCK_D, all
    < COL_END) for the slots of query t_start + program_id(1). WITH_P_TERM: add dout^T P (value
    columns). DETERMINISTIC: store rows to the partial buffer dkv_ptr [chunk * K, D] instead of
    adding into the accumulator dkv_ptr [S, D]."""
    col0 = COL_START + tl.program_id(0) * BLOCK_D
    t_local = tl.program_id(1).to(tl.int64)
    t = t_start + t_local
    heads = tl.arange(0, HEADS_BLOCK)
    head_mask = heads < num_heads
    cols = col0 + tl.arange(0, BLOCK_D)
    col_mask = cols < COL_END
    static_cols: tl.constexpr = (COL_END - COL_START) % BLOCK_D == 0

    q_block = _load_2d(q_ptr, (t * num_heads + heads) * D, head_mask, col0, COL_END, BLOCK_D,
                       static_cols)
    if WITH_P_TERM:
        dout_block = _load_2d(dout_ptr, (t * num_heads + heads) * D_V, head_mask, col0, COL_END,
                              BLOCK_D, static_cols)

    num_slots = _num_slots(topk_length_ptr, t, topk, HAS_TOPK_LENGTH)
    ws_rows = (t_local * num_heads + heads) * ws_stride
    for start in range(0, num_slots, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        ids, slot_valid = _slot_ids(indices_ptr, t, topk, slots, num_slots, num_kv_rows)
        # Slots past num_slots read the zeros that _scores_kernel wrote there.
        ws_offsets = ws_rows[:, None] + slots[None, :]
        ds = tl.load(ds_ptr + ws_offsets, mask=head_mask[:, None], other=0.0)
        # [BLOCK_D, BLOCK_N]: transposed so that M is a column block (>= 64 for Hopper's wgmma).
        dkv_t = tl.dot(tl.trans(q_block), ds, input_precision=DOT_PRECISION)
        if WITH_P_TERM:
            p = tl.load(p_ptr + ws_offsets, mask=head_mask[:, None], other=0.0)
            dkv_t = tl.dot(tl.trans(dout_block), p, dkv_t, input_precision=DOT_PRECISION)
        if static_cols:
            mask = slot_valid[None, :]
        else:
            mask = slot_valid[None, :] & col_mask[:, None]
        if DETERMINISTIC:
            rows = (t_local * topk + slots).to(tl.int64) * D
            tl.store(dkv_ptr + rows[None, :] + cols[:, None], dkv_t, mask=mask)
        else:
            rows = ids.to(tl.int64) * D
            tl.atomic_add(dkv_ptr + rows[None, :] + cols[:, None], dkv_t, mask=mask, sem="relaxed")


# --------------------------------------------------------------------------------------------
# Kernel 3: dq = dS @ kv[idx]
# --------------------------------------------------------------------------------------------
@triton.jit
def _dq_kernel(
    kv_ptr, ds_ptr, indices_ptr, topk_length_ptr, dq_ptr,
    t_start, num_heads, num_kv_rows, topk, ws_stride,
    D: tl.constexpr, D_V: tl.constexpr, DV_BLOCK: tl.constexpr, D_ROPE: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_TOPK_LENGTH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, COL_PARTS: tl.constexpr,
):
    """dq[t, heads, part's columns] for one query, one head block and one of COL_PARTS column parts
    (part p: value columns [p, p + 1) * DV_BLOCK / COL_PARTS and as much of the rope columns)."""
    t_local = tl.program_id(0).to(tl.int64)
    t = t_start + t_local
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < num_heads
    PART_V: tl.constexpr = DV_BLOCK // COL_PARTS
    PART_ROPE: tl.constexpr = D_ROPE // COL_PARTS
    value_start = tl.program_id(2) * PART_V
    rope_start = D_V + tl.program_id(2) * PART_ROPE
    dv_exact: tl.constexpr = DV_BLOCK == D_V

    dq_value = tl.zeros([BLOCK_H, PART_V], dtype=tl.float32)
    if HAS_ROPE:
        dq_rope = tl.zeros([BLOCK_H, PART_ROPE], dtype=tl.float32)
    num_slots = _num_slots(topk_length_ptr, t, topk, HAS_TOPK_LENGTH)
    ws_rows = (t_local * num_heads + heads) * ws_stride
    for start in range(0, num_slots, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        # ids loaded in the step that gathers with them, as in _scores_kernel (and why)
        ids, slot_valid = _slot_ids(indices_ptr, t, topk, slots, num_slots, num_kv_rows)
        kv_rows = ids.to(tl.int64) * D
        ds = tl.load(ds_ptr + ws_rows[:, None] + slots[None, :], mask=head_mask[:, None],
                     other=0.0)  # zeros past num_slots (see _scores_kernel)
        kv_value = _load_2d(kv_ptr, kv_rows, slot_valid, value_start, D_V, PART_V, dv_exact)
        dq_value = tl.dot(ds, kv_value, dq_value, input_precision=DOT_PRECISION)
        if HAS_ROPE:
            kv_rope = _load_2d(kv_ptr, kv_rows, slot_valid, rope_start, D, PART_ROPE, False)
            dq_rope = tl.dot(ds, kv_rope, dq_rope, input_precision=DOT_PRECISION)

    q_rows = (t * num_heads + heads) * D
    cols = value_start + tl.arange(0, PART_V)
    tl.store(dq_ptr + q_rows[:, None] + cols[None, :], dq_value.to(dq_ptr.dtype.element_ty),
             mask=head_mask[:, None] & (cols < D_V)[None, :])
    if HAS_ROPE:
        cols = rope_start + tl.arange(0, PART_ROPE)
        tl.store(dq_ptr + q_rows[:, None] + cols[None, :], dq_rope.to(dq_ptr.dtype.element_ty),
                 mask=head_mask[:, None] & (cols < D)[None, :])


# --------------------------------------------------------------------------------------------
# Deterministic mode: ordered per-row sum of the partial rows
# --------------------------------------------------------------------------------------------
@triton.jit
def _reduce_kernel(
    partial_ptr, sorted_slots_ptr, bounds_ptr, dkv_acc_ptr,
    slot_start, num_kv_rows,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dkv_acc[s, cols] += sum of partial[slot - slot_start, cols] over the slots that selected
    kv row s in this chunk: sorted_slots[bounds[0, s] : bounds[1, s]], in ascending order, BLOCK_E
    at a time (a fixed order: the same bits every run)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    begin = tl.load(bounds_ptr + row)
    end = tl.load(bounds_ptr + num_kv_rows + row)
    if end > begin:
        acc_ptrs = dkv_acc_ptr + row.to(tl.int64) * D + cols
        acc = tl.load(acc_ptrs, mask=col_mask, other=0.0)
        for e in range(begin, end, BLOCK_E):
            entries = e + tl.arange(0, BLOCK_E)
            entry_mask = entries < end
            slots = tl.load(sorted_slots_ptr + entries, mask=entry_mask, other=0).to(tl.int64)
            rows = (slots - slot_start) * D
            tile = tl.load(partial_ptr + rows[:, None] + cols[None, :],
                           mask=entry_mask[:, None] & col_mask[None, :], other=0.0)
            acc += tl.sum(tile, axis=0)
        tl.store(acc_ptrs, acc, mask=col_mask)


# --------------------------------------------------------------------------------------------
# Delta = out . dout for the CuTe-DSL backward (the Triton one forms it inside _scores_kernel)
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_dot_kernel(a_ptr, b_ptr, out_ptr, n_rows, N: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < N)
    offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, tl.sum(a * b, axis=1), mask=rows < n_rows)


def row_dot(a, b):
    """sum(a * b, -1) in fp32 for contiguous [..., N] tensors, reading each input once (torch would
    make fp32 copies of both: 1.6 ms of the CuTe-DSL backward at T=4096, H=64, measured)."""
    if a.shape != b.shape or not (a.is_contiguous() and b.is_contiguous()) or a.device != b.device:
        raise ValueError(f"row_dot needs two contiguous tensors of one shape on one device, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[-1]
    out = torch.empty(a.shape[:-1], dtype=torch.float32, device=a.device)
    n_rows = out.numel()
    if n_rows:
        block_r = 16
        _row_dot_kernel[(triton.cdiv(n_rows, block_r),)](a, b, out, n_rows, N=n, BLOCK_N=_next_pow2(n),
                                                         BLOCK_R=block_r, num_warps=4)
    return out


def _slots_by_kv_row(indices, topk_length, num_kv_rows):
    """Inverse index: the valid slots (flat t*K + j) sorted by kv row id, ascending slot order
    within a row (a stable sort), and a sort key for searching chunk boundaries. All on device."""
    num_tokens, topk = indices.shape
    valid = (indices >= 0) & (indices < num_kv_rows)
    if topk_length is not None:
        valid &= torch.arange(topk, device=indices.device)[None, :] < topk_length[:, None]
    keys = torch.where(valid, indices, torch.full_like(indices, num_kv_rows)).flatten()
    sorted_rows, sorted_slots = torch.sort(keys, stable=True)
    # (row, slot) as one ascending int64 key: chunk boundaries come from one searchsorted.
    composite = sorted_rows.to(torch.int64) * (num_tokens * topk) + sorted_slots
    return sorted_slots.to(torch.int32), composite


def _chunk_bounds(composite, num_tokens, topk, num_kv_rows, t_begin, t_end):
    """[2, S] int32: for each kv row, the range of sorted entries whose slots lie in the query
    chunk [t_begin, t_end)."""
    rows = torch.arange(num_kv_rows, device=composite.device, dtype=torch.int64)
    targets = torch.stack([rows * (num_tokens * topk) + t_begin * topk,
                           rows * (num_tokens * topk) + t_end * topk])
    return torch.searchsorted(composite, targets).to(torch.int32).contiguous()


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _workspace_bytes() -> int:
    return int(os.environ.get(WORKSPACE_ENV, _DEFAULT_WORKSPACE_MB)) << 20


# CUDA caps grid axes 1 and 2 at 65535 programs; the dkv kernel puts a chunk's queries on axis 1.
MAX_GRID_YZ = 65535


def query_chunk(num_tokens: int, per_query_bytes: int) -> int:
    """Queries per launch: as many as the workspace budget holds, and no more than a grid axis takes
    (a V4 backward with K = 512 and 16 heads holds 65536 queries in the default 2 GiB)."""
    return max(1, min(num_tokens, _workspace_bytes() // per_query_bytes, MAX_GRID_YZ))


def sparse_attention_backward(dout, q, kv, out, lse, indices, scale, d_v, attn_sink, topk_length,
                              deterministic: bool, grad_lse=None):
    """Gradients (dq, dkv, d_sink) of sparse MQA attention; see the module docstring.

    dout [T,H,d_v], q [T,H,D], kv [S,D], out [T,H,d_v], lse [T,H] fp32, indices [T,K] int32,
    attn_sink [H] fp32 or None, topk_length [T] int32 or None. Returns dq (q.dtype),
    dkv (kv.dtype), d_sink [H] fp32 (zeros when attn_sink is None). `grad_lse` [T,H] (fp32/fp64, or
    None) is the gradient reaching lse: it shifts Delta per (t, h), see the module docstring.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_rows = kv.shape[0]
    topk = indices.shape[1]
    device = q.device
    rope_dim = head_dim - d_v
    if rope_dim < 0:
        raise ValueError(f"d_v={d_v} must be <= D={head_dim}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported dtype {q.dtype}")

    config = pick_config(num_heads)
    block_h = config["BLOCK_H"]
    stacked, score_warps, score_block_n, score_stages, ids_ahead = score_launch(config, block_h,
                                                                                 q.element_size())
    dv_block = max(16, _next_pow2(d_v))
    d_rope = max(16, _next_pow2(rope_dim))
    heads_block = max(16, _next_pow2(num_heads))
    dq_block_h, dq_col_parts = dq_launch(config, num_heads, q.element_size(), dv_block, d_rope,
                                         rope_dim > 0)
    # fp32 inputs: exact fp32 products (no tf32), and an fp32 workspace.
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    ws_dtype = q.dtype

    dq = torch.empty_like(q)
    dkv_acc = torch.zeros(num_kv_rows, head_dim, dtype=torch.float32, device=device)
    d_sink = torch.zeros(num_heads, dtype=torch.float32, device=device)
    dsink_part = (torch.zeros(num_tokens, num_heads, dtype=torch.float32, device=device)
                  if attn_sink is not None else d_sink)
    if num_tokens == 0 or topk == 0 or num_heads == 0:
        dq.zero_()
        return dq, dkv_acc.to(kv.dtype), d_sink

    # Query chunk: the P / dS workspace (and the partial rows) must fit the budget.
    per_query = num_heads * triton.cdiv(topk, _WS_PAD) * _WS_PAD * 2 * torch.finfo(ws_dtype).bits // 8
    if deterministic:
        per_query += topk * head_dim * 4
    chunk = query_chunk(num_tokens, per_query)
    ws_stride = triton.cdiv(topk, _WS_PAD) * _WS_PAD  # aligned workspace rows, whatever K is
    p_ws = torch.empty(chunk, num_heads, ws_stride, dtype=ws_dtype, device=device)
    ds_ws = torch.empty(chunk, num_heads, ws_stride, dtype=ws_dtype, device=device)
    if deterministic:
        partial = torch.empty(chunk * topk, head_dim, dtype=torch.float32, device=device)
        sorted_slots, composite = _slots_by_kv_row(indices, topk_length, num_kv_rows)

    sink_arg = attn_sink if attn_sink is not None else lse
    grad_lse_arg = grad_lse.to(torch.float32).contiguous() if grad_lse is not None else lse
    length_arg = topk_length if topk_length is not None else indices
    common = dict(HAS_TOPK_LENGTH=topk_length is not None, DOT_PRECISION=dot_precision)
    for t_begin in range(0, num_tokens, chunk):
        rows = min(chunk, num_tokens - t_begin)
        head_grid = (rows, triton.cdiv(num_heads, block_h))
        _scores_kernel[head_grid](
            q, kv, dout, out, lse, sink_arg, indices, length_arg, grad_lse_arg, p_ws, ds_ws,
            dsink_part, t_begin, num_heads, num_kv_rows, topk, ws_stride, float(scale),
            D=head_dim, D_V=d_v, DV_BLOCK=dv_block, D_ROPE=d_rope, HAS_ROPE=rope_dim > 0,
            HAS_SINK=attn_sink is not None, HAS_GRAD_LSE=grad_lse is not None, BLOCK_H=block_h,
            BLOCK_N=score_block_n, WS_PAD=_WS_PAD, STACKED=stacked, IDS_AHEAD=ids_ahead,
            num_warps=score_warps, num_stages=score_stages,
            **common)

        dkv_target = partial if deterministic else dkv_acc
        # Value columns (with the dout^T P term), then rope columns (q^T dS only).
        parts = [(0, d_v, True)] + ([(d_v, head_dim, False)] if rope_dim > 0 else [])
        for col_start, col_end, with_p in parts:
            block_d = min(config["DKV_BLOCK_D"], max(16, _next_pow2(col_end - col_start)))
            _dkv_kernel[(triton.cdiv(col_end - col_start, block_d), rows)](
                q, dout, p_ws, ds_ws, indices, length_arg, dkv_target,
                t_begin, num_heads, num_kv_rows, topk, ws_stride,
                D=head_dim, D_V=d_v, COL_START=col_start, COL_END=col_end, WITH_P_TERM=with_p,
                DETERMINISTIC=bool(deterministic), HEADS_BLOCK=heads_block, BLOCK_D=block_d,
                BLOCK_N=config["DKV_DET_BLOCK_N" if deterministic else "DKV_BLOCK_N"],
                num_warps=config["DKV_WARPS"], num_stages=config["DKV_STAGES"], **common)

        _dq_kernel[(rows, triton.cdiv(num_heads, dq_block_h), dq_col_parts)](
            kv, ds_ws, indices, length_arg, dq,
            t_begin, num_heads, num_kv_rows, topk, ws_stride,
            D=head_dim, D_V=d_v, DV_BLOCK=dv_block, D_ROPE=d_rope, HAS_ROPE=rope_dim > 0,
            BLOCK_H=dq_block_h, BLOCK_N=config["DQ_BLOCK_N"], COL_PARTS=dq_col_parts,
            num_warps=config["DQ_WARPS"], num_stages=config["DQ_STAGES"], **common)

        if deterministic:
            bounds = _chunk_bounds(composite, num_tokens, topk, num_kv_rows, t_begin,
                                   t_begin + rows)
            block_d = config["REDUCE_BLOCK_D"]
            _reduce_kernel[(num_kv_rows, triton.cdiv(head_dim, block_d))](
                partial, sorted_slots, bounds, dkv_acc, t_begin * topk, num_kv_rows,
                D=head_dim, BLOCK_D=block_d, BLOCK_E=config["REDUCE_BLOCK_E"], num_warps=2)

    if attn_sink is not None:
        d_sink = dsink_part.sum(dim=0)
    return dq, dkv_acc.to(kv.dtype), d_sink
