"""Experiment: how fast can one pass stream a 4096 x 65536 fp32 matrix row by row (GPU)?

    python -m benchmarks.experiments.row_stream [--rows 4096] [--cols 65536]

The top-k kernel (csrc_dsl/triton/topk.py) gives each row to one small program that streams it in BLOCK-column
steps. At 4096 x 65536 it reached about 1.3 TB/s, under half the copy rate, while ncu showed its warps waiting on
loads. This separates the access pattern from the kernel's own work: a kernel that only reads (and counts the
values above a threshold, so nothing is optimised away) with the same pattern, in several launch shapes, next to
a contiguous read of the same bytes, and the top-k itself on a row stride that is not a power of two (a padded
matrix: 256 KB row strides could send every row's step to the same memory channels).
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl


@triton.jit
def _rows_count_kernel(x_ptr, out_ptr, n_rows, n_cols, stride, thr, BLOCK: tl.constexpr, PREFETCH: tl.constexpr):
    """Persistent programs; program p takes rows p, p + grid, ...; each row streams in BLOCK steps with the next
    PREFETCH steps' loads in flight (1 or 2)."""
    lane = tl.arange(0, BLOCK)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        base = x_ptr + (row + tl.zeros([], tl.int64)) * stride
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        v1 = tl.load(base + lane, mask=lane < n_cols, other=0.0)
        v2 = tl.load(base + BLOCK + lane, mask=BLOCK + lane < n_cols, other=0.0)
        for start in range(0, n_cols, BLOCK):
            v = v1
            if PREFETCH == 2:
                v1 = v2
                nxt = start + 2 * BLOCK + lane
                v2 = tl.load(base + nxt, mask=nxt < n_cols, other=0.0)
            else:
                nxt = start + BLOCK + lane
                v1 = tl.load(base + nxt, mask=nxt < n_cols, other=0.0)
            acc += (v > thr).to(tl.int32)
        tl.store(out_ptr + row, tl.sum(acc, 0))


@triton.jit
def _flat_count_kernel(x_ptr, out_ptr, n, thr, BLOCK: tl.constexpr):
    """Contiguous chunks handed out round-robin over the programs: the plain streaming read."""
    lane = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + lane
        acc += (tl.load(x_ptr + offs, mask=offs < n, other=0.0) > thr).to(tl.int32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


def main():
    from csrc_dsl.triton import topk as tk

    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=65536)
    p.add_argument("--k", type=int, default=2048)
    a = p.parse_args()
    rows, cols = a.rows, a.cols
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device: {torch.cuda.get_device_name()}; {rows} x {cols} fp32 ({rows * cols * 4 / 2**30:.2f} GiB)")
    bench = lambda fn: triton.testing.do_bench(fn, warmup=20, rep=150, return_mode="median")  # noqa: E731
    nbytes = rows * cols * 4
    print("| pattern | ms | GB/s read |")
    print("| --- | --- | --- |")

    def report(name, ms):
        print(f"| {name} | {ms:.3f} | {nbytes / ms / 1e6:.0f} |", flush=True)

    for pad in (0, 64):
        store = torch.randn(rows, cols + pad, device="cuda")
        x = store[:, :cols]
        counts = torch.empty(rows, dtype=torch.int32, device="cuda")
        want = (x > 2.0).sum(1, dtype=torch.int32)
        tag = f"row stride {cols + pad}"
        if pad == 0:
            flat_out = torch.empty(sms * 16, dtype=torch.int32, device="cuda")
            for warps, block in ((4, 1024), (8, 2048)):
                grid = sms * 16 // warps
                fn = lambda: _flat_count_kernel[(grid,)](x, flat_out, rows * cols, 2.0, BLOCK=block,  # noqa: E731
                                                          num_warps=warps)
                fn()
                assert int(flat_out[:grid].sum()) == int(want.sum()), "flat count wrong"
                report(f"contiguous, {warps}-warp programs, {block}-col chunks", bench(fn))
            report("torch x.sum() (reference read)", bench(lambda: x.sum()))
        for warps, block, per_sm, prefetch in ((1, 256, 32, 1), (1, 256, 32, 2), (1, 512, 16, 1), (1, 512, 16, 2),
                                               (2, 512, 16, 1), (4, 1024, 8, 1), (4, 1024, 8, 2), (8, 2048, 4, 2)):
            grid = min(rows, sms * per_sm)
            fn = lambda: _rows_count_kernel[(grid,)](x, counts, rows, cols, x.stride(0), 2.0, BLOCK=block,  # noqa: E731
                                                     PREFETCH=prefetch, num_warps=warps)
            fn()
            assert torch.equal(counts, want), "row count wrong"
            report(f"{tag}, rows: {warps}-warp programs x {per_sm}/SM, {block}-col steps, prefetch {prefetch}",
                   bench(fn))
        # The top-k itself (its default launch) on this stride.
        settings = tk._launch_settings(x.device)
        block = settings["BLOCK"]
        programs = tk._programs_available(x.device, settings["PROGRAMS_PER_SM"])
        out_val = torch.empty(rows, a.k, device="cuda")
        out_col = torch.empty(rows, a.k, dtype=torch.int32, device="cuda")
        fn = lambda: tk._launch(store, None, None, out_val, out_col, rows, cols, store.stride(0), cols, 1, a.k,  # noqa: E731
                                False, block, programs, tk.SAMPLE, tk.SELECT_BLOCK, settings["MAX_REGISTERS"])
        fn()
        ref = torch.topk(x, a.k, dim=1).values.sort(1).values
        assert torch.equal(out_val.sort(1).values, ref), "top-k values differ from torch.topk"
        report(f"{tag}: topk k={a.k} (default launch)", bench(fn))
        del store, x
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
