"""A CuTe-DSL microbenchmark kernel for `bench_dkv_reduction --bulk`: fp32 reductions into random rows of an
[S, D] accumulator sent by the TMA unit (`cp.reduce.async.bulk ... .add.f32`, one instruction per piece of a
row, from shared memory) instead of by the threads (`red.global.add`).

The question it answers: whether a backward that stages its dkv blocks in shared memory and hands them to the
TMA unit could beat the L2 rate the threads' 16-byte reductions reach (BENCHMARKS.md: at most 816 G values/s
on the H100, 957 on the H200, in 128-byte pieces), which is the floor under the CuTe-DSL backward's time.

Each CTA (128 threads) takes groups of R updates in turn (group = block, block + grid, ...). For each group and
each C-column chunk of the row, the threads fill an R x C fp32 tile in one of NBUF shared buffers (values
computed, not loaded), fence it for the async proxy, and threads 0..R-1 each send one C*4-byte piece to their
update's row. A thread waits for its own earlier bulk groups to have read a buffer (`cp.async.bulk.wait_group
.read`) before the buffer is filled again. The kernel never waits for the reductions themselves to land.
"""
from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op
from cutlass.utils import SmemAllocator

THREADS = 128


@dsl_user_op
def bulk_reduce_add_f32(gmem_addr: Int64, smem_addr: Int32, num_bytes: Int32, *, loc=None, ip=None):
    """One bulk fp32 add of `num_bytes` (a multiple of 16) from shared to global memory, in this thread's
    current bulk group."""
    llvm.inline_asm(None, [Int64(gmem_addr).ir_value(loc=loc, ip=ip), Int32(smem_addr).ir_value(loc=loc, ip=ip),
                           Int32(num_bytes).ir_value(loc=loc, ip=ip)],
                    "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [$0], [$1], $2;", "l,r,r",
                    has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


class BulkReduceBench:
    """One compiled variant: D (row length), C (columns per piece), R (updates per group), NBUF buffers."""

    def __init__(self, D: int, C: int, R: int, nbuf: int = 2):
        if D % C != 0 or C % 4 != 0 or R > THREADS or (R * C) % THREADS != 0:
            raise ValueError(f"unsupported D={D}, C={C}, R={R}")
        self.D, self.C, self.R, self.nbuf = D, C, R, nbuf
        self.smem_bytes = nbuf * R * C * 4

    @cute.jit
    def __call__(self, mIdx: cute.Tensor, mDst: cute.Tensor, num_ctas: Int32, stream: cuda.CUstream):
        self.kernel(mIdx, mDst).launch(grid=[num_ctas, 1, 1], block=[THREADS, 1, 1], smem=self.smem_bytes,
                                       stream=stream)

    @cute.kernel
    def kernel(self, mIdx: cute.Tensor, mDst: cute.Tensor):
        D, C, R, nbuf = self.D, self.C, self.R, self.nbuf
        tid, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        smem = SmemAllocator()
        buf = smem.allocate_tensor(Float32, cute.make_layout((R * C, nbuf)), byte_alignment=128)
        dst_base = mDst.iterator.toint()
        num_groups = mIdx.shape[0] // R
        step = Int32(0)
        for group in cutlass.range(bid, num_groups, grid, unroll=1):
            for c0 in cutlass.range_constexpr(0, D, C):
                slot = step % nbuf
                if tid < R:
                    # this thread's pieces sent from this buffer NBUF steps ago have been read
                    cute.arch.cp_async_bulk_wait_group(nbuf - 1, read=True)
                cute.arch.barrier()
                for v in cutlass.range_constexpr(R * C // THREADS):
                    e = v * THREADS + tid
                    buf[e, slot] = Float32((e // C + group) % 7 + (e % C + c0) % 5) * 0.25
                cute.arch.fence_proxy("async.shared", space="cta")   # st.shared -> the bulk copy's reads
                cute.arch.barrier()
                if tid < R:
                    row = Int64(mIdx[group * R + tid])
                    piece = cute.local_tile(buf[None, slot], (C,), (tid,))
                    bulk_reduce_add_f32(dst_base + (row * D + c0) * 4, Int32(piece.iterator.toint()), C * 4)
                    cute.arch.cp_async_bulk_commit_group()
                step += 1
        if tid < R:
            cute.arch.cp_async_bulk_wait_group(0, read=True)   # shared memory must outlive the reads


def fake_arguments():
    """Fake tensors with symbolic sizes: compiles with no GPU (`fake_compile.compile_fake`)."""
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    updates, rows, cols = (cute.sym_int() for _ in range(3))
    idx = make_fake_compact_tensor(cutlass.Int32, (updates,), assumed_align=4)
    dst = make_fake_compact_tensor(cutlass.Float32, (rows, cols), stride_order=(1, 0), assumed_align=16)
    return [idx, dst, Int32(1), make_fake_stream()]


def compile_bench(D: int, C: int, R: int, nbuf: int = 2):
    """The TVM-FFI callable (idx int32 [U], dst fp32 [S, D], num_ctas, stream); needs no GPU to build."""
    return cute.compile(BulkReduceBench(D, C, R, nbuf), *fake_arguments(), options="--enable-tvm-ffi")
