"""The CuTe-DSL kernel behind `sparse_attn_score.sparse_attn_score` and `.dense_attn_score` (SM90, bf16).

    raw[t, j] = sum_h exp2(scale_log2 * q[t,h] . kv[indices[t,j]] - L2[t,h])     (0 on invalid slots)

How one CTA works
-----------------
One CTA per query token, for all of its heads (up to 128): the gathered kv rows are read from global memory once
per token, where the forward's 64-head CTAs read them twice at H = 128. No output accumulator is kept (the score
op has no P V product), so registers can hold Q instead.

Three warpgroups of 128 threads:

  WG0, producer: cp.async (LDGSTS) gathers, as in the forward: first Q (128 x D; heads past H zero-filled),
       then per tile of BN top-k slots the BN kv rows named by `indices`; invalid slots (id < 0, id >= S,
       slot >= topk_length) are zero-filled and their id is stored as -1.
  WG1, WG2, consumers c = 0, 1: heads [64c, 64c + 64) of the token.
       S_c = Q_c K^T            wgmma 64 x BN over D;
       P_c = exp2(S_c * scale_log2 - L2) (0 on invalid keys and padding heads, whose L2 is +inf);
       the column sums of P_c (over the consumer's 64 heads): within a thread (its 2 rows), across the 8
       lanes that hold the same columns (shuffles), then across the 4 warps and the 2 consumers through a small
       shared buffer; consumer 0 adds the 8 partial sums of each key and stores them.
The kv stage is released as soon as both consumers' S wgmma has completed (it is their only reader).

Alternate tiles (ScoreConfig.alternate_tiles, for H <= 64): both consumers hold heads [0, 64) and take every
other tile, so one's exponentials overlap the other's products; each sums its own 4 warps' partials. Without it,
a consumer whose 64 heads are all padding skips its products and exponentials.

Dense mode (ScoreConfig.dense, for dense_attn_score): `indices` is [T, 1], the first kv row of the token's
batch; slot j names kv row base + j, and topk_length is the token's count of ratio-causally visible keys.

Two layouts (ScoreConfig.q_in_registers):
  - False: BN = 32, two kv stages (72 KB at D = 576) next to Q in shared memory (144 KB). The S wgmma reads
    both operands from shared memory; at N = 32 that is 3 KB per 16 tensor-core cycles, more than shared
    memory's 128 bytes per cycle, so it, not the tensor cores, sets the pace.
  - True (default): each consumer copies its Q rows into registers once (the wgmma A operand, 144 registers at
    D = 576); the S wgmma then reads only the kv tile from shared memory. Q's 144 KB are then free, so they
    are the last two of three kv stages of BN = 64 rows: Q sits at the end of the kv buffer, tile 0 goes to
    stage 0 (outside Q) and the producer fills stages 1 and 2 only after both consumers have taken their Q
    (barrier `q_free`).

Synchronisation per tile: one named barrier between the consumers (256 threads) publishes the partial column
sums of tile t in buffer t % 2. The sums of tile t + 2 go to the same buffer only after barrier t + 1, which
the storing threads pass after they have read tile t's sums.
"""
import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import BFloat16, Float32, Int32, Int64, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.memory import SmemAllocator
from cutlass.tensor_utils import LayoutEnum

from csrc_dsl.cute.sm90.sparse_attention_fwd_kernel import copy_row, rows_cols_view, wgmma

HEADS_PER_CONSUMER = 64   # wgmma M
CONSUMERS = 2
BAR_SUMS_READY = 1        # named barrier between the two consumer warpgroups (alternate tiles: 1 + consumer)


