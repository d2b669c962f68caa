"""Drive the CuTe-DSL sparse attention backward kernel for a profiler (ncu): warm-up calls, then more.

    ncu -k regex:SparseAttentionBwdSm90 --launch-skip 2 --launch-count 1 --set full \
        python -m tools.profile_bwd [H] [T] [variant]       # defaults: 64 4096 kernel; K=2048, D=576, S=8192

variant: one of the benchmark's kernel-alone variants (`--ablation` of csrc_dsl.cute.sm90.sparse_attention_bwd:
kernel, serial_dkv, tiled_dkv, scalar_dkv, no_dkv_write, no_dkv).
"""
import math
import sys

import torch

from csrc_dsl.cute.sm90 import sparse_attention_bwd as bwd


def main():
    H = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    T = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    variant = sys.argv[3] if len(sys.argv) > 3 else "kernel"
    S, K, D, d_v = 8192, 2048, 576, 512
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, H, D, device="cuda", generator=g).to(torch.bfloat16)
    kv = torch.randn(S, D, device="cuda", generator=g).to(torch.bfloat16)
    indices = torch.randint(0, S, (T, K), device="cuda", generator=g, dtype=torch.int32)
    dout = torch.randn(T, H, d_v, device="cuda", generator=g).to(torch.bfloat16)
    out = torch.randn(T, H, d_v, device="cuda", generator=g).to(torch.bfloat16) * 0.05
    lse = torch.full((T, H), math.log(K) + 0.5, device="cuda")
    delta, l2, _ = bwd.row_terms(out, dout, lse, None)
    lengths = torch.full((T,), K, dtype=torch.int32, device="cuda")
    dq = torch.empty_like(q)
    dkv_acc = torch.zeros(S, D, dtype=torch.float32, device="cuda")
    config = bwd.BwdConfig(D, d_v, False, **bwd._KERNEL_VARIANTS[variant])
    for _ in range(4):
        bwd._launch(config, q, kv, indices, dout, l2, delta, lengths, dq, dkv_acc, D ** -0.5)
    torch.cuda.synchronize()
    print(f"profiled the CuTe-DSL backward, T={T} H={H} K={K} D={D} variant={variant}")


if __name__ == "__main__":
    main()
