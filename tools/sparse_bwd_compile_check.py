"""Compile the Triton sparse-attention backward's kernels for sm_90 without a GPU and report, per setting, the
registers, stack (spills) and shared memory a launch requests, and the CTAs per SM those allow.

    TRITON_INTERPRET=0 python -m tools.sparse_bwd_compile_check

Why the dkv kernel's CTAs per SM matter (2026-12-07, H100): each of its programs loads a dS / P tile, multiplies,
and sends the tile's atomics in turn, so one CTA per SM leaves the tensor cores and the L2 reductions idle in turn.
With 64-slot tiles it fits one CTA per SM at H = 128 (Triton 3.6: 147 KB of shared memory; Triton 3.9: 167
registers); with 32-slot tiles, the default since session 19, two, and the kernel ran 1.3x faster (BENCHMARKS.md).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402

from csrc_dsl.triton import sparse_attention_bwd as bwd  # noqa: E402
from tools.sparse_fwd_compile_check import SM90_MAX_SHARED, compile_launch_for_sm90  # noqa: E402
from tools.topk_compile_check import cubin_resources  # noqa: E402

REGISTERS_PER_SM = 65536
POINTERS = {"lse_ptr": "*fp32", "sink_ptr": "*fp32", "grad_lse_ptr": "*fp32", "dsink_part_ptr": "*fp32",
            "indices_ptr": "*i32", "topk_length_ptr": "*i32", "dkv_ptr": "*fp32", "dq_ptr": "*bf16"}
ALIGNED_INTS = ("num_heads", "topk", "ws_stride")


def _compile(fn, constexprs: dict, num_warps: int, num_stages: int):
    return compile_launch_for_sm90(fn, constexprs, POINTERS, ("scale",), ALIGNED_INTS, num_warps, num_stages)


def compile_dkv_for_sm90(config: dict, num_heads: int, dim: int = 576, d_v: int = 512):
    """The dkv kernel's value-column launch (with the dout^T P term) for bf16 inputs, fast mode."""
    heads_block = max(16, bwd._next_pow2(num_heads))
    block_d = min(config["DKV_BLOCK_D"], max(16, bwd._next_pow2(d_v)))
    constexprs = dict(D=dim, D_V=d_v, COL_START=0, COL_END=d_v, WITH_P_TERM=True, HAS_TOPK_LENGTH=False,
                      DETERMINISTIC=False, DOT_PRECISION="tf32", HEADS_BLOCK=heads_block, BLOCK_D=block_d,
                      BLOCK_N=config["DKV_BLOCK_N"])
    return _compile(bwd._dkv_kernel, constexprs, config["DKV_WARPS"], config["DKV_STAGES"])


def compile_scores_for_sm90(config: dict, dim: int = 576, d_v: int = 512):
    """The score kernel for bf16 inputs with a sink; `config` from `pick_config` (its BLOCK_H fitted to H)."""
    stacked, warps, block_n, stages, ids_ahead = bwd.score_launch(config, config["BLOCK_H"], 2)  # 2: bf16
    constexprs = dict(D=dim, D_V=d_v, DV_BLOCK=bwd._next_pow2(d_v), D_ROPE=max(16, bwd._next_pow2(dim - d_v)),
                      HAS_ROPE=dim > d_v, HAS_SINK=True, HAS_TOPK_LENGTH=False, HAS_GRAD_LSE=False,
                      DOT_PRECISION="tf32", BLOCK_H=config["BLOCK_H"], BLOCK_N=block_n, WS_PAD=bwd._WS_PAD,
                      STACKED=stacked, IDS_AHEAD=ids_ahead)
    return _compile(bwd._scores_kernel, constexprs, warps, stages)


