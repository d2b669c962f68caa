"""Exact row-wise top-k for fp32 score matrices (SPEC section 2), in Triton.

    topk(scores[..., C] fp32, k, lengths[...] int32 or None, sorted) -> (indices int32 [..., k], values fp32 [..., k])

Per row: the k largest among the first lengths[r] columns; -inf and NaN are never selected; rows with fewer
than k candidates pad with index -1 / value -inf. Ties: the smaller column wins, so the selected set is a pure
function of the input. -0.0 and +0.0 are equal (a tie); a selected -0.0 is reported as +0.0.

Algorithm: one streaming pass over each row with a candidate buffer and a rising threshold (a threshold select;
the row is never sorted):

  * Each float maps to a uint32 "key" whose unsigned order is the float order. NaN maps below -inf; -inf never
    passes the initial threshold, so neither is ever a candidate. The threshold `thr` is a key.
  * First threshold: a guess from a sample of the row (SAMPLE values in SAMPLE_RUNS evenly spaced runs): the
    sample's rank expected to hold k of the row's values, plus GUESS_SIGMAS standard deviations of that rank, so
    that a row almost never has to be streamed twice. If fewer than k beat it after all, the row is streamed
    again from -inf, so the guess only affects speed, never the result.
  * The row streams through in BLOCK-column steps. An element enters the buffer when its key is above `thr`,
    tested as one float compare `v > thr_f` (thr_f: the largest float whose key is <= thr, so the test is exactly
    `key(v) > thr`; NaN and -inf fail it): no key is built for the streamed values. The buffer holds raw values,
    turned into keys only when its (few) entries are read back. Entries are appended in column order (a prefix
    count over the block), so the buffer is always in column order.
  * When the next block would overflow the buffer (CAP entries, about CAP_K x k), the buffer is compacted to
    exactly its k best entries. The k-th largest key T comes from a radix select (RADIX_BITS-bit digits, on-chip
    histograms) on digits RELATIVE to the buffer's range [thr, key(max)] (every buffered key is >= thr; the max
    comes from one pass over the buffer), so the first round already splits the range the keys really span; and
    the select stops as soon as the bin holding the k-th entry is needed whole (its count equals what is still
    missing): then "keep every key >= the bin's low end" is exact with no tie to resolve. Random data usually
    needs 2 passes over the buffer. Every key > T stays, and of the keys == T only the first (k - #greater) in
    column order stay. Then thr = T: a later element with key == T loses the tie to the ones kept (they have
    smaller columns), so only keys > T can still get in. This is what makes ties exact without any sort.
  * At the end of the row the same compaction leaves the answer; it is written in column order (sorted=False)
    or sorted by (value desc, column asc) with one in-register bitonic sort of packed 64-bit (key, ~column).

So each score is read from global memory once (twice for a row whose guess failed); the buffer (CAP x 8 bytes
per program) stays in L1/L2. Since CAP >= k + BLOCK, every compaction frees at least BLOCK slots, so the work
stays bounded for any data.

Long rows with few rows (not enough rows to fill the GPU) are split into segments: stage 1 finds each
segment's top-k (in column order) into a workspace [R, S, k]; stage 2 runs the same stream over the S*k
survivors of each row. Concatenating segments in order keeps column order, so the tie rule still holds.

Programs are persistent: a grid sized to the GPU takes (row, segment) tasks from an atomic counter (the order
in which programs take tasks varies; each task's result does not depend on which program ran it, so outputs
are bitwise deterministic). Workspace sizes depend on shapes only, and nothing syncs the host: CUDA-graph safe.

The launch shape (small one-warp programs, many per SM) and what bounds a streaming step on a GPU: see the notes
above BLOCK. tools/topk_compile_check.py compiles the kernel for sm_90 on a machine without a GPU and reports
registers and spills.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------------------
# Launch configuration (read at every call by `_topk`, `_launch` and `_plan`; tests shrink BLOCK / SAMPLE to
# reach every code path on tiny inputs; benchmarks/bench_topk.py --sweep times other settings).
#
#   * Many small programs: one warp per program (scans and sums are warp shuffles, no cross-warp barrier) and
#     32 programs per SM, all resident at once under a 64-register cap, so many rows are in flight at once. One
#     program holds one row, so a re-streamed row is the kernel's tail: hence the guess's GUESS_SIGMAS margin.
#   * The streaming step is kept small in instructions, because that is what bounds it (ncu on an H100, Triton
#     3.6: issue-bound at 56% of the SM, DRAM at 39%): admission is one float compare, buffer writes go through
#     _store_where (inline PTX on a GPU, so no layout conversion through shared memory), and the select's upper
#     bound comes from one pass over the buffer at compaction time instead of a running max in every step.
#     332 -> 183 SASS instructions a step.
#   * History: an earlier version (4-warp programs of 1024-column steps, 8 per SM, integer keys in the buffer
#     and a fixed 4-round select of 8-bit digits) took 0.49 / 1.34 ms on an H100 at 4096 x 8192 / 65536
#     (k=2048), against 0.34 / 0.86 ms for this one (BENCHMARKS.md).
# ----------------------------------------------------------------------------------------------------------
BLOCK = 512             # columns per streaming step (16 per thread of one warp)
NUM_WARPS = 1           # warps per program (sorted output uses at least K_POW2 // 1024 for its register sort)
PROGRAMS_PER_SM = 16    # persistent programs per SM, for NUM_WARPS warps each: all resident at once under
                        # MAX_REGISTERS (each costs CAP x 8 bytes of scratch); extra ones just find no work left
SPLIT_PROGRAMS_PER_SM = 8  # split rows into segments only when rows < SMs x this
MAX_REGISTERS = None    # register cap of unsorted launches on a GPU (None: none); 512 / 16 / none measured faster
                        # on an H100 than 256 / 32 / 64 (0.776 vs 0.841 ms, 2026-12-05, BENCHMARKS.md)
RESIDENT_MAX_COLS = 16384  # unsorted rows up to this long: one program per row, the row in registers (a bisection
                           # select, _resident_topk_kernel); longer rows (or sorted output) stream
RESIDENT_PER_THREAD = 32   # ... with this many of the row values per thread (8 warps for 8192 columns) ...
RESIDENT_INTERPOLATE = True  # ... alternating interpolation and bisection rounds (False: bisection only) ...
RESIDENT_MAX_REGISTERS = 80  # ... under this register cap (None: none); H100 sweep 2026-12-05: 0.220 ms vs 0.261 at 16 / 64
SELECT_PREFETCH = True  # buffer passes load the next chunk before using this one (ncu, H100 4096 x 65536: the
                        # passes stalled on their buffer loads, which come from L2 or DRAM)
SELECT_BLOCK = 256      # buffer entries per step of the select / compaction / output passes (and sample chunk)
RADIX_BITS = 6          # digit width of one select round (2^bits histogram bins; 6: 2 bins a lane, 80
                        # registers and 469 SASS instructions per pass step, against 128 and 765 at 8 bits)
CAP_K = 3               # buffer = CAP_K * k rounded up to BLOCK, plus BUFFER_STEPS blocks ...
BUFFER_STEPS = 1        # ... (more: fewer compactions, more memory)
SAMPLE = 1024           # values sampled per row to guess the first threshold (rows shorter than 4x this: no guess)
SAMPLE_RUNS = 16        # ... taken as this many evenly spaced contiguous runs
SAMPLE_ROUNDS = 2       # bytes of the guess (its top 16 bits, ~1% of its value, are precise enough)
GUESS_SIGMAS = 5.0      # margin of the first-threshold guess, in standard deviations of the sampled rank
MIN_SEGMENT = 32768     # a row is split only into segments at least this long ...
SEGMENT_PER_K = 8       # ... and at least this many times k, so a segment's top-k really filters it
# Settings that measured faster than the defaults above on a given GPU (matched by a word of its name), for
# launches that do not pass their own. The defaults were tuned on an H100 (32 one-warp programs per SM); the
# H200 takes fewer, wider ones (`benchmarks/bench_topk.py --sweep`, 2026-12-04: 0.690 against 0.818 ms at
# 4096 x 65536, 0.312 against 0.338 at 4096 x 8192, k=2048; BENCHMARKS.md).
DEVICE_SETTINGS = {"H200": {"BLOCK": 512, "PROGRAMS_PER_SM": 16, "MAX_REGISTERS": None}}

# Keys are uint32 whose unsigned order is the float order: flip all bits of negative floats, only the sign bit of
# the others. -0.0 gets the key of +0.0 (they are equal); NaN gets key 0, below -inf.
_INT_MIN = tl.constexpr(-2147483648)
_KEY_NEG_INF = tl.constexpr(0x007FFFFF)  # key(-inf); valid scores have larger keys
_KEY_POS_ZERO = tl.constexpr(0x80000000)


@triton.jit
def _order_key(v):
    """fp32 -> uint32 key with the same order (see above)."""
    bits = v.to(tl.int32, bitcast=True)
    key = (bits ^ ((bits >> 31) | _INT_MIN)).to(tl.uint32, bitcast=True)  # >> is arithmetic on int32
    key = tl.where(v == 0.0, _KEY_POS_ZERO, key)
    key = tl.where(v != v, 0, key)
    return key


@triton.jit
def _key_to_value(key):
    """Inverse of _order_key (for keys of non-NaN values)."""
    k = key.to(tl.int32, bitcast=True)
    bits = k ^ ((~k >> 31) | _INT_MIN)  # keys with the top bit clear came from negative floats
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _floor_value(t):
    """The float f with `v > f` <=> `_order_key(v) > t` for every v (t >= key(-inf)); NaN fails both."""
    t = tl.where(t == 0x7FFFFFFF, 0x7FFFFFFE, t)  # 0x7FFFFFFF would be -0.0's key, which maps to +0.0's
    return _key_to_value(t)


@triton.jit
def _guess(row_val, col_lo, n_here, need, SAMPLE: tl.constexpr, SAMPLE_RUNS: tl.constexpr, BITS: tl.constexpr):
    """A key that at least `need` of the sample's keys reach (1 <= need <= SAMPLE): the need-th largest rounded
    down to its top BITS bits. The sample (SAMPLE_RUNS evenly spaced runs of the segment) is loaded once into
    registers (all its loads in flight together), then the answer is built bit by bit from the top: a bit is set
    when at least `need` keys reach the prefix with it set (one compare and one warp sum a bit).
    (Replaced 8-bit radix rounds over the sample re-read from L2 in chunks, 2026-12-06: ncu on an H100 put 6% of
    the 4096 x 65536 top-k there; the result is the same key.)"""
    run_len: tl.constexpr = SAMPLE // SAMPLE_RUNS
    sl = tl.arange(0, SAMPLE)
    stride = n_here // SAMPLE_RUNS
    key = _order_key(tl.load(row_val + (col_lo + (sl // run_len) * stride + sl % run_len)))
    prefix = tl.zeros([], dtype=tl.uint32)
    bit = tl.full([], 0x80000000, tl.uint32)
    for _ in range(BITS):
        cand = prefix | bit
        reach = tl.sum((key >= cand).to(tl.int32), 0)
        prefix = tl.where(reach >= need, cand, prefix)
        bit = bit >> 1
    return prefix


@triton.jit
def _select(buf_val, cnt, need, lo, hi, SELECT_BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr,
            PREFETCH: tl.constexpr):
    """The need-th largest key among the buffer's first cnt values (need <= cnt), all with keys in [lo, hi].

    Returns (T, n_greater): the need best are the keys > T plus the first (need - n_greater) keys == T in
    column order (n_greater == need: no key == T is kept)."""
    NB: tl.constexpr = 1 << RADIX_BITS
    lane = tl.arange(0, SELECT_BLOCK)
    bins = tl.arange(0, NB)
    span = hi - lo
    # w: bit length of span (rel = key - lo < 2^w)
    w = tl.zeros([], dtype=tl.int32)
    for b in tl.static_range(5):
        up = (span >> (w + (16 >> b)).to(tl.uint32)) != 0
        w = tl.where(up, w + (16 >> b), w)
    w = tl.where(span != 0, w + 1, 0)
    base = tl.zeros([], dtype=tl.uint32)  # window of rel: [base, base + 2^w), holds the need-th
    remaining = need                       # how many of the window's keys are still needed
    done = tl.zeros([], dtype=tl.int32)
    while (w > 0) & (done == 0):
        shift = tl.maximum(w - RADIX_BITS, 0)
        width = 1 << (w - shift)           # digits of this round: [0, width), width <= NB
        hist = tl.zeros([NB], dtype=tl.int32)
        v_next = tl.load(buf_val + lane, mask=lane < cnt, other=0.0)
        for start in range(0, cnt, SELECT_BLOCK):
            offs = start + lane
            live = offs < cnt
            v, v_next = _next_chunk(buf_val, offs, cnt, v_next, SELECT_BLOCK, PREFETCH)
            key = _order_key(v)
            digit = (key - lo - base) >> shift.to(tl.uint32)  # keys below the window wrap to >= 2^w
            in_play = live & (digit < width.to(tl.uint32))
            hist += tl.histogram(tl.where(in_play, digit, 0).to(tl.int32), NB, mask=in_play)
        at_or_above = tl.cumsum(hist, 0, reverse=True)
        d_star = tl.max(tl.where(at_or_above >= remaining, bins, 0), 0)
        remaining -= tl.sum(tl.where(bins > d_star, hist, 0), 0)
        here = tl.sum(tl.where(bins == d_star, hist, 0), 0)
        base += d_star.to(tl.uint32) << shift.to(tl.uint32)
        w = shift
        done = (here == remaining).to(tl.int32)  # the whole bin is needed: keep every key >= lo + base
    thr = tl.where(done != 0, lo + base - 1, lo + base)
    n_greater = tl.where(done != 0, need, need - remaining)
    return thr, n_greater


@triton.jit
def _next_chunk(buf_val, offs, cnt, v_next, SELECT_BLOCK: tl.constexpr, PREFETCH: tl.constexpr):
    """(this chunk's buffer values, the next chunk's): with PREFETCH the next chunk's load is issued before this
    chunk is used, so its latency (the buffer is in L2, partly in DRAM) overlaps this chunk's work; the caller
    passes in the first chunk's load as v_next."""
    if PREFETCH:
        v = v_next
        nxt = offs + SELECT_BLOCK
        v_next = tl.load(buf_val + nxt, mask=nxt < cnt, other=0.0)
    else:
        v = tl.load(buf_val + offs, mask=offs < cnt, other=0.0)
    return v, v_next


