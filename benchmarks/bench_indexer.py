"""Lightning-indexer benchmark: Triton kernels (csrc_dsl/triton/indexer.py) vs a chunked torch baseline.

    python -m benchmarks.bench_indexer            # the table
    python -m benchmarks.bench_indexer --sweep    # also time tile configurations of the logits kernel

Every timed op is first checked against an fp32 torch reference on sampled rows. TFLOP/s count only
visible (query, key) pairs: 2 * H_I * D_I * #visible, as SPEC section 1 does. Peak extra memory is
torch.cuda.max_memory_allocated() during the call minus what was allocated before it (outputs included).
"""

import argparse

import torch

PEAK_TFLOPS = 760.0  # H100 SXM dense bf16, the yardstick of the % column
CUDNN_NOTE_MS = {8192: 1.02, 65536: 9.2}  # cuDNN frontend indexer forward on H100 (team's measurement)


def bench(fn, warmup_ms=100, rep_ms=500):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def make_inputs(B, Sq, Sk, HI, DI, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Sq, HI, DI, generator=gen, device="cuda").to(torch.bfloat16)
    k = torch.randn(B, Sk, DI, generator=gen, device="cuda").to(torch.bfloat16)
    w = torch.randn(B, Sq, HI, generator=gen, device="cuda") * HI ** -0.5
    return q, k, w


def visible_counts(B, Sq, Sk, ratio=1):
    pos = (Sk * ratio - Sq) + torch.arange(Sq, device="cuda")
    return ((pos + 1).clamp_min(0) // ratio).clamp_max(Sk)[None].expand(B, Sq)


def torch_logits(q, k, w, scale, row_chunk=256):
    """Baseline: chunked bf16 matmul over all keys, ReLU, head-weighted sum by bmm, then the mask."""
    B, Sq, HI, DI = q.shape
    Sk = k.shape[1]
    out = torch.empty(B, Sq, Sk, dtype=torch.float32, device=q.device)
    n_vis = visible_counts(B, Sq, Sk)
    cols = torch.arange(Sk, device=q.device)
    for b in range(B):
        for r0 in range(0, Sq, row_chunk):
            r1 = min(Sq, r0 + row_chunk)
            s = (q[b, r0:r1].reshape(-1, DI) @ k[b].T).view(r1 - r0, HI, Sk).relu_()
            wr = (w[b, r0:r1] * scale).to(q.dtype)[:, None, :]
            rows = torch.bmm(wr, s).squeeze(1).float()
            out[b, r0:r1] = rows.masked_fill(cols[None, :] >= n_vis[b, r0:r1, None], float("-inf"))
    return out


def reference_rows(q, k, w, scale, rows):
    """fp32 reference of the selected query rows of batch 0 (no tf32)."""
    qs = q[0, rows].float()
    s = torch.einsum("qhd,kd->qhk", qs, k[0].float()) * scale
    out = torch.einsum("qhk,qh->qk", s.relu(), w[0, rows].float())
    Sq, Sk = q.shape[1], k.shape[1]
    n_vis = visible_counts(1, Sq, Sk)[0, rows]
    return out.masked_fill(torch.arange(Sk, device="cuda")[None] >= n_vis[:, None], float("-inf"))


def check_rows(scores, ref, what, tol=2e-3):
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(scores), fin), f"{what}: -inf pattern differs"
    err = ((scores[fin] - ref[fin]).norm() / ref[fin].norm()).item()
    assert err <= tol, f"{what}: rel err {err}"
    return err


def peak_extra_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / 2 ** 20


def topk_impl():
    try:
        from csrc_dsl.triton.topk import topk  # noqa: F401
        return "team Triton top-k", None
    except ImportError:
        # stand-in with the same call shape so the fused path can be timed; NOT the SPEC tie rule
        def fallback(scores, k, lengths):
            val, idx = torch.topk(scores, k, dim=-1)
            idx = torch.where(torch.isneginf(val), -1, idx).to(torch.int32)
            return idx, val
        return "torch.topk stand-in (csrc_dsl/triton/topk.py missing)", fallback


def cudnn_note():
    try:
        import cudnn  # noqa: F401
    except ImportError:
        return "cuDNN frontend (`import cudnn`) not installed: cuDNN column = team's published H100 numbers"
    return ("`import cudnn` works but its DSA indexer API is not wired here yet: "
            "cuDNN column = team's published H100 numbers")