def compile_dq_for_sm90(config: dict, num_heads: int, dim: int = 576, d_v: int = 512):
    """The dq kernel for bf16 inputs, as the launcher picks its head block and column parts."""
    dv_block, d_rope = bwd._next_pow2(d_v), max(16, bwd._next_pow2(dim - d_v))
    block_h, col_parts = bwd.dq_launch(config, num_heads, 2, dv_block, d_rope, dim > d_v)  # 2: bf16
    constexprs = dict(D=dim, D_V=d_v, DV_BLOCK=dv_block, D_ROPE=d_rope, HAS_ROPE=dim > d_v, HAS_TOPK_LENGTH=False,
                      DOT_PRECISION="tf32", BLOCK_H=block_h, BLOCK_N=config["DQ_BLOCK_N"], COL_PARTS=col_parts)
    return _compile(bwd._dq_kernel, constexprs, config["DQ_WARPS"], config["DQ_STAGES"])


def _resource_rows(compile_one, settings, ctas_per_sm: bool = False) -> list:
    """[setting, H, regs, stack, shared] of compile_one(config, num_heads) for each setting at H = 64 and 128;
    `ctas_per_sm`: and the CTAs that registers and shared memory let one SM hold."""
    rows = []
    for overrides in settings:
        for num_heads in (64, 128):
            kernel = compile_one(bwd.pick_config(num_heads, overrides), num_heads)
            r = cubin_resources(kernel)
            shared = kernel.metadata.shared
            row = [overrides or "default", num_heads, r["reg"], r["stack"], shared]
            if ctas_per_sm:
                row.append(min(REGISTERS_PER_SM // (r["reg"] * 32 * kernel.metadata.num_warps),
                               SM90_MAX_SHARED // max(shared, 1)))
            rows.append(row)
    return rows


def dq_rows(settings=("DQ_SPLIT=0", "DQ_SPLIT=1")) -> list:
    """[setting, H, regs, stack, shared] of the dq kernel (Triton 3.6, H = 128: all columns of 64 heads, 255
    registers and 163840 B; half of the columns of 128 heads, 220 registers and 106496 B; no spills)."""
    return _resource_rows(compile_dq_for_sm90, settings)


SETTINGS = ("", "DKV_BLOCK_N=64")   # the default, and its 64-slot tiles before session 19


def dkv_rows() -> list:
    """[setting, H, regs, stack, shared, CTAs per SM] of the dkv kernel for every SETTINGS entry."""
    return _resource_rows(compile_dkv_for_sm90, SETTINGS, ctas_per_sm=True)


def score_rows(settings=("SCORE_STACKED=0", "SCORE_STACKED=1", "SCORE_STACKED=1,STACKED_BLOCK_N=32,STACKED_STAGES=2")
               ) -> list:
    """[setting, H, regs, stack, shared] of the score kernel for each setting. By default: the two products on 4
    warps (Triton 3.6: 247 registers, 217088 B), the stacked product on 64-slot tiles at one stage with the ids a
    step ahead (Triton 3.6: 220 registers, no spill, 212992 B; Triton 3.9: 255 registers, a 264-byte spill,
    212992 B), and the stacked product on 32-slot tiles at two stages, also with the ids ahead (Triton 3.6: 202
    registers, 229376 B; Triton 3.9: a 360-byte spill and 237568 B, more than an H100 block may have)."""
    return _resource_rows(lambda config, num_heads: compile_scores_for_sm90(config), settings)


def main():
    print(f"triton {triton.__version__}, target sm_90, D = 576, d_v = 512, bf16")
    print("| dkv setting | H | regs | stack B | shared B | CTAs/SM |")
    print("| --- " * 6 + "|")
    for name, heads, regs, stack, shared, ctas in dkv_rows():
        print(f"| {name} | {heads} | {regs} | {stack} | {shared} | {ctas} |")
    for name, heads, regs, stack, shared in score_rows():
        print(f"scores kernel ({name}), H={heads}: {regs} registers, {stack} B stack, {shared} B shared")
    for name, heads, regs, stack, shared in dq_rows():
        print(f"dq kernel ({name}), H={heads}: {regs} registers, {stack} B stack, {shared} B shared")


if __name__ == "__main__":
    main()
