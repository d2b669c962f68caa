"""Benchmark: Triton sparse MQA attention backward (fast and deterministic) vs a chunked torch
backward, and cuDNN frontend's DSA backward when it is installed.

    python -m benchmarks.bench_sparse_attention_bwd            # T=4096 S=8192 K=2048 D=576, H=64,128
    python -m benchmarks.bench_sparse_attention_bwd --heads 128 --modes fast --profile \
        --configs "default;default,DKV_BLOCK_N=64"

CUDA only. Prints one markdown row per (shape, mode): time, baseline time, speedup over the
baseline, TFLOP/s with FLOPs = 2*T*H*K*(3*D + 2*d_v) (SPEC section 5), and % of 760 TFLOP/s
(a dense bf16 matrix product on an H100). Each Triton mode is first checked against the baseline
(relative error of dq, dkv and d_sink; above MAX_REL_ERR the setting is reported wrong and not
timed), and the deterministic mode for bitwise repeatability.
"""

from __future__ import annotations

import argparse
import os

import torch

from csrc_dsl.triton import sparse_attention_bwd as triton_bwd

PEAK_TFLOPS = 760.0
# Relative error (norm) of dq, dkv and d_sink against the chunked torch backward above which a setting is reported
# as wrong and not timed (bf16 inputs give about 2e-3 and 2.6e-3 at the default shapes).
MAX_REL_ERR = 1e-2


def bwd_flops(num_tokens, num_heads, topk, head_dim, d_v):
    return 2.0 * num_tokens * num_heads * topk * (3 * head_dim + 2 * d_v)


