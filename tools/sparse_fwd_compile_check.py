"""Compile the Triton sparse-attention forward kernel for sm_90 without a GPU and report, per launch setting,
registers, stack (spills), the shared memory a launch requests, and the wgmma instructions of the score product.

    TRITON_INTERPRET=0 python -m tools.sparse_fwd_compile_check

Shared memory is `kernel.metadata.shared`, what the launch asks for (the cubin's static count is only 1 KB); an
H100 grants a block at most 232448 bytes and a launch that asks for more fails. Score wgmmas: with 64 heads on
8 warps Triton's chained-dot rule stacks both warpgroups on the same 64 rows of S, so each computes all of
Q K^T (72 m64n32k16 per 64-key tile at D = 576, not 36). Splitting S between the warpgroups was tried on
2026-12-06 and not kept: docs/experiments/triton-fwd-split-scores.patch, BENCHMARKS.md.
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from csrc_dsl.triton import sparse_attention_fwd as fwd  # noqa: E402
from tools.topk_compile_check import cubin_resources  # noqa: E402

SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on an H100 (227 KB)
POINTERS = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "idx_ptr": "*i32", "sink_ptr": "*fp32", "topk_len_ptr": "*i32",
            "block_table_ptr": "*i32", "seq_lens_ptr": "*i32", "out_ptr": "*bf16", "lse_ptr": "*fp32"}
# num_heads, topk and split_len are multiples of 16 at the measured shapes, as a launch specializes them
ALIGNED_INTS = ("num_heads", "topk", "split_len")


def compile_fwd_for_sm90(config: fwd.FwdConfig, dim: int = 576, d_v: int = 512, paged: bool = False,
                         split: bool = False):
    """The forward kernel as a launch for bf16 q / kv of head dim `dim` (sink, no topk_length)."""
    fn = fwd._sparse_mqa_fwd_kernel
    _, block_dv, tail, block_tail = fwd._dim_split(dim, d_v)
    constexprs = dict(DIM=dim, D_V=d_v, BLOCK_DV=block_dv, D_TAIL=tail, BLOCK_TAIL=block_tail,
                      BLOCK_H=config.BLOCK_H, BLOCK_N=config.BLOCK_N, HAS_SINK=True, HAS_TOPK_LENGTH=False,
                      PAGED=paged, SPLIT=split, DOT_PRECISION="tf32", INT64_ROWS=False)
    pointers = dict(POINTERS, out_ptr="*fp32") if split else POINTERS   # split-K partials are fp32
    return compile_launch_for_sm90(fn, constexprs, pointers, ("qk_scale_log2",), ALIGNED_INTS, config.num_warps,
                                   config.num_stages)


def compile_launch_for_sm90(fn, constexprs: dict, pointers: dict, float_args, aligned_ints, num_warps: int,
                            num_stages: int):
    """`fn` compiled for sm_90 as a launch would specialize it: `constexprs` fixed, pointers typed by `pointers`
    (others bf16), the `float_args` fp32, other arguments i32; every pointer and the `aligned_ints` divisible by
    16. Shared with tools/sparse_bwd_compile_check.py."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*bf16")
        else:
            signature[name] = "fp32" if name in float_args else "i32"
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if signature[n].startswith("*") or n in aligned_ints}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                                   num_stages=num_stages))


def score_wgmma_count(kernel, block_n: int = 64) -> int:
    """wgmma instructions of the score product's shape: m64n{<= block_n}k16 (bf16)."""
    shapes = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.bf16\.bf16", kernel.asm["ptx"])
    return sum(1 for n in shapes if int(n) <= block_n)


def default_launches():
    """(config, D, split) of every launch the bf16 defaults make for H in {16, 32, 64, 128}, D in {512, 576}:
    many programs (prefill, one split) and few (decode, split-K), deduplicated."""
    seen = []
    for heads in (16, 32, 64, 128):
        for dim in (512, 576):
            for programs in (1 << 20, 1):
                config = fwd.default_config(heads, dim, torch.bfloat16, num_programs=programs)
                launch = (config, dim, programs == 1)  # one program: split-K
                if launch not in seen:
                    seen.append(launch)
    return seen


def main():
    print(f"triton {triton.__version__}, target sm_90, d_v = 512, bf16; H100 shared memory limit {SM90_MAX_SHARED} B")
    print("| D | BLOCK_H | BLOCK_N | warps | stages | split-K | regs | stack B | shared B | score wgmma / tile |")
    print("| --- " * 10 + "|")
    for config, dim, split in default_launches():
        kernel = compile_fwd_for_sm90(config, dim, split=split)
        r = cubin_resources(kernel)
        print(f"| {dim} | {config.BLOCK_H} | {config.BLOCK_N} | {config.num_warps} | {config.num_stages} | {split} "
              f"| {r['reg']} | {r['stack']} | {kernel.metadata.shared} | {score_wgmma_count(kernel, config.BLOCK_N)} |")


if __name__ == "__main__":
    main()