@triton.jit
def _compact(buf_val, buf_col, cnt, need, lo, dst_val, dst_col, SELECT_BLOCK: tl.constexpr,
             RADIX_BITS: tl.constexpr, ASM_STORE: tl.constexpr, PREFETCH: tl.constexpr):
    """Move the `need` best of the buffer's first `cnt` entries (cnt >= need, every key >= lo) to dst_val /
    dst_col[0, need), keeping column order: in place (dst = the buffer) during a stream, straight into the output
    row at its end. Returns T, the key of the need-th best: every later entry must have key > T to get in.
    """
    tl.debug_barrier()  # the appends of all threads must be visible before we read them
    lane = tl.arange(0, SELECT_BLOCK)
    # The select's range [lo, key(max)]: one pass over the buffer here costs less than a running max in the
    # stream (which saw ~30x more values than the buffer holds).
    vmax = tl.full([SELECT_BLOCK], float("-inf"), tl.float32)
    v_next = tl.load(buf_val + lane, mask=lane < cnt, other=float("-inf"))
    for start in range(0, cnt, SELECT_BLOCK):
        v, v_next = _next_chunk(buf_val, start + lane, cnt, v_next, SELECT_BLOCK, PREFETCH)
        vmax = tl.maximum(vmax, tl.where(start + lane < cnt, v, float("-inf")))
    thr, n_greater = _select(buf_val, cnt, need, lo, _order_key(tl.max(vmax, 0)), SELECT_BLOCK, RADIX_BITS,
                             PREFETCH)
    need_equal = need - n_greater  # how many of the keys == thr survive: the first ones in column order
    gt_seen = tl.zeros([], dtype=tl.int32)  # kept entries before this chunk: keys > thr ...
    eq_seen = tl.zeros([], dtype=tl.int32)  # ... and keys == thr (of which the first need_equal are kept)
    v_next = tl.load(buf_val + lane, mask=lane < cnt, other=0.0)
    for start in range(0, cnt, SELECT_BLOCK):
        offs = start + lane
        live = offs < cnt
        v, v_next = _next_chunk(buf_val, offs, cnt, v_next, SELECT_BLOCK, PREFETCH)
        key = _order_key(v)
        is_gt = live & (key > thr)
        is_eq = live & (key == thr)
        # One scan counts both kinds: greater in the low 16 bits, equal in the high 16 (SELECT_BLOCK < 65536).
        both = is_gt.to(tl.int32) + (is_eq.to(tl.int32) << 16)
        before = tl.cumsum(both, 0) - both
        gt_before = gt_seen + (before & 0xFFFF)
        eq_before = eq_seen + (before >> 16)
        keep = is_gt | (is_eq & (eq_before < need_equal))
        pos = gt_before + tl.minimum(eq_before, need_equal)  # <= offs: in place, entries only move left
        col = tl.load(buf_col + offs, mask=keep, other=0)
        tl.debug_barrier()  # in place: this chunk is read by everyone before anyone overwrites it
        # (+0.0 for a kept -0.0: the key's value)
        _store_where(dst_val + pos, _key_to_value(key), keep, ASM_STORE)
        _store_where(dst_col + pos, col, keep, ASM_STORE)
        gt_seen += tl.sum(is_gt.to(tl.int32), 0)
        eq_seen += tl.sum(is_eq.to(tl.int32), 0)
    tl.debug_barrier()
    return thr


