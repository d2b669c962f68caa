"""Experiment: three MMA layouts for the dense indexer logits (dense keys, ratio 1, bottom-right causal).

    python -m benchmarks.experiments.indexer_layouts            # GPU: check, then time each layout vs cuDNN

Why: the shipped kernel (csrc_dsl/triton/indexer.py) puts keys in the MMA's M and heads in its N
(m64n64k16 with both operands in shared memory: 4 KB read per 32 tensor-core cycles, the whole shared-memory
bandwidth of an SM). Two layouts read less shared memory per FLOP:
- heads_m: heads are M, keys are N (m64n128/256k16: q 2 KB + keys 4-8 KB per 64-128 cycles); the head
  reduction then runs across the MMA's rows (shuffles and a shared-memory pass, which Triton emits).
- two_rows: keys are M and two query rows share one MMA (N = 2 x heads), so each key tile read serves two rows.
Found on the CPU while compiling for sm_90 (Triton 3.6, not kept): putting the key tile in registers as the
MMA's A operand makes Triton reload it with LDSM before every HGMMA, and issuing the next row's MMA before
this row's epilogue still waits for it at once (and spills).

The kernels here are the experiment's own minimal copies (dense, ratio 1, no paging); the winner, if any,
moves into csrc_dsl/triton/indexer.py behind its tests. CPU check: tests/test_indexer_layouts.py runs them
under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl


@triton.jit
def _fill_unseen_rows(out_ptr, n_rows, q_start, stride_os, rows_per_prog, offs_k, col_ok, k0):
    """-inf into this program's rows that see none of its key tile (row r sees key k0 iff r >= k0 - q_start);
    returns the first row that sees some of it and the end of the program's rows."""
    row_lo = tl.program_id(1) * rows_per_prog
    row_hi = tl.minimum(row_lo + rows_per_prog, n_rows)
    row_mid = tl.minimum(tl.maximum(k0 - q_start, row_lo), row_hi)
    for r in range(row_lo, row_mid):
        tl.store(out_ptr + r * stride_os.to(tl.int64) + offs_k, tl.full(offs_k.shape, float("-inf"), tl.float32),
                 mask=col_ok)
    return row_mid, row_hi


