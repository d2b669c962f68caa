"""The CuTe-DSL forward for few heads (H <= 32): the keys in the M dimension of the products (SM90, bf16).

Why (read this first)
---------------------
The main kernel (sparse_attention_fwd_kernel.py) stacks 64 heads in the wgmma M dimension, so at H = 16 three
quarters of each product is padding: H = 16 took 1.81 ms where H = 64 took 1.99 ms (T = 4096, K = 2048,
D = 576, H100, BENCHMARKS.md session 17). Here the 64 gathered keys of a tile are the M dimension and the
heads the N dimension (N = 16 or 32, covering H):

    S^T [64 keys, N]  = K_tile [64, D] . Q^T               wgmma 64 x N x D, both operands from smem
    P^T               = 2^(S^T - m), m the running max of each head (column)
    O^T [d_v, N]     += V_tile^T [d_v, 64] . P^T [64, N]   wgmma (8 x 64) x N x 64: V read MN-major from the
                                                           same smem tile, P^T through smem

so no product does more than N's rounding of padded work, and the gather (each query still needs its own K
rows of D bf16) is what is left to bound the kernel.

How one CTA works
-----------------
One CTA per (query token, block of N heads); three warpgroups. WG0 is the main kernel's producer, unchanged
(`produce`): Q's N rows, then the kv tiles in pairs, tile 2j into stage 0 and 2j + 1 into stage 1, each stage
in two column halves with their own barriers. The two consumers split the keys, not the output: consumer w
takes the tiles of stage w (and an all-masked one when the count is odd) and keeps its own O^T (d_v x N fp32:
64 registers per thread at N = 16), running max and running sum per head. So they never wait for each other
inside the tile loop, and while one does its softmax, the other's products run. Per tile, consumer w:

    waits for both halves of stage w -> S^T -> its warps' maxima per head (shuffles over the 16 keys a warp
    holds, then the four warps' through smem and a barrier of the warpgroup) -> P = 2^(s - m), O^T and the
    running sums moved to the new max -> P^T (bf16) to smem, fenced, a barrier of the warpgroup ->
    O^T += V^T P^T -> frees stage w.

At the end consumer 1 hands (O^T, m, l) to consumer 0 through the freed kv smem (thread i of one consumer holds
exactly the (d_v, head) values of thread i of the other), and consumer 0 merges the two partial softmaxes, adds
the sink, writes the lse and stores O through smem as 16-byte pieces of rows.

Invalid keys get a -inf bias from the producer (zero-filled rows), as in the main kernel; a head with no valid
key keeps m = -inf and l = 0: out = 0, lse = +inf.
"""
from typing import Optional

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import BFloat16, Float32, Int32, Int64, const_expr
from cutlass.cute.nvgpu import warpgroup
from cutlass.memory import SmemAllocator
from cutlass.tensor_utils import LayoutEnum

from csrc_dsl.cute.sm90.sparse_attention_fwd import KEYS_IN_M_HEADS
from csrc_dsl.cute.sm90.sparse_attention_fwd_kernel import (LN_2, LOG2_E, SparseAttentionFwdSm90, rows_cols_view,
                                                            wgmma)

# Named barriers (0 is __syncthreads)
BAR_OUT = 1         # within consumer 0 (128 threads): the output rows are in smem
BAR_MERGE = 3       # both consumers (256 threads): consumer 1's O^T, max and sum are in smem
BAR_MAX = 4         # 4 + w, within consumer w: its four warps' maxima (or, at the end, sums) are in smem
BAR_P = 6           # 6 + w, within consumer w: its P^T is in smem


