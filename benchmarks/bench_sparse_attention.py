"""Sparse MQA attention benchmarks: the Triton kernels vs a chunked torch baseline (CUDA only).

    python -m benchmarks.bench_sparse_attention              # every case, markdown table
    python -m benchmarks.bench_sparse_attention --sweep      # also time every entry of CONFIGS per case (each
                                                             # checked against the oracle first; head blocks
                                                             # wider than the case's heads skipped)
    python -m benchmarks.bench_sparse_attention --cases fwd  # only cases whose name contains "fwd"

Each case is checked against an fp64 oracle (on a slice of its queries) before it is timed.
To add an op: write `bench_<op>(case, args) -> dict` returning the row fields and add `Case`s with that op.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch

H100_BF16_TFLOPS = 760.0  # dense bf16 peak used for the "% of peak" column


@dataclass(frozen=True)
class Case:
    name: str
    op: str                      # picks bench_<op>
    T: int                       # queries (decode: batch * seq_q)
    S: int                       # kv rows (decode: tokens per sequence)
    H: int
    K: int
    D: int = 576
    d_v: int = 512
    extra: dict = field(default_factory=dict, hash=False, compare=False)


CASES = [
    Case("fwd V3.2 H=128", "sparse_attention", T=4096, S=8192, H=128, K=2048),
    Case("fwd V3.2 H=64", "sparse_attention", T=4096, S=8192, H=64, K=2048),
    Case("fwd V4 H=64", "sparse_attention", T=4096, S=8192, H=64, K=512, D=512),
    Case("decode V3.2 B=64 H=128", "sparse_attention_decode", T=64, S=8192, H=128, K=2048,
         extra={"seq_q": 1, "page_size": 64}),
    Case("decode V3.2 B=32x2 H=16", "sparse_attention_decode", T=64, S=8192, H=16, K=2048,
         extra={"seq_q": 2, "page_size": 64}),
    Case("decode V3.2 B=8 H=64", "sparse_attention_decode", T=8, S=8192, H=64, K=2048,
         extra={"seq_q": 1, "page_size": 64}),
]


# ------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------
def time_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(x, ref) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def torch_sparse_attention(q, kv, indices, scale, d_v, sink=None, topk_length=None, chunk=256,
                           compute_dtype=None):
    """Chunked torch: gather the K rows per query, two batched matmuls, fp32 softmax. With compute_dtype
    (e.g. fp64) it is the oracle; without it, the bf16-matmul baseline."""
    num_q, num_heads, _ = q.shape
    dtype = compute_dtype or q.dtype
    out = torch.empty(num_q, num_heads, d_v, dtype=dtype, device=q.device)
    lse = torch.empty(num_q, num_heads, dtype=torch.float32 if compute_dtype is None else dtype,
                      device=q.device)
    slot = torch.arange(indices.shape[1], device=q.device)
    for t0 in range(0, num_q, chunk):
        ids = indices[t0:t0 + chunk]
        valid = (ids >= 0) & (ids < kv.shape[0])
        if topk_length is not None:
            valid &= slot < topk_length[t0:t0 + chunk, None]
        rows = kv[torch.where(valid, ids, 0).long()].to(dtype)                    # [c, K, D]
        s = torch.matmul(q[t0:t0 + chunk].to(dtype), rows.transpose(1, 2)).float() * scale
        if compute_dtype is not None:
            s = s.to(dtype)
        s = s.masked_fill(~valid[:, None, :], -math.inf)
        row_lse = torch.logsumexp(s, dim=-1)
        denom = row_lse if sink is None else torch.logaddexp(row_lse, sink.to(s.dtype)[None, :])
        empty = torch.isneginf(row_lse)
        p = torch.exp(s - denom.masked_fill(empty, 0)[..., None]).masked_fill(~valid[:, None, :], 0)
        out[t0:t0 + chunk] = torch.matmul(p.to(dtype), rows[..., :d_v])
        lse[t0:t0 + chunk] = row_lse.masked_fill(empty, math.inf)
    return out.to(q.dtype) if compute_dtype is None else out, lse


def attention_inputs(case: Case, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(case.T, case.H, case.D, device="cuda", generator=gen).bfloat16()
    kv = torch.randn(case.S, case.D, device="cuda", generator=gen).bfloat16()
    # distinct ids per query (as a top-k gives), a few -1 pads at the end of some rows
    idx = torch.argsort(torch.rand(case.T, case.S, device="cuda", generator=gen), dim=1)[:, :case.K]
    idx = idx.int().contiguous()
    idx[::7, -5:] = -1
    sink = torch.randn(case.H, device="cuda", generator=gen)
    return q, kv, idx, sink


def check(out, lse, ref_out, ref_lse, what):
    err = rel_err(out, ref_out)
    finite = torch.isfinite(ref_lse)
    lse_err = (lse[finite].double() - ref_lse[finite].double()).abs().max().item() if finite.any() else 0.0
    if not (err <= 1e-2 and lse_err <= 1e-3) or torch.isnan(out).any():
        raise AssertionError(f"{what}: out rel err {err:.2e}, lse max abs err {lse_err:.2e}")
    return err


def fwd_module():
    from csrc_dsl.triton import sparse_attention_fwd
    return sparse_attention_fwd


# ------------------------------------------------------------------------------------------------------
# One function per op: check, time ours and the baseline, return the row
# ------------------------------------------------------------------------------------------------------
def bench_sparse_attention(case: Case, args) -> dict:
    fwd = fwd_module()
    q, kv, idx, sink = attention_inputs(case)
    scale = case.D ** -0.5
    n_check = 64
    ref = torch_sparse_attention(q[:n_check], kv, idx[:n_check], scale, case.d_v, sink,
                                 compute_dtype=torch.float64)
    out, lse = fwd.sparse_attention(q, kv, idx, scale, case.d_v, sink)
    err = check(out[:n_check], lse[:n_check], *ref, case.name)

    ours = time_ms(lambda: fwd.sparse_attention(q, kv, idx, scale, case.d_v, sink))
    base = time_ms(lambda: torch_sparse_attention(q, kv, idx, scale, case.d_v, sink))
    flops = 2 * case.T * case.H * case.K * (case.D + case.d_v)
    row = dict(ours=ours, base=base, tflops=flops / ours / 1e9, err=err)
    if args.sweep:
        row["sweep"] = {}
        for name, cfg in fwd.CONFIGS.items():
            if args.configs and name not in args.configs.split(","):
                continue
            if fwd._block_h_for(case.H, cfg.BLOCK_H) < cfg.BLOCK_H or not _fits(fwd, cfg, q, kv, idx, case):
                continue
            run = lambda c=cfg: fwd._sparse_mqa_forward(q, kv, idx, scale, case.d_v, sink, None, config=c)
            out_c, lse_c = run()
            check(out_c[:n_check], lse_c[:n_check], *ref, f"{case.name}, config {name}")  # raises if wrong
            row["sweep"][name] = time_ms(run)
            print(f"  [{case.name}] {name}: {row['sweep'][name]:.3f} ms", flush=True)
    return row


def _fits(fwd, cfg, q, kv, idx, case) -> bool:
    """Configs that do not compile (shared memory, registers) are skipped in the sweep."""
    try:
        fwd._sparse_mqa_forward(q[:1], kv, idx[:1], 1.0, case.d_v, None, None, config=cfg, num_splits=1)
        torch.cuda.synchronize()
        return True
    except Exception as exc:  # triton OutOfResources and friends
        print(f"  [{case.name}] config {cfg} skipped: {type(exc).__name__}")
        return False


def paged_inputs(case: Case, seed=0):
    seq_q, page_size = case.extra["seq_q"], case.extra["page_size"]
    batch = case.T // seq_q
    pages_per_seq = case.S // page_size
    q, kv_flat, _, sink = attention_inputs(Case("", "", case.T, batch * case.S, case.H, 1, case.D), seed)
    kv_cache = kv_flat.view(batch * pages_per_seq, page_size, case.D)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    block_table = torch.randperm(batch * pages_per_seq, device="cuda", generator=gen)
    block_table = block_table.view(batch, pages_per_seq).int()
    seq_lens = torch.full((batch,), case.S, dtype=torch.int32, device="cuda")
    idx = torch.argsort(torch.rand(case.T, case.S, device="cuda", generator=gen), dim=1)[:, :case.K]
    idx = idx.int().view(batch, seq_q, case.K).contiguous()
    return q.view(batch, seq_q, case.H, case.D), kv_cache, block_table, seq_lens, idx, sink


def bench_sparse_attention_decode(case: Case, args) -> dict:
    fwd = fwd_module()
    q, kv_cache, block_table, seq_lens, idx, sink = paged_inputs(case)
    batch, seq_q, num_heads, dim = q.shape
    page_size = kv_cache.shape[1]
    scale = dim ** -0.5
    # the baseline (and oracle) maps token positions to cache rows first
    rows = (block_table.long()[torch.arange(batch, device="cuda")[:, None, None], idx.long() // page_size]
            * page_size + idx.long() % page_size).int().view(batch * seq_q, -1)
    flat_kv = kv_cache.view(-1, dim)
    q3 = q.view(batch * seq_q, num_heads, dim)

    def baseline():
        r = (block_table.long()[torch.arange(batch, device="cuda")[:, None, None], idx.long() // page_size]
             * page_size + idx.long() % page_size).view(batch * seq_q, -1)
        return torch_sparse_attention(q3, flat_kv, r, scale, case.d_v, sink)

    ref = torch_sparse_attention(q3, flat_kv, rows, scale, case.d_v, sink, compute_dtype=torch.float64)
    out, lse = fwd.sparse_attention_decode(q, kv_cache, block_table, seq_lens, idx, scale, case.d_v, sink)
    err = check(out.view(batch * seq_q, num_heads, -1), lse.view(batch * seq_q, -1), *ref, case.name)

    ours = time_ms(lambda: fwd.sparse_attention_decode(q, kv_cache, block_table, seq_lens, idx, scale,
                                                       case.d_v, sink))
    base = time_ms(baseline)
    flops = 2 * case.T * case.H * case.K * (case.D + case.d_v)
    # bytes that must move at least once: gathered kv rows (distinct per sequence here) + q + out
    gathered = batch * min(case.S, seq_q * case.K) * dim * 2
    bytes_moved = gathered + q.numel() * 2 + batch * seq_q * num_heads * case.d_v * 2
    return dict(ours=ours, base=base, tflops=flops / ours / 1e9, err=err, gbps=bytes_moved / ours / 1e6)


# ------------------------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="", help="only cases whose name contains this text")
    parser.add_argument("--sweep", action="store_true", help="also time every entry of CONFIGS")
    parser.add_argument("--configs", default="", help="with --sweep: only these CONFIGS names (comma-separated)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sparse_attention needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}\n")
    print("| case | shape | ours ms | baseline ms | speed-up | TFLOP/s | % of 760 | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    sweeps = []
    for case in CASES:
        if args.cases not in case.name:
            continue
        row = globals()[f"bench_{case.op}"](case, args)
        shape = f"T={case.T} S={case.S} H={case.H} K={case.K} D={case.D} d_v={case.d_v}"
        if case.extra:
            shape += " " + " ".join(f"{k}={v}" for k, v in case.extra.items())
        note = f"err {row['err']:.1e}" + (f", {row['gbps']:.0f} GB/s" if "gbps" in row else "")
        speedup = row["base"] / row["ours"]
        print(f"| {case.name} | {shape} | {row['ours']:.3f} | {row['base']:.3f} | {speedup:.1f}x "
              f"| {row['tflops']:.0f} | {100 * row['tflops'] / H100_BF16_TFLOPS:.0f}% | {note} |", flush=True)
        if "sweep" in row:
            sweeps.append((case.name, row["sweep"]))
    for name, sweep in sweeps:
        print(f"\nconfig sweep, {name}:")
        for cfg, ms in sorted(sweep.items(), key=lambda kv: kv[1]):
            print(f"  {cfg:16s} {ms:.3f} ms")


if __name__ == "__main__":
    main()
