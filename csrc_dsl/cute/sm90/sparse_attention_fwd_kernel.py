"""The CuTe-DSL kernel behind `sparse_attention_fwd.sparse_attention` (SM90, bf16).

How one CTA works (read this first)
-----------------------------------
One CTA computes one query token for a block of 64 heads (the wgmma M dimension). The registers set the
block size: the output accumulator of 64 heads x 512 values in fp32 is 128 KB, half the register file, so
a CTA cannot hold 128 heads; H = 128 runs as two CTAs per token (next to each other in the grid, so the
second finds the gathered kv rows in L2). H < 64 pads the block inside the tile: the padding rows of Q are
zero-filled in shared memory, never copied in global memory, and never stored.

Three warpgroups of 128 threads:

  WG0, producer: cp.async (LDGSTS) gathers. First Q (64 x D), then, per tile of 64 top-k slots, the 64
       kv rows named by the indices, each row's address read from `indices` (a gather: no TMA). Invalid
       slots (id < 0, id >= S, slot >= topk_length) are zero-filled (cp.async with source size 0) and get
       a -inf bias. Two stages, each loaded in two column halves with a full/empty mbarrier pair per half
       (below).
  WG1, WG2, consumers (w = 0, 1). Consumer w keeps O_w = the output columns [256w, 256w+256) of all
       64 heads (64 x 256 fp32 = 128 registers per thread). The tiles are shared out in the "seesaw"
       schedule (the scheme of FlashMLA's SM90 sparse prefill, read there and written anew here):
       alternate tiles taken in pairs, 2j in stage 0 for consumer 0 and 2j+1 in stage 1 for consumer 1.
       - S_t = Q K_t^T (wgmma 64 x 64 x D, Q and K from smem) is computed by the tile's owner only;
       - each stage is loaded and freed in two column halves, L = [0, 256) and R = [256, D), each with
         its own full/empty barrier, loaded in the order 0L, 1R, 0R, 1L. A half is freed by the one
         consumer that reads it last, so V_0L (consumer 0's own P V) and V_1R (consumer 1's) can be
         refilled while the other halves of the pair are still in use: about 1.5 stages of look-ahead
         in the shared memory of two;
       - the owner's S starts on the half that lands first (consumer 0: L, consumer 1: R);
       - the owner multiplies its own P straight from registers (wgmma with A in registers); only the
         other consumer's P goes through shared memory (stmatrix; stage 0's into its RoPE columns,
         which no GEMM reads once S is done);
       - one max per pair: consumer 0 takes m0 from its running max and tile 2j, consumer 1 continues
         from m0 with tile 2j+1 to m1; consumer 0 then rescales its P (for consumer 1) and its O to
         m1. One exponential per score, no per-tile meeting beyond these two hand-offs;
       - consumer 0 issues S of the next pair while its last P V still runs;
       - the gather's cp.async carries an L2 evict_last policy and a 256-byte L2 prefetch
         (FwdConfig.l2_hints, inline PTX: `copy_row_hinted`), 1-4% faster than plain cp.async.
       1.23-1.29x faster on the H100 than the two simpler schedules it replaced (BENCHMARKS.md, sessions
       13 and 14; both are kept as docs/experiments/cute-fwd-split-keys-alternate.patch). Registers: 216
       per consumer thread and 72 per producer thread (the producer keeps the ids of both tiles of a pair).

Persistent seesaw (FwdConfig.persistent; with dynamic_items and hoisted gather addresses it is the op's default
since session 18, 1.03-1.14x the one-CTA-per-item grid on the H100): the grid has one CTA per SM, and each CTA
runs (token, head block) items in turn, so the launch and the barrier setup are paid once and an item's start
overlaps the previous item's end. The producer picks the items (static: bidx, bidx + grid, ...;
FwdConfig.dynamic_items: the next index of a global counter, claimed while the current item runs, so that SMs
that finish early take more) and publishes each in smem with its Q load (one extra arrival on q_bar); the
consumers read it after waiting for Q, and an index past the last item ends them. Q is refilled as soon as
both consumers have waited for their last S of the item (q_empty), that is during the last P V and the
epilogue, and the next item's first kv tiles are gathered then too. O can no longer be staged in Q's smem:
it goes out from registers (`store_rows_direct`). The kv barrier phases run on across items.

Scores are kept in log2 units (scale * log2 e folded in) so softmax uses exp2.

Correctness details that are easy to miss:
- the kv smem tile is written by cp.async (generic proxy) and read by wgmma (async proxy): consumers
  issue `fence.proxy.async` after each full-barrier wait; P is written with st.shared and fenced the same
  way before the barrier that publishes it;
- the full barrier of the half a stage is loaded first expects 256 arrivals: 128 from
  `cp.async.mbarrier.arrive.noinc` (the copies landed) and 128 ordinary arrivals that release the bias
  writes; the other half's, only the 128 of its copies;
- zero-filled rows make invalid keys contribute exactly 0 * 0 to O (never 0 * NaN from stale smem);
- a row with no valid key keeps m = -inf and l = 0: out = 0 and lse = +inf; exp2 never sees -inf - -inf
  because the max is replaced by 0 while it is -inf.
"""
from types import SimpleNamespace
from typing import Optional

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import BFloat16, Boolean, Float32, Int32, Int64, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.memory import SmemAllocator
from cutlass.tensor_utils import LayoutEnum

from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453
HEADS_PER_CTA = 64  # wgmma M

# Named barriers (0 is __syncthreads; the numbers are those of the kernel that was measured). Between the
# two consumer warpgroups (256 threads):
BAR_EPILOGUE = 3
BAR_SEESAW_MAX = 8  # 8 + w, consumer w published its new row max in sMax[:, 0]
BAR_SEESAW_P = 10   # 10 + w, consumer w's P (at the pair's max) is in smem
BAR_PRODUCER = 12   # persistent with dynamic items: within the producer warpgroup, the next item is in smem


def rows_cols_view(acc: cute.Tensor) -> cute.Tensor:
    """View a wgmma accumulator ((2, 2, N/8), M_atoms, N_atoms) as (rows, cols) of this thread.

    In the SM90 accumulator layout, mode 0 is (column pair, row +8, column +8): so the rows of a thread
    are (mode0[1], M_atoms) and its columns are (mode0[0], mode0[2], N_atoms)."""
    layout = acc.layout
    shape, stride = layout.shape, layout.stride
    rows = ((shape[0][1], shape[1]), (stride[0][1], stride[1]))
    cols = ((shape[0][0], shape[0][2], shape[2]), (stride[0][0], stride[0][2], stride[2]))
    return cute.make_tensor(acc.iterator, cute.make_layout((rows[0], cols[0]), stride=(rows[1], cols[1])))


@cute.jit
def wgmma(tiled_mma: cute.TiledMma, acc: cute.Tensor, frag_a: cute.Tensor, frag_b: cute.Tensor,
          zero_init: cutlass.Constexpr[bool], wait: cutlass.Constexpr[bool] = True):
    """acc (+)= A B over all k-blocks, issued as one wgmma group; waited for unless `wait` is False
    (then the caller waits with `warpgroup.wait_group(n)`)."""
    warpgroup.fence()
    atom = cute.make_mma_atom(tiled_mma.op)
    atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
    for k in cutlass.range_constexpr(cute.size(frag_a.shape[2])):
        cute.gemm(atom, acc, frag_a[None, None, k], frag_b[None, None, k], acc)
        atom.set(warpgroup.Field.ACCUMULATE, True)
    warpgroup.commit_group()
    if const_expr(wait):
        warpgroup.wait_group(0)


