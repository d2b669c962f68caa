"""The backward's "wide" schedule (`BwdConfig.schedule == "wide"`): 64-key tiles in one kv stage.

Same CTA as the split schedule (sparse_attention_bwd_kernel.py, read its docstring first): one query token
and 64 heads, a producer warpgroup gathering kv rows with cp.async, two consumer warpgroups, dQ in registers,
dkv sent to global memory as 16-byte fp32 reductions (stores in deterministic mode). What changes is the
tile and who does what:

  tile: BN = 64 top-k slots in ONE kv stage (72 KB at D = 576). Q (72 KB), dO (64 KB), the stage and the
       bf16 P and dS' tiles (8 KB each) fill the 227 KB; there is no fp32 P exchange.
  c = 0: per half tile of 32 keys: S = Q K^T (64 x 32 over D) and dP = dO V^T (64 x 32 over d_v);
         P = exp2(S*scale_log2 - L2) (0 on invalid keys), dS' = scale * P * (dP - Delta), both in bf16 to
         smem (sP, sdS); then dQ[:, 0:256] (+ the RoPE columns) += dS' K over the whole tile.
         Why halves: dQ (160 fp32 per thread with the RoPE columns) next to a whole tile's S and even half
         of its dP did not fit in a consumer's 232 registers (ptxas spilled the RoPE block).
  c = 1: dQ[:, 256:512] += dS' K, then releases the kv stage, then EVERY dkv block b = 0 .. D/64 - 1 with
         the keys as rows: (64 keys x 64 latent columns) = dS'^T Q_b (+ P^T dO_b), each sent while the next
         block's wgmmas run (`overlap_dkv`, two accumulators) or after its own (one, the default). With keys
         as rows a thread holds 16 columns of 2 keys, which can go out as four 16-byte pieces per key with no
         lane exchange, because the fp32 accumulator stores each block's columns permuted
         (`pair_column_order`, put back by the launcher's cast): 64 bytes of a key per warp instruction. By
         default (`dkv_lines`) neighbouring quads first trade half their pieces (4 shuffles per 8 values) so
         that an instruction covers a whole 128-byte line of a key, which L2 takes 1.2x faster. The split
         schedule, whose 32-key tile cannot be a wgmma's M, computes dkv^T and needs 16 shuffles per 16
         values for 64 bytes (`write_dkv_vector`).

Why: every wgmma of the split schedule has N = 32 (its tile's keys), so for each multiply-add it reads 1.5x
the shared memory that N = 64 needs, and the kernel was bound by shared memory (ncu, H200: L1/shared 86.6%,
tensor pipe 33%). Here the dkv products, two fifths of the FLOPs, have N = 64, and dQ has K = 64 keys per
wgmma. The price is the single stage: the gather of tile t + 1 starts only when both consumers' dQ products of
tile t are done; it then overlaps consumer 1's dkv blocks of tile t, and consumer 0 waits for it. The same
division of work (one warpgroup on S, dP and dS, the other on dkv, one 64-key kv tile) is what cuDNN's SM90
DSA backward does, at 6.9 ms against this kernel's split schedule's 9.2 ms (H = 64, H100, session 17).
STATUS (session 25, H100): the op's default schedule. Its GPU tests pass (`pytest tests/test_cute_sm90_bwd.py`:
the oracle, tile edges, CUDA-graph replay, dq and deterministic dkv bitwise equal to the split schedule's).
Kernel alone, T = 4096, S_kv = 8192, K = 2048, D = 576, H = 64 / 128 (BENCHMARKS.md, session 25, run 2):
  split schedule                                   9.19 / 17.99 ms
  wide, 64-byte pieces, one dkv accumulator         8.08 / 16.41
  wide, 64-byte pieces, two (`overlap_dkv`)         8.47 / 16.84
  wide, `dkv_lines`, one accumulator (default)      7.61 / 15.11
  wide, `dkv_lines`, two                            7.53 / 17.74
  wide without the dkv writes / without dkv         6.24 / 13.15 and 3.92 / 8.50 (lines: the shuffles stay)
Session 26, same run: default 7.67 / 17.36, `uniform_send` 7.47 / 15.06 (H = 128's default is bimodal across
runs, 15.1 or 17.4 ms, unexplained); uniform_send is not the default until it has run on the GPU at D = 512.
The writes are what bounds it: 4.83 G fp32 reductions at H = 64, which L2 takes at 685 G values/s in 64-byte
pieces and 819 in 128-byte ones on this H100 (benchmarks/bench_dkv_reduction.py): 7.05 and 5.90 ms.
Timing: `tools/device_session.sh cutebwd` and `cutebwdop`.
Registers: producer 32, consumer 0 240, consumer 1 232 (`SCHEDULES`). What ptxas keeps in local memory (the
split schedule: nothing): at D = 576 one producer value per tile, at D = 512 four consumer-0 values across
its tile loop; consumer 1 none. The spill-free split at D = 576 (producer 40, consumer 1 224) measured 0.6% /
3.4% slower at H = 64 / 128 (`wide_p40`) in session 25, and with uniform_send 1.4% slower / 0.4% faster in
session 26. The D = 512 values are shared-memory addresses of the P / dS' stores: ptxas hoists one swizzled
address per st.shared out of the tile loop (the swizzle XOR hides that rows r and r + 8, or sP and sdS, differ
by constants), so computing the swizzled 16-byte chunk once per chunk and adding the constants is the fix to try.

Synchronisation per tile t (named barriers between the consumers, 256 threads unless noted):
  full / empty mbarriers: the kv stage, as in the split schedule (both consumers release it).
  SCORES_WRITTEN (c0's 128 threads): all of c0 has written sP / sdS (and fenced) before c0's dQ wgmma.
  DS_READY:  c0 arrives after writing sP / sdS of tile t; c1 waits before its dQ and dkv wgmmas.
  DS_FREE:   c1 arrives once its last dkv wgmma of tile t has completed (nothing reads sP / sdS of tile t
             any more); c0 waits before writing sP / sdS of tile t + 1. Not signalled after the last tile.
Consumer 1 reads the tile's kv ids (its dkv targets) before it releases the stage.
`BwdConfig.kv_halves`: the producer signals each half of 32 rows on its own full barrier; consumer 0 issues S
and dP of the first half as soon as it lands and waits for the second while they run, so the second half's
gather overlaps those products. (Consumer 1 waits for both.)
"""
import cutlass
import cutlass.cute as cute
from cutlass import BFloat16, Boolean, Float32, Int32, Int64, const_expr
from cutlass.cute.nvgpu import warpgroup

