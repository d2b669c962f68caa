"""The CuTe-DSL SM90 sparse attention forward, one row per named variant, side by side (GPU, SM90).

    python -m benchmarks.bench_cute_fwd_schedules [--cases headline|all|k_sweep] [--reps 30] [--ids random|sorted]
        [--variants [all | NAME,NAME]] [--no-triton] [--flashmla .device/flashmla/libflashmla_sm90_sparse_fwd.so]

The op's variant (`DEFAULT_VARIANT` of `csrc_dsl.cute.sm90.sparse_attention_fwd`), or the ones `--variants` names
from its `VARIANTS` (all of them with a bare `--variants`), and the Triton forward, for scale, run on the same
inputs in one process: each is checked against the fp64 torch oracle on the first 64
queries, then timed in interleaved rounds (one call of each per round, L2 flushed before every call,
CUDA events), and the median is reported. FLOPs: 2*T*H*K*(D + d_v) (SPEC section 4).
`--flashmla LIB` adds FlashMLA's SM90 sparse prefill (H 64 and 128 only) as one more interleaved row on the same
inputs, from the library that benchmarks/flashmla_baseline/build.sh makes; without it, only the H100 times quoted
in issue 4 are printed beside ours.
`--cases k_sweep` times H = 64 and 128 at K = 128 ... 2048 and fits time = fixed + K * per_key for each backend:
the fixed part (per wave of CTAs) is what a kernel spends outside its tile loop (launch, Q, epilogue).
`--ids sorted` sorts each query's ids (as a top-k that emits ids in index order gives; the default is a random
order). With `seesaw+persistent` among the variants, the persistent kernel also runs with one item per CTA.
(Until session 23 the schedules "split_keys" and "alternate" had rows too: docs/experiments/.)
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.bench_sparse_attention import Case, attention_inputs, check, torch_sparse_attention
from benchmarks.common import flush_l2, use_roofline_of

# FlashMLA's SM90 sparse prefill on this H100 class (issue 4): ms, keyed by (H, S_kv), T=4096, K=2048, D=576.
FLASHMLA_MS = {(128, 8192): 3.52, (64, 8192): 2.01, (128, 65536): 4.30}

HEADLINE = [
    Case("V3.2 H=128", "fwd", T=4096, S=8192, H=128, K=2048),
    Case("V3.2 H=64", "fwd", T=4096, S=8192, H=64, K=2048),
    Case("V3.2 H=128 S=64K", "fwd", T=4096, S=65536, H=128, K=2048),
]
MORE = [
    Case("V3.2 H=32", "fwd", T=4096, S=8192, H=32, K=2048),
    Case("V3.2 H=16", "fwd", T=4096, S=8192, H=16, K=2048),
    Case("V4 H=64 K=512", "fwd", T=4096, S=8192, H=64, K=512, D=512),
    Case("V4 H=64 K=1024", "fwd", T=4096, S=8192, H=64, K=1024, D=512),
]


K_SWEEP = [Case(f"V3.2 H={H} K={K}", "fwd", T=4096, S=8192, H=H, K=K) for H in (128, 64)
           for K in (128, 256, 512, 1024, 2048)]


def fit_fixed_cost(rows: list[dict], num_sms: int) -> None:
    """Least-squares time = fixed + per_key * K for each (H, backend) of a K sweep; prints the fixed part per wave
    of CTAs (one CTA per SM: T * ceil(H / 64) CTAs over the SMs; every case of a sweep has the same T)."""
    print("\n| H | backend | fixed ms | per wave us | per 1024 keys ms |")
    print("| --- | --- | --- | --- | --- |")
    groups = {}
    for row in rows:
        groups.setdefault((row["T"], row["H"], row["backend"]), []).append((row["K"], row["ms"]))
    for (T, H, backend), points in groups.items():
        n = len(points)
        mean_k = sum(k for k, _ in points) / n
        mean_t = sum(t for _, t in points) / n
        slope = (sum((k - mean_k) * (t - mean_t) for k, t in points)
                 / sum((k - mean_k) ** 2 for k, _ in points))
        fixed = mean_t - slope * mean_k
        waves = -(-T * -(-H // 64) // num_sms)
        print(f"| {H} | {backend} | {fixed:.3f} | {1000 * fixed / waves:.2f} | {1024 * slope:.3f} |")


def load_flashmla(path: str):
    """FlashMLA's SM90 sparse prefill forward as a callable(q, kv, idx, sink, scale, d_v, out, max_logits, lse) that
    writes into the given outputs, through the C entry point of benchmarks/flashmla_baseline/flashmla_capi.cu."""
    import ctypes

    fn = ctypes.CDLL(path).flashmla_sm90_sparse_fwd
    fn.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float] + [ctypes.c_void_p] * 8 + [ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count

    def run(q, kv, idx, sink, scale, d_v, out, max_logits, lse):
        T, H, D = q.shape
        rc = fn(T, kv.shape[0], H, D, d_v, idx.shape[1], scale, q.data_ptr(), kv.data_ptr(), idx.data_ptr(),
                None if sink is None else sink.data_ptr(), None, out.data_ptr(), max_logits.data_ptr(),
                lse.data_ptr(), num_sms, torch.cuda.current_stream().cuda_stream)
        if rc != 0:
            raise RuntimeError(f"flashmla_sm90_sparse_fwd returned {rc}")
    return run


def run_case(case: Case, reps: int, with_triton: bool, variant_names, sorted_ids: bool,
             flashmla=None) -> list[dict]:
    from csrc_dsl.cute.sm90 import sparse_attention_fwd as cute_fwd
    from csrc_dsl.triton import sparse_attention_fwd as triton_fwd

    q, kv, idx, sink = attention_inputs(case)
    if sorted_ids:
        # ascending ids, the -1 pads (placed last by attention_inputs) kept last
        idx = torch.where(idx < 0, torch.iinfo(torch.int32).max, idx).sort(dim=1).values
        idx = torch.where(idx == torch.iinfo(torch.int32).max, -1, idx).contiguous()
    scale = case.D ** -0.5
    n_check = 64
    ref_out, ref_lse = torch_sparse_attention(q[:n_check], kv, idx[:n_check], scale, case.d_v, sink,
                                              compute_dtype=torch.float64)
    out = torch.empty(case.T, case.H, case.d_v, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(case.T, case.H, device="cuda", dtype=torch.float32)
    runs = {}
    for name, fields in [(f"cute {name}", cute_fwd.VARIANTS[name]) for name in variant_names]:
        config = cute_fwd.FwdConfig(case.D, case.d_v, has_sink=True, has_topk_length=False, **fields)
        runs[name] = (lambda c=config: cute_fwd._launch(c, q, kv, idx, out, lse, scale, sink, None))
        if name == "cute seesaw+persistent":
            # the persistent kernel with one item per CTA (a grid as large as the work): its code without its
            # scheduling, to tell the two apart
            runs[name + " 1/CTA"] = (lambda c=config: cute_fwd._launch(c, q, kv, idx, out, lse, scale, sink, None,
                                                                       max_ctas=1 << 30))
    if with_triton:
        runs["triton"] = lambda: triton_fwd.sparse_attention(q, kv, idx, scale, case.d_v, sink)
    if flashmla is not None and case.H in (64, 128):
        max_logits = torch.empty_like(lse)
        runs["flashmla"] = lambda: flashmla(q, kv, idx, sink, scale, case.d_v, out, max_logits, lse)
    errors = {}
    for name, fn in list(runs.items()):
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        result = fn()
        got_out, got_lse = result if name == "triton" else (out, lse)
        try:
            errors[name] = check(got_out[:n_check], got_lse[:n_check], ref_out, ref_lse, f"{case.name} {name}")
        except AssertionError as exc:   # a wrong variant is reported, never timed
            print(f"WRONG, not timed: {exc}", flush=True)
            del runs[name]
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            flush_l2(q.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    flops = 2 * case.T * case.H * case.K * (case.D + case.d_v)
    rows = []
    for name in runs:
        ms = statistics.median(times[name])
        rows.append(dict(case=case.name, backend=name, ms=ms, tflops=flops / ms / 1e9, err=errors[name],
                         spread=(min(times[name]), max(times[name])), T=case.T, H=case.H, K=case.K))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="headline", choices=["headline", "all", "k_sweep"])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--ids", default="random", choices=["random", "sorted"])
    parser.add_argument("--variants", nargs="?", const="all", default="",
                        help="all of VARIANTS, or a comma-separated list of names (default: the op's variant)")
    parser.add_argument("--flashmla", default="", help="FlashMLA library from benchmarks/flashmla_baseline/build.sh")
    parser.add_argument("--heads", default="", help="only the cases with these head counts (comma-separated)")
    args = parser.parse_args(argv)
    from csrc_dsl.cute.sm90 import sparse_attention_fwd as cute_fwd
    if args.variants == "all":
        variant_names = list(cute_fwd.VARIANTS)
    else:
        variant_names = [x for x in args.variants.split(",") if x] or [cute_fwd.DEFAULT_VARIANT]
    unknown = set(variant_names) - set(cute_fwd.VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; VARIANTS has {sorted(cute_fwd.VARIANTS)}")
    peak, _ = use_roofline_of(torch.cuda.get_device_name())
    cases = K_SWEEP if args.cases == "k_sweep" else HEADLINE + (MORE if args.cases == "all" else [])
    if args.heads:
        heads = {int(h) for h in args.heads.split(",")}
        cases = [case for case in cases if case.H in heads]
    all_rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; medians of {args.reps} "
          f"interleaved calls, L2 flushed before each; ids in {args.ids} order")
    flashmla_lib = load_flashmla(args.flashmla) if args.flashmla else None
    print("| case | backend | ms | TFLOP/s | % of peak | vs first row | FlashMLA same run: ms (its / ours) | "
          "FlashMLA ms (published) | rel err (64 q) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in cases:
        rows = run_case(case, args.reps, not args.no_triton, variant_names, args.ids == "sorted", flashmla_lib)
        first = rows[0]["ms"]
        published = FLASHMLA_MS.get((case.H, case.S)) if case.D == 576 and case.K == 2048 else None
        measured = next((row["ms"] for row in rows if row["backend"] == "flashmla"), None)
        for row in rows:
            ms = row["ms"]
            vs_measured = "" if measured is None else f"{measured:.3f} ({measured / ms:.2f}x)"
            vs_published = "" if published is None else f"{published:.2f} ({published / ms:.2f}x)"
            print(f"| {row['case']} | {row['backend']} | {ms:.3f} | {row['tflops']:.0f} | "
                  f"{100 * row['tflops'] / peak:.0f}% | {first / ms:.2f}x | {vs_measured} | {vs_published} | "
                  f"{row['err']:.1e} |", flush=True)
        all_rows += rows
    if args.cases == "k_sweep":
        fit_fixed_cost(all_rows, torch.cuda.get_device_properties(0).multi_processor_count)


if __name__ == "__main__":
    main()
