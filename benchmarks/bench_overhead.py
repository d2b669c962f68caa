"""Per-call cost of the op boundary (eager): torch.ops.dsa.<op> minus a direct call of the same implementation.

The boundary is: the dispatcher (autograd wrapper + CPU/CUDA kernel), argument validation and the dispatch-table
lookup. Measured with a trivial implementation swapped into the table, so the kernel itself costs ~nothing.
    python -m benchmarks.bench_overhead [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import dsa_ops  # noqa: F401
from dsa_ops import dispatch
from dsa_ops.testing import sample_args

OPS = ("topk", "indexer_topk", "sparse_attention", "sparse_attention_decode", "indexer_loss")


_trivial = None


def trivial_impl(*args):
    """Stands in for a kernel: returns copies of precomputed outputs."""
    return _trivial(*args)


def per_call_us(fn, n=2000, rounds=7):
    for _ in range(100):
        fn()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    print("| op | boundary us/call (eager, no grad) | with requires_grad inputs |")
    print("| --- | --- | --- |")
    for op in OPS:
        args = sample_args(op, device=a.device, dtype=dtype)
        real_out = getattr(torch.ops.dsa, op)(*args)
        outs = real_out if isinstance(real_out, tuple) else (real_out,)
        global _trivial
        _trivial = (lambda *x: tuple(o.clone() for o in outs)) if isinstance(real_out, tuple) \
            else (lambda *x: outs[0].clone())
        trivial = _trivial
        saved = dispatch.TABLE[op]
        arch = dispatch.arch_of(args[0].device)
        dispatch.TABLE[op] = {**saved, arch: [dispatch.Impl("trivial", f"{__name__}:trivial_impl")]}
        try:
            with torch.no_grad():
                op_us = per_call_us(lambda: getattr(torch.ops.dsa, op)(*args))
                direct_us = per_call_us(lambda: trivial(*args))
            grad_args = sample_args(op, device=a.device, dtype=dtype, requires_grad=True)
            op_grad_us = per_call_us(lambda: getattr(torch.ops.dsa, op)(*grad_args))
        finally:
            dispatch.TABLE[op] = saved
        print(f"| {op} | {op_us - direct_us:.1f} | {op_grad_us - direct_us:.1f} |")


if __name__ == "__main__":
    main()
