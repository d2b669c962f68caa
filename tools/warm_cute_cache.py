"""Compile CuTe-DSL kernels ahead of time into the disk cache, on any machine (no GPU needed).

    python -m tools.warm_cute_cache --dir .device/cute_cache [--set shipped|device] [--jobs 2]

A lent GPU's time is scarce and each compile there takes seconds (the backward's GPU tests and benchmark
variants are about 50 configurations). Compiled here, the exported objects (about 130 KB each) travel with a
device call (`carry: [".device/cute_cache"]`) and `tools/device_session.sh` points the cache at them
(`DSA_OPS_CUTE_CACHE_DIR`), so the GPU machine loads instead of compiling. The cache key holds a fingerprint
of the kernel sources, the cutlass version and the Python version, so objects from other sources are never
loaded; run this with the GPU machine's Python (3.12), or its cache folder has another name there and every
kernel compiles again. An object the GPU machine cannot load costs only a compile there (compile_cache warns
and carries on).

Sets: "shipped" is every configuration the ops can run; "device" adds what tools/device_session.sh's CuTe
phases compile besides: the backward's benchmark variants (`_KERNEL_VARIANTS`) and dkv write paths, in both
modes and at both head dims.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def shipped_configs() -> list:
    from csrc_dsl.cute.sm90 import sparse_attention_bwd, sparse_attention_fwd, sparse_attn_score

    return [*sparse_attention_fwd.shipped_configs(), *sparse_attention_bwd.shipped_configs(),
            *sparse_attn_score.shipped_configs()]


def device_configs() -> list:
    from csrc_dsl.cute.sm90 import sparse_attention_bwd as bwd

    configs = list(shipped_configs())
    for head_dim in bwd.SUPPORTED_HEAD_DIMS:
        for deterministic in (False, True):
            variants = [*bwd._KERNEL_VARIANTS.values(),
                        *({"schedule": "split", "dkv_write": w} for w in bwd.DKV_WRITES)]
            for fields in variants:
                config = bwd.BwdConfig(head_dim, 512, deterministic, **fields)
                if config not in configs:
                    configs.append(config)
    return configs


def _compile(config) -> tuple[str, float]:
    from csrc_dsl.cute.common.compile_cache import cache_for

    start = time.perf_counter()
    cache_for(config).get(config)       # compiles and writes the disk copy (or finds it there)
    return repr(config), time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="cache folder (becomes DSA_OPS_CUTE_CACHE_DIR)")
    parser.add_argument("--set", choices=("shipped", "device"), default="device")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    from csrc_dsl.cute.common import compile_cache

    os.environ[compile_cache.ENV_CACHE_DIR] = os.path.abspath(args.dir)
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")       # compiling without a GPU
    configs = shipped_configs() if args.set == "shipped" else device_configs()
    start = time.perf_counter()
    # spawned workers (not forked from a process that may hold the DSL's compiler state); they inherit the env
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, seconds in pool.map(_compile, configs):
            print(f"{seconds:6.1f} s  {name}", flush=True)
    print(f"{len(configs)} configurations in {args.dir} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
