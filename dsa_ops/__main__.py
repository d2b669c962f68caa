"""`python -m dsa_ops`: one DeepSeek-V3.2 sparse-attention layer step, end to end, on the best device present.

indexer top-k -> sparse attention forward and backward -> attention target -> indexer KL loss and its backward.
Prints the shapes, the implementation each op dispatched to, median timings, and the error of every output
against the pure-torch reference (fp32) on the same inputs. Exits non-zero if a check fails.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import dsa_ops
from dsa_ops import dispatch
from dsa_ops.reference import attention as ref_attn
from dsa_ops.reference import indexer as ref_idx
from dsa_ops.reference import loss as ref_loss


def timed(fn, device, repeats):
    """Median wall time of fn() in ms (after one warm-up call); returns (result, ms)."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return result, statistics.median(times)


def rel_err(got, want):
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)):
        return float("inf")
    return ((got - want)[finite].norm() / want[finite].norm().clamp_min(1e-30)).item()


def set_mismatch(ids, ref_ids, n_keys):
    """Fraction of selected ids (-1 padding included, as its own key) missing from the reference row's set."""
    member = torch.zeros(ids.shape[0], n_keys + 1, dtype=torch.bool, device=ids.device)
    member.scatter_(1, (ref_ids.long() % (n_keys + 1)), True)
    return 1.0 - member.gather(1, ids.long() % (n_keys + 1)).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq", type=int, default=None, help="tokens (default 2048 on GPU, 192 on CPU)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 64 on GPU, 8 on CPU)")
    p.add_argument("--topk", type=int, default=None, help="selected keys (default 512 on GPU, 64 on CPU)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    S = a.seq or (2048 if gpu else 192)
    H = a.heads or (64 if gpu else 8)
    K = a.topk or (512 if gpu else 64)
    D, d_v, HI, DI = 576, 512, 64, 128
    dtype = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, std=1.0, dt=dtype, grad=False):
        t = (torch.randn(shape, generator=g) * std).to(device=device, dtype=dt)
        return t.requires_grad_(grad)

    q_idx, k_idx = rnd(1, S, HI, DI, std=0.5), rnd(1, S, DI, std=0.5)
    w = rnd(1, S, HI, std=HI ** -0.5, dt=torch.float32)
    q, kv = rnd(S, H, D, grad=True), rnd(S, D, grad=True)
    sink = rnd(H, dt=torch.float32, grad=True)
    scale = D ** -0.5
    print(f"dsa_ops {dsa_ops.__version__} on {device} ({torch.cuda.get_device_name(device) if gpu else 'CPU'}), "
          f"torch {torch.__version__}")
    print(f"shapes: S={S} tokens, attention H={H} D={D} d_v={d_v}, indexer H_I={HI} D_I={DI}, topk={K}, {dtype}")

    idx_w = (q_idx, k_idx, w)
    steps = {}
    (idx, _), steps["indexer_topk"] = timed(lambda: dsa_ops.indexer_topk(*idx_w, K), device, a.repeats)
    ids = idx[0]
    (out, lse), steps["sparse_attention"] = timed(
        lambda: dsa_ops.sparse_attention(q, kv, ids, scale, d_v, sink), device, a.repeats)
    dout = rnd(S, H, d_v)
    grads, steps["sparse_attention_backward"] = timed(
        lambda: torch.autograd.grad(dsa_ops.sparse_attention(q, kv, ids, scale, d_v, sink)[0], (q, kv, sink), dout),
        device, a.repeats)
    target, steps["sparse_attn_score"] = timed(
        lambda: dsa_ops.sparse_attn_score(q.detach(), kv.detach(), lse, ids, scale), device, a.repeats)
    leaf = [t.detach().requires_grad_() for t in idx_w]
    loss_and_grads, steps["indexer_loss (+backward)"] = timed(
        lambda: (lambda L: (L, *torch.autograd.grad(L, leaf)))(
            dsa_ops.indexer_loss(*leaf, idx, target.unsqueeze(0), 1.0, 1.0)), device, a.repeats)

    # The reference on the same inputs, in fp32 (the oracle).
    f = lambda t: t.detach().float()  # noqa: E731
    r_idx, _ = ref_idx.indexer_topk(f(q_idx), f(k_idx), w, K, 1.0, 1, None, None, None)
    r_out, r_lse = ref_attn.sparse_attention(f(q), f(kv), ids, scale, d_v, f(sink), None)
    r_dq, r_dkv, r_dsink = ref_attn.sparse_attention_backward(
        f(dout), f(q), f(kv), r_out, r_lse, ids, scale, d_v, f(sink), None, False)
    r_target = ref_attn.sparse_attn_score(f(q), f(kv), r_lse, ids, scale, None)
    r_loss = ref_loss.indexer_loss(f(q_idx), f(k_idx), w, idx, r_target.unsqueeze(0), 1.0, 1.0, None)
    r_grads = ref_loss.indexer_loss_backward(torch.ones((), device=device), f(q_idx), f(k_idx), w, idx,
                                             r_target.unsqueeze(0), 1.0, 1.0, None)
    checks = [
        ("indexer_topk ids (fraction not in the reference set)", set_mismatch(idx[0], r_idx[0], S), 1e-3),
        ("sparse_attention out", rel_err(out, r_out), 1e-2),
        ("sparse_attention lse", rel_err(lse, r_lse), 2e-3),
        ("dq", rel_err(grads[0], r_dq), 2e-2),
        ("dkv", rel_err(grads[1], r_dkv), 2e-2),
        ("d_sink", rel_err(grads[2], r_dsink), 2e-2),
        ("sparse_attn_score", rel_err(target, r_target), 2e-2),
        ("indexer_loss", rel_err(loss_and_grads[0], r_loss), 2e-2),
        ("d q_idx", rel_err(loss_and_grads[1], r_grads[0]), 2e-2),
        ("d k_idx", rel_err(loss_and_grads[2], r_grads[1]), 2e-2),
        ("d w", rel_err(loss_and_grads[3], r_grads[2]), 2e-2),
    ]

    print("\nop                            backend      median ms")
    op_args = {  # the full argument lists, so the dispatch sees what the calls saw
        "indexer_topk": (q_idx, k_idx, w, K, 1.0, 1, None, None, None),
        "sparse_attention": (q, kv, ids, scale, d_v, sink, None),
        "sparse_attention_backward": (dout, q, kv, out, lse, ids, scale, d_v, sink, None, False),
        "sparse_attn_score": (q, kv, lse, ids, scale, None),
        "indexer_loss": (q_idx, k_idx, w, idx, target.unsqueeze(0), 1.0, 1.0, None),
    }
    for name, ms in steps.items():
        op = name.split()[0]
        backend = dispatch.choose(op, op_args[op])[0].backend
        print(f"{name:<30}{backend:<13}{ms:9.3f}")
    print("\ncheck against the fp32 reference on the same inputs (relative error)")
    ok = True
    for name, err, tol in checks:
        good = err <= tol
        ok &= good
        print(f"  {name:<55}{err:10.2e}  (<= {tol:.0e}) {'ok' if good else 'FAIL'}")
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