class SparseAttentionFwdKeysInMSm90(SparseAttentionFwdSm90):
    """`FwdConfig.keys_in_m` = N fixes the heads per CTA; the producer and the work items are the main kernel's."""

    def __init__(self, config):
        super().__init__(config)
        if config.keys_in_m not in KEYS_IN_M_HEADS:
            raise ValueError(f"keys_in_m must be one of {KEYS_IN_M_HEADS}, got {config.keys_in_m}")
        if config.persistent:
            raise ValueError("keys_in_m runs one CTA per (token, head block): persistent is not implemented")
        self.N = config.keys_in_m
        self.BM = self.N            # heads per CTA: the producer loads N rows of Q, `item_coords` counts blocks

    # -------------------------------------------------------------------------------------------
    # Host side
    # -------------------------------------------------------------------------------------------
    @cute.jit
    def __call__(self, mQ: cute.Tensor, mKV: cute.Tensor, mIdx: cute.Tensor, mOut: cute.Tensor,
                 mLse: cute.Tensor, mSink: Optional[cute.Tensor], mTopkLen: Optional[cute.Tensor],
                 mItemCounter: Optional[cute.Tensor], scale_log2: Float32, max_ctas: Int32, stream: cuda.CUstream):
        N, BN, D = self.N, self.BN, self.D
        # K-major, 128-byte-swizzled smem tiles (rows of 64 bf16), as in the main kernel; P^T is N rows of 64 keys.
        atom = warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, BFloat16, 64), BFloat16)
        sQ_layout = cute.tile_to_shape(atom, (N, D), order=(0, 1))
        sKV_layout = cute.tile_to_shape(atom, (BN, D, self.stages), order=(0, 1, 2))
        sPt_layout = cute.tile_to_shape(atom, (N, BN, 2), order=(0, 1, 2))
        # S^T = K Q^T: the kv tile is A (keys x D), Q is B (heads x D), both K-major.
        mma_s = sm90_utils.make_trivial_tiled_mma(
            BFloat16, BFloat16, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.K,
            Float32, (1, 1, 1), (BN, N))
        # O^T += V^T P^T: V^T (d_v x keys) is the kv tile read MN-major; P^T (heads x keys) is K-major.
        mma_o = sm90_utils.make_trivial_tiled_mma(
            BFloat16, BFloat16, cute.nvgpu.OperandMajorMode.MN, cute.nvgpu.OperandMajorMode.K,
            Float32, (1, 1, 1), (64, N))

        @cute.struct
        class SharedStorage:
            full_bar: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
            empty_bar: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
            q_bar: cute.struct.MemRange[cutlass.Int64, 1]
            bias: cute.struct.MemRange[Float32, BN * self.stages]   # 0 or -inf per kv row and stage
            part: cute.struct.MemRange[Float32, 2 * 4 * N]           # per consumer, warp and head: max, or sum
            merge_ml: cute.struct.MemRange[Float32, 2 * N]           # consumer 1's final max and sum per head
            sQ: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sQ_layout)], 1024]
            sKV: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sKV_layout)], 1024]
            sPt: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sPt_layout)], 1024]

        self.shared_storage = SharedStorage
        head_blocks = (mQ.shape[1] + N - 1) // N
        self.kernel(mQ, mKV, mIdx, mOut, mLse, mSink, mTopkLen, scale_log2,
                    sQ_layout, sKV_layout, sPt_layout, mma_s, mma_o).launch(
            grid=[mQ.shape[0] * head_blocks, 1, 1], block=[self.num_threads, 1, 1], stream=stream,
            min_blocks_per_mp=1)

    # -------------------------------------------------------------------------------------------
    # Device side
    # -------------------------------------------------------------------------------------------
    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mKV: cute.Tensor, mIdx: cute.Tensor, mOut: cute.Tensor,
               mLse: cute.Tensor, mSink: Optional[cute.Tensor], mTopkLen: Optional[cute.Tensor],
               scale_log2: Float32, sQ_layout: cute.ComposedLayout, sKV_layout: cute.ComposedLayout,
               sPt_layout: cute.ComposedLayout, mma_s: cute.TiledMma, mma_o: cute.TiledMma):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg_idx = warp_idx // 4

        smem = SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        full_bar = storage.full_bar.data_ptr()
        empty_bar = storage.empty_bar.data_ptr()
        q_bar = storage.q_bar.data_ptr()
        if warp_idx == 0:
            with cute.arch.elect_one():
                self.init_stage_barriers(full_bar, empty_bar)    # consumer s frees both halves of stage s
                cute.arch.mbarrier_init(q_bar, 128)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sKV = storage.sKV.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        sPt = storage.sPt.get_tensor(sPt_layout.outer, swizzle=sPt_layout.inner)   # (N, 64, consumer)
        sBias = storage.bias.get_tensor(cute.make_layout((self.BN, self.stages)))
        sPart = storage.part.get_tensor(cute.make_layout((4, self.N, 2)))          # (warp, head, consumer)
        sML = storage.merge_ml.get_tensor(cute.make_layout((self.N, 2)))           # (head, max | sum)
        token, head_block, k_valid, n_tiles = self.item_coords(mQ.shape[1], mIdx, mTopkLen, bidx)

        if wg_idx == 0:
            cute.arch.setmaxregister_decrease(self.producer_regs)
            self.produce(mQ, mKV, mIdx, mTopkLen, sQ, sKV, sBias, full_bar, empty_bar, q_bar, None,
                         token, head_block, k_valid, n_tiles, tidx)
        else:
            cute.arch.setmaxregister_increase(self.consumer_regs)
            if wg_idx == 1:
                self.consume_keys(mOut, mLse, mSink, sQ, sKV, sPt, sBias, sPart, sML, storage, full_bar, empty_bar,
                                  q_bar, mma_s, mma_o, scale_log2, token, head_block, n_tiles, 0, tidx - 128)
            else:
                self.consume_keys(mOut, mLse, mSink, sQ, sKV, sPt, sBias, sPart, sML, storage, full_bar, empty_bar,
                                  q_bar, mma_s, mma_o, scale_log2, token, head_block, n_tiles, 1, tidx - 256)

    @cute.jit
    def warpgroup_column_reduce(self, values: cute.Tensor, S_coord: cute.Tensor, sPart: cute.Tensor,
                                w: cutlass.Constexpr[int], take_max: cutlass.Constexpr[bool], tid: Int32):
        """values[j] (this thread's partial for column j, i.e. head S_coord[0, j][1]) -> the max or the sum over
        the warpgroup's 64 rows (keys), in place: over the 8 lane groups of the warp by shuffles, then over the
        four warps through smem. Ends on a barrier of the warpgroup, after which sPart may be written again
        only once every warp has read it (the callers' next barrier sees to that)."""
        lane = tid % 32
        warp = tid // 32
        for j in cutlass.range_constexpr(cute.size(values)):
            v = values[j]
            for offset in (4, 8, 16):
                other = cute.arch.shuffle_sync_bfly(v, offset=offset)
                if const_expr(take_max):
                    v = cute.arch.fmax(v, other)
                else:
                    v = v + other
            values[j] = v
        if lane < 4:
            for j in cutlass.range_constexpr(cute.size(values)):
                sPart[warp, S_coord[0, j][1], w] = values[j]
        cute.arch.barrier(barrier_id=BAR_MAX + w, number_of_threads=128)
        for j in cutlass.range_constexpr(cute.size(values)):
            head = S_coord[0, j][1]
            v = sPart[0, head, w]
            for other_warp in cutlass.range_constexpr(1, 4):
                if const_expr(take_max):
                    v = cute.arch.fmax(v, sPart[other_warp, head, w])
                else:
                    v = v + sPart[other_warp, head, w]
            values[j] = v

    @cute.jit
    def consume_keys(self, mOut: cute.Tensor, mLse: cute.Tensor, mSink: Optional[cute.Tensor], sQ: cute.Tensor,
                     sKV: cute.Tensor, sPt: cute.Tensor, sBias: cute.Tensor, sPart: cute.Tensor, sML: cute.Tensor,
                     storage, full_bar, empty_bar, q_bar, mma_s: cute.TiledMma, mma_o: cute.TiledMma,
                     scale_log2: Float32, token: Int32, head_block: Int32, n_tiles: Int32,
                     w: cutlass.Constexpr[int], tid: Int32):
        """Consumer w: the tiles of stage w, its own online softmax; then the merge (module docstring)."""
        N, BN, D, DV = self.N, self.BN, self.D, self.DV
        thr_s = mma_s.get_slice(tid)
        thr_o = mma_o.get_slice(tid)
        tSrK = thr_s.make_fragment_A(thr_s.partition_A(sKV))                      # by stage
        tSrQ = thr_s.make_fragment_B(thr_s.partition_B(sQ))
        # V^T: the first d_v columns of each kv stage seen as (dv, key), MN-major
        sVt = cute.composition(sKV, cute.make_layout((DV, BN, self.stages), stride=(BN, 1, BN * D)))
        tOrV = thr_o.make_fragment_A(thr_o.partition_A(sVt))                      # by stage
        sPt_w = sPt[None, None, w]
        tOrP = thr_o.make_fragment_B(thr_o.partition_B(sPt_w))

        acc_S = cute.make_rmem_tensor(thr_s.partition_shape_C((BN, N)), Float32)
        acc_O = cute.make_rmem_tensor(thr_o.partition_shape_C((DV, N)), Float32)
        acc_O.fill(0.0)
        S = rows_cols_view(acc_S)                                                  # (2 keys, N / 4 heads)
        S_coord = rows_cols_view(thr_s.partition_C(cute.make_identity_tensor((BN, N))))
        O = rows_cols_view(acc_O)                                                  # (16 dv, the same heads)
        O_coord = rows_cols_view(thr_o.partition_C(cute.make_identity_tensor((DV, N))))
        n_rows = cute.size(S, mode=[0])
        n_cols = cute.size(S, mode=[1])
        n_out_rows = cute.size(O, mode=[0])

        row_max = cute.make_rmem_tensor((n_cols,), Float32)    # per head (column), common to the warpgroup
        row_sum = cute.make_rmem_tensor((n_cols,), Float32)    # per head, over this thread's keys only
        col = cute.make_rmem_tensor((n_cols,), Float32)
        row_max.fill(-Float32.inf)
        row_sum.fill(0.0)

        cute.arch.mbarrier_wait(q_bar, 0)
        for k in cutlass.range((n_tiles + 1) // 2, unroll=1):   # tile 2k + w, in stage w
            phase = k % 2
            cute.arch.mbarrier_wait(full_bar + 2 * w, phase)
            cute.arch.mbarrier_wait(full_bar + 2 * w + 1, phase)
            cute.arch.fence_proxy("async.shared", space="cta")   # cp.async data -> wgmma reads
            wgmma(mma_s, acc_S, tSrK[None, None, None, w], tSrQ, zero_init=True)

            # scores in log2 units plus the key's bias (0 or -inf); this tile's max per head
            for j in cutlass.range_constexpr(n_cols):
                m = -Float32.inf
                for i in cutlass.range_constexpr(n_rows):
                    s = S[i, j] * scale_log2 + sBias[S_coord[i, 0][0], w]
                    S[i, j] = s
                    m = cute.arch.fmax(m, s)
                col[j] = m
            self.warpgroup_column_reduce(col, S_coord, sPart, w, True, tid)

            for j in cutlass.range_constexpr(n_cols):
                m_new = cute.arch.fmax(row_max[j], col[j])
                m_use = m_new
                if m_new == -Float32.inf:
                    m_use = Float32(0.0)
                alpha = cute.math.exp2(row_max[j] - m_use, fastmath=True)
                row_max[j] = m_new
                total = Float32(0.0)
                for i in cutlass.range_constexpr(n_rows):
                    p = cute.math.exp2(S[i, j] - m_use, fastmath=True)
                    S[i, j] = p
                    total += p
                    sPt_w[S_coord[i, j][1], S_coord[i, j][0]] = BFloat16(p)
                row_sum[j] = row_sum[j] * alpha + total
                for r in cutlass.range_constexpr(n_out_rows):
                    O[r, j] = O[r, j] * alpha
            cute.arch.fence_proxy("async.shared", space="cta")   # st.shared P^T -> wgmma reads
            cute.arch.barrier(barrier_id=BAR_P + w, number_of_threads=128)
            wgmma(mma_o, acc_O, tOrV[None, None, None, w], tOrP, zero_init=False)
            cute.arch.mbarrier_arrive(empty_bar + 2 * w)
            cute.arch.mbarrier_arrive(empty_bar + 2 * w + 1)

        # The warpgroup's sum per head. (Every warp read the last tile's maxima from sPart before the P barrier.)
        self.warpgroup_column_reduce(row_sum, S_coord, sPart, w, False, tid)

        # Consumer 1's O^T goes into the second kv stage, whose last tile it has consumed, as [value, thread].
        stage_elems = BN * D
        merge_ptr = cute.recast_ptr(storage.sKV.data_ptr() + stage_elems, dtype=Float32)
        sMerge = cute.make_tensor(merge_ptr, cute.make_layout((n_out_rows, n_cols, 128),
                                                              stride=(n_cols * 128, 128, 1)))
        if const_expr(w == 1):
            for r in cutlass.range_constexpr(n_out_rows):
                for j in cutlass.range_constexpr(n_cols):
                    sMerge[r, j, tid] = O[r, j]
            if tid < 4:     # warp 0's lanes 0-3 hold every head once
                for j in cutlass.range_constexpr(n_cols):
                    sML[S_coord[0, j][1], 0] = row_max[j]
                    sML[S_coord[0, j][1], 1] = row_sum[j]
            cute.arch.barrier_arrive(barrier_id=BAR_MERGE, number_of_threads=256)
        else:
            cute.arch.barrier(barrier_id=BAR_MERGE, number_of_threads=256)
            H = mOut.shape[1]
            f_own = cute.make_rmem_tensor((n_cols,), Float32)
            f_other = cute.make_rmem_tensor((n_cols,), Float32)
            for j in cutlass.range_constexpr(n_cols):
                head_in_block = S_coord[0, j][1]
                head = head_block * N + head_in_block
                m_other = sML[head_in_block, 0]
                m = cute.arch.fmax(row_max[j], m_other)
                m_use = m
                if m == -Float32.inf:
                    m_use = Float32(0.0)
                own = cute.math.exp2(row_max[j] - m_use, fastmath=True)
                other = cute.math.exp2(m_other - m_use, fastmath=True)
                total = row_sum[j] * own + sML[head_in_block, 1] * other
                denom = total
                if const_expr(mSink is not None):
                    # the sink adds exp(sink) to the denominator only (never to lse)
                    denom = denom + cute.math.exp2(mSink[cutlass.min(head, H - 1)] * LOG2_E - m_use, fastmath=True)
                inv = Float32(0.0)
                lse = Float32.inf
                if total > Float32(0.0):
                    inv = Float32(1.0) / denom
                    lse = (m + cute.math.log2(total, fastmath=True)) * LN_2
                f_own[j] = own * inv
                f_other[j] = other * inv
                if tid < 4 and head < H:
                    mLse[token, head] = lse

            # O rows (bf16) into the first kv stage, each head's row padded by 8 values against bank conflicts
            row_stride = DV + 8
            sOut = cute.make_tensor(storage.sKV.data_ptr(), cute.make_layout((N, DV), stride=(row_stride, 1)))
            for r in cutlass.range_constexpr(n_out_rows):
                for j in cutlass.range_constexpr(n_cols):
                    value = O[r, j] * f_own[j] + sMerge[r, j, tid] * f_other[j]
                    sOut[O_coord[r, j][1], O_coord[r, j][0]] = BFloat16(value)
            cute.arch.barrier(barrier_id=BAR_OUT, number_of_threads=128)

            copy_16B = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), BFloat16, num_bits_per_copy=128)
            pieces_per_row = DV // 8                     # 64 threads cover one row
            rows_per_pass = 128 // pieces_per_row        # 2 rows per pass
            piece = tid % pieces_per_row
            out_base = mOut.iterator.toint()
            for p in cutlass.range_constexpr(N // rows_per_pass):
                r = tid // pieces_per_row + rows_per_pass * p
                head = head_block * N + r
                if head < H:
                    src_addr = sOut.iterator.toint() + (r * row_stride + piece * 8) * 2   # 16-byte aligned
                    src = cute.make_tensor(cute.make_ptr(BFloat16, src_addr, cute.AddressSpace.smem, assumed_align=16),
                                           cute.make_layout(((8, 1),)))
                    dst_addr = out_base + ((Int64(token) * H + Int64(head)) * DV + Int64(piece * 8)) * 2
                    dst = cute.make_tensor(
                        cute.make_ptr(BFloat16, dst_addr, cute.AddressSpace.gmem, assumed_align=16),
                        cute.make_layout(((8, 1),)))
                    cute.copy(copy_16B, src, dst)