@triton.jit
def _store_where(ptr, value, mask, ASM: tl.constexpr):
    """tl.store(ptr, value, mask=mask) of 32-bit values to scattered addresses. On a GPU (ASM) it is one
    predicated st.global per element, issued in the value's own register layout: a plain tl.store to addresses
    of unknown contiguity gets a one-element-per-thread layout, and the conversion to it (through shared memory,
    pulling the prefix scan along) made the streaming loop 332 instructions a step instead of 177 on sm_90
    (Triton 3.6). The interpreter takes the plain store."""
    if ASM:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b32 [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r,r", [ptr, value.to(tl.int32, bitcast=True), mask.to(tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _stream(row_val, row_col, col_lo, col_hi, load_hi, thr, buf_val, buf_col, k,
            COLS_FROM_SRC: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr,
            SELECT_BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr, MASK_TAIL: tl.constexpr,
            ASM_STORE: tl.constexpr, PREFETCH: tl.constexpr):
    """Append every column in [col_lo, col_hi) whose key is > thr to the (empty) buffer, compacting to the k
    best and raising thr whenever a step would overflow it. Returns (entries buffered, threshold (every buffered
    key is >= it)).

    The inner loop streams until a step would overflow the buffer and then leaves; the compaction runs outside
    it (none of the loop's register tiles is live there), and the step that did not fit is loaded again.
    Loads are masked with load_hi (>= col_hi, in the row, and a multiple of 4 when col_hi comes from a length, so
    the loads stay 16-byte vectors); with MASK_TAIL the columns in [col_hi, load_hi) then read as -inf."""
    lane = tl.arange(0, BLOCK)
    cnt = tl.zeros([], dtype=tl.int32)
    start = col_lo
    while start < col_hi:
        thr_f = _floor_value(thr)
        # Prefetch one step ahead so the next load is in flight while this step is processed (two steps measured
        # no faster on an H100, 2026-12-05).
        nxt = start + lane
        v_next = tl.load(row_val + nxt, mask=nxt < load_hi, other=float("-inf"))
        full = tl.zeros([], dtype=tl.int32)
        while (start < col_hi) & (full == 0):
            cols = start + lane
            v = v_next
            nxt = cols + BLOCK
            v_next = tl.load(row_val + nxt, mask=nxt < load_hi, other=float("-inf"))
            if MASK_TAIL:
                v = tl.where(cols < col_hi, v, float("-inf"))
            admit = v > thr_f
            n_new = tl.sum(admit.to(tl.int32), 0)
            if cnt + n_new > CAP:
                full = 1
            else:
                if n_new > 0:
                    a = admit.to(tl.int32)
                    pos = cnt + tl.cumsum(a, 0) - a
                    if COLS_FROM_SRC:
                        c = tl.load(row_col + cols, mask=admit, other=0)
                    else:
                        c = cols
                    _store_where(buf_val + pos, v, admit, ASM_STORE)
                    _store_where(buf_col + pos, c, admit, ASM_STORE)
                    cnt += n_new
                start += BLOCK
        if full != 0:
            # cnt > k here (cnt + n_new > CAP >= k + BLOCK); afterwards the step fits (k + BLOCK <= CAP).
            thr = _compact(buf_val, buf_col, cnt, k, thr, buf_val, buf_col, SELECT_BLOCK, RADIX_BITS, ASM_STORE,
                           PREFETCH)
            cnt = k
    return cnt, thr


