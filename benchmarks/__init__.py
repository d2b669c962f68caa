"""Benchmarks of the dsa_ops kernels.

    python -m benchmarks.run [--ops topk,sparse_attention] [--quick]   # the whole suite -> benchmarks/results/
    python -m benchmarks.plot benchmarks/results/latest.json          # throughput plots (needs matplotlib)

The bench_*.py modules are the kernel authors' focused benchmarks (tuning sweeps, one op each).
"""