def sweep(ix, shapes):
    print("\n### logits kernel configurations (ms, TFLOP/s on visible pairs)\n")
    print("| Sk | BLOCK_K | warps | stages | min rows/program | ms | TFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    names = ("_FWD_BLOCK_K", "_FWD_NUM_WARPS", "_FWD_NUM_STAGES", "_MIN_ROWS_PER_PROG")
    saved = {n: getattr(ix, n) for n in names}
    # (BLOCK_K, num_warps, num_stages, min rows per program); the first is the shipped default
    configs = [(256, 4, 3, 128), (128, 4, 3, 128), (256, 8, 3, 128), (256, 4, 4, 128), (256, 4, 3, 64),
               (256, 4, 3, 256), (512, 8, 3, 128)]
    for (B, Sq, Sk, HI, DI) in shapes:
        q, k, w = make_inputs(B, Sq, Sk, HI, DI)
        flops = 2 * HI * DI * visible_counts(B, Sq, Sk).sum().item()
        rows = torch.linspace(0, Sq - 1, 64, device="cuda").long()
        ref = reference_rows(q, k, w, 1.0, rows)
        for config in configs:
            for n, v in zip(names, config):
                setattr(ix, n, v)
            cells = " | ".join(str(v) for v in config)
            try:
                out = ix.indexer_logits(q, k, w, 1.0, 1, None)
                check_rows(out[0, rows], ref, "sweep")
                del out
                ms = bench(lambda: ix.indexer_logits(q, k, w, 1.0, 1, None), 50, 200)
                print(f"| {Sk} | {cells} | {ms:.3f} | {flops / ms / 1e9:.0f} |", flush=True)
            except Exception as e:  # a config that does not compile (e.g. shared memory) is reported, not fatal
                print(f"| {Sk} | {cells} | failed: {type(e).__name__} | |", flush=True)
        del q, k, w
        torch.cuda.empty_cache()
    for n, v in saved.items():
        setattr(ix, n, v)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="time tile configurations of the logits kernel")
    parser.add_argument("--topk", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_indexer: CUDA is not available; nothing to time.")
        return
    from csrc_dsl.triton import indexer as ix

    print(f"device: {torch.cuda.get_device_name()}")
    topk_name, fallback = topk_impl()
    if fallback is not None:
        ix._team_topk = fallback
    print(f"top-k used by the fused path: {topk_name}")
    print(cudnn_note())
    shapes = [(1, 4096, 8192, 64, 128), (1, 4096, 65536, 64, 128)]
    if args.sweep:
        sweep(ix, shapes)

    print("\n### indexer_logits (bf16, bottom-right causal, scale 1)\n")
    print("| shape B,Sq,Sk,HI,DI | ours ms | torch ms | cuDNN ms (ref) | torch/ours | cuDNN/ours | TFLOP/s | % of 760 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    logits_ms = {}
    for (B, Sq, Sk, HI, DI) in shapes:
        q, k, w = make_inputs(B, Sq, Sk, HI, DI)
        flops = 2 * HI * DI * visible_counts(B, Sq, Sk).sum().item()
        rows = torch.linspace(0, Sq - 1, 128, device="cuda").long()
        ref = reference_rows(q, k, w, 1.0, rows)
        check_rows(ix.indexer_logits(q, k, w, 1.0, 1, None)[0, rows], ref, "ours")
        # the baseline rounds its matmul output to bf16: SPEC's bf16-output tolerance applies to it
        check_rows(torch_logits(q, k, w, 1.0)[0, rows], ref, "torch baseline", tol=1e-2)
        ours = bench(lambda: ix.indexer_logits(q, k, w, 1.0, 1, None))
        base = bench(lambda: torch_logits(q, k, w, 1.0), 50, 300)
        logits_ms[Sk] = ours
        cud = CUDNN_NOTE_MS.get(Sk)
        print(f"| {B},{Sq},{Sk},{HI},{DI} | {ours:.3f} | {base:.3f} | {cud} | {base / ours:.2f} | "
              f"{cud / ours:.2f} | {flops / ours / 1e9:.0f} | {100 * flops / ours / 1e9 / PEAK_TFLOPS:.0f}% |",
              flush=True)
        del q, k, w
        torch.cuda.empty_cache()

    print(f"\n### indexer_topk (fused, topk={args.topk}) vs logits alone\n")
    print("| shape | topk ms | logits ms | topk/logits | select alone ms | TFLOP/s | peak extra MiB | "
          "full score matrix MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (B, Sq, Sk, HI, DI) in shapes:
        q, k, w = make_inputs(B, Sq, Sk, HI, DI)
        flops = 2 * HI * DI * visible_counts(B, Sq, Sk).sum().item()
        idx, val = ix.indexer_topk(q, k, w, args.topk, 1.0, 1, None, None, None)
        rows = torch.linspace(0, Sq - 1, 64, device="cuda").long()
        ref = reference_rows(q, k, w, 1.0, rows)
        got = torch.gather(ref, 1, idx[0, rows].long().clamp_min(0))
        assert torch.allclose(got[idx[0, rows] >= 0], val[0, rows][idx[0, rows] >= 0], rtol=1e-3, atol=1e-3)
        ms = bench(lambda: ix.indexer_topk(q, k, w, args.topk, 1.0, 1, None, None, None))
        mib = peak_extra_mib(lambda: ix.indexer_topk(q, k, w, args.topk, 1.0, 1, None, None, None))
        # the select alone, on the materialised scores of the same problem (where the rest of the time goes)
        scores = ix.indexer_logits(q, k, w, 1.0, 1, None)
        lengths = visible_counts(B, Sq, Sk).to(torch.int32).contiguous()
        select_ms = bench(lambda: ix._team_topk(scores, args.topk, lengths))
        del scores
        print(f"| {B},{Sq},{Sk},{HI},{DI} | {ms:.3f} | {logits_ms[Sk]:.3f} | {ms / logits_ms[Sk]:.2f} | "
              f"{select_ms:.3f} | {flops / ms / 1e9:.0f} | {mib:.0f} | {B * Sq * Sk * 4 / 2 ** 20:.0f} |",
              flush=True)
        del q, k, w, idx, val
        torch.cuda.empty_cache()

    print("\n### other indexer kernels\n")
    print("| op | shape | ms | note |")
    print("| --- | --- | --- | --- |")
    # backward of the logits
    B, Sq, Sk, HI, DI = 1, 4096, 8192, 64, 128
    q, k, w = make_inputs(B, Sq, Sk, HI, DI)
    grad = torch.randn(B, Sq, Sk, device="cuda")
    flops = 2 * HI * DI * visible_counts(B, Sq, Sk).sum().item()
    ms = bench(lambda: ix.indexer_logits_backward(grad, q, k, w, 1.0, 1, None), 50, 300)
    print(f"| indexer_logits_backward | {B},{Sq},{Sk},{HI},{DI} | {ms:.3f} | "
          f"{4 * flops / ms / 1e9:.0f} TFLOP/s (4x fwd FLOPs: two recomputes, dq, dk) |", flush=True)
    # sparse indexer score (predict of the KL loss)
    K = 2048
    indices = torch.randint(0, Sk, (B, Sq, K), device="cuda", dtype=torch.int32)
    ms = bench(lambda: ix.sparse_indexer_score(q, k, w, indices, 1.0, None))
    print(f"| sparse_indexer_score | {B},{Sq},K={K},{HI},{DI} | {ms:.3f} | "
          f"{2 * HI * DI * B * Sq * K / ms / 1e9:.0f} TFLOP/s |", flush=True)
    del grad, indices
    # paged decode
    for (Bd, Sqd, seq, page) in ((64, 1, 32768, 64), (32, 2, 65536, 64)):
        maxp = seq // page
        qd, kd_dense, wd = make_inputs(Bd, Sqd, 1, HI, DI)
        k_cache = torch.randn(Bd * maxp, page, DI, device="cuda").to(torch.bfloat16)
        block_table = torch.randperm(Bd * maxp, device="cuda", dtype=torch.int32).view(Bd, maxp)
        seq_lens = torch.full((Bd,), seq, dtype=torch.int32, device="cuda")
        ms = bench(lambda: ix.indexer_topk_paged(qd, k_cache, block_table, seq_lens, wd, args.topk, 1.0))
        ws = torch.empty(Bd, Sqd, maxp * page, device="cuda")
        logits_only = bench(lambda: ix._launch_logits(qd, k_cache, wd, ws, seq_lens, 1, 1.0,
                                                      block_table=block_table, page=page))
        gb = Bd * seq * DI * 2 / 1e9
        print(f"| indexer_topk_paged | B={Bd},Sq={Sqd},seq={seq},page={page} | {ms:.3f} | "
              f"paged logits alone {logits_only:.3f} ms = keys at {gb / logits_only:.2f} TB/s |", flush=True)


if __name__ == "__main__":
    main()