class SparseAttnScoreSm90:
    """One compiled variant: `ScoreConfig` fixes D and the tiles; T, H (<= 128), S and K are runtime values."""

    def __init__(self, config):
        expected = (64, 3) if config.q_in_registers else (32, 2)
        if (config.block_n, config.num_stages) != expected:
            raise ValueError(f"q_in_registers={config.q_in_registers} is written for (block_n, stages) = {expected}")
        if config.head_dim % 64 != 0:
            raise ValueError(f"unsupported head dim D={config.head_dim}")
        self.cfg = config
        self.D = config.head_dim
        self.BM = HEADS_PER_CONSUMER * CONSUMERS     # heads per CTA
        self.BN = config.block_n
        self.stages = config.num_stages
        self.num_threads = (1 + CONSUMERS) * 128
        self.q_in_registers = config.q_in_registers
        self.dense = config.dense
        self.alternate = config.alternate_tiles

    # -------------------------------------------------------------------------------------------
    # Host side
    # -------------------------------------------------------------------------------------------
    @cute.jit
    def __call__(self, mQ: cute.Tensor, mKV: cute.Tensor, mIdx: cute.Tensor, mL2: cute.Tensor,
                 mTopkLen: cute.Tensor, mRaw: cute.Tensor, scale_log2: Float32, stream: cuda.CUstream):
        BM, BN, D = self.BM, self.BN, self.D
        atom = warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, BFloat16, 64), BFloat16)
        sQ_layout = cute.tile_to_shape(atom, (BM, D), order=(0, 1))
        sKV_layout = cute.tile_to_shape(atom, (BN, D, self.stages), order=(0, 1, 2))
        # S_c = Q_c K^T: K-major operands; Q from registers or shared memory.
        a_source = warpgroup.OperandSource.RMEM if self.q_in_registers else warpgroup.OperandSource.SMEM
        mma_qk = sm90_utils.make_trivial_tiled_mma(
            BFloat16, BFloat16, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.K,
            Float32, (1, 1, 1), (HEADS_PER_CONSUMER, BN), a_source)
        # Q in registers: Q is staged in the last stages of the kv buffer (see the module docstring)
        q_elems = 0 if self.q_in_registers else cute.cosize(sQ_layout)

        @cute.struct
        class SharedStorage:
            full_bar: cute.struct.MemRange[cutlass.Int64, self.stages]
            empty_bar: cute.struct.MemRange[cutlass.Int64, self.stages]
            q_bar: cute.struct.MemRange[cutlass.Int64, 1]
            q_free_bar: cute.struct.MemRange[cutlass.Int64, 1]
            ids: cute.struct.MemRange[Int32, BN * self.stages]               # kv id per slot, -1 invalid
            sums: cute.struct.MemRange[Float32, CONSUMERS * 4 * BN * 2]      # (consumer, warp, key, buffer)
            sQ: cute.struct.Align[cute.struct.MemRange[BFloat16, max(q_elems, 1)], 1024]
            sKV: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sKV_layout)], 1024]

        self.shared_storage = SharedStorage
        self.smem_bytes = SharedStorage.size_in_bytes()
        if const_expr(self.q_in_registers and cute.cosize(sQ_layout) > cute.cosize(sKV_layout)):
            raise ValueError("Q does not fit in the kv stages")
        self.kernel(mQ, mKV, mIdx, mL2, mTopkLen, mRaw, scale_log2, sQ_layout, sKV_layout, mma_qk).launch(
            grid=[mQ.shape[0], 1, 1], block=[self.num_threads, 1, 1], stream=stream, min_blocks_per_mp=1)

    # -------------------------------------------------------------------------------------------
    # Device side
    # -------------------------------------------------------------------------------------------
    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mKV: cute.Tensor, mIdx: cute.Tensor, mL2: cute.Tensor,
               mTopkLen: cute.Tensor, mRaw: cute.Tensor, scale_log2: Float32,
               sQ_layout: cute.ComposedLayout, sKV_layout: cute.ComposedLayout, mma_qk: cute.TiledMma):
        tidx, _, _ = cute.arch.thread_idx()
        token, _, _ = cute.arch.block_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg_idx = warp_idx // 4

        smem = SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        full_bar = storage.full_bar.data_ptr()
        empty_bar = storage.empty_bar.data_ptr()
        q_bar = storage.q_bar.data_ptr()
        q_free_bar = storage.q_free_bar.data_ptr()
        if warp_idx == 0:
            with cute.arch.elect_one():
                for s in cutlass.range_constexpr(self.stages):
                    cute.arch.mbarrier_init(full_bar + s, 256)    # 128 cp.async + 128 id-write arrivals
                    # every thread of the consumer(s) that read the stage
                    cute.arch.mbarrier_init(empty_bar + s, 128 if const_expr(self.alternate) else 256)
                cute.arch.mbarrier_init(q_bar, 128)
                cute.arch.mbarrier_init(q_free_bar, 256)          # every consumer thread, once
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        sKV = storage.sKV.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        if const_expr(self.q_in_registers):
            # Q over the last stages of the kv buffer (1024-byte aligned: a multiple of 64 rows of D columns)
            q_offset = cute.cosize(sKV_layout) - cute.cosize(sQ_layout)
            q_ptr = cute.recast_ptr(storage.sKV.data_ptr() + q_offset, sQ_layout.inner, dtype=BFloat16)
            sQ = cute.make_tensor(q_ptr, sQ_layout.outer)
        else:
            sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sIds = storage.ids.get_tensor(cute.make_layout((self.BN, self.stages)))
        sSums = storage.sums.get_tensor(cute.make_layout((CONSUMERS * 4, self.BN, 2)))

        k_valid = cutlass.min(mRaw.shape[1], cutlass.max(mTopkLen[token], 0))
        n_tiles = (k_valid + self.BN - 1) // self.BN

        if wg_idx == 0:
            cute.arch.setmaxregister_decrease(self.cfg.producer_regs)
            self.produce(mQ, mKV, mIdx, sQ, sKV, sIds, full_bar, empty_bar, q_bar, q_free_bar, token, k_valid,
                         n_tiles, tidx)
        elif wg_idx == 1:
            cute.arch.setmaxregister_increase(self.cfg.consumer_regs)
            self.consume(mL2, mRaw, sQ, sKV, sIds, sSums, full_bar, empty_bar, q_bar, q_free_bar, mma_qk,
                         scale_log2, token, n_tiles, tidx % 128, 0)
        else:
            cute.arch.setmaxregister_increase(self.cfg.consumer_regs)
            self.consume(mL2, mRaw, sQ, sKV, sIds, sSums, full_bar, empty_bar, q_bar, q_free_bar, mma_qk,
                         scale_log2, token, n_tiles, tidx % 128, 1)

    # ---- producer: cp.async gathers ------------------------------------------------------------
    @cute.jit
    def produce(self, mQ: cute.Tensor, mKV: cute.Tensor, mIdx: cute.Tensor, sQ: cute.Tensor, sKV: cute.Tensor,
                sIds: cute.Tensor, full_bar, empty_bar, q_bar, q_free_bar, token: Int32, k_valid: Int32,
                n_tiles: Int32, tidx: Int32):
        D, H = self.D, mQ.shape[1]
        copy_16B = cute.make_copy_atom(
            cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), BFloat16, num_bits_per_copy=128)
        # 8 threads per row, each moving 16-byte pieces 128 bytes apart; 16 rows per pass.
        row_in_pass = tidx // 8
        piece = tidx % 8
        row_bytes = D * 2

        q_base = mQ.iterator.toint()
        for p in cutlass.range_constexpr(self.BM // 16):
            head = row_in_pass + 16 * p
            valid = head < H
            src_row = q_base + (Int64(token) * H + Int64(head if valid else 0)) * row_bytes
            copy_row(copy_16B, src_row, sQ[head, None], D, piece, valid)
        cute.arch.cp_async_mbarrier_arrive_noinc(q_bar)

        kv_rows = mKV.shape[0]
        kv_base = mKV.iterator.toint()
        passes = self.BN // 16
        for it in cutlass.range(n_tiles, unroll=1):
            stage = it % self.stages
            phase = (it // self.stages) % 2
            cute.arch.mbarrier_wait(empty_bar + stage, phase ^ 1)
            if const_expr(self.q_in_registers):
                if it == 1:
                    cute.arch.mbarrier_wait(q_free_bar, 0)     # stages 1 and 2 hold Q until it is in registers
            for p in cutlass.range_constexpr(passes):
                r = row_in_pass + 16 * p
                slot = it * self.BN + r
                kv_id = Int32(-1)
                if slot < k_valid:
                    if const_expr(self.dense):
                        kv_id = mIdx[token, 0] + slot          # the token's batch row base, then key `slot`
                    else:
                        kv_id = mIdx[token, slot]
                valid = kv_id >= 0 and kv_id < kv_rows
                src_row = kv_base + Int64(kv_id if valid else 0) * row_bytes
                copy_row(copy_16B, src_row, sKV[r, None, stage], D, piece, valid)
                if piece == 0:
                    sIds[r, stage] = kv_id if valid else Int32(-1)
            cute.arch.cp_async_mbarrier_arrive_noinc(full_bar + stage)
            cute.arch.mbarrier_arrive(full_bar + stage)

    # ---- consumers: S, P, column sums -------------------------------------------------------------
    @cute.jit
    def consume(self, mL2: cute.Tensor, mRaw: cute.Tensor, sQ: cute.Tensor, sKV: cute.Tensor, sIds: cute.Tensor,
                sSums: cute.Tensor, full_bar, empty_bar, q_bar, q_free_bar, mma_qk: cute.TiledMma,
                scale_log2: Float32, token: Int32, n_tiles: Int32, tid: Int32, c: cutlass.Constexpr[int]):
        BN, H = self.BN, mL2.shape[1]
        thr = mma_qk.get_slice(tid)
        # heads [64c, 64c + 64), or (alternate tiles) heads [0, 64) for both consumers
        sQ_c = cute.flat_divide(sQ, (HEADS_PER_CONSUMER, self.D))[None, None, 0 if self.alternate else c, 0]
        tSsQ = thr.partition_A(sQ_c)
        tSrQ = thr.make_fragment_A(tSsQ)      # registers (q_in_registers) or smem descriptors
        tSrK = thr.make_fragment_B(thr.partition_B(sKV))                             # (32, D, stage)
        acc_S = cute.make_rmem_tensor(thr.partition_shape_C((HEADS_PER_CONSUMER, BN)), Float32)
        S = rows_cols_view(acc_S)
        S_coord = rows_cols_view(thr.partition_C(cute.make_identity_tensor((HEADS_PER_CONSUMER, BN))))
        n_rows = cute.size(S, mode=[0])
        n_cols = cute.size(S, mode=[1])

        # L2 of this thread's heads (padding heads: +inf, so their P is 0).
        row_l2 = cute.make_rmem_tensor((n_rows,), Float32)
        for i in cutlass.range_constexpr(n_rows):
            head = (0 if self.alternate else c * HEADS_PER_CONSUMER) + S_coord[i, 0][0]
            value = Float32.inf
            if head < H:
                value = mL2[token, head]
            row_l2[i] = value

        lane = tid % 32
        warp = tid // 32
        col_sums = cute.make_rmem_tensor((n_cols,), Float32)
        cute.arch.mbarrier_wait(q_bar, 0)
        if const_expr(self.q_in_registers):
            cute.autovec_copy(tSsQ, tSrQ)             # Q_c into the wgmma A fragment, once
            cute.arch.mbarrier_arrive(q_free_bar)     # its shared memory may now take kv rows
        # A consumer whose 64 heads are all padding (H <= 64: consumer 1) skips its products and exponentials,
        # leaving the SM's tensor cores and MUFU to the other one; it still keeps the barriers' counts.
        has_heads = (0 if self.alternate else c * HEADS_PER_CONSUMER) < H
        # Alternate tiles: consumer c takes tiles c, c + 2, ...; else both take every tile.
        first, step = (c, 2) if self.alternate else (0, 1)
        for n in cutlass.range((n_tiles - first + step - 1) // step, unroll=1):
            it = first + step * n
            stage = it % self.stages
            phase = (it // self.stages) % 2
            cute.arch.mbarrier_wait(full_bar + stage, phase)
            for j in cutlass.range_constexpr(n_cols):
                col_sums[j] = Float32(0.0)
            if has_heads:
                cute.arch.fence_proxy("async.shared", space="cta")   # cp.async data -> wgmma reads
                wgmma(mma_qk, acc_S, tSrQ, tSrK[None, None, None, stage], zero_init=True)
                # S is in registers; the stage is released after this thread has read its ids below.
                for j in cutlass.range_constexpr(n_cols):
                    key_ok = sIds[S_coord[0, j][1], stage] >= 0
                    total = Float32(0.0)
                    for i in cutlass.range_constexpr(n_rows):
                        p = cute.math.exp2(S[i, j] * scale_log2 - row_l2[i], fastmath=True)
                        total = total + p
                    col_sums[j] = total if key_ok else Float32(0.0)
            cute.arch.mbarrier_arrive(empty_bar + stage)
            # lanes 4g + q (g = 0..7) hold the same columns: sum over g
            for j in cutlass.range_constexpr(n_cols):
                v = col_sums[j]
                v = v + cute.arch.shuffle_sync_bfly(v, offset=4)
                v = v + cute.arch.shuffle_sync_bfly(v, offset=8)
                v = v + cute.arch.shuffle_sync_bfly(v, offset=16)
                col_sums[j] = v
            buf = n % 2
            if lane < 4:
                for j in cutlass.range_constexpr(n_cols):
                    sSums[c * 4 + warp, S_coord[0, j][1], buf] = col_sums[j]
            if const_expr(self.alternate):          # this consumer's 4 warps hold the whole tile
                cute.arch.barrier(barrier_id=BAR_SUMS_READY + c, number_of_threads=128)
            else:
                cute.arch.barrier(barrier_id=BAR_SUMS_READY, number_of_threads=256)
            if const_expr(c == 0 or self.alternate):
                if tid < BN:                          # one thread per key of the tile
                    slot = it * BN + tid
                    total = Float32(0.0)
                    for w in cutlass.range_constexpr(4 if self.alternate else CONSUMERS * 4):
                        total = total + sSums[(c * 4 if self.alternate else 0) + w, tid, buf]
                    if slot < mRaw.shape[1]:
                        mRaw[token, slot] = total
