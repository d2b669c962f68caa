"""Experiment: launch settings of the Triton sparse_attn_score kernel against cuDNN, same run (GPU).

    python -m benchmarks.experiments.score_launch [--S 4096 8192]

V3.2 shapes (T = S_kv = S, H = 128, D = 576, K = 2048), the inputs of `benchmarks.run`'s suite. Each setting of
csrc_dsl/triton/sparse_attention_fwd.SCORE_LAUNCH (BLOCK_N, warps, stages for a 64-head block) is checked
against the fp32 reference on 256 rows before it is timed (median of triton.testing.do_bench).
"""
from __future__ import annotations

import argparse

import torch
import triton

# (BLOCK_N, num_warps, num_stages); sm_90 compile (Triton 3.6): registers / shared memory in the comments
SETTINGS = [(64, 8, 2),   # 124 / 220 KB: the default
            (32, 8, 3),   # 138 / 148 KB
            (32, 4, 2),   # 92 / 145 KB
            (64, 4, 2)]   # 128 / 217 KB


def main():
    from benchmarks.run import GPU_MODELS, cudnn_sparse_attn_score, sparse_attn_score_inputs
    from csrc_dsl.triton import sparse_attention_fwd as fwd
    from dsa_ops.reference import attention as ref_attention

    parser = argparse.ArgumentParser()
    parser.add_argument("--S", type=int, nargs="+", default=[4096, 8192])
    args = parser.parse_args()
    model = GPU_MODELS[0]  # V3.2: H = 128, D = 576
    K = 2048
    print(f"device: {torch.cuda.get_device_name()}; triton {triton.__version__}; H={model.H}, D={model.D}, K={K}")
    print("| S | kernel | BLOCK_N | warps | stages | ms | TFLOP/s | cuDNN ms | cuDNN / ours | rel err (256 rows) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    default = fwd.SCORE_LAUNCH[64]
    for S in args.S:
        q, kv, lse, ids, scale, length = sparse_attn_score_inputs(model, S, K, torch.device("cuda"), 0)
        flops = 2 * S * model.H * K * model.D
        rows = slice(0, 256)
        want = ref_attention.sparse_attn_score(q[rows].float(), kv.float(), lse[rows], ids[rows], scale, None)

        def timed(fn):
            return triton.testing.do_bench(fn, warmup=100, rep=400, return_mode="median")
        try:
            got = cudnn_sparse_attn_score(q, kv, lse, ids, scale, length)
            err = ((got[rows] - want).norm() / want.norm()).item()
            cudnn_ms = timed(lambda: cudnn_sparse_attn_score(q, kv, lse, ids, scale, length))
            print(f"| {S} | cuDNN | | | | {cudnn_ms:.3f} | {flops / cudnn_ms / 1e9:.0f} | | | {err:.1e} |")
        except Exception as e:  # noqa: BLE001 (no cuDNN frontend staged)
            print(f"cuDNN unavailable: {type(e).__name__}: {e}")
            cudnn_ms = float("nan")
        for setting in SETTINGS:
            fwd.SCORE_LAUNCH[64] = setting
            try:
                got = fwd.sparse_attn_score(q, kv, lse, ids, scale, length)
                err = ((got[rows] - want).norm() / want.norm()).item()
                ms = timed(lambda: fwd.sparse_attn_score(q, kv, lse, ids, scale, length))
                cells = " | ".join(str(v) for v in setting)
                flag = "" if err <= 2e-3 else " WRONG"
                print(f"| {S} | triton | {cells} | {ms:.3f} | {flops / ms / 1e9:.0f} | {cudnn_ms:.3f} | "
                      f"{cudnn_ms / ms:.2f}x | {err:.1e}{flag} |", flush=True)
            except Exception as e:  # noqa: BLE001 (a setting that does not fit is reported)
                print(f"| {S} | triton | {setting} | failed: {type(e).__name__}: {str(e)[:80]} | | | | | |")
            finally:
                fwd.SCORE_LAUNCH[64] = default
        del q, kv, lse, ids
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
