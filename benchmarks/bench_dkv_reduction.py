"""Microbenchmark: how fast L2 takes fp32 reductions into a [S, D] accumulator, by the width of the piece
of one row that a warp instruction covers (the question behind the CuTe-DSL backward's dkv writes).

    python -m benchmarks.bench_dkv_reduction [--rows 1048576] [--S 8192] [--D 576]

Each of `rows` updates adds D fp32 values into row idx[u] (random in [0, S), like top-k ids) with
`tl.atomic_add` (relaxed; Triton vectorizes it to 16-byte atomics where the values are contiguous).
A program covers BLOCK_K updates x BLOCK_C columns per step, so a warp instruction covers pieces of
BLOCK_C * 4 bytes of several rows: BLOCK_C = 8 gives 32-byte pieces (what the CuTe-DSL kernel's
accumulator layout gives it), 32 full 128-byte lines. The values are computed, not loaded, so only the
reductions move memory. Prints G elements/s and GB/s per piece width, and the reduction instructions
found in the PTX.
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


if __name__ == "__main__":
    main()
