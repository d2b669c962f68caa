"""The CuTe-DSL kernel behind `sparse_attention_bwd.sparse_attention_backward` (SM90, bf16).

How one CTA works (read this first)
-----------------------------------
One CTA handles one query token and a block of 64 heads (the wgmma M dimension); H = 128 runs as two
CTAs per token, side by side in the grid so the second finds the gathered kv rows in L2. Heads past H
are zero rows of Q and dO in shared memory (never copied in global memory) with L = +inf, so their
P and dS are exactly 0 and they add nothing to dkv.

The launcher passes per-(token, head) constants computed with torch ops: L2 = log2(e) * logaddexp(lse,
sink) (+inf on rows with no valid key) and Delta = out . dout. So P needs no online softmax here: it is
exp2(scale_log2 * s - L2) directly.

Three warpgroups of 128 threads; the kv rows come in tiles of BN = 32 top-k slots (two stages):

  WG0, producer: cp.async (LDGSTS) gathers, as in the forward. First Q (64 x D) and dO (64 x d_v), then
       per tile the 32 kv rows named by `indices`. Invalid slots (id < 0, id >= S, slot >= topk_length)
       are zero-filled and their id is stored as -1 in `sIds` (the consumers mask them and skip their
       dkv writes).
  WG1, WG2, consumers c = 0, 1 (both see the same tile):
       c = 0: S  = Q  K^T   (64 x 32 over D)      -> P = exp2(S*scale_log2 - L2) (0 on invalid keys), in
                                                     fp32 to a per-thread exchange buffer sPx;
       c = 1: dP = dO V^T   (64 x 32 over d_v)    -> reads P (the two accumulators have the same thread
                                                     layout, so thread i reads what thread i wrote),
                                                     dS' = scale * P * (dP - Delta); P and dS' in bf16
                                                     to smem (sP, sdS).
       both:  dQ_c += dS' K_c  (64 x 256, + 64 x 64 of the RoPE columns for c = 0 when D = 576) with the
              accumulator in registers for the whole key loop;
              dkv^T block b (64 latent columns x 32 keys), for the blocks b = c, c+2, ...:
                  = Q_b^T dS' (+ dO_b^T P when the block is among the first d_v columns)
              then the values go to global memory: fast mode reductions (`red.global.add.v4.f32`
              after a lane transpose, `write_dkv_vector`, or after one lane exchange into permuted
              columns, `write_dkv_pair`) into the fp32 [S, D] accumulator at row id;
              deterministic mode plain stores into a per-slot partial row ((head_block * T + token) * K
              + slot), which the launcher sums in slot order. Two accumulators (`overlap_dkv`): block
              b's wgmmas run while block b - 2 is being sent.
       The dkv product is computed transposed (latent columns as M) because wgmma needs M = 64 and a
       tile has only 32 keys; both its operands are read MN-major from the same smem tiles (Q, dO, dS,
       P) that the other products read K-major.

Why BN = 32 and two stages: shared memory holds Q (72 KB at D = 576), dO (64 KB) and the kv stages;
two stages of 64 rows (144 KB) do not fit next to Q and dO, two of 32 (72 KB) do (about 225 KB total).
Registers: consumer 0 keeps 64 x 320 fp32 of dQ (160 per thread) plus the 64 x 32 S tile and two dkv tiles
(16 values per thread each), within the 232 registers setmaxnreg gives a consumer thread (ptxas: no spills).

Synchronisation per tile (named barriers between the two consumers, 256 threads):
  P_READY  : c0 has written P (fp32) to sPx;      c1 waits before reading it.
  DS_READY : c1 has written sP, sdS (and fenced); both wait before the dQ / dkv wgmmas read them.
  The next tile's writes are safe without more barriers: c0 writes sPx(t+1) after DS_READY(t), when c1
  is done reading sPx(t); c1 writes sP/sdS(t+1) after P_READY(t+1), when c0 has waited out every wgmma
  of tile t. The kv stage is released (empty barrier) once both consumers' dQ wgmma has completed; the
  dkv products read only Q, dO, P and dS.

Epilogue: dQ -> bf16 -> smem over Q (dead after the last tile) -> 16-byte coalesced stores of valid heads.
"""
from typing import Optional

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass._mlir import ir
from cutlass._mlir.dialects import vector as mlir_vector
from cutlass import BFloat16, Float32, Int32, Int64, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.memory import SmemAllocator
from cutlass.tensor_utils import LayoutEnum

from csrc_dsl.cute.sm90.sparse_attention_bwd import DKV_WRITES
from csrc_dsl.cute.sm90.sparse_attention_fwd_kernel import copy_row, quad_transpose, rows_cols_view, wgmma

HEADS_PER_CTA = 64   # wgmma M
DQ_BLOCK = 256       # dQ columns per wgmma (the largest wgmma N)
DKV_BLOCK = 64       # latent columns per dkv^T block (wgmma M)
SMEM_CAPACITY = 232448  # bytes of shared memory one CTA may use on SM90 (227 KB)

# Named barriers (0 is __syncthreads), all between the two consumer warpgroups (256 threads).
BAR_P_READY = 1
BAR_DS_READY = 2
BAR_EPILOGUE = 3