# ----------------------------------------------------------------------------------------------
# Chunked torch forward / backward (the baseline; fp32 math on gathered bf16 rows)
# ----------------------------------------------------------------------------------------------
def _chunk_probs(q, kv, indices, scale, attn_sink, topk_length, sl):
    idx = indices[sl]
    valid = (idx >= 0) & (idx < kv.shape[0])
    if topk_length is not None:
        valid &= torch.arange(idx.shape[1], device=idx.device)[None, :] < topk_length[sl, None]
    rows = idx.clamp(0, kv.shape[0] - 1).long()
    gathered = kv[rows].float()  # [C, K, D]
    scores = torch.einsum("thd,tkd->thk", q[sl].float(), gathered) * scale
    scores.masked_fill_(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    big_l = torch.logaddexp(lse, attn_sink[None, :]) if attn_sink is not None else lse
    safe_l = torch.where(torch.isfinite(big_l), big_l, torch.zeros_like(big_l))
    probs = torch.exp(scores - safe_l[..., None])  # masked entries: exp(-inf) = 0
    return valid, rows, gathered, lse, big_l, probs


def torch_forward(q, kv, indices, scale, d_v, attn_sink, topk_length, chunk=64):
    outs, lses = [], []
    for start in range(0, q.shape[0], chunk):
        sl = slice(start, min(start + chunk, q.shape[0]))
        valid, _, gathered, lse, _, probs = _chunk_probs(q, kv, indices, scale, attn_sink,
                                                         topk_length, sl)
        outs.append(torch.einsum("thk,tkd->thd", probs, gathered[..., :d_v]).to(q.dtype))
        lses.append(torch.where(valid.any(1)[:, None], lse, torch.full_like(lse, float("inf"))))
    return torch.cat(outs), torch.cat(lses)


def torch_backward(dout, q, kv, out, lse, indices, scale, d_v, attn_sink, topk_length, chunk=64):
    """The formulas of SPEC section 5, chunked over queries so memory stays bounded."""
    dq = torch.empty_like(q)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    d_sink = torch.zeros(q.shape[1], dtype=torch.float32, device=q.device)
    for start in range(0, q.shape[0], chunk):
        sl = slice(start, min(start + chunk, q.shape[0]))
        valid, rows, gathered, _, big_l, probs = _chunk_probs(q, kv, indices, scale, attn_sink,
                                                              topk_length, sl)
        dof = dout[sl].float()
        delta = (out[sl].float() * dof).sum(-1)
        dp = torch.einsum("thd,tkd->thk", dof, gathered[..., :d_v])
        ds = probs * (dp - delta[..., None])
        dq[sl] = (scale * torch.einsum("thk,tkd->thd", ds, gathered)).to(q.dtype)
        contrib = scale * torch.einsum("thk,thd->tkd", ds, q[sl].float())
        contrib[..., :d_v] += torch.einsum("thk,thd->tkd", probs, dof)
        contrib *= valid[..., None]
        dkv.index_add_(0, rows.flatten(), contrib.flatten(0, 1))
        if attn_sink is not None:
            d_sink -= (torch.exp(attn_sink[None, :] - big_l) * delta).sum(0)
    return dq, dkv.to(kv.dtype), d_sink


# ----------------------------------------------------------------------------------------------
# cuDNN frontend DSA (optional)
# ----------------------------------------------------------------------------------------------
def cudnn_backward_fn():
    """A callable like torch_backward running cuDNN's DSA backward, or (None, reason)."""
    from benchmarks.common import load_cudnn_dsa

    dsa, note = load_cudnn_dsa()
    if dsa is None:
        return None, f"cuDNN frontend DSA not importable ({note})"

    def run(dout, q, kv, out, lse, indices, scale, d_v, attn_sink, topk_length):
        # It takes V = kv[:, :512] for D = 576 and all of kv for D = 512 (no other D), our natural-log sink-free
        # lse, and a sink always (-inf = none); it returns a dict.
        if d_v != (512 if q.shape[-1] == 576 else q.shape[-1]):
            raise RuntimeError(f"cuDNN's backward has no D={q.shape[-1]}, d_v={d_v} form")
        sink = attn_sink if attn_sink is not None else torch.full(
            (q.shape[1],), float("-inf"), dtype=torch.float32, device=q.device)
        result = dsa.sparse_attention_backward_wrapper(
            q, kv, out, dout, lse, sink, indices, softmax_scale=scale, topk_length=topk_length)
        return result["dq"], result["dkv"], result["d_sink"]

    return run, ""


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def make_inputs(num_tokens, num_kv_rows, num_heads, topk, head_dim, d_v, sink, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(num_tokens, num_heads, head_dim, device="cuda", generator=gen).bfloat16()
    kv = torch.randn(num_kv_rows, head_dim, device="cuda", generator=gen).bfloat16()
    dout = torch.randn(num_tokens, num_heads, d_v, device="cuda", generator=gen).bfloat16()
    # Distinct ids per query, uniformly over all rows (the top-k of random scores).
    indices = torch.rand(num_tokens, num_kv_rows, device="cuda", generator=gen).topk(
        topk, dim=1).indices.to(torch.int32)
    attn_sink = torch.randn(num_heads, device="cuda", generator=gen) if sink else None
    return q, kv, dout, indices, attn_sink


def print_kernel_times(fn, iters=3):
    """Per-kernel GPU time of fn (mean over iters), as indented lines under the table row."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / iters / 1e3) for e in prof.key_averages()
            if e.device_time_total > 0]
    for name, ms in sorted(rows, key=lambda r: -r[1])[:8]:
        print(f"|   | {name[:60]} | | {ms:.3f} | | | | | |")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--kv-rows", type=int, default=8192)
    parser.add_argument("--heads", type=str, default="64,128")
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--head-dim", type=int, default=576)
    parser.add_argument("--d-v", type=int, default=512)
    parser.add_argument("--sink", action="store_true", help="use an attention sink")
    parser.add_argument("--configs", type=str, default="",
                        help=f"configs to time, each a {triton_bwd.CONFIG_ENV} value (a name from CONFIGS, "
                             "then KEY=VALUE overrides): a comma list of names, or specs separated by ';'")
    parser.add_argument("--modes", type=str, default="fast,deterministic",
                        help="comma list of the dkv modes to time: fast, deterministic")
    parser.add_argument("--no-baseline", action="store_true", help="skip the torch baseline")
    parser.add_argument("--profile", action="store_true",
                        help="also print the time of each kernel (torch.profiler)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("CUDA only")
    import triton.testing

    cudnn_fn, cudnn_note = cudnn_backward_fn()
    print(f"device: {torch.cuda.get_device_name()}")
    if cudnn_fn is None:
        print(f"note: cuDNN DSA backward not timed: {cudnn_note}")
    print()
    print("| shape | impl | mode | ms | baseline ms | speedup | TFLOP/s | % of 760 | check |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    separator = ";" if ";" in args.configs or "=" in args.configs else ","
    configs = [c.strip() for c in args.configs.split(separator) if c.strip()] or [""]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"fast", "deterministic"}:
        raise SystemExit(f"--modes: expected fast and/or deterministic, got {args.modes!r}")
    for num_heads in [int(h) for h in args.heads.split(",")]:
        q, kv, dout, indices, attn_sink = make_inputs(args.tokens, args.kv_rows, num_heads,
                                                      args.topk, args.head_dim, args.d_v, args.sink)
        scale = args.head_dim ** -0.5
        out, lse = torch_forward(q, kv, indices, scale, args.d_v, attn_sink, None)
        call_args = (dout, q, kv, out, lse, indices, scale, args.d_v, attn_sink, None)
        flops = bwd_flops(args.tokens, num_heads, args.topk, args.head_dim, args.d_v)
        shape = (f"T={args.tokens} S={args.kv_rows} H={num_heads} K={args.topk} "
                 f"D={args.head_dim}{' sink' if args.sink else ''}")

        ref = torch_backward(*call_args)
        base_ms = float("nan")
        if not args.no_baseline:
            base_ms = triton.testing.do_bench(lambda: torch_backward(*call_args), warmup=50,
                                              rep=300, return_mode="median")

        def row(impl, mode, ms, check):
            tflops = flops / (ms * 1e-3) / 1e12
            print(f"| {shape} | {impl} | {mode} | {ms:.3f} | {base_ms:.3f} | {base_ms / ms:.2f}x "
                  f"| {tflops:.1f} | {100 * tflops / PEAK_TFLOPS:.1f}% | {check} |", flush=True)

        row("torch chunked", "-", base_ms, "baseline")
        for config in configs:
            if config:
                os.environ[triton_bwd.CONFIG_ENV] = config
            impl = f"triton {config or 'default'}"
            for mode in modes:
                deterministic = mode == "deterministic"
                try:
                    result = triton_bwd.sparse_attention_backward(*call_args, deterministic)
                except Exception as exc:  # noqa: BLE001 - report and go on with the sweep
                    print(f"| {shape} | {impl} | {mode} | failed: {type(exc).__name__}: "
                          f"{str(exc)[:120]} | | | | | |", flush=True)
                    continue
                errors = [rel_err(result[0], ref[0]), rel_err(result[1], ref[1])]
                check = f"dq {errors[0]:.1e} dkv {errors[1]:.1e}"
                if attn_sink is not None:
                    errors.append(rel_err(result[2], ref[2]))
                    check += f" dsink {errors[2]:.1e}"
                if not all(e <= MAX_REL_ERR for e in errors):  # NaN fails too
                    print(f"| {shape} | {impl} | {mode} | WRONG, not timed: {check} (limit {MAX_REL_ERR}) "
                          f"| | | | | |", flush=True)
                    continue
                if deterministic:
                    again = triton_bwd.sparse_attention_backward(*call_args, deterministic)
                    same = all(torch.equal(a, b) for a, b in zip(result, again))
                    check += " bitwise-same" if same else " NOT-BITWISE-SAME"
                ms = triton.testing.do_bench(
                    lambda: triton_bwd.sparse_attention_backward(*call_args, deterministic),
                    warmup=50, rep=300, return_mode="median")
                row(impl, mode, ms, check)
                if args.profile:
                    print_kernel_times(
                        lambda: triton_bwd.sparse_attention_backward(*call_args, deterministic))
            os.environ.pop(triton_bwd.CONFIG_ENV, None)
        if cudnn_fn is not None:
            try:
                result = cudnn_fn(*call_args)
                check = f"dq {rel_err(result[0], ref[0]):.1e} dkv {rel_err(result[1], ref[1]):.1e}"
                ms = triton.testing.do_bench(lambda: cudnn_fn(*call_args), warmup=50, rep=300,
                                             return_mode="median")
                row("cuDNN DSA", "-", ms, check)
            except Exception as exc:  # noqa: BLE001
                print(f"| {shape} | cuDNN DSA | - | failed: {type(exc).__name__}: {str(exc)[:160]} "
                      f"| | | | | |", flush=True)
        del q, kv, dout, indices, out, lse, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