from csrc_dsl.cute.sm90.sparse_attention_bwd_kernel import BAR_DS_READY, DKV_BLOCK, SparseAttentionBwdSm90
from csrc_dsl.cute.sm90.sparse_attention_fwd_kernel import rows_cols_view, wgmma

BAR_DS_FREE = 4
BAR_SCORES_WRITTEN = 5


class SparseAttentionBwdSm90Wide(SparseAttentionBwdSm90):
    """The wide schedule; the producer, the 16-byte dkv write (`write_dkv_piece`) and the epilogue are the
    split schedule's."""

    def __init__(self, config):
        super().__init__(config)
        self.p_exchange_elems = 128          # no fp32 P exchange (the smallest buffer the layout takes)
        self.dp_keys = self.BN // 2          # dP in two halves (consumer 0's registers)
        self.full_barriers = 2 if config.kv_halves else 1

    SCHEDULE = "wide"

    @staticmethod
    def check_tiles(config):
        if config.dkv_write != "pair":
            raise ValueError("the wide schedule stores the dkv accumulator's columns in pair order "
                             "(dkv_write='pair')")
        if config.block_n != 64 or config.num_stages != 1:
            raise ValueError("the wide schedule is written for block_n = 64 and 1 stage")
        if config.uniform_send and not config.dkv_lines:
            raise ValueError("uniform_send is a way of exchanging pieces for dkv_lines")

    @cute.jit
    def role_work(self, mQ: cute.Tensor, mIdx: cute.Tensor, mTopkLen: cute.Tensor, token: Int32,
                  head_block: Int32, k_valid: Int32, n_tiles: Int32):
        """(token, head block, valid slots, tiles) recomputed after the role's setmaxnreg, from the block index:
        the values computed before the split lived across it and ptxas spilled them (loaded back from local
        memory in every tile); the recomputation is an integer division and one load per CTA."""
        bidx, _, _ = cute.arch.block_idx()
        head_blocks = (mQ.shape[1] + self.BM - 1) // self.BM
        w_token = bidx // head_blocks
        w_block = bidx - w_token * head_blocks
        w_valid = cutlass.min(mIdx.shape[1], cutlass.max(mTopkLen[w_token], 0))
        return w_token, w_block, w_valid, (w_valid + self.BN - 1) // self.BN

    @cute.jit
    def consume(self, mL2: cute.Tensor, mDelta: cute.Tensor, mdQ: cute.Tensor, mDkv: cute.Tensor,
                mIdx: cute.Tensor, sQ: cute.Tensor, sdO: cute.Tensor, sKV: cute.Tensor, sP: cute.Tensor,
                sdS: cute.Tensor, sIds: cute.Tensor, sPx: cute.Tensor, full_bar, empty_bar, q_bar,
                mma_s: cute.TiledMma, mma_dp: cute.TiledMma, mma_dq: cute.TiledMma,
                mma_dq_rope: cute.TiledMma, mma_kv: cute.TiledMma, scale_log2: Float32, scale: Float32,
                token: Int32, head_block: Int32, n_tiles: Int32, tid: Int32, c: cutlass.Constexpr[int]):
        """Consumer c (0: S, dP, P, dS' and dQ[:, :256] + RoPE; 1: dQ[:, 256:512] and every dkv block)."""
        BM, BN, D, DV = self.BM, self.BN, self.D, self.DV
        H = mL2.shape[1]
        with_rope = const_expr(c == 0 and self.rope > 0)

        # ---- dQ_c += dS' K_c (both consumers) ---------------------------------------------------------
        thr_dq, tQrdS, tQrK, acc_dQ, thr_dqr, tRrdS, tRrK, acc_dQr = self.dq_operands(
            mma_dq, mma_dq_rope, sKV, sdS, tid, c, with_rope)

        if const_expr(c == 0):
            # ---- S = Q K^T and dP = dO V^T, each in two halves of 32 keys (`mma_dp`) -----------------
            thr_h = mma_dp.get_slice(tid)
            sK = cute.flat_divide(sKV, (BN // 2, D))[None, None, None, 0, 0]                # (32, D, half)
            sV = cute.flat_divide(sKV, (BN // 2, DV))[None, None, None, 0, 0]             # (32, d_v, half)
            tSrQ = thr_h.make_fragment_A(thr_h.partition_A(sQ))
            tSrK = thr_h.make_fragment_B(thr_h.partition_B(sK))
            tPrdO = thr_h.make_fragment_A(thr_h.partition_A(sdO))
            tPrV = thr_h.make_fragment_B(thr_h.partition_B(sV))
            acc_S = cute.make_rmem_tensor(thr_h.partition_shape_C((BM, BN // 2)), Float32)
            acc_dP = cute.make_rmem_tensor_like(acc_S, Float32)
            S = rows_cols_view(acc_S)
            dP = rows_cols_view(acc_dP)
            half_coord = cute.flat_divide(cute.make_identity_tensor((BM, BN)), (BM, BN // 2))
            S_coord = [rows_cols_view(thr_h.partition_C(half_coord[None, None, 0, h])) for h in range(2)]
            n_rows = cute.size(S, mode=[0])
            n_cols = cute.size(S, mode=[1])
            # Per-row constants of this thread's heads (padding heads: L2 = +inf, so P = dS' = 0).
            row_l2 = cute.make_rmem_tensor((n_rows,), Float32)
            row_delta = cute.make_rmem_tensor((n_rows,), Float32)
            for i in cutlass.range_constexpr(n_rows):
                head = head_block * BM + S_coord[0][i, 0][0]
                row_l2[i] = Float32.inf
                row_delta[i] = Float32(0.0)
                if head < H:
                    row_l2[i] = mL2[token, head]
                    row_delta[i] = mDelta[token, head]
        else:
            # ---- dkv blocks, keys as rows: (key, head) views of dS' and P (A), (latent column, head) views of
            # Q and dO (B); both MN-major reads of the tiles the other products read K-major ------------------
            thr_kv = mma_kv.get_slice(tid)
            sQ_blocks, sdO_blocks, sdSt, sPt = self.dkv_operand_views(sQ, sdO, sdS, sP)
            tKrdS = thr_kv.make_fragment_A(thr_kv.partition_A(sdSt))
            tKrP = thr_kv.make_fragment_A(thr_kv.partition_A(sPt))
            tKrQ = thr_kv.make_fragment_B(thr_kv.partition_B(sQ_blocks))                  # (64, heads, block)
            tKrdO = thr_kv.make_fragment_B(thr_kv.partition_B(sdO_blocks))
            acc_KV = [cute.make_rmem_tensor(thr_kv.partition_shape_C((BN, DKV_BLOCK)), Float32)
                      for _ in range(2 if self.cfg.overlap_dkv else 1)]
            KV = [rows_cols_view(acc) for acc in acc_KV]
            KV_coord = rows_cols_view(thr_kv.partition_C(cute.make_identity_tensor((BN, DKV_BLOCK))))
            # This thread's two keys (rows) and, per 64-column block, its 16 columns 8 nt + 2 q + (0, 1), which
            # the stored order puts at 16 m + 4 q + (0 .. 3) for nt = 2 m, 2 m + 1 (`pair_column_order`).
            # `dkv_lines`: the lanes of quads g and g ^ 1 (rows 2i, 2i + 1) both send to both rows, so each
            # thread needs the address of both: slots (own & ~1, own | 1) per row half, in that order.
            n_rh = cute.size(KV[0], mode=[0])
            lines = const_expr(self.cfg.dkv_lines)
            key_slot = cute.make_rmem_tensor((2 * n_rh if lines else n_rh,), Int32)
            for rh in cutlass.range_constexpr(n_rh):
                own = KV_coord[rh, 0][0]
                if const_expr(lines):
                    key_slot[2 * rh] = own - own % 2
                    key_slot[2 * rh + 1] = own - own % 2 + 1
                else:
                    key_slot[rh] = own
            key_addrs = cute.make_rmem_tensor((cute.size(key_slot),), Int64)
            stored_col = 2 * KV_coord[0, 0][1]                                  # 4 q
            odd_quad = KV_coord[0, 0][0] % 2
            if const_expr(lines):
                stored_col += 16 * odd_quad                                     # + 16 for an odd quad
            num_tokens, topk = mL2.shape[0], mIdx.shape[1]
            col_base = mDkv.iterator.toint() + Int64(stored_col) * 4          # this thread's column of row 0
            # `uniform_send`: an odd row's pieces go 16 columns the other way (`write_dkv_lines`)
            col_base_o = col_base
            if const_expr(self.cfg.uniform_send):
                col_base_o = col_base + Int64(64 - 128 * odd_quad)

        cute.arch.mbarrier_wait(q_bar, 0)
        for it in cutlass.range(n_tiles, unroll=1):
            # the kv tile has landed (`kv_halves`: its first half, for consumer 0)
            cute.arch.mbarrier_wait(full_bar, it % 2)
            if const_expr(self.full_barriers == 2 and c == 1):
                cute.arch.mbarrier_wait(full_bar + 1, it % 2)
            cute.arch.fence_proxy("async.shared", space="cta")   # cp.async data -> wgmma reads
            if const_expr(c == 0):
                for h in cutlass.range_constexpr(2):
                    wgmma(mma_dp, acc_S, tSrQ, tSrK[None, None, None, h], zero_init=True, wait=False)
                    wgmma(mma_dp, acc_dP, tPrdO, tPrV[None, None, None, h], zero_init=True, wait=False)
                    if const_expr(h == 0 and self.full_barriers == 2):
                        # the second half lands while the first half's products run (waiting for it later,
                        # between the halves, made ptxas spill the second half's precomputed addresses)
                        cute.arch.mbarrier_wait(full_bar + 1, it % 2)
                        cute.arch.fence_proxy("async.shared", space="cta")
                    warpgroup.wait_group(1)
                    # P = exp2(scale_log2 * s - L2), 0 on invalid keys, while dP is still running.
                    for j in cutlass.range_constexpr(n_cols):
                        key_ok = sIds[S_coord[h][0, j][1], 0] >= 0
                        for i in cutlass.range_constexpr(n_rows):
                            p = cute.math.exp2(S[i, j] * scale_log2 - row_l2[i], fastmath=True)
                            S[i, j] = p if key_ok else Float32(0.0)
                    warpgroup.wait_group(0)
                    if const_expr(h == 0):
                        if it > 0:
                            cute.arch.barrier(barrier_id=BAR_DS_FREE, number_of_threads=256)
                    # dS' = scale * P * (dP - Delta); P and dS' in bf16 to smem for the tensor cores, two
                    # neighbouring keys (accumulator columns 2n, 2n + 1) per 4-byte store.
                    for i in cutlass.range_constexpr(n_rows):
                        for n in cutlass.range_constexpr(n_cols // 2):
                            r, k = S_coord[h][i, 2 * n]
                            p_pair = cute.make_rmem_tensor((2,), BFloat16)
                            ds_pair = cute.make_rmem_tensor((2,), BFloat16)
                            for e in cutlass.range_constexpr(2):
                                p = S[i, 2 * n + e]
                                p_pair[e] = BFloat16(p)
                                ds_pair[e] = BFloat16(scale * p * (dP[i, 2 * n + e] - row_delta[i]))
                            cute.autovec_copy(p_pair, cute.local_tile(sP[r, None], (2,), (k // 2,)))
                            cute.autovec_copy(ds_pair, cute.local_tile(sdS[r, None], (2,), (k // 2,)))
                cute.arch.fence_proxy("async.shared", space="cta")   # st.shared -> wgmma reads
                cute.arch.barrier(barrier_id=BAR_SCORES_WRITTEN, number_of_threads=128)
                cute.arch.barrier_arrive(barrier_id=BAR_DS_READY, number_of_threads=256)
                wgmma(mma_dq, acc_dQ, tQrdS, tQrK[None, None, None, 0], zero_init=False, wait=False)
                if const_expr(with_rope):
                    wgmma(mma_dq_rope, acc_dQr, tRrdS, tRrK[None, None, None, 0], zero_init=False, wait=False)
                warpgroup.wait_group(0)
                cute.arch.mbarrier_arrive(empty_bar)
            else:
                self.key_addresses(key_addrs, key_slot, sIds, it, token, head_block, num_tokens, topk, col_base,
                                   col_base_o)
                cute.arch.barrier(barrier_id=BAR_DS_READY, number_of_threads=256)
                wgmma(mma_dq, acc_dQ, tQrdS, tQrK[None, None, None, 0], zero_init=False, wait=True)
                cute.arch.mbarrier_arrive(empty_bar)               # the kv stage may take the next tile
                self.send_dkv_tile(mma_kv, acc_KV, KV, tKrQ, tKrdO, tKrdS, tKrP, key_addrs, it + 1 < n_tiles, tid)

        self.epilogue(mdQ, sQ, thr_dq, thr_dqr, acc_dQ, acc_dQr if const_expr(with_rope) else None,
                      token, head_block, tid, c)

    @cute.jit
    def key_addresses(self, key_rows: cute.Tensor, key_slot: cute.Tensor, sIds: cute.Tensor, it: Int32,
                        token: Int32, head_block: Int32, num_tokens: Int32, topk: Int32, col_base: Int64,
                        col_base_o: Int64):
        """Where this thread's two keys of tile `it` send their dkv values: the address of the thread's first
        (stored) column in the key's target row (0: an invalid key, nothing is sent), the target row being
        the kv row in fast mode and the slot's partial row in deterministic mode. Read from sIds before the
        kv stage is released (the producer rewrites them with the next tile's ids). Each block's columns are
        then a compile-time offset from it (an immediate in the reduction's address)."""
        for j in cutlass.range_constexpr(cute.size(key_slot)):
            slot_in_tile = key_slot[j]
            kv_id = sIds[slot_in_tile, 0]
            target = Int64(kv_id)
            if const_expr(self.deterministic):
                target = (Int64(head_block) * num_tokens + token) * topk + it * self.BN + slot_in_tile
            base = col_base_o if const_expr(j % 2 == 1 and self.cfg.dkv_lines) else col_base   # odd rows
            key_rows[j] = base + target * (self.D * 4) if kv_id >= 0 else Int64(0)

    @cute.jit
    def send_dkv_tile(self, mma_kv: cute.TiledMma, acc_KV: list, KV: list, tKrQ: cute.Tensor,
                      tKrdO: cute.Tensor, tKrdS: cute.Tensor, tKrP: cute.Tensor, key_rows: cute.Tensor,
                      signal_free: Boolean, tid: Int32):
        """Every dkv block of the tile (keys as rows): dS'^T Q_b + P^T dO_b on the d_v value columns, dS'^T Q_b
        alone on the RoPE block, each sent to global memory; then (`signal_free`) DS_FREE as soon as the last
        wgmma reading sP / sdS is done. With `overlap_dkv`, block n's wgmmas are issued on one accumulator
        before block n - 1 is sent from the other. Unrolled: in a loop over the blocks ptxas could not see
        which accumulator a wait had completed and serialized every wgmma of the kernel (C7514)."""
        blocks = list(range(self.D // DKV_BLOCK if self.cfg.ablation != "no_dkv" else 0))
        overlap = const_expr(self.cfg.overlap_dkv)
        for n in cutlass.range_constexpr(len(blocks)):
            b = blocks[n]
            with_p = b * DKV_BLOCK < self.DV
            acc = acc_KV[n % len(acc_KV)]
            wgmma(mma_kv, acc, tKrdS, tKrQ[None, None, None, b], zero_init=True, wait=False)
            if const_expr(with_p):
                wgmma(mma_kv, acc, tKrP, tKrdO[None, None, None, b], zero_init=False, wait=False)
            last = n == len(blocks) - 1
            if const_expr(overlap):
                if const_expr(n > 0):
                    warpgroup.wait_group(2 if with_p else 1)       # block n - 1 is done, n may run on
                    self.write_dkv_rows(KV[(n - 1) % 2], key_rows, blocks[n - 1], tid)
                if const_expr(last):
                    warpgroup.wait_group(0)
                    if signal_free:
                        cute.arch.barrier_arrive(barrier_id=BAR_DS_FREE, number_of_threads=256)
                    self.write_dkv_rows(KV[n % 2], key_rows, b, tid)
            else:
                warpgroup.wait_group(0)
                if const_expr(last):
                    if signal_free:
                        cute.arch.barrier_arrive(barrier_id=BAR_DS_FREE, number_of_threads=256)
                self.write_dkv_rows(KV[0], key_rows, b, tid)
        if const_expr(len(blocks) == 0):
            if signal_free:
                cute.arch.barrier_arrive(barrier_id=BAR_DS_FREE, number_of_threads=256)

    @cute.jit
    def write_dkv_rows(self, KV: cute.Tensor, key_rows: cute.Tensor, block: int, tid: Int32):
        """dkv block `block` (64 keys x 64 latent columns, keys as rows) to global memory: per key row of the
        thread, four 16-byte pieces straight from the accumulator, no lane exchange. Accumulator column
        j = 4 m + k of a row is latent column 8 (2 m + k // 2) + 2 q + k % 2 and goes to stored column
        16 m + 4 q + k, so the 4 lanes of a row (q = 0 .. 3) cover 64 contiguous bytes per instruction, as
        `write_dkv_vector` does; `dkv_output` puts the columns back in latent order (`pair_column_order`).
        `dkv_lines`: see `write_dkv_lines`."""
        if const_expr(self.cfg.dkv_lines):
            self.write_dkv_lines(KV, key_rows, block, tid)
            return
        for rh in cutlass.range_constexpr(cute.size(key_rows)):
            for m in cutlass.range_constexpr(cute.size(KV, mode=[1]) // 4):
                piece = cute.make_rmem_tensor((4,), Float32)
                for k in cutlass.range_constexpr(4):
                    piece[k] = KV[rh, 4 * m + k]
                self.write_dkv_piece(piece, key_rows[rh], block * DKV_BLOCK + 16 * m)

    @cute.jit
    def write_dkv_lines(self, KV: cute.Tensor, key_rows: cute.Tensor, block: int, tid: Int32):
        """`write_dkv_rows` with whole 128-byte lines: L2 takes fp32 reductions about 1.2x faster in 128-byte
        pieces than in 64-byte ones (benchmarks/bench_dkv_reduction.py, H100: 819 against 685 G values/s).
        Quads g (even) and g + 1 hold rows e = g and o = g + 1 (and e + 8, o + 8); per pair of pieces
        (m = 2p, 2p + 1, stored columns 32p .. 32p + 31 of a row), the even quad keeps row e's piece 2p and
        sends row e's piece 2p + 1, the odd quad keeps row o's piece 2p + 1 and sends row o's piece 2p. Then
        the 8 lanes write all 32 columns of row e in one instruction and of row o in the next, each lane at
        its stored column 32p + 16 (g % 2) + 4q (in the address, `key_addresses`). `uniform_send` trades the
        same pieces with one select fewer per value (see below). Every exchange of the block comes before its
        first write, as in `write_dkv_pair` (a write sits in a branch that the shuffles cannot cross)."""
        odd = (tid // 4) % 2 == 1
        n_rh = cute.size(KV, mode=[0])
        n_pairs = cute.size(KV, mode=[1]) // 8
        pieces = cute.make_rmem_tensor((4, n_rh * n_pairs * 2), Float32)      # (value, (row e|o, pair, rh))
        for rh in cutlass.range_constexpr(n_rh):
            for p in cutlass.range_constexpr(n_pairs):
                for k in cutlass.range_constexpr(4):
                    first, second = KV[rh, 8 * p + k], KV[rh, 8 * p + 4 + k]       # pieces 2p and 2p + 1
                    if const_expr(self.cfg.uniform_send):
                        # every lane sends piece 2p + 1: the odd quad then writes its own piece 2p of row o
                        # at 32p + 4q, the even quad the received piece 2p + 1 of row o at 32p + 16 + 4q
                        # (`col_base_o`); row e as below. One select fewer per value.
                        got = cute.arch.shuffle_sync_bfly(second, offset=4)
                        pieces[k, 2 * (rh * n_pairs + p)] = got if odd else first        # row e
                        pieces[k, 2 * (rh * n_pairs + p) + 1] = first if odd else got    # row o
                    else:
                        got = cute.arch.shuffle_sync_bfly(first if odd else second, offset=4)
                        pieces[k, 2 * (rh * n_pairs + p)] = got if odd else first        # row e
                        pieces[k, 2 * (rh * n_pairs + p) + 1] = second if odd else got   # row o
        for rh in cutlass.range_constexpr(n_rh):
            for p in cutlass.range_constexpr(n_pairs):
                for e in cutlass.range_constexpr(2):
                    self.write_dkv_piece(pieces[None, 2 * (rh * n_pairs + p) + e], key_rows[2 * rh + e],
                                         block * DKV_BLOCK + 32 * p)
