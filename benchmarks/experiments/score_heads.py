"""Experiment: the CuTe-DSL sparse_attn_score at H <= 64, alternate tiles against one consumer (GPU, SM90).

    python -m benchmarks.experiments.score_heads [--S 4096] [--K 2048] [--D 576]

At each H the kernel runs both ways (csrc_dsl/cute/sm90/sparse_attn_score.ScoreConfig.alternate_tiles: both
consumer warpgroups take all heads and every other tile; or consumer 0 takes every tile while consumer 1, all of
whose heads are padding, skips its work), next to the Triton kernel. Each is checked against the fp32 reference on
256 rows before it is timed (median of triton.testing.do_bench).
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import triton


def main():
    from benchmarks.run import GPU_MODELS, sparse_attn_score_inputs
    from csrc_dsl.cute.sm90 import sparse_attn_score as cute_score
    from csrc_dsl.triton import sparse_attention_fwd as triton_fwd
    from dsa_ops.reference import attention as ref_attention

    p = argparse.ArgumentParser()
    p.add_argument("--S", type=int, default=4096)
    p.add_argument("--K", type=int, default=2048)
    p.add_argument("--D", type=int, default=576)
    p.add_argument("--H", type=int, nargs="+", default=[16, 32, 48, 64])
    a = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; S = T = {a.S}, K = {a.K}, D = {a.D}")
    print("| H | kernel | ms | TFLOP/s | rel err (256 rows) |")
    print("| --- | --- | --- | --- | --- |")
    rows = slice(0, 256)
    for H in a.H:
        model = dataclasses.replace(GPU_MODELS[0], H=H, D=a.D)
        inputs = sparse_attn_score_inputs(model, a.S, a.K, torch.device("cuda"), 0)
        q, kv, lse, ids, scale, length = inputs
        want = ref_attention.sparse_attn_score(q[rows].float(), kv.float(), lse[rows], ids[rows], scale, None)
        flops = 2 * a.S * H * a.K * a.D
        kernels = [(f"cute, alternate tiles={alt}",
                    lambda alt=alt: cute_score.sparse_attn_score(
                        *inputs, config=cute_score.ScoreConfig(a.D, alternate_tiles=alt))) for alt in (True, False)]
        kernels.append(("triton", lambda: triton_fwd.sparse_attn_score(*inputs)))
        for name, fn in kernels:
            got = fn()[rows]
            err = ((got - want).norm() / want.norm()).item()
            ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
            print(f"| {H} | {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {err:.1e}{'' if err <= 2e-3 else ' WRONG'} |",
                  flush=True)
        del inputs, q, kv, lse, ids
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