@cute.jit
def issue_kblocks(tiled_mma: cute.TiledMma, acc: cute.Tensor, frag_a: cute.Tensor, frag_b: cute.Tensor,
                  k_start: cutlass.Constexpr[int], k_stop: cutlass.Constexpr[int],
                  zero_init: cutlass.Constexpr[bool]):
    """acc (+)= A B over k-blocks [k_start, k_stop): wgmmas only, the caller fences and commits. Lets a
    product start on the half of a tile that has landed while the other half is still loading."""
    atom = cute.make_mma_atom(tiled_mma.op)
    atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
    for k in cutlass.range_constexpr(k_start, k_stop):
        cute.gemm(atom, acc, frag_a[None, None, k], frag_b[None, None, k], acc)
        atom.set(warpgroup.Field.ACCUMULATE, True)


def acc_as_frag_a(acc: cute.Tensor) -> cute.Tensor:
    """View a 16-bit wgmma accumulator ((2, 2, N/8), M_atoms, N_atoms) as the register A operand of the next
    product, ((2, 2, 2), M_atoms, (N/16, N_atoms)): the values a thread holds for columns [16k, 16k+16) are
    exactly its A values of k-block k, so no data moves (the back-to-back GEMM register trick)."""
    layout = cute.logical_divide(acc.layout, ((None, None, 2), None, None))
    shape, stride = layout.shape, layout.stride
    return cute.make_tensor(acc.iterator, cute.make_layout(
        ((shape[0][0], shape[0][1], shape[0][2][0]), shape[1], (shape[0][2][1], shape[2])),
        stride=((stride[0][0], stride[0][1], stride[0][2][0]), stride[1], (stride[0][2][1], stride[2]))))


@cute.jit
def softmax_own_rows(S: cute.Tensor, O: cute.Tensor, S_coord: cute.Tensor, sBias: cute.Tensor, stage: Int32,
                     row_max: cute.Tensor, row_sum: cute.Tensor, m_start: cute.Tensor, scale_log2: Float32):
    """Online softmax of this thread's rows of a whole 64-key tile (in kv stage `stage`), in place: S becomes
    P = 2^(s - m) with s the scores in log2 units plus the key's bias (0 or -inf), m the new row max
    (continuing from m_start[i] >= row_max[i]); O and the row sums move from row_max to m, and row_max
    becomes m. A row's 4 threads agree on m; m stays -inf while the row has seen no valid key (then
    2^(s - 0) = 0 for the masked keys, never -inf - -inf)."""
    n_rows = cute.size(S, mode=[0])
    n_cols = cute.size(S, mode=[1])
    col_bias = cute.make_rmem_tensor((n_cols,), Float32)
    for j in cutlass.range_constexpr(n_cols):
        col_bias[j] = sBias[S_coord[0, j][1], stage]
    for i in cutlass.range_constexpr(n_rows):
        m = m_start[i]
        for j in cutlass.range_constexpr(n_cols):
            s = S[i, j] * scale_log2 + col_bias[j]
            S[i, j] = s
            m = cute.arch.fmax(m, s)
        m = cute.arch.fmax(m, cute.arch.shuffle_sync_bfly(m, offset=1))
        m = cute.arch.fmax(m, cute.arch.shuffle_sync_bfly(m, offset=2))
        m_use = m
        if m == -Float32.inf:
            m_use = Float32(0.0)
        scale = cute.math.exp2(row_max[i] - m_use, fastmath=True)
        row_max[i] = m
        total = Float32(0.0)
        for j in cutlass.range_constexpr(n_cols):
            p = cute.math.exp2(S[i, j] - m_use, fastmath=True)
            S[i, j] = p
            total += p
        row_sum[i] = row_sum[i] * scale + total
        O_row = O[i, None]
        O_row.store(O_row.load() * scale)


@cute.jit
def move_row_to_max(m_new: Float32, i: cutlass.Constexpr[int], row_max: cute.Tensor, row_sum: cute.Tensor,
                    O: cute.Tensor) -> Float32:
    """Row i's output and sum move from row_max[i] to the max m_new >= it; returns the factor applied."""
    m_use = m_new
    if m_new == -Float32.inf:
        m_use = Float32(0.0)
    factor = cute.math.exp2(row_max[i] - m_use, fastmath=True)
    row_max[i] = m_new
    row_sum[i] = row_sum[i] * factor
    O_row = O[i, None]
    O_row.store(O_row.load() * factor)
    return factor


@dsl_user_op
def l2_policy(evict_last: bool, *, loc=None, ip=None) -> Int64:
    """A 64-bit L2 cache policy (createpolicy) for cache-hinted loads: evict_last keeps the lines (the kv rows
    that every token gathers again), evict_first lets them go first (Q, read once)."""
    kind = "evict_last" if evict_last else "evict_first"
    return Int64(llvm.inline_asm(T.i64(), [], f"createpolicy.fractional.L2::{kind}.b64 $0, 1.0;", "=l",
                                 has_side_effects=True, is_align_stack=False,
                                 asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip))