class SparseAttentionBwdSm90:
    """One compiled variant: `BwdConfig` fixes D, d_v, the dkv mode and the tiles; T, H, S and K are
    runtime values."""

    def __init__(self, config):
        self.check_config(config)
        self.cfg = config
        self.D = config.head_dim
        self.DV = config.d_v
        self.BM = HEADS_PER_CTA
        self.BN = config.block_n
        self.stages = config.num_stages
        self.rope = self.D - self.DV          # 64 or 0: consumer 0's extra dQ block
        self.num_threads = 3 * 128
        self.deterministic = config.deterministic
        self.p_exchange_elems = self.BM * self.BN     # fp32 P from consumer 0 to consumer 1
        self.dp_keys = self.BN
        self.full_barriers = self.stages              # the producer's "rows landed" barriers, per stage

    SCHEDULE = "split"

    @classmethod
    def check_config(cls, config):
        """What every schedule needs, then the schedule's own tiles (`check_tiles`)."""
        if config.schedule != cls.SCHEDULE:
            raise ValueError(f"this kernel runs the {cls.SCHEDULE} schedule, not {config.schedule!r}")
        if config.ablation not in ("none", "no_dkv_write", "no_dkv"):
            raise ValueError(f"unknown ablation {config.ablation!r}")
        if config.d_v != 512 or config.head_dim not in (512, 576):
            raise ValueError(f"unsupported head dims D={config.head_dim}, d_v={config.d_v}")
        cls.check_tiles(config)

    @staticmethod
    def check_tiles(config):
        if config.dkv_write not in DKV_WRITES:
            raise ValueError(f"unknown dkv_write {config.dkv_write!r}")
        if config.block_n != 32 or config.num_stages != 2 or config.kv_halves:
            raise ValueError("this kernel is written for block_n = 32 and 2 stages, one full barrier each")
        if config.dkv_lines or config.uniform_send:
            raise ValueError("dkv_lines and uniform_send are the wide schedule's (its dkv blocks have the keys as "
                             "rows)")

    # -------------------------------------------------------------------------------------------
    # Host side: layouts, MMAs, shared storage, launch
    # -------------------------------------------------------------------------------------------
    @cute.jit
    def __call__(self, mQ: cute.Tensor, mKV: cute.Tensor, mIdx: cute.Tensor, mdO: cute.Tensor,
                 mL2: cute.Tensor, mDelta: cute.Tensor, mTopkLen: cute.Tensor, mdQ: cute.Tensor,
                 mDkv: cute.Tensor, scale_log2: Float32, scale: Float32, stream: cuda.CUstream):
        BM, BN, D, DV = self.BM, self.BN, self.D, self.DV
        # K-major swizzled smem tiles (the wgmma canonical layouts): 128-byte rows of 64 bf16 for the
        # wide tiles, 64-byte rows of 32 bf16 for the (heads x keys) tiles P and dS.
        atom64 = warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, BFloat16, 64), BFloat16)
        atom32 = warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, BFloat16, BN), BFloat16)
        sQ_layout = cute.tile_to_shape(atom64, (BM, D), order=(0, 1))
        sdO_layout = cute.tile_to_shape(atom64, (BM, DV), order=(0, 1))
        sKV_layout = cute.tile_to_shape(atom64, (BN, D, self.stages), order=(0, 1, 2))
        sP_layout = cute.tile_to_shape(atom32, (BM, BN), order=(0, 1))

        K_, MN_ = cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN
        # S = Q K^T and dP = dO V^T: both operands K-major (the reduction runs along the latent dim).
        mma_s = sm90_utils.make_trivial_tiled_mma(BFloat16, BFloat16, K_, K_, Float32, (1, 1, 1), (BM, BN))
        # dP in pieces of `dp_keys` keys (the wide schedule: half a tile; here unused, dP is computed like S).
        mma_dp = sm90_utils.make_trivial_tiled_mma(BFloat16, BFloat16, K_, K_, Float32, (1, 1, 1),
                                                   (BM, self.dp_keys))
        # dQ += dS K: dS K-major ([head, key]), K read MN-major from the kv tile.
        mma_dq = sm90_utils.make_trivial_tiled_mma(BFloat16, BFloat16, K_, MN_, Float32, (1, 1, 1),
                                                   (BM, DQ_BLOCK))
        mma_dq_rope = sm90_utils.make_trivial_tiled_mma(BFloat16, BFloat16, K_, MN_, Float32, (1, 1, 1),
                                                        (BM, max(self.rope, 64)))
        # dkv^T = Q^T dS (+ dO^T P): heads are the reduction; both operands MN-major.
        mma_kv = sm90_utils.make_trivial_tiled_mma(BFloat16, BFloat16, MN_, MN_, Float32, (1, 1, 1),
                                                   (DKV_BLOCK, BN))

        @cute.struct
        class SharedStorage:
            full_bar: cute.struct.MemRange[cutlass.Int64, self.full_barriers]
            empty_bar: cute.struct.MemRange[cutlass.Int64, self.stages]
            q_bar: cute.struct.MemRange[cutlass.Int64, 1]
            ids: cute.struct.MemRange[Int32, BN * self.stages]        # kv row id per slot, -1 invalid
            p_exchange: cute.struct.MemRange[Float32, self.p_exchange_elems]   # fp32 P, consumer 0 -> 1
            sQ: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sQ_layout)], 1024]
            sdO: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sdO_layout)], 1024]
            sKV: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sKV_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sP_layout)], 1024]
            sdS: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(sP_layout)], 1024]

        self.shared_storage = SharedStorage
        self.smem_bytes = SharedStorage.size_in_bytes()
        if const_expr(self.smem_bytes > SMEM_CAPACITY):
            raise ValueError(f"shared storage of {self.smem_bytes} bytes exceeds the SM90 limit {SMEM_CAPACITY}")

        head_blocks = (mQ.shape[1] + BM - 1) // BM
        grid_x = mQ.shape[0] * head_blocks
        self.kernel(mQ, mKV, mIdx, mdO, mL2, mDelta, mTopkLen, mdQ, mDkv, scale_log2, scale,
                    sQ_layout, sdO_layout, sKV_layout, sP_layout,
                    mma_s, mma_dp, mma_dq, mma_dq_rope, mma_kv).launch(
            grid=[grid_x, 1, 1], block=[self.num_threads, 1, 1], stream=stream, min_blocks_per_mp=1)

    # -------------------------------------------------------------------------------------------
    # Device side
    # -------------------------------------------------------------------------------------------
    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mKV: cute.Tensor, mIdx: cute.Tensor, mdO: cute.Tensor,
               mL2: cute.Tensor, mDelta: cute.Tensor, mTopkLen: cute.Tensor, mdQ: cute.Tensor,
               mDkv: cute.Tensor, scale_log2: Float32, scale: Float32,
               sQ_layout: cute.ComposedLayout, sdO_layout: cute.ComposedLayout,
               sKV_layout: cute.ComposedLayout, sP_layout: cute.ComposedLayout,
               mma_s: cute.TiledMma, mma_dp: cute.TiledMma, mma_dq: cute.TiledMma,
               mma_dq_rope: cute.TiledMma, mma_kv: cute.TiledMma):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg_idx = warp_idx // 4
        head_blocks = (mQ.shape[1] + self.BM - 1) // self.BM
        token = bidx // head_blocks
        head_block = bidx - token * head_blocks

        smem = SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        full_bar = storage.full_bar.data_ptr()
        empty_bar = storage.empty_bar.data_ptr()
        q_bar = storage.q_bar.data_ptr()
        if warp_idx == 0:
            with cute.arch.elect_one():
                for s in cutlass.range_constexpr(max(self.full_barriers, self.stages)):
                    if const_expr(s < self.full_barriers):
                        cute.arch.mbarrier_init(full_bar + s, 256)    # 128 cp.async + 128 id-write arrivals
                    if const_expr(s < self.stages):
                        cute.arch.mbarrier_init(empty_bar + s, 256)   # every consumer thread
                cute.arch.mbarrier_init(q_bar, 128)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sdO = storage.sdO.get_tensor(sdO_layout.outer, swizzle=sdO_layout.inner)
        sKV = storage.sKV.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
        sdS = storage.sdS.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
        sIds = storage.ids.get_tensor(cute.make_layout((self.BN, self.stages)))
        # (value, thread): thread i's v-th accumulator value at v * 128 + i (no bank conflicts).
        sPx = storage.p_exchange.get_tensor(
            cute.make_layout((self.p_exchange_elems // 128, 128), stride=(128, 1)))

        k_valid = cutlass.min(mIdx.shape[1], cutlass.max(mTopkLen[token], 0))
        n_tiles = (k_valid + self.BN - 1) // self.BN

        if wg_idx == 0:
            cute.arch.setmaxregister_decrease(self.cfg.producer_regs)
            w_token, w_block, w_valid, w_tiles = self.role_work(mQ, mIdx, mTopkLen, token, head_block, k_valid,
                                                                n_tiles)
            self.produce(mQ, mKV, mIdx, mdO, sQ, sdO, sKV, sIds, full_bar, empty_bar, q_bar,
                         w_token, w_block, w_valid, w_tiles, tidx)
        elif wg_idx == 1:
            cute.arch.setmaxregister_increase(self.cfg.consumer_regs)
            w_token, w_block, w_valid, w_tiles = self.role_work(mQ, mIdx, mTopkLen, token, head_block, k_valid,
                                                                n_tiles)
            self.consume(mL2, mDelta, mdQ, mDkv, mIdx, sQ, sdO, sKV, sP, sdS, sIds, sPx,
                         full_bar, empty_bar, q_bar, mma_s, mma_dp, mma_dq, mma_dq_rope, mma_kv,
                         scale_log2, scale, w_token, w_block, w_tiles, tidx % 128, 0)
        else:
            cute.arch.setmaxregister_increase(self.cfg.consumer1_regs or self.cfg.consumer_regs)
            w_token, w_block, w_valid, w_tiles = self.role_work(mQ, mIdx, mTopkLen, token, head_block, k_valid,
                                                                n_tiles)
            self.consume(mL2, mDelta, mdQ, mDkv, mIdx, sQ, sdO, sKV, sP, sdS, sIds, sPx,
                         full_bar, empty_bar, q_bar, mma_s, mma_dp, mma_dq, mma_dq_rope, mma_kv,
                         scale_log2, scale, w_token, w_block, w_tiles, tidx % 128, 1)

    def role_work(self, mQ: cute.Tensor, mIdx: cute.Tensor, mTopkLen: cute.Tensor, token: Int32,
                  head_block: Int32, k_valid: Int32, n_tiles: Int32):
        """The CTA's (token, head block, valid slots, tiles) as a warpgroup role uses them: here the values
        computed before the role split, as they are (the wide schedule recomputes them in each role)."""
        return token, head_block, k_valid, n_tiles

    # ---- producer: cp.async gathers ------------------------------------------------------------
    @cute.jit
    def produce(self, mQ: cute.Tensor, mKV: cute.Tensor, mIdx: cute.Tensor, mdO: cute.Tensor,
                sQ: cute.Tensor, sdO: cute.Tensor, sKV: cute.Tensor, sIds: cute.Tensor,
                full_bar, empty_bar, q_bar, token: Int32, head_block: Int32, k_valid: Int32,
                n_tiles: Int32, tidx: Int32):
        D, DV, H = self.D, self.DV, mQ.shape[1]
        copy_16B = cute.make_copy_atom(
            cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), BFloat16, num_bits_per_copy=128)
        # 8 threads per row, each moving 16-byte pieces 128 bytes apart; 16 rows per pass.
        row_in_pass = tidx // 8
        piece = tidx % 8

        # Q and dO rows of this head block; heads past H are zero-filled.
        q_base = mQ.iterator.toint()
        do_base = mdO.iterator.toint()
        for p in cutlass.range_constexpr(self.BM // 16):
            r = row_in_pass + 16 * p
            head = head_block * self.BM + r
            valid = head < H
            row = Int64(token) * H + Int64(head if valid else 0)
            copy_row(copy_16B, q_base + row * (D * 2), sQ[r, None], D, piece, valid)
            copy_row(copy_16B, do_base + row * (DV * 2), sdO[r, None], DV, piece, valid)
        cute.arch.cp_async_mbarrier_arrive_noinc(q_bar)

        # kv tiles: the ids of tile `it` are loaded one tile ahead, before waiting for the buffer.
        kv_rows = mKV.shape[0]
        kv_base = mKV.iterator.toint()
        passes = self.BN // 16
        slot_ids = cute.make_rmem_tensor((passes,), Int32)
        self.load_slot_ids(mIdx, slot_ids, token, 0, k_valid, row_in_pass)
        for it in cutlass.range(n_tiles, unroll=1):
            stage = it % self.stages
            phase = (it // self.stages) % 2
            cute.arch.mbarrier_wait(empty_bar + stage, phase ^ 1)
            # the stage's full barriers: one per stage, or one per group of rows (`full_barriers`)
            groups = self.full_barriers // self.stages
            for p in cutlass.range_constexpr(passes):
                r = row_in_pass + 16 * p
                kv_id = slot_ids[p]
                valid = kv_id >= 0 and kv_id < kv_rows
                src_row = kv_base + Int64(kv_id if valid else 0) * (D * 2)
                copy_row(copy_16B, src_row, sKV[r, None, stage], D, piece, valid)
                if piece == 0:
                    sIds[r, stage] = kv_id if valid else Int32(-1)
                if const_expr((p + 1) % (passes // groups) == 0):      # the last pass of a group
                    bar = full_bar + stage * groups + (p + 1) // (passes // groups) - 1
                    cute.arch.cp_async_mbarrier_arrive_noinc(bar)
                    cute.arch.mbarrier_arrive(bar)
            if it + 1 < n_tiles:
                self.load_slot_ids(mIdx, slot_ids, token, it + 1, k_valid, row_in_pass)

    @cute.jit
    def load_slot_ids(self, mIdx: cute.Tensor, slot_ids: cute.Tensor, token: Int32, tile: Int32,
                      k_valid: Int32, row_in_pass: Int32):
        """kv ids of this thread's rows of `tile`; -1 (invalid) past the valid slots."""
        for p in cutlass.range_constexpr(cute.size(slot_ids)):
            slot = tile * self.BN + row_in_pass + 16 * p
            slot_ids[p] = Int32(-1)
            if slot < k_valid:
                slot_ids[p] = mIdx[token, slot]

    # ---- consumers ----------------------------------------------------------------------------
    @cute.jit
    def consume(self, mL2: cute.Tensor, mDelta: cute.Tensor, mdQ: cute.Tensor, mDkv: cute.Tensor,
                mIdx: cute.Tensor, sQ: cute.Tensor, sdO: cute.Tensor, sKV: cute.Tensor, sP: cute.Tensor,
                sdS: cute.Tensor, sIds: cute.Tensor, sPx: cute.Tensor, full_bar, empty_bar, q_bar,
                mma_s: cute.TiledMma, mma_dp: cute.TiledMma, mma_dq: cute.TiledMma,
                mma_dq_rope: cute.TiledMma, mma_kv: cute.TiledMma, scale_log2: Float32, scale: Float32,
                token: Int32, head_block: Int32, n_tiles: Int32, tid: Int32, c: cutlass.Constexpr[int]):
        """Consumer c (0: S and P, 1: dP and dS); see the module docstring for the split."""
        BM, BN, D, DV = self.BM, self.BN, self.D, self.DV
        H = mL2.shape[1]
        with_rope = const_expr(c == 0 and self.rope > 0)

        # ---- S = Q K^T (c = 0) or dP = dO V^T (c = 1): same MMA, so the same thread layout ----------
        thr_s = mma_s.get_slice(tid)
        if const_expr(c == 0):
            tSrA = thr_s.make_fragment_A(thr_s.partition_A(sQ))
            tSrB = thr_s.make_fragment_B(thr_s.partition_B(sKV))                         # (32, D, stage)
        else:
            sV = cute.flat_divide(sKV, (BN, DV))[None, None, 0, 0, None]                  # (32, d_v, stage)
            tSrA = thr_s.make_fragment_A(thr_s.partition_A(sdO))
            tSrB = thr_s.make_fragment_B(thr_s.partition_B(sV))
        acc_S = cute.make_rmem_tensor(thr_s.partition_shape_C((BM, BN)), Float32)
        S = rows_cols_view(acc_S)
        S_coord = rows_cols_view(thr_s.partition_C(cute.make_identity_tensor((BM, BN))))
        n_rows = cute.size(S, mode=[0])
        n_cols = cute.size(S, mode=[1])
        acc_P = cute.make_rmem_tensor_like(acc_S, Float32)    # consumer 1: P read back from sPx
        P = rows_cols_view(acc_P)

        # ---- dQ_c += dS K_c ---------------------------------------------------------------------------
        thr_dq, tQrdS, tQrK, acc_dQ, thr_dqr, tRrdS, tRrK, acc_dQr = self.dq_operands(
            mma_dq, mma_dq_rope, sKV, sdS, tid, c, with_rope)

        # ---- dkv^T blocks: (latent column, head) views of Q and dO, (key, head) views of dS and P ----
        thr_kv = mma_kv.get_slice(tid)
        sQ_blocks, sdO_blocks, sdSt, sPt = self.dkv_operand_views(sQ, sdO, sdS, sP)
        tKrQ = thr_kv.make_fragment_A(thr_kv.partition_A(sQ_blocks))
        tKrdO = thr_kv.make_fragment_A(thr_kv.partition_A(sdO_blocks))
        tKrdS = thr_kv.make_fragment_B(thr_kv.partition_B(sdSt))
        tKrP = thr_kv.make_fragment_B(thr_kv.partition_B(sPt))
        # two accumulators with `overlap_dkv`: block n's products run while block n - 1 is being sent
        acc_KV = [cute.make_rmem_tensor(thr_kv.partition_shape_C((DKV_BLOCK, BN)), Float32)
                  for _ in range(2 if self.cfg.overlap_dkv else 1)]
        KV = [rows_cols_view(acc) for acc in acc_KV]
        KV_coord = rows_cols_view(thr_kv.partition_C(cute.make_identity_tensor((DKV_BLOCK, BN))))
        # The keys (top-k slots of the tile) whose dkv values this thread sends; `key_rows` holds, per such
        # key, its dkv target row (-1: skip) for "scalar" writes, or its address for "tiled" and "vector"
        # writes (0: skip): see `write_dkv`.
        key_slot = self.dkv_key_slots(KV_coord, tid)
        key_rows = cute.make_rmem_tensor((cute.size(key_slot),), Int64)
        dkv_col = KV_coord[0, 0][0]       # this thread's first latent column of a dkv^T block
        if const_expr(self.cfg.dkv_write == "vector"):
            lane = tid % 32
            dkv_col = 16 * (tid // 32) + 8 * ((lane // 4) % 2) + 4 * (lane // 16)
        elif const_expr(self.cfg.dkv_write == "pair"):
            dkv_col = 16 * (tid // 32) + 4 * ((tid % 32) // 8)     # stored column (`pair_column_order`)

        # Per-row constants of this thread's heads (padding heads: L2 = +inf, so P = dS = 0).
        row_const = cute.make_rmem_tensor((n_rows,), Float32)
        for i in cutlass.range_constexpr(n_rows):
            head = head_block * BM + S_coord[i, 0][0]
            value = Float32.inf if const_expr(c == 0) else Float32(0.0)
            if head < H:
                if const_expr(c == 0):
                    value = mL2[token, head]
                else:
                    value = mDelta[token, head]
            row_const[i] = value

        num_tokens, topk = mL2.shape[0], mIdx.shape[1]
        dkv_base = mDkv.iterator.toint()

        cute.arch.mbarrier_wait(q_bar, 0)
        for it in cutlass.range(n_tiles, unroll=1):
            stage = it % self.stages
            phase = (it // self.stages) % 2
            cute.arch.mbarrier_wait(full_bar + stage, phase)
            cute.arch.fence_proxy("async.shared", space="cta")   # cp.async data -> wgmma reads
            wgmma(mma_s, acc_S, tSrA, tSrB[None, None, None, stage], zero_init=True)

            if const_expr(c == 0):
                # P = exp2(scale_log2 * s - L2), 0 on invalid keys; fp32 to consumer 1.
                for j in cutlass.range_constexpr(n_cols):
                    key_ok = sIds[S_coord[0, j][1], stage] >= 0
                    for i in cutlass.range_constexpr(n_rows):
                        p = cute.math.exp2(S[i, j] * scale_log2 - row_const[i], fastmath=True)
                        S[i, j] = p if key_ok else Float32(0.0)
                for v in cutlass.range_constexpr(cute.size(acc_S)):
                    sPx[v, tid] = acc_S[v]
                cute.arch.barrier(barrier_id=BAR_P_READY, number_of_threads=256)
                cute.arch.barrier(barrier_id=BAR_DS_READY, number_of_threads=256)
            else:
                cute.arch.barrier(barrier_id=BAR_P_READY, number_of_threads=256)
                # dS' = scale * P * (dP - Delta); P and dS' in bf16 to smem for the tensor cores.
                for v in cutlass.range_constexpr(cute.size(acc_P)):
                    acc_P[v] = sPx[v, tid]
                for i in cutlass.range_constexpr(n_rows):
                    for j in cutlass.range_constexpr(n_cols):
                        p = P[i, j]
                        r, k = S_coord[i, j]
                        sP[r, k] = BFloat16(p)
                        sdS[r, k] = BFloat16(scale * p * (S[i, j] - row_const[i]))
                cute.arch.fence_proxy("async.shared", space="cta")   # st.shared -> wgmma reads
                cute.arch.barrier(barrier_id=BAR_DS_READY, number_of_threads=256)

            # dQ_c += dS' K_c (the last reads of the kv stage).
            wgmma(mma_dq, acc_dQ, tQrdS, tQrK[None, None, None, stage], zero_init=False, wait=False)
            if const_expr(with_rope):
                wgmma(mma_dq_rope, acc_dQr, tRrdS, tRrK[None, None, None, stage], zero_init=False, wait=False)
            for j in cutlass.range_constexpr(cute.size(key_slot)):
                slot_in_tile = key_slot[j]
                kv_id = sIds[slot_in_tile, stage]
                target = Int64(kv_id)
                if const_expr(self.deterministic):
                    target = (Int64(head_block) * num_tokens + token) * topk + it * BN + slot_in_tile
                    if kv_id < 0:
                        target = Int64(-1)
                if const_expr(self.cfg.dkv_write != "scalar"):
                    address = dkv_base + (target * self.D + dkv_col) * 4
                    target = address if kv_id >= 0 else Int64(0)
                key_rows[j] = target
            warpgroup.wait_group(0)
            cute.arch.mbarrier_arrive(empty_bar + stage)

            # dkv^T blocks b = c, c + 2, ...: Q_b^T dS' (+ dO_b^T P on the value columns) -> global.
            # With `overlap_dkv`, block n's wgmmas are issued before block n - 1 is sent, on the other
            # accumulator, so the tensor cores work while this warpgroup shuffles and writes.
            blocks = list(range(c, D // DKV_BLOCK if self.cfg.ablation != "no_dkv" else 0, 2))
            overlap = const_expr(self.cfg.overlap_dkv)
            for n in cutlass.range_constexpr(len(blocks)):
                b = blocks[n]
                with_p = b * DKV_BLOCK < DV
                acc = acc_KV[n % len(acc_KV)]
                wgmma(mma_kv, acc, tKrQ[None, None, None, b], tKrdS, zero_init=True,
                      wait=not with_p and not overlap)
                if const_expr(with_p):
                    wgmma(mma_kv, acc, tKrdO[None, None, None, b], tKrP, zero_init=False, wait=not overlap)
                if const_expr(overlap):
                    if const_expr(n > 0):
                        warpgroup.wait_group(2 if with_p else 1)       # block n - 1 is done, n may run on
                        self.write_dkv_block(KV[(n - 1) % 2], KV_coord, key_rows, dkv_base,
                                             blocks[n - 1] * DKV_BLOCK, tid)
                    if const_expr(n == len(blocks) - 1):
                        warpgroup.wait_group(0)
                        self.write_dkv_block(KV[n % 2], KV_coord, key_rows, dkv_base, b * DKV_BLOCK, tid)
                else:
                    self.write_dkv_block(KV[0], KV_coord, key_rows, dkv_base, b * DKV_BLOCK, tid)

        self.epilogue(mdQ, sQ, thr_dq, thr_dqr, acc_dQ, acc_dQr if const_expr(with_rope) else None,
                      token, head_block, tid, c)

    def dq_operands(self, mma_dq: cute.TiledMma, mma_dq_rope: cute.TiledMma, sKV: cute.Tensor, sdS: cute.Tensor,
                    tid: Int32, c: int, with_rope: bool):
        """Consumer c's dQ products, dQ[:, 256 c : 256 (c + 1)] (+ the RoPE columns with `with_rope`) += dS' K:
        (thr_dq, dS' fragments, K fragments, zeroed accumulator) and the same for the RoPE block (None
        without it). The kv tile is read as (latent column, key), MN-major; stage index last."""
        BM, BN, D, DV = self.BM, self.BN, self.D, self.DV
        sKt = cute.composition(sKV, cute.make_layout((D, BN, self.stages), stride=(BN, 1, BN * D)))
        sKt_c = cute.flat_divide(sKt, (DQ_BLOCK, BN))[None, None, c, 0, None]            # (256, BN, stage)
        thr_dq = mma_dq.get_slice(tid)
        tQrdS = thr_dq.make_fragment_A(thr_dq.partition_A(sdS))
        tQrK = thr_dq.make_fragment_B(thr_dq.partition_B(sKt_c))
        acc_dQ = cute.make_rmem_tensor(thr_dq.partition_shape_C((BM, DQ_BLOCK)), Float32)
        acc_dQ.fill(0.0)
        thr_dqr = mma_dq_rope.get_slice(tid)
        tRrdS = tRrK = acc_dQr = None
        if with_rope:
            sKt_r = cute.flat_divide(sKt, (self.rope, BN))[None, None, DV // self.rope, 0, None]
            tRrdS = thr_dqr.make_fragment_A(thr_dqr.partition_A(sdS))
            tRrK = thr_dqr.make_fragment_B(thr_dqr.partition_B(sKt_r))
            acc_dQr = cute.make_rmem_tensor(thr_dqr.partition_shape_C((BM, self.rope)), Float32)
            acc_dQr.fill(0.0)
        return thr_dq, tQrdS, tQrK, acc_dQ, thr_dqr, tRrdS, tRrK, acc_dQr

    def dkv_operand_views(self, sQ: cute.Tensor, sdO: cute.Tensor, sdS: cute.Tensor, sP: cute.Tensor):
        """The dkv products' operands, all transposed (MN-major) views of tiles the other products read
        K-major: Q and dO as (latent column, head, 64-column block), dS' and P as (key, head)."""
        BM, BN, D, DV = self.BM, self.BN, self.D, self.DV
        sQt = cute.composition(sQ, cute.make_layout((D, BM), stride=(BM, 1)))
        sdOt = cute.composition(sdO, cute.make_layout((DV, BM), stride=(BM, 1)))
        sdSt = cute.composition(sdS, cute.make_layout((BN, BM), stride=(BM, 1)))
        sPt = cute.composition(sP, cute.make_layout((BN, BM), stride=(BM, 1)))
        return (cute.flat_divide(sQt, (DKV_BLOCK, BM))[None, None, None, 0],
                cute.flat_divide(sdOt, (DKV_BLOCK, BM))[None, None, None, 0], sdSt, sPt)

    @cute.jit
    def dkv_key_slots(self, KV_coord: cute.Tensor, tid: Int32) -> cute.Tensor:
        """The tile slots (keys) whose dkv values this thread sends, in the order `write_dkv*` uses them:
        the keys of its accumulator columns (8), or for "vector" writes the 4 keys it holds after the
        transpose (`write_dkv_vector`)."""
        if const_expr(self.cfg.dkv_write == "vector"):
            lane = tid % 32
            slots = cute.make_rmem_tensor((4,), Int32)
            for p in cutlass.range_constexpr(2):
                for ek in cutlass.range_constexpr(2):
                    slots[2 * p + ek] = 8 * (2 * p + (lane // 8) % 2) + 2 * (lane % 4) + ek
        elif const_expr(self.cfg.dkv_write == "pair"):
            lane = tid % 32
            slots = cute.make_rmem_tensor((4,), Int32)
            for j in cutlass.range_constexpr(4):
                slots[j] = 8 * j + 2 * (lane % 4) + (lane // 4) % 2
        else:
            slots = cute.make_rmem_tensor((cute.size(KV_coord, mode=[1]),), Int32)
            for j in cutlass.range_constexpr(cute.size(slots)):
                slots[j] = KV_coord[0, j][1]
        return slots

    @cute.jit
    def write_dkv_block(self, KV: cute.Tensor, KV_coord: cute.Tensor, key_rows: cute.Tensor, dkv_base: Int64,
                        col0: int, tid: Int32):
        """One dkv^T block to global memory by the configured path (`BwdConfig.dkv_write`)."""
        if const_expr(self.cfg.dkv_write == "vector"):
            self.write_dkv_vector(KV, key_rows, col0, tid)
        elif const_expr(self.cfg.dkv_write == "pair"):
            self.write_dkv_pair(KV, key_rows, col0, tid)
        else:
            self.write_dkv(KV, KV_coord, key_rows, dkv_base, col0)

    @cute.jit
    def write_dkv(self, KV: cute.Tensor, KV_coord: cute.Tensor, key_rows: cute.Tensor, dkv_base: Int64,
                  col0: int):
        """This thread's values of one dkv^T block to global memory, one 4-byte value per instruction: fast
        mode an fp32 reduction into the [S, D] accumulator, deterministic mode a store into the slot's
        partial row. A warp instruction covers 32-byte pieces of 4 keys.

        "tiled": `key_rows` holds each key's address at the thread's first latent column of block 0
        (computed once per tile); in the SM90 accumulator layout the thread's second row is 8 columns
        further, so every address here is that one plus a compile-time offset. "scalar": each address is
        computed here from the row and the thread's coordinates, which the compiler rematerializes from
        the thread index per key (SASS: 72 S2R, 536 LEA against 2 and 208; 3.4% slower on the H200)."""
        tiled = const_expr(self.cfg.dkv_write == "tiled")
        for j in cutlass.range_constexpr(cute.size(KV, mode=[1])):
            row = key_rows[j]
            # Ablation "no_dkv_write": a condition that never holds but that the compiler cannot drop,
            # so the dkv products stay in the kernel while no value reaches global memory.
            if const_expr(tiled):
                write = row != 0 if const_expr(self.cfg.ablation == "none") else row == 1
            else:
                write = row >= 0 if const_expr(self.cfg.ablation == "none") else row < -1
            if write:
                for i in cutlass.range_constexpr(cute.size(KV, mode=[0])):
                    if const_expr(tiled):
                        addr = row + (col0 + 8 * i) * 4
                    else:
                        col = col0 + KV_coord[i, j][0]
                        addr = dkv_base + (row * self.D + col) * 4
                    ptr = cute.make_ptr(Float32, addr, cute.AddressSpace.gmem, assumed_align=4)
                    if const_expr(self.deterministic):
                        cute.make_tensor(ptr, cute.make_layout((1,)))[0] = KV[i, j]
                    else:
                        cute.arch.red(ptr, KV[i, j], op="add", dtype="f32", sem="relaxed", scope="gpu")

    @cute.jit
    def write_dkv_vector(self, KV: cute.Tensor, key_rows: cute.Tensor, col0: int, tid: Int32):
        """This thread's values of one dkv^T block as four 16-byte pieces (`red.global.add.v4.f32`, or
        `st.global.v4` in deterministic mode); a warp instruction covers 64 contiguous bytes of each of 8
        keys, which L2 takes 1.4x faster than the 32-byte pieces of `write_dkv`
        (benchmarks/bench_dkv_reduction.py).

        Lane 4g + q of warp w holds KV[r, c + 2j]: latent column 16w + g + 8r, key 8j + 2q + c (g = 4b + i).
        The lanes i = 0..3 (same b, q) swap 4-value blocks, a 4 x 4 block transpose in two butterfly
        stages (lane xor 4, lane xor 8): lane i's block d, sent to lane d, is
        {KV[d % 2, ek + 4p + 2 (d // 2)] : p, ek in {0, 1}}. Afterwards lane (b, i = 2 i_hi + e, q)
        holds, for each (p, ek), latent columns 16w + 8e + 4b + 0..3 (one value from each lane k = 0..3)
        of key 8 (2p + i_hi) + 2q + ek, whose address `key_rows[2p + ek]` holds (`dkv_key_slots`)."""
        lane = tid % 32
        i = (lane // 4) % 4
        # blocks[d][2p + ek]: the values for lane d, before the exchange; from lane d, after it
        blocks = quad_transpose([[KV[d % 2, ek + 4 * p + 2 * (d // 2)] for p in range(2) for ek in range(2)]
                                 for d in range(4)], i, 4)
        for v in cutlass.range_constexpr(4):
            piece = cute.make_rmem_tensor((4,), Float32)
            for k in cutlass.range_constexpr(4):
                piece[k] = blocks[k][v]
            self.write_dkv_piece(piece, key_rows[v], col0)

    @cute.jit
    def write_dkv_pair(self, KV: cute.Tensor, key_rows: cute.Tensor, col0: int, tid: Int32):
        """This thread's values of one dkv^T block as four 16-byte pieces, like `write_dkv_vector`, after one
        exchange stage instead of two, because the accumulator's columns are stored in another order
        (`pair_column_order`; the launcher puts them back while casting to bf16).

        Lane 4g + q of warp w holds KV[r, 2j + c]: latent column 16w + g + 8r, key 8j + 2q + c. Lanes g and
        g ^ 1 (lane xor 4) hold neighbouring columns of the same keys; each gives the other the two values
        (r = 0, 1) of the key it does not send itself: an even g keeps key c = 0, an odd g key c = 1. Then a
        lane holds columns 16w + 8r + 2p + e (p = g // 2; e, r in {0, 1}) of its key, which the stored
        order puts next to each other at 16w + 4p + 2r + e: one 16-byte piece per key, a warp instruction
        covering 64 contiguous bytes of each of 8 keys, as with "vector", for half its shuffles."""
        odd = (tid // 4) % 2 == 1
        # every exchange before the first write: a write sits in a branch (invalid keys), which the shuffles
        # cannot move across, so interleaving them leaves each shuffle's latency exposed. (Both orders measured
        # slower than "vector": 16% interleaved, 18% this way; see the launcher's docstring.)
        pieces = cute.make_rmem_tensor((4, 4), Float32)
        for j in cutlass.range_constexpr(4):
            for r in cutlass.range_constexpr(2):
                own_c0, own_c1 = KV[r, 2 * j], KV[r, 2 * j + 1]
                sent = own_c0 if odd else own_c1
                kept = own_c1 if odd else own_c0
                got = cute.arch.shuffle_sync_bfly(sent, offset=4)
                pieces[2 * r, j] = got if odd else kept          # column e = 0 (even g)
                pieces[2 * r + 1, j] = kept if odd else got      # column e = 1 (odd g)
        for j in cutlass.range_constexpr(4):
            self.write_dkv_piece(pieces[None, j], key_rows[j], col0)

    @cute.jit
    def write_dkv_piece(self, piece: cute.Tensor, row: Int64, col0: int):
        """One 16-byte piece (4 fp32) at address `row` + the block's column offset: `red.global.add.v4.f32`,
        or `st.global.v4` in deterministic mode. `row` 0: an invalid key, nothing is written."""
        write = row != 0 if const_expr(self.cfg.ablation == "none") else row == 1
        if write:
            ptr = cute.make_ptr(Float32, row + col0 * 4, cute.AddressSpace.gmem, assumed_align=16)
            if const_expr(self.deterministic):
                cute.autovec_copy(piece, cute.make_tensor(ptr, cute.make_layout((4,))))
            else:
                vec = mlir_vector.from_elements(ir.VectorType.get([4], Float32.mlir_type),
                                                [Float32(piece[k]).ir_value() for k in range(4)])
                cute.arch.red(ptr, vec, op="add", dtype="f32", sem="relaxed", scope="gpu")

    @cute.jit
    def epilogue(self, mdQ: cute.Tensor, sQ: cute.Tensor, thr_dq: cute.ThrMma, thr_dqr: cute.ThrMma,
                 acc_dQ: cute.Tensor, acc_dQr: Optional[cute.Tensor], token: Int32, head_block: Int32,
                 tid: Int32, c: cutlass.Constexpr[int]):
        """dQ -> bf16 -> smem over Q -> coalesced 16-byte stores of the valid heads."""
        BM, D, H = self.BM, self.D, mdQ.shape[1]
        # Every wgmma reading sQ (S of the last tile, the dkv blocks) has been waited for by both.
        cute.arch.barrier(barrier_id=BAR_EPILOGUE, number_of_threads=256)
        frag = cute.make_rmem_tensor_like(acc_dQ, BFloat16)
        frag.store(acc_dQ.load().to(BFloat16))
        sQ_c = cute.flat_divide(sQ, (BM, DQ_BLOCK))[None, None, 0, c]
        cute.autovec_copy(frag, thr_dq.partition_C(sQ_c))
        if const_expr(acc_dQr is not None):
            frag_r = cute.make_rmem_tensor_like(acc_dQr, BFloat16)
            frag_r.store(acc_dQr.load().to(BFloat16))
            sQ_r = cute.flat_divide(sQ, (BM, self.rope))[None, None, 0, self.DV // self.rope]
            cute.autovec_copy(frag_r, thr_dqr.partition_C(sQ_r))
        cute.arch.barrier(barrier_id=BAR_EPILOGUE, number_of_threads=256)

        copy_16B = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), BFloat16, num_bits_per_copy=128)
        pieces_per_row = D // 8
        dq_base = mdQ.iterator.toint()
        tid256 = tid + 128 * c
        for p in cutlass.range_constexpr(BM * pieces_per_row // 256):
            flat = tid256 + 256 * p
            r = flat // pieces_per_row
            piece = flat - r * pieces_per_row
            head = head_block * BM + r
            if head < H:
                src_piece = cute.local_tile(sQ[r, None], (8,), (piece,))
                src = cute.make_tensor(src_piece.iterator, cute.make_layout(((8, 1),)))
                dst_addr = dq_base + ((Int64(token) * H + Int64(head)) * D + Int64(piece * 8)) * 2
                dst = cute.make_tensor(
                    cute.make_ptr(BFloat16, dst_addr, cute.AddressSpace.gmem, assumed_align=16),
                    cute.make_layout(((8, 1),)))
                cute.copy(copy_16B, src, dst)