@triton.jit
def _keys_m_kernel(q_ptr, k_ptr, w_ptr, out_ptr, n_rows, Sk, q_start, stride_qs, stride_ws, stride_os, w_scale,
                   rows_per_prog, HI: tl.constexpr, DI: tl.constexpr, HI_PAD: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """The shipped layout: s [BLOCK_K keys, HI_PAD heads], head reduction inside a row of the MMA tile."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, HI_PAD)
    offs_d = tl.arange(0, DI)
    h_ok = offs_h < HI
    col_ok = offs_k < Sk
    row_mid, row_hi = _fill_unseen_rows(out_ptr, n_rows, q_start, stride_os, rows_per_prog, offs_k, col_ok, k0)
    if row_mid < row_hi:
        k_tile = tl.load(k_ptr + offs_k.to(tl.int64)[:, None] * DI + offs_d[None, :], mask=col_ok[:, None],
                         other=0.0)
        first = row_mid + tl.zeros((), tl.int64)
        q_ptrs = q_ptr + first * stride_qs + offs_h[:, None] * DI + offs_d[None, :]
        w_ptrs = w_ptr + first * stride_ws + offs_h
        out_ptrs = out_ptr + first * stride_os + offs_k
        for r in range(row_mid, row_hi):
            q_row = tl.load(q_ptrs, mask=h_ok[:, None], other=0.0)
            s = tl.dot(k_tile, tl.trans(q_row), input_precision=PRECISION)  # [BLOCK_K, HI_PAD]
            w_row = tl.load(w_ptrs, mask=h_ok, other=0.0).to(tl.float32) * w_scale
            logits = tl.sum(tl.maximum(s, 0.0) * w_row[None, :], axis=1)
            tl.store(out_ptrs, tl.where(offs_k < q_start + r + 1, logits, float("-inf")), mask=col_ok)
            q_ptrs += stride_qs
            w_ptrs += stride_ws
            out_ptrs += stride_os


@triton.jit
def _heads_m_kernel(q_ptr, k_ptr, w_ptr, out_ptr, n_rows, Sk, q_start, stride_qs, stride_ws, stride_os, w_scale,
                    rows_per_prog, HI: tl.constexpr, DI: tl.constexpr, HI_PAD: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """s [HI_PAD heads, BLOCK_K keys]: wider MMAs, the head reduction across the tile's rows."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, HI_PAD)
    offs_d = tl.arange(0, DI)
    h_ok = offs_h < HI
    col_ok = offs_k < Sk
    row_mid, row_hi = _fill_unseen_rows(out_ptr, n_rows, q_start, stride_os, rows_per_prog, offs_k, col_ok, k0)
    if row_mid < row_hi:
        k_tile = tl.load(k_ptr + offs_k.to(tl.int64)[:, None] * DI + offs_d[None, :], mask=col_ok[:, None],
                         other=0.0)
        first = row_mid + tl.zeros((), tl.int64)
        q_ptrs = q_ptr + first * stride_qs + offs_h[:, None] * DI + offs_d[None, :]
        w_ptrs = w_ptr + first * stride_ws + offs_h
        out_ptrs = out_ptr + first * stride_os + offs_k
        for r in range(row_mid, row_hi):
            q_row = tl.load(q_ptrs, mask=h_ok[:, None], other=0.0)
            s = tl.dot(q_row, tl.trans(k_tile), input_precision=PRECISION)  # [HI_PAD, BLOCK_K]
            w_row = tl.load(w_ptrs, mask=h_ok, other=0.0).to(tl.float32) * w_scale
            logits = tl.sum(tl.maximum(s, 0.0) * w_row[:, None], axis=0)
            tl.store(out_ptrs, tl.where(offs_k < q_start + r + 1, logits, float("-inf")), mask=col_ok)
            q_ptrs += stride_qs
            w_ptrs += stride_ws
            out_ptrs += stride_os


@triton.jit
def _two_rows_kernel(q_ptr, k_ptr, w_ptr, out_ptr, n_rows, Sk, q_start, stride_qs, stride_ws, stride_os, w_scale,
                     rows_per_prog, HI: tl.constexpr, DI: tl.constexpr, HI_PAD: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """s [BLOCK_K keys, 2 x HI_PAD]: columns [0, HI_PAD) are row r's heads, the rest row r + 1's."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_h2 = tl.arange(0, 2 * HI_PAD)
    second = offs_h2 >= HI_PAD
    head = offs_h2 % HI_PAD
    offs_d = tl.arange(0, DI)
    h_ok = head < HI
    col_ok = offs_k < Sk
    row_mid, row_hi = _fill_unseen_rows(out_ptr, n_rows, q_start, stride_os, rows_per_prog, offs_k, col_ok, k0)
    if row_mid < row_hi:
        k_tile = tl.load(k_ptr + offs_k.to(tl.int64)[:, None] * DI + offs_d[None, :], mask=col_ok[:, None],
                         other=0.0)
        first = row_mid + tl.zeros((), tl.int64)
        row_of = first + second.to(tl.int64)
        q_ptrs = q_ptr + row_of[:, None] * stride_qs + head[:, None] * DI + offs_d[None, :]
        w_ptrs = w_ptr + row_of * stride_ws + head
        out_ptrs = out_ptr + first * stride_os + offs_k
        for r in range(row_mid, row_hi, 2):
            ok = h_ok & (r + second.to(tl.int32) < row_hi)
            q_rows = tl.load(q_ptrs, mask=ok[:, None], other=0.0)
            s = tl.maximum(tl.dot(k_tile, tl.trans(q_rows), input_precision=PRECISION), 0.0)  # [BLOCK_K, 2 HI_PAD]
            w_rows = tl.load(w_ptrs, mask=ok, other=0.0).to(tl.float32) * w_scale
            first_row = tl.sum(s * tl.where(second, 0.0, w_rows)[None, :], axis=1)
            second_row = tl.sum(s * tl.where(second, w_rows, 0.0)[None, :], axis=1)
            tl.store(out_ptrs, tl.where(offs_k < q_start + r + 1, first_row, float("-inf")), mask=col_ok)
            tl.store(out_ptrs + stride_os, tl.where(offs_k < q_start + r + 2, second_row, float("-inf")),
                     mask=col_ok & (offs_k * 0 + r + 1 < row_hi))
            q_ptrs += 2 * stride_qs
            w_ptrs += 2 * stride_ws
            out_ptrs += 2 * stride_os


KERNELS = {"keys_m": _keys_m_kernel, "heads_m": _heads_m_kernel, "two_rows": _two_rows_kernel}


def logits(layout: str, q, k, w, scale: float, *, block_k: int, num_warps: int, num_stages: int,
           rows_per_prog: int | None = None):
    """scores [Sq, Sk] fp32 of one sequence (q [Sq, HI, DI], k [Sk, DI], w [Sq, HI]), bottom-right causal."""
    from csrc_dsl.triton._common import dot_precision, pad_pow2
    from csrc_dsl.triton.indexer import _rows_per_program

    Sq, HI, DI = q.shape
    Sk = k.shape[0]
    out = torch.empty(Sq, Sk, dtype=torch.float32, device=q.device)
    n_tiles = triton.cdiv(Sk, block_k)
    rows = rows_per_prog or _rows_per_program(Sq, n_tiles, 1, q.device)
    KERNELS[layout][(n_tiles, triton.cdiv(Sq, rows))](
        q, k, w, out, Sq, Sk, Sk - Sq, q.stride(0), w.stride(0), out.stride(0), float(scale), rows,
        HI=HI, DI=DI, HI_PAD=pad_pow2(HI), BLOCK_K=block_k, PRECISION=dot_precision(q.dtype, "indexer"),
        num_warps=num_warps, num_stages=num_stages)
    return out


# (layout, BLOCK_K, warps, stages); registers from a CPU compile for sm_90 with Triton 3.6 in the comments
CONFIGS = [
    ("keys_m", 256, 4, 3),    # the shipped setting (183 registers)
    ("heads_m", 256, 8, 2),   # 128 registers, 100 KB shared
    ("heads_m", 256, 8, 3),
    ("heads_m", 128, 4, 2),   # 128 registers, 66 KB shared
    ("heads_m", 128, 4, 3),
    ("heads_m", 128, 8, 3),   # 80 registers
    ("two_rows", 256, 8, 2),  # 206 registers, 129 KB shared
    ("two_rows", 128, 4, 2),  # 189 registers
    ("two_rows", 128, 8, 3),  # 124 registers
]


def main():
    from benchmarks.run import cudnn_indexer_logits
    from csrc_dsl.triton import indexer as ix

    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="4096x8192,8192x8192,4096x65536", help="Sq x Sk, comma separated")
    args = parser.parse_args()
    HI, DI = 64, 128
    print(f"device: {torch.cuda.get_device_name()}; triton {triton.__version__}; HI={HI}, DI={DI}, bf16, B=1")
    print("| Sq x Sk | kernel | BLOCK_K | warps | stages | ms | TFLOP/s | cuDNN ms | cuDNN / ours | check |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes.split(","):
        Sq, Sk = (int(x) for x in shape.split("x"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(Sq, HI, DI, generator=gen, device="cuda").to(torch.bfloat16)
        k = torch.randn(Sk, DI, generator=gen, device="cuda").to(torch.bfloat16)
        w = torch.randn(Sq, HI, generator=gen, device="cuda") * HI ** -0.5
        visible = sum(min(Sk, Sk - Sq + r + 1) for r in range(Sq))
        flops = 2 * HI * DI * visible
        want = ix.indexer_logits(q[None], k[None], w[None], 1.0, 1, None)[0]
        fin = torch.isfinite(want)

        def timed(fn):
            return triton.testing.do_bench(fn, warmup=100, rep=400, return_mode="median")
        try:
            cudnn_ms = timed(lambda: cudnn_indexer_logits(q[None], k[None], w[None], 1.0, 1, None))
        except Exception as e:  # noqa: BLE001 (no cuDNN frontend staged: report and go on)
            print(f"cuDNN unavailable: {type(e).__name__}: {e}")
            cudnn_ms = float("nan")
        runs = [("shipped", None)] + [(c[0], c) for c in CONFIGS]
        for name, cfg in runs:
            if cfg is None:
                fn = lambda: ix.indexer_logits(q[None], k[None], w[None], 1.0, 1, None)  # noqa: E731
                cells = f"{ix._FWD_BLOCK_K} | {ix._fwd_num_warps(ix._FWD_BLOCK_K, 64)} | {ix._FWD_NUM_STAGES}"
            else:
                layout, bk, nw, ns = cfg
                fn = lambda: logits(layout, q, k, w, 1.0, block_k=bk, num_warps=nw, num_stages=ns)  # noqa: E731
                cells = f"{bk} | {nw} | {ns}"
            try:
                got = fn()
                got = got[0] if got.dim() == 3 else got
                same_mask = torch.equal(torch.isfinite(got), fin)
                err = ((got[fin] - want[fin]).norm() / want[fin].norm()).item()
                check = "ok" if same_mask and err <= 2e-3 else f"WRONG (mask {same_mask}, rel {err:.1e})"
                ms = timed(fn)
                print(f"| {Sq}x{Sk} | {name} | {cells} | {ms:.3f} | {flops / ms / 1e9:.0f} | {cudnn_ms:.3f} | "
                      f"{cudnn_ms / ms:.2f}x | {check} {err:.1e} |", flush=True)
            except Exception as e:  # noqa: BLE001 (a config that fails to compile or launch is reported)
                print(f"| {Sq}x{Sk} | {name} | {cells} | failed: {type(e).__name__}: {str(e)[:80]} | | | | |",
                      flush=True)
        del q, k, w, want
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
