"""Compile the Triton top-k kernel for sm_90 without a GPU (Triton >= 3.x can target a GPUTarget on CPU) and
print registers / spills / shared memory per configuration, from the cubin (cuobjdump shipped with Triton).

    python tools/topk_compile_check.py
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from csrc_dsl.triton import topk as tk  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTRS = [("src_val_ptr", "*fp32"), ("src_col_ptr", "*i32"), ("lengths_ptr", "*i32"), ("out_val_ptr", "*fp32"),
        ("out_col_ptr", "*i32")]
INTS = [("n_cols", "i32"), ("row_stride", "i32"), ("seg_len", "i32"), ("n_segs", "i32"), ("n_tasks", "i32"),
        ("k", "i32")]


def compile_for_sm90(fn, buf_types, constexprs, num_warps, maxnreg=None):
    """Compiles a top-k kernel for sm_90 (no GPU needed). `constexprs` may also fix integer arguments (a launch
    with k == 1, one row or one column makes them compile-time constants)."""
    sig = dict(PTRS + buf_types + [("task_counter_ptr", "*i32")] + INTS)
    sig.update({name: "constexpr" for name in constexprs})
    # As a launch specializes them: every pointer and n_cols / row_stride / seg_len divisible by 16.
    names = list(sig)
    aligned = [n for n in names if sig[n].startswith("*") or (n in ("n_cols", "row_stride", "seg_len")
                                                              and sig[n] != "constexpr")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    opts = dict(num_warps=num_warps)
    if maxnreg is not None:
        opts["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def compile_one(fn, buf_types, constexprs, num_warps, maxnreg=None):
    """compile_for_sm90, then registers / stack / shared memory from the cubin and 16-byte loads in the PTX."""
    kernel = compile_for_sm90(fn, buf_types, constexprs, num_warps, maxnreg)
    ptx = kernel.asm["ptx"]
    return dict(cubin_resources(kernel), ld_v4=len(re.findall(r"ld\.global[.\w:]*\.v4", ptx)))


def cubin_resources(kernel) -> dict:
    """Registers, stack (spills), shared and local memory of a compiled Triton kernel, read from its cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    return dict(reg=int(m[1]), stack=int(m[2]), shared=int(m[3]), local=int(m[4]))


def main():
    k, k_pow2 = 2048, 2048
    print(f"triton {triton.__version__}, target sm_90")
    print("| BLOCK | warps | SELECT_BLOCK | SAMPLE | maxnreg | SORTED | COLS_FROM_SRC | HAS_LENGTHS | regs "
          "| stack (spill) B | shared B | v4 loads in PTX | warps/SM by regs |")
    print("| --- " * 13 + "|")
    failures = 0
    configs = []
    flags = list(itertools.product([False, True], [False, True], [False, True]))  # SORTED, COLS_FROM_SRC, LENGTHS
    # The defaults with every flag, then the other settings of benchmarks/bench_topk.py --sweep (plain kernel)
    bufs = [("buf_val_ptr", "*fp32"), ("buf_col_ptr", "*i32")]
    default = (tk.BLOCK, tk.NUM_WARPS, tk.SELECT_BLOCK, tk.SAMPLE, None)
    settings = [default] + [(256, 1, 256, 1024, 64), (512, 1, 256, 1024, None), (256, 1, 256, 2048, None),
                            (512, 2, 512, 1024, None),
                            (1024, 4, 1024, 1024, None)]
    for block, warps, sel, sample, maxnreg in settings:
        for sorted_out, cols, lens in flags:
            if (block, warps, sel, sample, maxnreg) != default and (sorted_out or cols or lens):
                continue
            cap = (triton.cdiv(tk.CAP_K * k, block) + tk.BUFFER_STEPS) * block
            w = max(warps, min(8, k_pow2 // 1024)) if sorted_out else warps
            configs.append((dict(HAS_LENGTHS=lens, COLS_FROM_SRC=cols, SORTED=sorted_out, BLOCK=block, CAP=cap,
                                 K_POW2=k_pow2, SAMPLE=sample, SAMPLE_RUNS=16, SAMPLE_ROUNDS=2, SELECT_BLOCK=sel,
                                 RADIX_BITS=tk.RADIX_BITS, GUESS_SIGMAS=float(tk.GUESS_SIGMAS),
                                 ASM_STORE=True, SELECT_PREFETCH=tk.SELECT_PREFETCH), w, maxnreg))
    for const, warps, maxnreg in configs:
        try:
            r = compile_one(tk._stream_topk_kernel, bufs, const, warps, maxnreg)
        except Exception as exc:  # report and go on
            failures += 1
            print(f"| {const['BLOCK']} | {warps} | FAILED: {type(exc).__name__}: {str(exc)[:300]} |")
            continue
        per_warp = ((r["reg"] + 7) // 8 * 8) * 32  # registers are allocated per warp in units of 256
        progs = min(32, 65536 // (per_warp * warps), 64 // warps)
        print(f"| {const['BLOCK']} | {warps} | {const['SELECT_BLOCK']} | {const['SAMPLE']} "
              f"| {maxnreg} | {const['SORTED']} | {const['COLS_FROM_SRC']} | {const['HAS_LENGTHS']} | {r['reg']} "
              f"| {r['stack'] + r['local']} | {r['shared']} | {r['ld_v4']} | {progs * warps} |", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
