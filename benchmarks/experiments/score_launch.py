"""Experiment: launch settings of the Triton sparse_attn_score kernel against cuDNN, same run (GPU).

    python -m benchmarks.experiments.score_launch [--S 4096 8192]

sparse_attn_score and dense_attn_score (S <= 8192) at V3.2 shapes (T = S_kv = S, H = 128, D = 576, K = 2048),
the inputs of `benchmarks.run`'s suite. Each setting
(head block, BLOCK_N, warps, stages: csrc_dsl/triton/sparse_attention_fwd.SCORE_MAX_BLOCK_H and SCORE_LAUNCH) is
checked against the fp32 reference on 256 rows before it is timed (median of triton.testing.do_bench).
"""
from __future__ import annotations

import argparse

import torch
import triton

# (head block, BLOCK_N, num_warps, num_stages); sm_90 compile (Triton 3.6): registers / shared memory
SETTINGS = [(128, 64, 8, 1),   # 177 / 216 KB: the default since this experiment (one program per query)
            (128, 32, 8, 2),   # 78 / 217 KB
            (128, 32, 8, 1),   # 119 / 180 KB
            (128, 32, 4, 2),   # 216 / 217 KB
            (64, 64, 4, 2),    # 128 / 217 KB: two programs per query
            (64, 64, 4, 3),    # 214 / 217 KB (sparse only: the dense tile loads need 289 KB)
            (64, 32, 4, 3),    # 158 / 145 KB
            (64, 64, 8, 2)]    # 124 / 220 KB


def _cases(model, S, K, device=torch.device("cuda")):
    """(op name, inputs, our function, cuDNN's, reference on the first 256 rows, FLOPs)."""
    from benchmarks.run import (cudnn_dense_attn_score, cudnn_sparse_attn_score, dense_attn_score_inputs,
                                sparse_attn_score_inputs)
    from csrc_dsl.triton import sparse_attention_fwd as fwd
    from dsa_ops.reference import attention as ref_attention

    q, kv, lse, ids, scale, length = sparse_attn_score_inputs(model, S, K, device, 0)
    rows = slice(0, 256)
    yield ("sparse_attn_score", (q, kv, lse, ids, scale, length), fwd.sparse_attn_score, cudnn_sparse_attn_score,
           lambda out: out[rows],
           ref_attention.sparse_attn_score(q[rows].float(), kv.float(), lse[rows], ids[rows], scale, None),
           2 * S * model.H * K * model.D)
    del q, kv, lse, ids
    if S <= 8192:  # dense: S x S scores
        q, kv, lse, scale, ratio, q_start = args = dense_attn_score_inputs(model, S, device, 0)
        want = ref_attention.dense_attn_score(q[:, rows].float(), kv.float(), lse[:, rows], scale, ratio,
                                              torch.full((1,), S - S, device=device))[0]
        yield ("dense_attn_score", args, fwd.dense_attn_score, cudnn_dense_attn_score, lambda out: out[0][:, rows],
               want, 2 * model.H * model.D * S * (S + 1) // 2)


def _time_cute_score(inputs, pick, want, flops, cudnn_ms, S, timed, rel):
    """The CuTe-DSL kernel's layouts (csrc_dsl/cute/sm90/sparse_attn_score.py; the dispatch launches Q in registers)."""
    try:
        from csrc_dsl.cute.sm90 import sparse_attn_score as cute_score
        if not cute_score.supports(*inputs):
            print(f"| sparse_attn_score | {S} | cute | | | | | not supported here | | | | |")
            return
    except ImportError as e:
        print(f"| sparse_attn_score | {S} | cute | | | | | unavailable: {e} | | | | |")
        return
    for config in cute_score.shipped_configs():
        if config.head_dim != inputs[0].shape[2] or config.dense:
            continue
        layout = "cute, Q in registers" if config.q_in_registers else "cute, Q in smem"
        try:
            err = rel(pick(cute_score.sparse_attn_score(*inputs, config=config)), want)
            ms = timed(lambda: cute_score.sparse_attn_score(*inputs, config=config))
            flag = "" if err <= 2e-3 else " WRONG"
            print(f"| sparse_attn_score | {S} | {layout} | 128 | {config.block_n} | 12 | {config.num_stages} | "
                  f"{ms:.3f} | {flops / ms / 1e9:.0f} | {cudnn_ms:.3f} | {cudnn_ms / ms:.2f}x | {err:.1e}{flag} |",
                  flush=True)
        except Exception as e:  # noqa: BLE001 (reported, the sweep goes on)
            print(f"| sparse_attn_score | {S} | {layout} | failed: {type(e).__name__}: {str(e)[:120]} | | | | | | | |")


def main():
    from benchmarks.run import GPU_MODELS
    from csrc_dsl.triton import sparse_attention_fwd as fwd

    parser = argparse.ArgumentParser()
    parser.add_argument("--S", type=int, nargs="+", default=[4096, 8192])
    args = parser.parse_args()
    model = GPU_MODELS[0]  # V3.2: H = 128, D = 576
    K = 2048
    print(f"device: {torch.cuda.get_device_name()}; triton {triton.__version__}; H={model.H}, D={model.D}, K={K}")
    print("| op | S | kernel | head block | BLOCK_N | warps | stages | ms | TFLOP/s | cuDNN ms | cuDNN / ours "
          "| rel err (256 rows) |")
    print("| --- " * 12 + "|")
    saved = fwd.SCORE_MAX_BLOCK_H, dict(fwd.SCORE_LAUNCH)

    def timed(fn):
        return triton.testing.do_bench(fn, warmup=100, rep=400, return_mode="median")

    def rel(got, want):
        return ((got - want).norm() / want.norm()).item()

    for S in args.S:
        for op, inputs, ours, cudnn, pick, want, flops in _cases(model, S, K):
            try:
                err = rel(pick(cudnn(*inputs)), want)
                cudnn_ms = timed(lambda: cudnn(*inputs))
                print(f"| {op} | {S} | cuDNN | | | | | {cudnn_ms:.3f} | {flops / cudnn_ms / 1e9:.0f} | | | {err:.1e} |")
            except Exception as e:  # noqa: BLE001 (no cuDNN frontend staged)
                print(f"cuDNN unavailable: {type(e).__name__}: {e}")
                cudnn_ms = float("nan")
            if op == "sparse_attn_score":
                _time_cute_score(inputs, pick, want, flops, cudnn_ms, S, timed, rel)
            for setting in SETTINGS:
                fwd.SCORE_MAX_BLOCK_H = setting[0]
                fwd.SCORE_LAUNCH[setting[0]] = setting[1:]
                cells = " | ".join(str(v) for v in setting)
                try:
                    err = rel(pick(ours(*inputs)), want)
                    ms = timed(lambda: ours(*inputs))
                    flag = "" if err <= 2e-3 else " WRONG"
                    print(f"| {op} | {S} | triton | {cells} | {ms:.3f} | {flops / ms / 1e9:.0f} | {cudnn_ms:.3f} | "
                          f"{cudnn_ms / ms:.2f}x | {err:.1e}{flag} |", flush=True)
                except Exception as e:  # noqa: BLE001 (a setting that does not fit is reported)
                    print(f"| {op} | {S} | triton | {cells} | failed: {type(e).__name__}: {str(e)[:80]} | | | | |")
                finally:
                    fwd.SCORE_MAX_BLOCK_H, fwd.SCORE_LAUNCH = saved[0], dict(saved[1])
            del inputs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
