"""Compile the Triton sparse-attention forward kernel for sm_90 without a GPU and report, per launch setting,
registers, stack (spills) and how many wgmma instructions the score product (Q K^T) compiles to.

    TRITON_INTERPRET=0 python -m tools.sparse_fwd_compile_check

Why the wgmma count: with 64 heads on 8 warps, Triton's chained-dot rule puts both warpgroups on the same 64
rows of S, so each computes all of S (D/16 * 2 instructions of m64n32k16 per tile for D = 576 and 64 keys);
`FwdConfig.split_scores` gives each warpgroup half of the keys (D/16 instructions). See FwdConfig.
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from csrc_dsl.triton import sparse_attention_fwd as fwd  # noqa: E402
from tools.topk_compile_check import cubin_resources  # noqa: E402

POINTERS = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "idx_ptr": "*i32", "sink_ptr": "*fp32", "topk_len_ptr": "*i32",
            "block_table_ptr": "*i32", "seq_lens_ptr": "*i32", "out_ptr": "*bf16", "lse_ptr": "*fp32"}
# num_heads, topk and split_len are multiples of 16 at the measured shapes, as a launch specializes them
ALIGNED_INTS = ("num_heads", "topk", "split_len")


def compile_fwd_for_sm90(config: fwd.FwdConfig, dim: int = 576, d_v: int = 512):
    """The forward kernel as a launch for bf16 q / kv of head dim `dim` (sink, no topk_length, not paged)."""
    fn = fwd._sparse_mqa_fwd_kernel
    _, block_dv, tail, block_tail = fwd._dim_split(dim, d_v)
    constexprs = dict(DIM=dim, D_V=d_v, BLOCK_DV=block_dv, D_TAIL=tail, BLOCK_TAIL=block_tail,
                      BLOCK_H=config.BLOCK_H, BLOCK_N=config.BLOCK_N, HAS_SINK=True, HAS_TOPK_LENGTH=False,
                      PAGED=False, SPLIT=False, DOT_PRECISION="tf32", INT64_ROWS=False,
                      SPLIT_SCORES=fwd.split_scores_applies(config, config.BLOCK_H))
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        else:
            signature[name] = "fp32" if name == "qk_scale_log2" else "i32"
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if signature[n].startswith("*") or n in ALIGNED_INTS}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def score_wgmma_count(kernel, block_n: int = 64) -> int:
    """wgmma instructions of the score product's shape: m64n{block_n / warps along N}k16 (bf16)."""
    shapes = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.bf16\.bf16", kernel.asm["ptx"])
    return sum(1 for n in shapes if int(n) <= block_n)


def main():
    print(f"triton {triton.__version__}, target sm_90, D = 576, d_v = 512, bf16")
    print("| BLOCK_H | BLOCK_N | warps | stages | split_scores (applied) | regs | stack B | score wgmma / tile |")
    print("| --- " * 8 + "|")
    for base in (fwd.CONFIGS["h64_n64_w8_s2"], fwd.CONFIGS["h64_n32_w8_s3"], fwd.CONFIGS["h32_n64_w4_s2"]):
        for split in (0, 1):
            config = fwd.replace(base, split_scores=split)
            kernel = compile_fwd_for_sm90(config)
            r = cubin_resources(kernel)
            print(f"| {config.BLOCK_H} | {config.BLOCK_N} | {config.num_warps} | {config.num_stages} "
                  f"| {split} ({int(fwd.split_scores_applies(config, config.BLOCK_H))}) "
                  f"| {r['reg']} | {r['stack']} | {score_wgmma_count(kernel, config.BLOCK_N)} |")


if __name__ == "__main__":
    main()
