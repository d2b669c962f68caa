"""Microbenchmark: how fast L2 takes fp32 reductions into a [S, D] accumulator, by the width of the piece
of one row that a warp instruction covers (the question behind the CuTe-DSL backward's dkv writes).

    python -m benchmarks.bench_dkv_reduction [--rows 1048576] [--S 8192] [--D 576] [--bulk]

Each of `rows` updates adds D fp32 values into row idx[u] (random in [0, S), like top-k ids) with
`tl.atomic_add` (relaxed; Triton vectorizes it to 16-byte atomics where the values are contiguous).
A program covers BLOCK_K updates x BLOCK_C columns per step, so a warp instruction covers pieces of
BLOCK_C * 4 bytes of several rows: BLOCK_C = 8 gives 32-byte pieces (what the CuTe-DSL kernel's
accumulator layout gives it), 32 full 128-byte lines. The values are computed, not loaded, so only the
reductions move memory. Prints G elements/s and GB/s per piece width, and the reduction instructions
found in the PTX.

`--bulk` adds, in the same run, the same updates sent by the TMA unit from shared memory
(`cp.reduce.async.bulk ... .add.f32`, benchmarks/bulk_reduction_kernel.py, CuTe-DSL): C-column pieces of R
updates per step, at 1, 2 and 4 CTAs of 128 threads per SM.
"""
from __future__ import annotations

import argparse
import re

import torch
import triton
import triton.language as tl


@triton.jit
def _scatter_add_kernel(idx_ptr, dst_ptr, D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    updates = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = tl.load(idx_ptr + updates).to(tl.int64)
    for c0 in tl.static_range(0, D, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        values = (updates[:, None] % 7 + cols[None, :] % 5).to(tl.float32) * 0.25
        tl.atomic_add(dst_ptr + rows[:, None] * D + cols[None, :], values, sem="relaxed")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1 << 20)
    parser.add_argument("--S", type=int, default=8192)
    parser.add_argument("--D", type=int, default=576)
    parser.add_argument("--bulk", action="store_true", help="also the TMA unit's bulk reductions (CuTe-DSL)")
    args = parser.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    idx = torch.randint(0, args.S, (args.rows,), device="cuda", generator=g, dtype=torch.int32)
    dst = torch.zeros(args.S, args.D, device="cuda")
    elements = args.rows * args.D
    print(f"{args.rows} updates of {args.D} fp32 into [{args.S}, {args.D}] (random rows), "
          f"{elements / 1e9:.2f} G elements per call")
    print("| piece bytes | ms | G elements/s | GB/s | reduction instructions (PTX) |")
    print("| --- | --- | --- | --- | --- |")
    for block_c in (8, 16, 32, 64):
        block_k = 2048 // block_c

        def run():
            _scatter_add_kernel[(args.rows // block_k,)](idx, dst, D=args.D, BLOCK_K=block_k, BLOCK_C=block_c,
                                                          num_warps=4)
        run()
        compiled = _scatter_add_kernel.warmup(idx, dst, D=args.D, BLOCK_K=block_k, BLOCK_C=block_c, num_warps=4,
                                              grid=(1,))
        reds = sorted(set(re.findall(r"\b(?:red|atom)\.global[\w.]*", compiled.asm["ptx"])))
        ms = triton.testing.do_bench(run, warmup=5, rep=200)
        print(f"| {block_c * 4} | {ms:.3f} | {elements / ms / 1e6:.0f} | "
              f"{elements * 4 / ms / 1e6:.0f} | {', '.join(reds)} |")
    if args.bulk:
        bulk(idx, dst, elements)


def bulk(idx, dst, elements) -> None:
    """The TMA unit's bulk reductions, same updates and accumulator."""
    from csrc_dsl.cute.common import current_stream
    from benchmarks.bulk_reduction_kernel import compile_bench

    D = dst.shape[1]
    sms = torch.cuda.get_device_properties(dst.device).multi_processor_count
    print("\n| bulk piece bytes (C x 4) | updates per step (R) | CTAs per SM | ms | G elements/s | GB/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for cols, per_step in ((32, 32), (64, 32), (128, 16), (D, 8)):
        if D % cols:
            continue
        kernel = compile_bench(D, cols, per_step)
        for ctas_per_sm in (1, 2, 4):
            def run():
                kernel(idx, dst, sms * ctas_per_sm, current_stream())
            run()
            ms = triton.testing.do_bench(run, warmup=5, rep=200)
            print(f"| {cols * 4} | {per_step} | {ctas_per_sm} | {ms:.3f} | {elements / ms / 1e6:.0f} | "
                  f"{elements * 4 / ms / 1e6:.0f} |", flush=True)
    # the sums must be right: one more call on a fresh accumulator against torch's index_add
    check_rows = idx[: 1 << 14]
    kernel = compile_bench(D, 64, 32)
    got = torch.zeros_like(dst)
    kernel(check_rows, got, sms, current_stream())
    e = torch.arange(32 * 64, device=dst.device)
    want = torch.zeros_like(dst)
    groups = torch.arange(check_rows.numel() // 32, device=dst.device)
    for c0 in range(0, D, 64):
        tile = (((e[None, :] // 64 + groups[:, None]) % 7 + (e[None, :] % 64 + c0) % 5).float() * 0.25)
        want[:, c0:c0 + 64].index_add_(0, check_rows.long(), tile.view(-1, 64))
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"bulk sums against index_add: max relative error {err:.2e}")
    assert err < 1e-5


if __name__ == "__main__":
    main()