@dsl_user_op
def cp_async_16B_hinted(dst_addr: Int32, src_addr: Int64, src_bytes: Int32, policy: Int64, *, loc=None, ip=None):
    """cp.async of 16 bytes (zero-filled past src_bytes) to the shared address dst_addr, with an L2 cache policy
    and a 256-byte L2 prefetch: the one form of the gather copy the DSL's CopyG2SOp does not spell (FlashMLA's
    producer uses it)."""
    llvm.inline_asm(None, [Int32(dst_addr).ir_value(loc=loc, ip=ip), Int64(src_addr).ir_value(loc=loc, ip=ip),
                           Int32(src_bytes).ir_value(loc=loc, ip=ip), Int64(policy).ir_value(loc=loc, ip=ip)],
                    "cp.async.cg.shared.global.L2::cache_hint.L2::256B [$0], [$1], 16, $2, $3;", "r,l,r,l",
                    has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


@dsl_user_op
def pack_bf16x2(lo: Float32, hi: Float32, *, loc=None, ip=None) -> Int32:
    """Two fp32 values rounded to bf16 (round to nearest even) in one 32-bit word, lo in the low half."""
    return Int32(llvm.inline_asm(T.i32(), [Float32(hi).ir_value(loc=loc, ip=ip), Float32(lo).ir_value(loc=loc, ip=ip)],
                                 "cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f", has_side_effects=False,
                                 is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip))


@dsl_user_op
def st_global_v4(addr: Int64, a: Int32, b: Int32, c: Int32, d: Int32, *, loc=None, ip=None):
    """One 16-byte store of four 32-bit words to a 16-byte-aligned global address."""
    operands = [Int64(addr).ir_value(loc=loc, ip=ip)] + [Int32(v).ir_value(loc=loc, ip=ip) for v in (a, b, c, d)]
    llvm.inline_asm(None, operands,
                    "st.global.v4.b32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r",
                    has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


@cute.jit
def quad_transpose(blocks: list, index: Int32, lane_stride: cutlass.Constexpr[int]) -> list:
    """A 4 x 4 block transpose among 4 lanes `lane_stride` apart (lane index bits 0 and 1 of `index`), in two
    butterfly stages of `shfl.bfly`: blocks[d] (a list of values) is what this lane holds for lane d before,
    and what lane d held for this lane after. Used to turn wgmma accumulator fragments into 16-byte stores
    (the forward's O, the backward's dkv)."""
    for s in cutlass.range_constexpr(2):
        upper = (index >> s) % 2 == 1          # this lane's bit s: it keeps the upper block of each pair
        for d in cutlass.range_constexpr(4):
            if const_expr(d & (1 << s) == 0):
                d2 = d | (1 << s)
                for v in cutlass.range_constexpr(len(blocks[d])):
                    sent = blocks[d][v] if upper else blocks[d2][v]
                    got = cute.arch.shuffle_sync_bfly(sent, offset=lane_stride << s)
                    blocks[d][v] = got if upper else blocks[d][v]
                    blocks[d2][v] = blocks[d2][v] if upper else got
    return blocks


@cute.jit
def copy_row_hinted(src_row: Int64, dst_row: cute.Tensor, num_cols: cutlass.Constexpr[int], piece: Int32,
                    valid: Boolean, policy: Int64, first_col: cutlass.Constexpr[int] = 0):
    """`copy_row` through `cp_async_16B_hinted`, for a destination in the 128-byte-swizzled wgmma layout: the
    pointer of a swizzled smem tensor holds the unswizzled address, so the swizzle (address bits 7-9 into
    bits 4-6, on a 1024-byte-aligned buffer) is applied here, as the DSL's own copies do."""
    src_bytes = Int32(16) if valid else Int32(0)
    for j in cutlass.range_constexpr(first_col // 64, num_cols // 64):
        col = j * 64 + piece * 8
        addr = Int32(cute.local_tile(dst_row, (8,), (j * 8 + piece,)).iterator.toint())
        cp_async_16B_hinted(addr ^ ((addr >> 3) & 0x70), src_row + Int64(col * 2), src_bytes, policy)


@cute.jit
def copy_row_hinted_at(src_row: Int64, dst_addr: Int32, num_cols: cutlass.Constexpr[int], piece: Int32,
                       valid: Boolean, policy: Int64, col_block_bytes: cutlass.Constexpr[int],
                       first_col: cutlass.Constexpr[int] = 0):
    """`copy_row_hinted` with the swizzled shared address of the row's first piece given (`dst_addr`, see
    `SparseAttentionFwdSm90.gather_layout_strides`): the other pieces lie `col_block_bytes` apart, so every address
    is that register plus an immediate, with no swizzle arithmetic per copy."""
    src_bytes = Int32(16) if valid else Int32(0)
    src_piece = src_row + Int64(piece * 16)
    for j in cutlass.range_constexpr(first_col // 64, num_cols // 64):
        cp_async_16B_hinted(dst_addr + Int32(j * col_block_bytes), src_piece + Int64(j * 128), src_bytes, policy)


@cute.jit
def copy_row(copy_16B: cute.CopyAtom, src_row: Int64, dst_row: cute.Tensor, num_cols: cutlass.Constexpr[int],
             piece: Int32, valid: Boolean, first_col: cutlass.Constexpr[int] = 0):
    """This thread's 16-byte cp.async pieces of one bf16 row, columns [first_col, num_cols) (columns
    piece*8 + 64j, for 8 threads per row); zero-filled when not valid. Shared by the SM90 kernels' producers."""
    pred = cute.make_rmem_tensor((1,), Boolean)
    pred[0] = valid
    for j in cutlass.range_constexpr(first_col // 64, num_cols // 64):
        col = j * 64 + piece * 8
        src = cute.make_tensor(
            cute.make_ptr(BFloat16, src_row + Int64(col * 2), cute.AddressSpace.gmem, assumed_align=16),
            cute.make_layout(((8, 1),)))
        dst_piece = cute.local_tile(dst_row, (8,), (j * 8 + piece,))
        dst = cute.make_tensor(dst_piece.iterator, cute.make_layout(((8, 1),)))
        cute.copy(copy_16B, src, dst, pred=pred)


class SparseAttentionFwdSm90:
    """One compiled variant: `FwdConfig` fixes D, d_v, the optional inputs and the tiles;
    T, H, S and K are runtime values."""

    def __init__(self, config):
        if config.block_n != 64 or config.num_stages != 2:
            raise ValueError("this kernel is written for block_n = 64 and 2 stages")
        if config.d_v != 512 or config.head_dim % 64 != 0 or config.head_dim < config.d_v:
            raise ValueError(f"unsupported head dims D={config.head_dim}, d_v={config.d_v}")
        self.cfg = config
        self.D = config.head_dim
        self.DV = config.d_v
        self.BM = HEADS_PER_CTA
        self.BN = config.block_n
        self.stages = config.num_stages
        self.dv_per_wg = self.DV // 2          # O columns of one consumer
        self.num_threads = 3 * 128
        # D = 576: P of stage 0's tile lives in that tile's RoPE columns (freed by the consumer that reads
        # P, and dead once S is computed); stage 1's P gets its own buffer. D = 512: a buffer for each.
        self.p_in_rope = self.D - self.DV == self.BN
        self.p_buffers = 1 if self.p_in_rope else self.stages
        # each kv stage is loaded and released in two halves of columns, L = [0, d_v/2) (consumer 0's V)
        # and R = [d_v/2, D) (consumer 1's V and the RoPE part): one full/empty barrier pair per half.
        self.half_cols = self.DV // 2
        self.bars_per_stage = 2
        # registers: 384 threads launch with 168 each; the producer hands its surplus to the consumers
        self.producer_regs = config.producer_regs or 72
        self.consumer_regs = config.consumer_regs or 216
        if self.producer_regs * 128 + self.consumer_regs * 256 > 168 * 384:
            raise ValueError(f"setmaxnreg {self.producer_regs} / {self.consumer_regs} exceeds the 168 x 384 "
                             "registers the CTA launches with")
        # one CTA per SM loops over (token, head block) items, so the gather of the next item's first tiles and
        # Q overlaps this item's last P V and epilogue (the launch and prologue are paid once)
        self.persistent = config.persistent
        if config.hoist_gather_addresses and not config.l2_hints:
            raise ValueError("hoist_gather_addresses is implemented for the gather with L2 hints")
        if config.ablation not in ("none", "no_gather"):
            raise ValueError(f"unknown ablation {config.ablation!r}")
        # persistent: items claimed from a global counter as CTAs get free (else bidx, bidx + grid, ...)
        self.dynamic_items = config.dynamic_items
        if self.dynamic_items and not self.persistent:
            raise ValueError("dynamic_items needs persistent")

    # -------------------------------------------------------------------------------------------
    # Host side: layouts, MMAs, shared storage, launch
    # -------------------------------------------------------------------------------------------
    @cute.jit
    def __call__(self, mQ: cute.Tensor, mKV: cute.Tensor, mIdx: cute.Tensor, mOut: cute.Tensor,
                 mLse: cute.Tensor, mSink: Optional[cute.Tensor], mTopkLen: Optional[cute.Tensor],
                 mItemCounter: Optional[cute.Tensor], scale_log2: Float32, max_ctas: Int32, stream: cuda.CUstream):
        BM, BN, D, DV = self.BM, self.BN, self.D, self.DV
        # K-major, 128-byte-swizzled smem tiles (the wgmma canonical layout): rows of 64 bf16.
        atom = warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, BFloat16, 64), BFloat16)
        sQ_layout = cute.tile_to_shape(atom, (BM, D), order=(0, 1))
        sKV_layout = cute.tile_to_shape(atom, (BN, D, self.stages), order=(0, 1, 2))
        sP_layout = cute.tile_to_shape(atom, (BM, BN, max(self.p_buffers, 1)), order=(0, 1, 2))
        sO_layout = cute.tile_to_shape(atom, (BM, DV), order=(0, 1))

        # S_w = Q K_w^T: both operands K-major in smem.
        mma_qk = sm90_utils.make_trivial_tiled_mma(
            BFloat16, BFloat16, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.K,
            Float32, (1, 1, 1), (BM, BN))
        # O_w += P V_w: P K-major in smem, V read from the same kv tile, which is MN-major for this GEMM.
        mma_pv = sm90_utils.make_trivial_tiled_mma(
            BFloat16, BFloat16, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN,
            Float32, (1, 1, 1), (BM, self.dv_per_wg))
        # A consumer multiplies its own P straight from registers.
        mma_pv_rs = sm90_utils.make_trivial_tiled_mma(
            BFloat16, BFloat16, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN,
            Float32, (1, 1, 1), (BM, self.dv_per_wg), warpgroup.OperandSource.RMEM)

        @cute.struct
        class SharedStorage:
            full_bar: cute.struct.MemRange[cutlass.Int64, self.stages * self.bars_per_stage]
            empty_bar: cute.struct.MemRange[cutlass.Int64, self.stages * self.bars_per_stage]
            q_bar: cute.struct.MemRange[cutlass.Int64, 1]
            q_empty: cute.struct.MemRange[cutlass.Int64, 1 if self.persistent else 0]  # Q may be refilled
            # persistent: the item of each Q load (by parity; published with q_bar), and the producer's next
            item_of_load: cute.struct.MemRange[Int32, 2 if self.persistent else 0]
            next_item: cute.struct.MemRange[Int32, 2 if self.dynamic_items else 0]
            bias: cute.struct.MemRange[Float32, BN * self.stages]   # 0 or -inf per kv row and stage
            row_max: cute.struct.MemRange[Float32, BM * 2]           # per row, per consumer
            # per row, per consumer (persistent: and per item parity, see `epilogue`)
            row_sum: cute.struct.MemRange[Float32, BM * 2 * (2 if self.persistent else 1)]
            sQ: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sQ_layout)], 1024]
            sKV: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sKV_layout)], 1024]
            sP: cute.struct.Align[
                cute.struct.MemRange[BFloat16, cute.cosize(sP_layout) if self.p_buffers > 0 else 0], 1024]

        self.shared_storage = SharedStorage

        # One CTA per (token, block of 64 heads); the head block varies fastest so that the CTAs of one
        # token run side by side and share the gathered kv rows through L2.
        head_blocks = (mQ.shape[1] + self.BM - 1) // self.BM
        grid_x = mQ.shape[0] * head_blocks
        if const_expr(self.persistent):
            grid_x = cutlass.min(grid_x, max_ctas)      # the launcher passes the SM count
        self.kernel(mQ, mKV, mIdx, mOut, mLse, mSink, mTopkLen, mItemCounter, scale_log2,
                    sQ_layout, sKV_layout, sP_layout, sO_layout, mma_qk, mma_pv, mma_pv_rs).launch(
            grid=[grid_x, 1, 1], block=[self.num_threads, 1, 1], stream=stream, min_blocks_per_mp=1)

    # -------------------------------------------------------------------------------------------
    # Device side
    # -------------------------------------------------------------------------------------------
    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mKV: cute.Tensor, mIdx: cute.Tensor, mOut: cute.Tensor,
               mLse: cute.Tensor, mSink: Optional[cute.Tensor], mTopkLen: Optional[cute.Tensor],
               mItemCounter: Optional[cute.Tensor], scale_log2: Float32, sQ_layout: cute.ComposedLayout,
               sKV_layout: cute.ComposedLayout, sP_layout: cute.ComposedLayout, sO_layout: cute.ComposedLayout,
               mma_qk: cute.TiledMma, mma_pv: cute.TiledMma, mma_pv_rs: cute.TiledMma):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg_idx = warp_idx // 4

        smem = SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        full_bar = storage.full_bar.data_ptr()
        empty_bar = storage.empty_bar.data_ptr()
        q_bar = storage.q_bar.data_ptr()
        sched = None
        if const_expr(self.persistent):
            sched = SimpleNamespace(
                q_empty=storage.q_empty.data_ptr(), counter=mItemCounter,
                item_of_load=storage.item_of_load.get_tensor(cute.make_layout((2,))),
                next_item=storage.next_item.get_tensor(cute.make_layout((2,))) if self.dynamic_items else None)
        if warp_idx == 0:
            with cute.arch.elect_one():
                for s in cutlass.range_constexpr(self.stages):
                    for half in cutlass.range_constexpr(2):
                        # the half a stage is loaded first (0: L, 1: R) also publishes its bias
                        cute.arch.mbarrier_init(full_bar + 2 * s + half, 256 if half == s else 128)
                        cute.arch.mbarrier_init(empty_bar + 2 * s + half, 128)   # one consumer each
                # persistent: one more arrival, the producer thread that published the load's item
                cute.arch.mbarrier_init(q_bar, 129 if self.persistent else 128)
                if const_expr(self.persistent):
                    cute.arch.mbarrier_init(sched.q_empty, 256)   # every consumer thread is done reading Q
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sKV = storage.sKV.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)   # (64, 64, buffers)
        sO = storage.sQ.get_tensor(sO_layout.outer, swizzle=sO_layout.inner)  # Q is dead by then
        sBias = storage.bias.get_tensor(cute.make_layout((self.BN, self.stages)))
        sMax = storage.row_max.get_tensor(cute.make_layout((self.BM, 2)))
        sSum = storage.row_sum.get_tensor(cute.make_layout((self.BM, 2, 2) if self.persistent else (self.BM, 2)))
        token, head_block, k_valid, n_tiles = self.item_coords(mQ.shape[1], mIdx, mTopkLen, bidx)

        if wg_idx == 0:
            cute.arch.setmaxregister_decrease(self.producer_regs)
            self.produce(mQ, mKV, mIdx, mTopkLen, sQ, sKV, sBias, full_bar, empty_bar, q_bar, sched,
                         token, head_block, k_valid, n_tiles, tidx)
        else:
            cute.arch.setmaxregister_increase(self.consumer_regs)
            # P of stage 0 (consumer 0's tiles) and of stage 1
            if const_expr(self.p_in_rope):
                sP0 = cute.flat_divide(sKV, (self.BM, self.BN))[None, None, 0, self.D // self.BN - 1, 0]
                sP1 = sP[None, None, 0]
            else:
                sP0 = sP[None, None, 0]
                sP1 = sP[None, None, 1]
            if wg_idx == 1:
                self.consume(mOut, mLse, mSink, mIdx, mTopkLen, sQ, sKV, sP0, sP1, sO, sBias, sMax,
                             sSum, full_bar, empty_bar, q_bar, sched, mma_qk, mma_pv, mma_pv_rs,
                             scale_log2, token, head_block, n_tiles, 0, tidx - 128)
            else:
                self.consume(mOut, mLse, mSink, mIdx, mTopkLen, sQ, sKV, sP0, sP1, sO, sBias, sMax,
                             sSum, full_bar, empty_bar, q_bar, sched, mma_qk, mma_pv, mma_pv_rs,
                             scale_log2, token, head_block, n_tiles, 1, tidx - 128)

    @cute.jit
    def item_coords(self, H: Int32, mIdx: cute.Tensor, mTopkLen: Optional[cute.Tensor], item: Int32):
        """(token, head_block, k_valid, n_tiles) of work item `item` (one CTA's work when not persistent): top-k
        slots [0, k_valid) may hold keys; tiles past the last one are skipped entirely."""
        head_blocks = (H + self.BM - 1) // self.BM
        token = item // head_blocks
        head_block = item - token * head_blocks
        k_valid = mIdx.shape[1]
        if const_expr(mTopkLen is not None):
            k_valid = cutlass.min(k_valid, cutlass.max(mTopkLen[token], 0))
        n_tiles = (k_valid + self.BN - 1) // self.BN
        return token, head_block, k_valid, n_tiles

    @cute.jit
    def persistent_items(self, H: Int32, num_tokens: Int32):
        """(first item, stride, end) of this CTA's items in the persistent grid: items bidx, bidx + grid, ..."""
        bidx, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        return bidx, grid, num_tokens * ((H + self.BM - 1) // self.BM)

    # ---- producer: cp.async gathers ------------------------------------------------------------
    def gather_atom(self) -> cute.CopyAtom:
        return cute.make_copy_atom(
            cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), BFloat16, num_bits_per_copy=128)

    def gather_layout_strides(self, sKV_outer) -> tuple:
        """(row pass, column block, stage) distances in bytes between the kv smem pieces one producer thread
        writes, checked on the layout itself (at trace time): in the 128-byte-swizzled layout the swizzle of
        a piece depends only on its row mod 8 and its 16-byte column index, which a thread keeps for all of
        its pieces (rows row_in_pass + 16 p), so one swizzled base address serves every piece."""
        pass_bytes, block_bytes, stage_bytes = 16 * 128, self.BN * 128, self.BN * self.D * 2
        for r0 in range(8):
            for piece in range(8):
                base = cute.crd2idx((r0, 8 * piece, 0), sKV_outer)
                for p, j, stage in ((1, 0, 0), (0, 1, 0), (0, 0, 1), (3, self.D // 64 - 1, 1)):
                    coord = (r0 + 16 * p, 64 * j + 8 * piece, stage)
                    got = (cute.crd2idx(coord, sKV_outer) - base) * 2
                    if got != p * pass_bytes + j * block_bytes + stage * stage_bytes:
                        raise ValueError(f"unexpected kv smem layout at {coord}: {got} bytes from the row start")
        return pass_bytes, block_bytes, stage_bytes

    @cute.jit
    def load_q(self, copy_16B: cute.CopyAtom, mQ: cute.Tensor, sQ: cute.Tensor, q_bar, token: Int32,
               head_block: Int32, tidx: Int32):
        """Q rows of this head block into smem (heads past H zero-filled); q_bar completes when they land.
        (Q with an L2 evict_first policy, as FlashMLA loads it, was measured no faster: BENCHMARKS.md, session 15.)"""
        H = mQ.shape[1]
        row_in_pass = tidx // 8
        piece = tidx % 8
        q_base = mQ.iterator.toint()
        for p in cutlass.range_constexpr(self.BM // 16):
            r = row_in_pass + 16 * p
            head = head_block * self.BM + r
            valid = head < H
            src_row = q_base + (Int64(token) * H + Int64(head if valid else 0)) * (self.D * 2)
            copy_row(copy_16B, src_row, sQ[r, None], self.D, piece, valid)
        cute.arch.cp_async_mbarrier_arrive_noinc(q_bar)

    @cute.jit
    def produce(self, mQ: cute.Tensor, mKV: cute.Tensor, mIdx: cute.Tensor, mTopkLen: Optional[cute.Tensor],
                       sQ: cute.Tensor, sKV: cute.Tensor, sBias: cute.Tensor, full_bar, empty_bar, q_bar, sched,
                       token: Int32, head_block: Int32, k_valid: Int32, n_tiles: Int32, tidx: Int32):
        """The producer: tiles go in pairs (tile 2j in stage 0, 2j + 1 in stage 1) and each stage in
        two column halves. Order per pair: 0L, 1R, 0R, 1L: first the halves their owners free early (after
        their own P V), then the halves freed only once the other consumer has folded the tile in. A pair
        past the last tile holds only invalid rows (zero-filled, bias -inf), so an odd tile count just
        computes one all-masked tile.

        Persistent: the same for each item in turn; the barrier phases run on across items (pairs and Q loads
        counted from the CTA's start). The producer picks the items (bidx, then bidx + grid, ... or, with
        dynamic_items, the next one of a global counter, claimed during the current item) and publishes each
        with its Q load (`item_of_load`); past the last one it publishes the end, and the consumers stop."""
        passes = self.BN // 16
        ids = [cute.make_rmem_tensor((passes,), Int32), cute.make_rmem_tensor((passes,), Int32)]
        if const_expr(self.persistent):
            item, stride, n_items = self.persistent_items(mQ.shape[1], mQ.shape[0])
            # (smem tensors written inside staged branches are held in locals: the tracer does not follow
            # writes through attributes)
            item_of_load, next_item = sched.item_of_load, sched.next_item
            pair_base = Int32(0)
            q_loads = Int32(0)
            while item < n_items:
                claimed = Int32(0)
                if const_expr(self.dynamic_items):
                    if tidx == 0:     # the next item; its latency is hidden behind this item's gathers
                        claimed = cute.arch.atomic_add(sched.counter.iterator, Int32(1), sem="relaxed", scope="gpu")
                i_token, i_head_block, i_k_valid, i_tiles = self.item_coords(mQ.shape[1], mIdx, mTopkLen, item)
                self.produce_item(mQ, mKV, mIdx, sQ, sKV, sBias, full_bar, empty_bar, q_bar, sched, ids,
                                         i_token, i_head_block, i_k_valid, i_tiles, tidx, pair_base, q_loads, item)
                pair_base = pair_base + (i_tiles + 1) // 2
                if const_expr(self.dynamic_items):
                    # the claim to every producer thread (two slots: a fast thread 0 may claim again first)
                    if tidx == 0:
                        next_item[q_loads % 2] = claimed + stride
                    cute.arch.barrier(barrier_id=BAR_PRODUCER, number_of_threads=128)
                    item = next_item[q_loads % 2]
                else:
                    item = item + stride
                q_loads = q_loads + 1
            # the end: the consumers wake on this load's barrier, read an item past the last one and stop
            cute.arch.mbarrier_wait(sched.q_empty, (q_loads % 2) ^ 1)
            if tidx == 0:
                item_of_load[q_loads % 2] = item
                cute.arch.mbarrier_arrive(q_bar)
            cute.arch.mbarrier_arrive(q_bar)
        else:
            self.produce_item(mQ, mKV, mIdx, sQ, sKV, sBias, full_bar, empty_bar, q_bar, sched, ids,
                                     token, head_block, k_valid, n_tiles, tidx, Int32(0), Int32(0), Int32(0))

    @cute.jit
    def produce_item(self, mQ: cute.Tensor, mKV: cute.Tensor, mIdx: cute.Tensor, sQ: cute.Tensor,
                            sKV: cute.Tensor, sBias: cute.Tensor, full_bar, empty_bar, q_bar, sched, ids,
                            token: Int32, head_block: Int32, k_valid: Int32, n_tiles: Int32, tidx: Int32,
                            pair_base: Int32, q_loads: Int32, item: Int32):
        """One item of `produce`: Q, then its pairs of tiles (barrier phases offset by pair_base)."""
        D = self.D
        copy_16B = self.gather_atom()
        # 8 threads per row, each moving 16-byte pieces 128 bytes apart; 16 rows per pass, 4 passes.
        row_in_pass, piece, passes, row_bytes = tidx // 8, tidx % 8, self.BN // 16, D * 2
        kv_rows = mKV.shape[0]
        kv_base = mKV.iterator.toint()
        kv_policy = l2_policy(True) if const_expr(self.cfg.l2_hints) else Int64(0)
        if const_expr(self.cfg.hoist_gather_addresses):
            pass_bytes, block_bytes, stage_bytes = self.gather_layout_strides(sKV.layout)
            first = Int32(cute.local_tile(sKV[row_in_pass, None, 0], (8,), (piece,)).iterator.toint())
            dst_base = first ^ ((first >> 3) & 0x70)          # the swizzle, once (see `copy_row_hinted`)
        n_pairs = (n_tiles + 1) // 2
        if const_expr(self.persistent):
            item_of_load = sched.item_of_load
            # the first ids are read while the consumers finish the previous item with Q
            if n_pairs > 0:
                self.load_slot_ids(mIdx, ids[0], token, 0, k_valid, row_in_pass)
                self.load_slot_ids(mIdx, ids[1], token, 1, k_valid, row_in_pass)
            cute.arch.mbarrier_wait(sched.q_empty, (q_loads % 2) ^ 1)
            if tidx == 0:
                item_of_load[q_loads % 2] = item           # released to the consumers by this arrival
                cute.arch.mbarrier_arrive(q_bar)
            self.load_q(copy_16B, mQ, sQ, q_bar, token, head_block, tidx)
        else:
            self.load_q(copy_16B, mQ, sQ, q_bar, token, head_block, tidx)
            if n_pairs > 0:
                self.load_slot_ids(mIdx, ids[0], token, 0, k_valid, row_in_pass)
                self.load_slot_ids(mIdx, ids[1], token, 1, k_valid, row_in_pass)
        for j in cutlass.range(n_pairs, unroll=1):
            phase = (pair_base + j) % 2
            for stage, half in ((0, 0), (1, 1), (0, 1), (1, 0)):
                bar = 2 * stage + half
                cute.arch.mbarrier_wait(empty_bar + bar, phase ^ 1)
                for p in cutlass.range_constexpr(passes):
                    r = row_in_pass + 16 * p
                    kv_id = ids[stage][p]
                    valid = kv_id >= 0 and kv_id < kv_rows
                    src_row = kv_base + Int64(kv_id if valid else 0) * row_bytes
                    if const_expr(self.cfg.ablation != "no_gather"):
                        lo, hi = (0, self.half_cols) if half == 0 else (self.half_cols, D)
                        if const_expr(self.cfg.hoist_gather_addresses):
                            copy_row_hinted_at(src_row, dst_base + Int32(p * pass_bytes + stage * stage_bytes), hi,
                                               piece, valid, kv_policy, block_bytes, first_col=lo)
                        elif const_expr(self.cfg.l2_hints):
                            copy_row_hinted(src_row, sKV[r, None, stage], hi, piece, valid, kv_policy,
                                            first_col=lo)
                        else:
                            copy_row(copy_16B, src_row, sKV[r, None, stage], hi, piece, valid, first_col=lo)
                    if const_expr(half == stage):
                        if piece == 0:
                            sBias[r, stage] = Float32(0.0) if valid else -Float32.inf
                cute.arch.cp_async_mbarrier_arrive_noinc(full_bar + bar)
                if const_expr(half == stage):
                    cute.arch.mbarrier_arrive(full_bar + bar)      # the bias of this stage's tile
            if j + 1 < n_pairs:
                self.load_slot_ids(mIdx, ids[0], token, 2 * j + 2, k_valid, row_in_pass)
                self.load_slot_ids(mIdx, ids[1], token, 2 * j + 3, k_valid, row_in_pass)

    @cute.jit
    def load_slot_ids(self, mIdx: cute.Tensor, slot_ids: cute.Tensor, token: Int32, tile: Int32,
                      k_valid: Int32, row_in_pass: Int32):
        """kv ids of this thread's rows of `tile`; -1 (invalid) past the valid slots."""
        for p in cutlass.range_constexpr(cute.size(slot_ids)):
            slot = tile * self.BN + row_in_pass + 16 * p
            slot_ids[p] = Int32(-1)
            if slot < k_valid:
                slot_ids[p] = mIdx[token, slot]

    # ---- consumers: wgmma + online softmax --------------------------------------------------------
    def value_view(self, sKV: cute.Tensor, w) -> cute.Tensor:
        """V_w^T: columns [256w, 256w+256) of each kv stage seen as (dv, key), MN-major for the P V product."""
        sVt = cute.composition(sKV, cute.make_layout((self.DV, self.BN, self.stages),
                                                     stride=(self.BN, 1, self.BN * self.D)))
        return cute.flat_divide(sVt, (self.dv_per_wg, self.BN))[None, None, w, 0, None]

    @cute.jit
    def accumulators(self, thr_qk: cute.ThrMma, thr_pv: cute.ThrMma, n_keys: cutlass.Constexpr[int]):
        """(acc_O zeroed, acc_S, and their (row, col) views O and S, and S_coord: the (row, key) of each value
        of S, from the same partitioning as the MMA) for a consumer whose S covers n_keys keys."""
        acc_O = cute.make_rmem_tensor(thr_pv.partition_shape_C((self.BM, self.dv_per_wg)), Float32)
        acc_O.fill(0.0)
        acc_S = cute.make_rmem_tensor(thr_qk.partition_shape_C((self.BM, n_keys)), Float32)
        S_coord = rows_cols_view(thr_qk.partition_C(cute.make_identity_tensor((self.BM, n_keys))))
        return acc_O, acc_S, rows_cols_view(acc_O), rows_cols_view(acc_S), S_coord

    @cute.jit
    def consume(self, mOut: cute.Tensor, mLse: cute.Tensor, mSink: Optional[cute.Tensor], mIdx: cute.Tensor,
                       mTopkLen: Optional[cute.Tensor], sQ: cute.Tensor, sKV: cute.Tensor, sP0: cute.Tensor,
                       sP1: cute.Tensor, sO: cute.Tensor, sBias: cute.Tensor, sMax: cute.Tensor, sSum: cute.Tensor,
                       full_bar, empty_bar, q_bar, sched, mma_qk: cute.TiledMma, mma_pv: cute.TiledMma,
                       mma_pv_rs: cute.TiledMma, scale_log2: Float32, token: Int32, head_block: Int32,
                       n_tiles: Int32, w: cutlass.Constexpr[int], tid: Int32):
        """Consumer w. Tiles come in pairs, 2j in stage 0 (consumer 0's) and 2j + 1
        in stage 1 (consumer 1's). Per pair:
          consumer 0: S_0 -> softmax with its running max m -> m0 (to smem) -> O_0 += P_0 V_0L (P from
                      registers) -> waits for m1 -> rescales P_0 to m1, stores it -> O_0 = O_0 * 2^(m0 - m1)
                      + P_1 V_1L (P_1 from smem) -> starts S of the next pair while that runs;
          consumer 1: S_1 -> softmax with max(m0, its scores) = m1 (to smem) -> O_1 += P_1 V_1R (registers),
                      stores P_1 -> O_1 += P_0 V_0R (P_0 from smem).
        Both end each pair at the same max m1, each summing only its own tile's P. Each half of a stage is
        released by the one consumer that reads it last: V_0L and V_1R after the owner's own product,
        V_0R (and P_0, in its RoPE columns) and V_1L after the other consumer's. Persistent: the same for each
        item in turn (`consume_item`), the fragments set up once."""
        BN = self.BN
        thr_qk = mma_qk.get_slice(tid % 128)
        thr_pv = mma_pv.get_slice(tid % 128)
        thr_pv_rs = mma_pv_rs.get_slice(tid % 128)
        tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ))
        tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sKV))                      # all 64 rows, by stage
        sVt_w = self.value_view(sKV, w)                                             # (256, 64, stage)
        tOrV = thr_pv.make_fragment_B(thr_pv.partition_B(sVt_w))
        tOrV_rs = thr_pv_rs.make_fragment_B(thr_pv_rs.partition_B(sVt_w))
        sP_own = sP0 if w == 0 else sP1
        sP_other = sP1 if w == 0 else sP0
        tOrP_other = thr_pv.make_fragment_A(thr_pv.partition_A(sP_other))

        acc_O, acc_S, O, S, S_coord = self.accumulators(thr_qk, thr_pv, BN)
        # P in bf16: the wgmma A operand of this consumer's own product, and stored (stmatrix) for the other.
        rP = cute.make_rmem_tensor_like(acc_S, BFloat16)
        rP_a = acc_as_frag_a(rP)
        store_atom = cute.make_copy_atom(cute.nvgpu.warp.StMatrix8x8x16bOp(transpose=False, num_matrices=4),
                                         BFloat16)
        thr_store = cute.make_tiled_copy_C(store_atom, mma_qk).get_slice(tid % 128)
        tPsP = thr_store.partition_D(sP_own)
        tPrP = thr_store.retile(rP)
        n_rows = cute.size(S, mode=[0])
        leader = cute.arch.lane_idx() % 4 == 0
        row_max = cute.make_rmem_tensor((n_rows,), Float32)
        row_sum = cute.make_rmem_tensor((n_rows,), Float32)   # over this consumer's own tiles
        row_max.fill(-Float32.inf)
        row_sum.fill(0.0)
        ctx = SimpleNamespace(mOut=mOut, mLse=mLse, mSink=mSink, sO=sO, sBias=sBias, sMax=sMax,
                              full_bar=full_bar, empty_bar=empty_bar, q_bar=q_bar, sched=sched,
                              mma_qk=mma_qk, mma_pv=mma_pv, mma_pv_rs=mma_pv_rs, scale_log2=scale_log2,
                              thr_pv=thr_pv, tSrQ=tSrQ, tSrK=tSrK, tOrV=tOrV, tOrV_rs=tOrV_rs, tOrP_other=tOrP_other,
                              acc_O=acc_O, acc_S=acc_S, O=O, S=S, S_coord=S_coord, rP=rP, rP_a=rP_a,
                              store_atom=store_atom, tPrP=tPrP, tPsP=tPsP, leader=leader, row_max=row_max,
                              row_sum=row_sum)
        if const_expr(self.persistent):
            _, _, n_items = self.persistent_items(mOut.shape[1], mOut.shape[0])
            pair_base = Int32(0)
            q_loads = Int32(0)
            cute.arch.mbarrier_wait(q_bar, 0)
            item = sched.item_of_load[0]
            while item < n_items:
                i_token, i_head_block, _, i_tiles = self.item_coords(mOut.shape[1], mIdx, mTopkLen, item)
                acc_O.fill(0.0)
                row_max.fill(-Float32.inf)
                row_sum.fill(0.0)
                # the row sums of items of alternate parity in separate halves of sSum (see `epilogue`)
                self.consume_item(ctx, sSum[None, None, q_loads % 2], i_token, i_head_block, i_tiles,
                                         pair_base, q_loads, w, tid)
                pair_base = pair_base + (i_tiles + 1) // 2
                q_loads = q_loads + 1
                cute.arch.mbarrier_wait(q_bar, q_loads % 2)      # the next item (or the end) and its Q
                item = sched.item_of_load[q_loads % 2]
        else:
            self.consume_item(ctx, sSum, token, head_block, n_tiles, Int32(0), Int32(0), w, tid)

    @cute.jit
    def consume_item(self, ctx: SimpleNamespace, sSum: cute.Tensor, token: Int32, head_block: Int32,
                            n_tiles: Int32, pair_base: Int32, q_loads: Int32, w: cutlass.Constexpr[int],
                            tid: Int32):
        """One item of `consume` (barrier phases offset by pair_base and q_loads), then its epilogue."""
        mma_qk, mma_pv, mma_pv_rs = ctx.mma_qk, ctx.mma_pv, ctx.mma_pv_rs
        tSrQ, tSrK, tOrV, tOrV_rs, tOrP_other = ctx.tSrQ, ctx.tSrK, ctx.tOrV, ctx.tOrV_rs, ctx.tOrP_other
        acc_O, acc_S, O, S, S_coord = ctx.acc_O, ctx.acc_S, ctx.O, ctx.S, ctx.S_coord
        rP, rP_a, store_atom, tPrP, tPsP = ctx.rP, ctx.rP_a, ctx.store_atom, ctx.tPrP, ctx.tPsP
        row_max, row_sum, leader = ctx.row_max, ctx.row_sum, ctx.leader
        full_bar, empty_bar, sBias, sMax = ctx.full_bar, ctx.empty_bar, ctx.sBias, ctx.sMax
        n_rows = cute.size(S, mode=[0])
        if const_expr(not self.persistent):
            cute.arch.mbarrier_wait(ctx.q_bar, 0)                # (persistent: waited for by the caller)
        n_pairs = (n_tiles + 1) // 2
        if const_expr(w == 0):
            if n_pairs > 0:
                self.seesaw_scores(mma_qk, acc_S, tSrQ, tSrK, full_bar, pair_base % 2, 0, 0)
                self.seesaw_scores(mma_qk, acc_S, tSrQ, tSrK, full_bar, pair_base % 2, 0, 1)
                warpgroup.wait_group(0)
        for j in cutlass.range(n_pairs, unroll=1):
            phase = (pair_base + j) % 2
            if const_expr(w == 1):
                self.seesaw_scores(mma_qk, acc_S, tSrQ, tSrK, full_bar, phase, 1, 1)
                self.seesaw_scores(mma_qk, acc_S, tSrQ, tSrK, full_bar, phase, 1, 0)
                warpgroup.wait_group(0)
                cute.arch.barrier(barrier_id=BAR_SEESAW_MAX + 0, number_of_threads=256)
            self.seesaw_softmax(S, O, S_coord, sBias, sMax, row_max, row_sum, ctx.scale_log2, w, leader)
            rP.store(acc_S.load().to(BFloat16))
            cute.arch.barrier_arrive(barrier_id=BAR_SEESAW_MAX + w, number_of_threads=256)
            wgmma(mma_pv_rs, acc_O, rP_a, tOrV_rs[None, None, None, w], zero_init=False, wait=False)
            if const_expr(w == 0):
                warpgroup.wait_group(0)
                cute.arch.mbarrier_arrive(empty_bar + 0)                  # V_0L: consumer 0 is done with it
                # the pair's max, from consumer 1: move P_0 and O_0 to it
                cute.arch.barrier(barrier_id=BAR_SEESAW_MAX + 1, number_of_threads=256)
                for i in cutlass.range_constexpr(n_rows):
                    factor = move_row_to_max(sMax[S_coord[i, 0][0], 0], i, row_max, row_sum, O)
                    S_row = S[i, None]
                    S_row.store(S_row.load() * factor)
                rP.store(acc_S.load().to(BFloat16))
                cute.copy(store_atom, tPrP, tPsP)
                cute.arch.fence_proxy("async.shared", space="cta")     # st.matrix P -> the other's wgmma
                cute.arch.barrier_arrive(barrier_id=BAR_SEESAW_P + 0, number_of_threads=256)
                cute.arch.barrier(barrier_id=BAR_SEESAW_P + 1, number_of_threads=256)
                wgmma(mma_pv, acc_O, tOrP_other, tOrV[None, None, None, 1], zero_init=False, wait=False)
                if j + 1 < n_pairs:
                    # S of the next pair's tile while P_1 V_1L runs; its L half first (freed earliest)
                    self.seesaw_scores(mma_qk, acc_S, tSrQ, tSrK, full_bar, 1 - phase, 0, 0)
                    warpgroup.wait_group(1)
                    cute.arch.mbarrier_arrive(empty_bar + 2)              # V_1L (and P_1) folded in
                    self.seesaw_scores(mma_qk, acc_S, tSrQ, tSrK, full_bar, 1 - phase, 0, 1)
                    warpgroup.wait_group(0)
                else:
                    warpgroup.wait_group(0)
                    cute.arch.mbarrier_arrive(empty_bar + 2)
            else:
                cute.copy(store_atom, tPrP, tPsP)
                cute.arch.barrier(barrier_id=BAR_SEESAW_P + 0, number_of_threads=256)
                wgmma(mma_pv, acc_O, tOrP_other, tOrV[None, None, None, 0], zero_init=False, wait=False)
                cute.arch.fence_proxy("async.shared", space="cta")     # st.matrix P -> the other's wgmma
                cute.arch.barrier_arrive(barrier_id=BAR_SEESAW_P + 1, number_of_threads=256)
                warpgroup.wait_group(1)
                cute.arch.mbarrier_arrive(empty_bar + 3)                  # V_1R: consumer 1 is done with it
                warpgroup.wait_group(0)
                cute.arch.mbarrier_arrive(empty_bar + 1)                  # V_0R and P_0 folded in

        if const_expr(self.persistent):
            # every S of this item has been waited for: the producer may load the next item's Q
            cute.arch.mbarrier_arrive(ctx.sched.q_empty)
        self.epilogue(ctx.mOut, ctx.mLse, ctx.mSink, ctx.sO, sSum, ctx.thr_pv, acc_O, O, S_coord, row_max, row_sum,
                      token, head_block, w, tid, leader)

    @cute.jit
    def seesaw_scores(self, mma_qk: cute.TiledMma, acc_S: cute.Tensor, tSrQ: cute.Tensor, tSrK: cute.Tensor,
                      full_bar, phase: Int32, stage: cutlass.Constexpr[int], half: cutlass.Constexpr[int]):
        """Issue (and commit, not wait for) the part of S = Q K^T over one column half of a stage's tile,
        once that half has landed. The owner's first half zero-initialises S."""
        k_split = self.half_cols // 16
        k_all = self.D // 16
        cute.arch.mbarrier_wait(full_bar + 2 * stage + half, phase)
        cute.arch.fence_proxy("async.shared", space="cta")   # cp.async data -> wgmma reads
        warpgroup.fence()
        issue_kblocks(mma_qk, acc_S, tSrQ, tSrK[None, None, None, stage],
                      0 if half == 0 else k_split, k_split if half == 0 else k_all, zero_init=half == stage)
        warpgroup.commit_group()

    @cute.jit
    def seesaw_softmax(self, S: cute.Tensor, O: cute.Tensor, S_coord: cute.Tensor, sBias: cute.Tensor,
                       sMax: cute.Tensor, row_max: cute.Tensor, row_sum: cute.Tensor, scale_log2: Float32,
                       w: cutlass.Constexpr[int], leader: Boolean):
        """Softmax of consumer w's own tile (stage w) in place in S (fp32 P), O and the sums moved to the new
        max, which goes to sMax. Consumer 0 continues from its own running max (the last pair's common max);
        consumer 1 from the max consumer 0 just published, so it lands on the pair's max."""
        n_rows = cute.size(S, mode=[0])          # 2 rows per thread
        m_start = cute.make_rmem_tensor((n_rows,), Float32)
        for i in cutlass.range_constexpr(n_rows):
            if const_expr(w == 0):
                m_start[i] = row_max[i]
            else:
                m_start[i] = sMax[S_coord[i, 0][0], 0]
        softmax_own_rows(S, O, S_coord, sBias, w, row_max, row_sum, m_start, scale_log2)
        cute.arch.sync_warp()    # the row's 4 threads have read sMax before its leader overwrites it
        if leader:
            for i in cutlass.range_constexpr(n_rows):
                sMax[S_coord[i, 0][0], 0] = row_max[i]

    @cute.jit
    def epilogue(self, mOut: cute.Tensor, mLse: cute.Tensor, mSink: Optional[cute.Tensor],
                 sO: cute.Tensor, sSum: cute.Tensor, thr_pv: cute.ThrMma, acc_O: cute.Tensor,
                 O: cute.Tensor, S_coord: cute.Tensor, row_max: cute.Tensor, row_sum: cute.Tensor,
                 token: Int32, head_block: Int32, w: Int32, tid: Int32, leader: Boolean):
        BM, H = self.BM, mOut.shape[1]
        n_rows = cute.size(row_max)
        # The full row sum: over this thread's columns, its 4 row-mates, then both consumers.
        for i in cutlass.range_constexpr(n_rows):
            s = row_sum[i]
            s += cute.arch.shuffle_sync_bfly(s, offset=1)
            s += cute.arch.shuffle_sync_bfly(s, offset=2)
            if leader:
                sSum[S_coord[i, 0][0], w] = s
        # Persistent: one barrier here and none after the reads below, so a consumer may reach the next item's
        # epilogue (an item with no tile) while the other still reads these sums: items alternate sSum halves.
        cute.arch.barrier(barrier_id=BAR_EPILOGUE, number_of_threads=256)

        row_inv = cute.make_rmem_tensor((n_rows,), Float32)
        for i in cutlass.range_constexpr(n_rows):
            r = S_coord[i, 0][0]
            head = head_block * BM + r
            total = sSum[r, 0] + sSum[r, 1]
            m_use = row_max[i]
            if m_use == -Float32.inf:
                m_use = Float32(0.0)
            denom = total
            if const_expr(mSink is not None):
                # The sink adds exp(sink) to the denominator only (never to lse).
                denom = denom + cute.math.exp2(mSink[cutlass.min(head, H - 1)] * LOG2_E - m_use,
                                               fastmath=True)
            inv = Float32(0.0)
            lse = Float32.inf
            if total > Float32(0.0):
                inv = Float32(1.0) / denom
                lse = (row_max[i] + cute.math.log2(total, fastmath=True)) * LN_2
            row_inv[i] = inv
            if w == 0 and leader and head < H:
                mLse[token, head] = lse

        if const_expr(self.persistent or self.cfg.direct_store):
            # persistent: Q's smem holds the next item's Q by now, so O goes out from registers
            self.store_rows_direct(mOut, O, row_inv, token, head_block, w, tid)
        else:
            self.store_rows_staged(mOut, sO, thr_pv, acc_O, O, row_inv, token, head_block, w, tid)

    @cute.jit
    def store_rows_staged(self, mOut: cute.Tensor, sO: cute.Tensor, thr_pv: cute.ThrMma, acc_O: cute.Tensor,
                          O: cute.Tensor, row_inv: cute.Tensor, token: Int32, head_block: Int32, w: Int32,
                          tid: Int32):
        """O / denominator -> bf16 -> smem (over dead Q) -> 16-byte coalesced stores of valid heads."""
        BM, H, DV, NW = self.BM, mOut.shape[1], self.DV, self.dv_per_wg
        n_rows = cute.size(row_inv)
        for i in cutlass.range_constexpr(n_rows):
            O_row = O[i, None]
            O_row.store(O_row.load() * row_inv[i])
        out_frag = cute.make_rmem_tensor_like(acc_O, BFloat16)
        out_frag.store(acc_O.load().to(BFloat16))
        sO_w = cute.flat_divide(sO, (BM, NW))[None, None, 0, w]
        cute.autovec_copy(out_frag, thr_pv.partition_C(sO_w))
        cute.arch.barrier(barrier_id=BAR_EPILOGUE, number_of_threads=256)

        copy_16B = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), BFloat16, num_bits_per_copy=128)
        pieces_per_row = DV // 8                     # 64 threads cover one row
        rows_per_pass = 256 // pieces_per_row        # 4 rows per pass
        piece = tid % pieces_per_row
        out_base = mOut.iterator.toint()
        for p in cutlass.range_constexpr(BM // rows_per_pass):
            r = tid // pieces_per_row + rows_per_pass * p
            head = head_block * BM + r
            if head < H:
                src_piece = cute.local_tile(sO[r, None], (8,), (piece,))
                src = cute.make_tensor(src_piece.iterator, cute.make_layout(((8, 1),)))
                dst_addr = out_base + ((Int64(token) * H + Int64(head)) * DV + Int64(piece * 8)) * 2
                dst = cute.make_tensor(
                    cute.make_ptr(BFloat16, dst_addr, cute.AddressSpace.gmem, assumed_align=16),
                    cute.make_layout(((8, 1),)))
                cute.copy(copy_16B, src, dst)

    @cute.jit
    def store_rows_direct(self, mOut: cute.Tensor, O: cute.Tensor, row_inv: cute.Tensor, token: Int32,
                          head_block: Int32, w: Int32, tid: Int32):
        """O / denominator -> bf16 -> global memory straight from the accumulator, in 16-byte pieces.

        In the wgmma accumulator, lane 4g + t of warp v holds rows 16v + g (+ 8) and, for each group k of 8
        columns, columns 8k + 2t and 8k + 2t + 1: one bf16x2 word per (row, k). The 4 lanes of a quad swap
        words in blocks of 4 groups (a 4 x 4 transpose in two butterfly stages, lane xor 1 then xor 2), after
        which lane t holds all 8 columns of group 4m + t: one `st.global.v4` per (row, block), and a warp
        instruction writes 64 contiguous bytes of each of 8 rows."""
        H, DV, NW = mOut.shape[1], self.DV, self.dv_per_wg
        n_rows = cute.size(O, mode=[0])
        n_groups = cute.size(O, mode=[1]) // 2          # 32 groups of 8 columns per row
        lane = tid % 32
        t = lane % 4
        row_base = (tid % 128) // 32 * 16 + lane // 4
        out_base = mOut.iterator.toint()
        for i in cutlass.range_constexpr(n_rows):
            head = head_block * self.BM + row_base + 8 * i
            row_addr = out_base + ((Int64(token) * H + Int64(head)) * DV + Int64(w * NW)) * 2
            for m in cutlass.range_constexpr(n_groups // 4):
                # blocks[d]: the word for lane d before the exchange; the word from lane d after it
                blocks = quad_transpose(
                    [[pack_bf16x2(O[i, 2 * (4 * m + d)] * row_inv[i], O[i, 2 * (4 * m + d) + 1] * row_inv[i])]
                     for d in range(4)], t, 1)
                if head < H:
                    st_global_v4(row_addr + Int64((4 * m + t) * 16), blocks[0][0], blocks[1][0], blocks[2][0],
                                 blocks[3][0])