@triton.jit
def _stream_topk_kernel(
    src_val_ptr,      # fp32 [n_rows, row_stride]: the scores (stage 1) or segment survivors (stage 2)
    src_col_ptr,      # int32, same shape: the survivors' columns (COLS_FROM_SRC), else unused
    lengths_ptr,      # int32 [n_rows] (HAS_LENGTHS), else unused
    out_val_ptr,      # fp32 [n_tasks, k]
    out_col_ptr,      # int32 [n_tasks, k]
    buf_val_ptr,      # fp32 [num_programs, CAP] scratch (raw values)
    buf_col_ptr,      # int32 [num_programs, CAP] scratch
    task_counter_ptr,  # int32 [1], zeroed: hands out tasks to programs
    n_cols, row_stride, seg_len, n_segs, n_tasks, k,
    HAS_LENGTHS: tl.constexpr,
    COLS_FROM_SRC: tl.constexpr,
    SORTED: tl.constexpr,
    BLOCK: tl.constexpr,
    CAP: tl.constexpr,
    K_POW2: tl.constexpr,
    SAMPLE: tl.constexpr,
    SAMPLE_RUNS: tl.constexpr,
    SAMPLE_ROUNDS: tl.constexpr,
    SELECT_BLOCK: tl.constexpr,
    RADIX_BITS: tl.constexpr,
    GUESS_SIGMAS: tl.constexpr,
    ASM_STORE: tl.constexpr = False,
    SELECT_PREFETCH: tl.constexpr = True,
):
    pid = tl.program_id(0)
    buf_val = buf_val_ptr + pid * CAP
    buf_col = buf_col_ptr + pid * CAP

    task = tl.atomic_add(task_counter_ptr, 1)
    while task < n_tasks:
        next_task = tl.atomic_add(task_counter_ptr, 1)  # asked for now, so its round trip overlaps this task
        row = task // n_segs
        seg = task - row * n_segs
        col_lo = seg * seg_len
        col_hi = tl.minimum(col_lo + seg_len, n_cols)
        load_hi = col_hi
        if HAS_LENGTHS:
            seg_hi = col_hi
            col_hi = tl.minimum(col_hi, tl.load(lengths_ptr + row))
            load_hi = tl.minimum((col_hi + 3) // 4 * 4, seg_hi)  # a multiple of 4 whenever seg_hi is
        row_val = src_val_ptr + row.to(tl.int64) * row_stride
        row_col = src_col_ptr + row.to(tl.int64) * row_stride
        n_here = col_hi - col_lo

        # First threshold: the sample's rank expected to hold k of the segment, plus GUESS_SIGMAS of its spread.
        # If fewer than k beat it after all, the segment is streamed again from -inf, so the result stays exact.
        thr = tl.full([], _KEY_NEG_INF, tl.uint32)  # -inf (and NaN) never get in
        # (k + a fp32 zero: a launch with k == 1 makes k a compile-time constant, which has no .to())
        expect = SAMPLE * (k + tl.zeros([], dtype=tl.float32)) / tl.maximum(n_here, 1).to(tl.float32)
        rank = (expect + GUESS_SIGMAS * tl.sqrt(expect)).to(tl.int32) + 4
        if (n_here >= 4 * SAMPLE) & (rank < SAMPLE):
            guess = _guess(row_val, col_lo, n_here, rank, SAMPLE, SAMPLE_RUNS, 8 * SAMPLE_ROUNDS)
            thr = tl.maximum(tl.maximum(guess, 1) - 1, thr)  # - 1: keys equal to the guess get in too
        guessed = thr > _KEY_NEG_INF
        cnt = tl.zeros([], dtype=tl.int32)
        lo = thr
        attempts = 0
        while attempts < 1 + guessed.to(tl.int32):
            cnt, lo = _stream(row_val, row_col, col_lo, col_hi, load_hi, thr, buf_val, buf_col, k,
                              COLS_FROM_SRC, BLOCK, CAP, SELECT_BLOCK, RADIX_BITS, HAS_LENGTHS, ASM_STORE,
                              SELECT_PREFETCH)
            # Enough got in (always true after a compaction): done. Else the guess was too high: again from -inf.
            attempts = tl.where(cnt >= k, 2, attempts + 1)
            thr = tl.full([], _KEY_NEG_INF, tl.uint32)
            tl.debug_barrier()

        # Emit the (at most k) survivors, padded with (-inf, -1).
        out_val_row = out_val_ptr + task.to(tl.int64) * k
        out_col_row = out_col_ptr + task.to(tl.int64) * k
        n_buffered = cnt
        if n_buffered > k:
            # Unsorted: the compaction's k survivors go straight to the output row (no copy pass over the buffer);
            # sorted: in place, for the sort below.
            dst_val = buf_val if SORTED else out_val_row
            dst_col = buf_col if SORTED else out_col_row
            _compact(buf_val, buf_col, cnt, k, lo, dst_val, dst_col, SELECT_BLOCK, RADIX_BITS, ASM_STORE,
                     SELECT_PREFETCH)
            cnt = k
        else:
            tl.debug_barrier()  # appends visible to all threads
        if SORTED:
            # One in-register sort, descending on (key, ~col) == value descending, then column ascending; pads
            # (key(-inf), ~-1 = 0) sort last.
            offs = tl.arange(0, K_POW2)
            live = offs < cnt
            key = _order_key(tl.load(buf_val + offs, mask=live, other=float("-inf")))
            col = tl.load(buf_col + offs, mask=live, other=-1)
            lo32 = (~col).to(tl.uint32, bitcast=True).to(tl.uint64)
            packed = tl.sort((key.to(tl.uint64) << 32) | lo32, descending=True)
            key = (packed >> 32).to(tl.uint32)
            col = ~(packed.to(tl.uint32).to(tl.int32, bitcast=True))
            tl.store(out_val_row + offs, _key_to_value(key), mask=offs < k)
            tl.store(out_col_row + offs, col, mask=offs < k)
        elif n_buffered <= k:
            # Column order (k or fewer buffered: copied, then padded), in SELECT_BLOCK-sized pieces.
            for start in range(0, k, SELECT_BLOCK):
                offs = start + tl.arange(0, SELECT_BLOCK)
                live = offs < cnt
                key = _order_key(tl.load(buf_val + offs, mask=live, other=float("-inf")))
                col = tl.load(buf_col + offs, mask=live, other=-1)
                tl.store(out_val_row + offs, _key_to_value(key), mask=offs < k)
                tl.store(out_col_row + offs, col, mask=offs < k)
        tl.debug_barrier()  # the buffer is read by everyone before the next task refills it
        task = next_task


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def _count_at_or_above(key, mid, ASM: tl.constexpr):
    """Per-thread partial counts of `key >= mid` whose sum is the count (same shape as key). With ASM (a GPU
    launch in which every thread holds a multiple of 4 of key's values; rows of 1 and 40 columns, with fewer,
    counted wrong on an H100) each group of 4 values costs 4 compares and 4 predicated adds, the count in the
    group's first slot and zeros (which ptxas folds away) in the others: the plain `(key >= mid).to(int32)` sum
    compiled (Triton 3.6, sm_90) to ~4.7 SASS instructions a value, with bit-packing selects. Otherwise (and in
    the interpreter) the plain form."""
    if ASM:
        mid_b = mid + tl.zeros_like(key)
        return tl.inline_asm_elementwise(
            "{ .reg .pred p0, p1, p2, p3;"
            " setp.ge.u32 p0, $4, $8; setp.ge.u32 p1, $5, $9; setp.ge.u32 p2, $6, $10; setp.ge.u32 p3, $7, $11;"
            " selp.u32 $0, 1, 0, p0; @p1 add.u32 $0, $0, 1; @p2 add.u32 $0, $0, 1; @p3 add.u32 $0, $0, 1;"
            " mov.u32 $1, 0; mov.u32 $2, 0; mov.u32 $3, 0; }",
            "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [key, mid_b], dtype=tl.int32, is_pure=True, pack=4)
    else:
        return (key >= mid).to(tl.int32)


@triton.jit
def _resident_topk_kernel(
    src_ptr,          # fp32 [n_rows, row_stride]
    lengths_ptr,      # int32 [n_rows] (HAS_LENGTHS), else unused
    out_val_ptr,      # fp32 [n_rows, k]
    out_col_ptr,      # int32 [n_rows, k]
    n_cols, row_stride, k,
    HAS_LENGTHS: tl.constexpr,
    ROW: tl.constexpr,       # power of two >= n_cols: the whole row is one register tile
    K_POW2: tl.constexpr,    # power of two >= k (the padding store)
    ASM_STORE: tl.constexpr = False,
    INTERPOLATE: tl.constexpr = True,
    ASM_COUNT: tl.constexpr = False,  # _count_at_or_above in inline PTX: a GPU launch where every thread holds a
                                      # multiple of 4 of the row's values (ROW >= 128 x warps)
):
    """Top-k of one short row per program, the row held in registers (rows of at most RESIDENT_MAX_COLS).

    T, the k-th largest key, comes from a search on the key: each round is one compare and one block sum over
    the registers, with no buffer, histogram or second read of the row. The bracket starts at [smallest valid
    key, largest key]; rounds alternate an interpolation on the counts (INTERPOLATE) with a bisection, and the
    search stops as soon as exactly k keys are >= the tested key. Then keys > T
    stay, and of the keys == T the first (k - #greater) in column order (one prefix scan), as in _compact."""
    row = tl.program_id(0)
    cols = tl.arange(0, ROW)
    # Loads masked by n_cols only, so they stay 16-byte vectors; a row's length applies after the load.
    v = tl.load(src_ptr + row.to(tl.int64) * row_stride + cols, mask=cols < n_cols, other=float("-inf"))
    key = _order_key(v)
    if HAS_LENGTHS:
        key = tl.where(cols < tl.load(lengths_ptr + row), key, 0)
    # -inf, NaN and the columns past the row's length have keys <= key(-inf): never selected. Only `key` stays
    # live through the search (everything after it is recomputed from it).
    n_valid = tl.sum(_count_at_or_above(key, tl.full([], _KEY_NEG_INF + 1, tl.uint32), ASM_COUNT), 0)
    # Bracket: count(key >= lo) >= k > count(key > hi) once lo <= T <= hi.
    lo = tl.min(tl.where(key > _KEY_NEG_INF, key, tl.full([ROW], 0xFFFFFFFF, tl.uint32)), 0)
    hi = tl.max(key, 0)
    if n_valid <= k:  # every valid key is kept
        lo = tl.full([], _KEY_NEG_INF + 1, tl.uint32)
        hi = lo
    c_lo = n_valid                     # count(key >= lo)
    c_hi = tl.zeros([], dtype=tl.int32)  # count(key > hi)
    step = tl.zeros([], dtype=tl.int32)
    while lo < hi:
        span = hi - lo  # < 2^32 - 1: lo + span + 1 cannot overflow
        if INTERPOLATE and (step % 2 == 0):
            # Regula falsi on the counts: where a straight line from (lo, c_lo) to (hi + 1, c_hi) reaches k. Every
            # other round bisects, so the bracket at least halves every two rounds whatever the data.
            frac = (c_lo - k).to(tl.float32) / (c_lo - c_hi).to(tl.float32)
            off = (frac * (span.to(tl.float32) + 1.0)).to(tl.uint32)
            mid = lo + tl.minimum(tl.maximum(off, 1), span)
        else:
            mid = lo + ((span + 1) >> 1)  # upper midpoint: lo < mid <= hi
        at_or_above = tl.sum(_count_at_or_above(key, mid, ASM_COUNT), 0)
        if at_or_above == k:
            lo = mid  # exactly k keys >= mid: T can be taken as mid
            hi = mid
        elif at_or_above > k:
            lo = mid
            c_lo = at_or_above
        else:
            hi = mid - 1
            c_hi = at_or_above
        step += 1
    thr = lo  # >= key(-inf) + 1: only valid keys compare >= it
    # One scan counts both kinds: greater in the low 16 bits, equal in the high 16 (ROW <= 32768).
    is_gt = key > thr
    is_eq = key == thr
    n_greater = tl.sum(is_gt.to(tl.int32), 0)
    need_equal = tl.minimum(k, n_valid) - n_greater
    both = is_gt.to(tl.int32) + (is_eq.to(tl.int32) << 16)
    before = tl.cumsum(both, 0) - both
    eq_before = before >> 16
    keep = is_gt | (is_eq & (eq_before < need_equal))
    pos = (before & 0xFFFF) + tl.minimum(eq_before, need_equal)
    out_val_row = out_val_ptr + row.to(tl.int64) * k
    out_col_row = out_col_ptr + row.to(tl.int64) * k
    # Kept entries in column order (+0.0 for a kept -0.0, as the streaming kernel reports), then the padding.
    _store_where(out_val_row + pos, _key_to_value(key), keep, ASM_STORE)
    _store_where(out_col_row + pos, tl.arange(0, ROW), keep, ASM_STORE)
    n_kept = n_greater + need_equal
    pad = tl.arange(0, K_POW2)
    pad_here = (pad >= n_kept) & (pad < k)
    tl.store(out_val_row + pad, tl.full([K_POW2], float("-inf"), tl.float32), mask=pad_here)
    tl.store(out_col_row + pad, tl.full([K_POW2], -1, tl.int32), mask=pad_here)


@functools.lru_cache(maxsize=None)
def _device_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def _launch_settings(device: torch.device) -> dict:
    """BLOCK, PROGRAMS_PER_SM and MAX_REGISTERS for a launch on `device`: the module's, or DEVICE_SETTINGS'."""
    settings = {"BLOCK": BLOCK, "PROGRAMS_PER_SM": PROGRAMS_PER_SM, "MAX_REGISTERS": MAX_REGISTERS}
    if device.type == "cuda":
        name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
        for word, tuned in DEVICE_SETTINGS.items():
            if word in name:
                settings.update(tuned)
                break
    return settings


def _programs_available(device: torch.device, per_sm: int | None = None) -> int:
    """Persistent programs for a launch on `device`: SMs x per_sm (default PROGRAMS_PER_SM) on a GPU."""
    if device.type == "cuda":
        per_sm = PROGRAMS_PER_SM if per_sm is None else per_sm
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device()) * per_sm
    return 4  # Triton interpreter on CPU tensors: a few programs, so the task hand-out is exercised


def _plan(n_rows: int, n_cols: int, k: int, programs: int, block: int, min_segment: int):
    """Segments per row: 1 unless there are too few rows to fill the GPU and the rows are long."""
    seg_min = max(min_segment, SEGMENT_PER_K * k)
    n_segs = 1
    if n_rows < programs and n_cols >= 2 * seg_min:
        n_segs = max(1, min(n_cols // seg_min, triton.cdiv(programs, n_rows)))
    seg_len = triton.cdiv(triton.cdiv(n_cols, n_segs), block) * block
    n_segs = max(1, triton.cdiv(n_cols, seg_len))
    return n_segs, seg_len


def _launch(src_val, src_col, lengths, out_val, out_col, n_rows, n_cols, row_stride, seg_len, n_segs, k,
            sorted_out, block, programs, sample, select_block, max_registers):
    n_tasks = n_rows * n_segs
    k_pow2 = triton.next_power_of_2(max(k, 1))
    # Buffer entries per program: room for what passes a good first threshold (k plus the guess's margin) without
    # any compaction, and >= k + BLOCK, so a compaction always frees room for a whole step.
    cap = (triton.cdiv(CAP_K * k, block) + BUFFER_STEPS) * block
    warps = NUM_WARPS
    if sorted_out:  # the in-register sort of K_POW2 packed entries: at most 32 per thread (up to 8 warps)
        warps = max(warps, min(8, k_pow2 // 1024))
        programs = max(1, programs * NUM_WARPS // warps)
    # Equal waves: every program takes the same number of tasks (4096 rows on 4224 programs run as one wave of
    # 4096, not 4224 then a tail; a 1.3-wave grid cost 15% at 4096 x 65536 on an H100).
    grid = max(1, triton.cdiv(n_tasks, triton.cdiv(n_tasks, max(1, programs))))
    device = src_val.device
    buf_val = torch.empty(grid * cap, dtype=torch.float32, device=device)
    buf_col = torch.empty(grid * cap, dtype=torch.int32, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    capped = max_registers is not None and device.type == "cuda" and not sorted_out  # the sort needs registers
    extra = {"maxnreg": max_registers} if capped else {}
    _stream_topk_kernel[(grid,)](
        src_val, src_col if src_col is not None else src_val, lengths if lengths is not None else src_val,
        out_val, out_col, buf_val, buf_col, counter,
        n_cols, row_stride, seg_len, n_segs, n_tasks, k,
        HAS_LENGTHS=lengths is not None, COLS_FROM_SRC=src_col is not None, SORTED=sorted_out,
        BLOCK=block, CAP=cap, K_POW2=k_pow2, SAMPLE=sample, SAMPLE_RUNS=min(SAMPLE_RUNS, sample),
        SAMPLE_ROUNDS=SAMPLE_ROUNDS, SELECT_BLOCK=select_block, RADIX_BITS=RADIX_BITS,
        GUESS_SIGMAS=float(GUESS_SIGMAS), ASM_STORE=device.type == "cuda", SELECT_PREFETCH=SELECT_PREFETCH,
        num_warps=warps,
        **extra,
    )


def _topk(scores, k, lengths=None, sorted=False, *, block=None, programs=None, min_segment=None, sample=None,
          out=None, kernel=None):
    """topk with launch knobs exposed (tests use a tiny BLOCK / segment / sample size to reach every path).
    kernel: "stream" or "resident" (_resident_topk_kernel; unsorted only), None: resident for unsorted rows of at
    most RESIDENT_MAX_COLS columns."""
    settings = _launch_settings(scores.device)
    # The select / output step scales with the stream step (tests shrink both).
    select_block = SELECT_BLOCK if block is None else max(16, SELECT_BLOCK * block // BLOCK)
    block = settings["BLOCK"] if block is None else block
    sample = SAMPLE if sample is None else sample
    min_segment = MIN_SEGMENT if min_segment is None else min_segment
    lead = scores.shape[:-1]
    n_cols = scores.shape[-1]
    n_rows = math.prod(lead)
    k = int(k)
    device = scores.device
    if out is not None:  # preallocated (indices int32, values fp32), contiguous [..., k]: written in place
        out_col, out_val = out
    else:
        out_val = torch.empty(*lead, k, dtype=torch.float32, device=device)
        out_col = torch.empty(*lead, k, dtype=torch.int32, device=device)
    if n_rows == 0 or k == 0:
        return out_col, out_val
    src = scores.reshape(n_rows, n_cols)
    if src.dtype != torch.float32:
        src = src.float()  # bf16/fp16 are exact in fp32
    src = src.contiguous()
    lens = None if lengths is None else lengths.reshape(n_rows).to(torch.int32).contiguous()
    if kernel is None:
        kernel = "resident" if not sorted and n_cols <= RESIDENT_MAX_COLS else "stream"
    if kernel == "resident":
        if sorted:
            raise ValueError("the resident top-k kernel writes column order only (sorted=False)")
        row_pow2 = triton.next_power_of_2(n_cols)
        warps = min(32, max(1, row_pow2 // (32 * RESIDENT_PER_THREAD)))
        _resident_topk_kernel[(n_rows,)](
            src, lens if lens is not None else src, out_val, out_col, n_cols, max(n_cols, 1), k,
            HAS_LENGTHS=lens is not None, ROW=row_pow2, K_POW2=triton.next_power_of_2(k),
            ASM_STORE=device.type == "cuda", INTERPOLATE=RESIDENT_INTERPOLATE,
            ASM_COUNT=device.type == "cuda" and row_pow2 >= 128 * warps, num_warps=warps,
            **({"maxnreg": RESIDENT_MAX_REGISTERS} if RESIDENT_MAX_REGISTERS and device.type == "cuda" else {}))
        return out_col, out_val
    if programs is None:
        programs = _programs_available(device, settings["PROGRAMS_PER_SM"])
        split_programs = _programs_available(device, SPLIT_PROGRAMS_PER_SM)
    else:
        split_programs = programs

    n_segs, seg_len = _plan(n_rows, n_cols, k, split_programs, block, min_segment)
    if n_segs == 1:
        _launch(src, None, lens, out_val, out_col, n_rows, n_cols, max(n_cols, 1), n_cols, 1, k,
                sorted, block, programs, sample, select_block, settings["MAX_REGISTERS"])
        return out_col, out_val
    # Stage 1: each segment's top-k, in column order, padded with (-inf, -1).
    part_val = torch.empty(n_rows, n_segs, k, dtype=torch.float32, device=device)
    part_col = torch.empty(n_rows, n_segs, k, dtype=torch.int32, device=device)
    _launch(src, None, lens, part_val, part_col, n_rows, n_cols, n_cols, seg_len, n_segs, k,
            False, block, programs, sample, select_block, settings["MAX_REGISTERS"])
    # Stage 2: the row's top-k among its segments' survivors.
    width = n_segs * k
    _launch(part_val, part_col, None, out_val, out_col, n_rows, width, width, width, 1, k,
            sorted, block, programs, sample, select_block, settings["MAX_REGISTERS"])
    return out_col, out_val


def topk(scores: torch.Tensor, k: int, lengths: torch.Tensor | None, sorted: bool, out=None):
    """(indices int32 [..., k], values fp32 [..., k]): see the module docstring and SPEC section 2.
    `out`: optional preallocated contiguous (indices, values) to write instead (returned)."""
    return _topk(scores, k, lengths, sorted, out=out)
