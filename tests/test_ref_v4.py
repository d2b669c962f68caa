"""The DeepSeek-V4 references (dsa_ops/reference/v4.py) against naive per-element loops in fp64 (SPEC section 7),
their backward functions against autograd of those loops, chunking, bf16 inputs and the empty-branch rules."""
import math

import pytest
import torch

from dsa_ops.reference import v4
from dsa_ops.testing import randn

F64 = torch.float64


def rand(*shape, seed, dtype=F64, requires_grad=False):
    return randn(*shape, g=torch.Generator().manual_seed(seed), dtype=dtype, device="cpu",
                 requires_grad=requires_grad)


# ------------------------------------------------------------------------------------------------------
# Naive oracles: one output element at a time, straight from the SPEC wording
# ------------------------------------------------------------------------------------------------------
def naive_pool(cs: list, zs: list):
    """sum_i softmax_i(z) * c_i over a list of scalar slots (0-dim tensors, so autograd can run through it)."""
    top = max(float(z.detach()) for z in zs)
    exps = [torch.exp(z - top) for z in zs]
    total = sum(exps)
    return sum(e / total * c for e, c in zip(exps, cs))


def naive_hca(c, z, m):
    B, S, d = c.shape
    out = torch.zeros(B, S // m, d, dtype=F64)
    for b in range(B):
        for w in range(S // m):
            for ch in range(d):
                tokens = range(w * m, (w + 1) * m)
                out[b, w, ch] = naive_pool([c[b, t, ch] for t in tokens], [z[b, t, ch] for t in tokens])
    return out


def naive_csa(c, z, m):
    B, S, two_d = c.shape
    d = two_d // 2
    out = torch.zeros(B, S // m, d, dtype=F64)
    for b in range(B):
        for w in range(S // m):
            a_tokens = range((w - 1) * m, w * m) if w > 0 else range(0)  # window w-1, absent for w = 0
            b_tokens = range(w * m, (w + 1) * m)
            for ch in range(d):
                cs = [c[b, t, ch] for t in a_tokens] + [c[b, t, d + ch] for t in b_tokens]
                zs = [z[b, t, ch] for t in a_tokens] + [z[b, t, d + ch] for t in b_tokens]
                out[b, w, ch] = naive_pool(cs, zs)
    return out


def naive_merge(outs, lses, sink):
    """The SPEC formula with M = max over branches and sink; +inf lse = empty branch."""
    J, T, H, d_v = outs.shape
    out = torch.zeros(T, H, d_v, dtype=F64)
    lse = torch.zeros(T, H, dtype=F64)
    for t in range(T):
        for h in range(H):
            live = [j for j in range(J) if lses[j, t, h] != math.inf]
            logits = [lses[j, t, h] for j in live] + ([sink[h]] if sink is not None else [])
            if not live:
                lse[t, h] = math.inf
                continue
            M = max(float(x.detach()) for x in logits)
            denom = sum(torch.exp(x - M) for x in logits)
            out[t, h] = sum(torch.exp(lses[j, t, h] - M) * outs[j, t, h] for j in live) / denom
            keys_max = max(float(lses[j, t, h].detach()) for j in live)
            lse[t, h] = keys_max + math.log(sum(math.exp(float(lses[j, t, h].detach()) - keys_max) for j in live))
    return out, lse


# ------------------------------------------------------------------------------------------------------
# Compressors
# ------------------------------------------------------------------------------------------------------
HCA_CASES = [(1, 5), (2, 7), (4, 11), (4, 3), (128, 131), (128, 257)]  # (m, S): S never a multiple of m


@pytest.mark.parametrize("m,S", HCA_CASES, ids=[f"m{m}-S{S}" for m, S in HCA_CASES])
def test_hca_matches_naive(m, S):
    d = 3 if m == 128 else 5  # odd channel counts; small d keeps the m = 128 loops quick
    c, z = rand(2, S, d, seed=m + S), 3 * rand(2, S, d, seed=m + S + 1)
    got = v4.hca_compress(c, z, m)
    assert got.shape == (2, S // m, d) and got.dtype == F64
    torch.testing.assert_close(got, naive_hca(c, z, m), rtol=1e-12, atol=1e-12)


CSA_CASES = [(1, 5), (2, 7), (4, 11), (4, 3), (3, 13)]


@pytest.mark.parametrize("m,S", CSA_CASES, ids=[f"m{m}-S{S}" for m, S in CSA_CASES])
def test_csa_matches_naive(m, S):
    d = 5
    c, z = rand(2, S, 2 * d, seed=m + S), 3 * rand(2, S, 2 * d, seed=m + S + 1)
    got = v4.csa_compress(c, z, m)
    assert got.shape == (2, S // m, d) and got.dtype == F64
    torch.testing.assert_close(got, naive_csa(c, z, m), rtol=1e-12, atol=1e-12)


def test_csa_first_entry_pools_b_halves_only_and_a_halves_shift():
    """Entry 0 ignores every a half; entry 1 reads the a halves of window 0 only."""
    m, d = 2, 3
    c, z = rand(1, 6, 2 * d, seed=1), rand(1, 6, 2 * d, seed=2)
    base = v4.csa_compress(c, z, m)
    c2 = c.clone()
    c2[:, 0:m, :d] += 10.0  # the a halves of window 0: only entry 1 may change
    moved = v4.csa_compress(c2, z, m)
    assert torch.equal(moved[:, 0], base[:, 0]) and torch.equal(moved[:, 2], base[:, 2])
    assert not torch.allclose(moved[:, 1], base[:, 1])


@pytest.mark.parametrize("name,naive", [("hca", naive_hca), ("csa", naive_csa)])
@pytest.mark.parametrize("m,S", [(1, 3), (3, 10)])
def test_compress_backward_matches_autograd_of_naive(name, naive, m, S):
    channels = 3 if name == "hca" else 6
    c = rand(2, S, channels, seed=S, requires_grad=True)
    z = rand(2, S, channels, seed=S + 1, requires_grad=True)
    grad = rand(2, S // m, channels if name == "hca" else channels // 2, seed=S + 2)
    want = torch.autograd.grad(naive(c, z, m), (c, z), grad)
    got = getattr(v4, f"{name}_compress_backward")(grad, c.detach(), z.detach(), m)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if S % m:
        assert torch.all(got[0][:, S // m * m:] == 0), "trailing tokens get no gradient"


@pytest.mark.parametrize("name", ["hca", "csa"])
def test_compress_chunking_is_invisible(name, monkeypatch):
    m, S = 3, 23
    channels = 7 if name == "hca" else 14
    c, z = rand(2, S, channels, seed=3, dtype=torch.float32), rand(2, S, channels, seed=4, dtype=torch.float32)
    grad = rand(2, S // m, 7, seed=5, dtype=torch.float32)
    fwd, bwd = getattr(v4, f"{name}_compress"), getattr(v4, f"{name}_compress_backward")
    whole = fwd(c, z, m), *bwd(grad, c, z, m)
    monkeypatch.setattr(v4, "CHUNK_BUDGET_ELEMENTS", 1)  # one window per chunk
    chunked = fwd(c, z, m), *bwd(grad, c, z, m)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["hca", "csa"])
def test_compress_bf16_with_fp32_gates(name):
    """bf16 c with fp32 (or bf16) z: output bf16, computed in fp32 (SPEC section 9: rel. error <= 1e-2)."""
    m, S = 4, 30
    channels = 16 if name == "hca" else 32
    c = rand(2, S, channels, seed=6, dtype=torch.float32).bfloat16()
    z = rand(2, S, channels, seed=7, dtype=torch.float32)
    fwd = getattr(v4, f"{name}_compress")
    want = fwd(c.double(), z.double(), m)
    for gates in (z, z.bfloat16()):
        got = fwd(c, gates, m)
        assert got.dtype == torch.bfloat16 and not got.isnan().any()
        assert (got.double() - want).norm() / want.norm() <= 1e-2
    dc, dz = getattr(v4, f"{name}_compress_backward")(torch.ones_like(got), c, z, m)
    assert dc.dtype == torch.bfloat16 and dz.dtype == torch.float32


def test_compress_fewer_tokens_than_a_window():
    c, z = rand(1, 5, 4, seed=8), rand(1, 5, 4, seed=9)
    assert v4.hca_compress(c, z, 128).shape == (1, 0, 4)
    dc, dz = v4.hca_compress_backward(torch.zeros(1, 0, 4, dtype=F64), c, z, 128)
    assert torch.all(dc == 0) and torch.all(dz == 0)
    assert v4.csa_compress(torch.cat([c, c], -1), torch.cat([z, z], -1), 8).shape == (1, 0, 4)


# ------------------------------------------------------------------------------------------------------
# Merge
# ------------------------------------------------------------------------------------------------------
def merge_inputs(J, T, H, d_v, seed):
    outs = rand(J, T, H, d_v, seed=seed)
    lses = 2 * rand(J, T, H, seed=seed + 1)
    lses[0, 0, 0], outs[0, 0, 0] = math.inf, 0.0  # one empty branch
    lses[:, 1, :], outs[:, 1, :] = math.inf, 0.0   # a row with every branch empty
    return outs, lses, rand(H, seed=seed + 2)


@pytest.mark.parametrize("with_sink", [True, False], ids=["sink", "no-sink"])
@pytest.mark.parametrize("J", [1, 2, 3])
def test_merge_matches_naive(J, with_sink):
    outs, lses, sink = merge_inputs(J, 5, 3, 7, seed=J)
    sink = sink if with_sink else None
    out, lse = v4.merge_attention_with_sink(outs, lses, sink)
    want_out, want_lse = naive_merge(outs, lses, sink)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == math.inf), "all-empty rows: out 0, lse +inf"
    assert not out.isnan().any()


def test_merge_ignores_garbage_in_empty_branches():
    outs, lses, sink = merge_inputs(2, 4, 2, 3, seed=4)
    dirty = outs.clone()
    dirty[0, 0, 0] = math.nan
    dirty[:, 1] = math.nan
    clean = v4.merge_attention_with_sink(outs, lses, sink)[0]
    assert torch.equal(v4.merge_attention_with_sink(dirty, lses, sink)[0], clean)


@pytest.mark.parametrize("with_sink", [True, False], ids=["sink", "no-sink"])
def test_merge_backward_matches_autograd_of_naive(with_sink):
    outs, lses, sink = merge_inputs(3, 4, 2, 5, seed=5)
    sink = sink if with_sink else None
    leaves = [t.requires_grad_() for t in (outs, lses, sink) if t is not None]
    grad = rand(4, 2, 5, seed=6)
    want = torch.autograd.grad(naive_merge(outs, lses, sink)[0], leaves, grad, allow_unused=True)
    out, lse = v4.merge_attention_with_sink(outs.detach(), lses.detach(), None if sink is None else sink.detach())
    d_outs, d_lses, d_sink = v4.merge_attention_with_sink_backward(
        grad, outs.detach(), lses.detach(), out, lse, None if sink is None else sink.detach())
    torch.testing.assert_close(d_outs, want[0], rtol=1e-10, atol=1e-12)
    # the naive loop never touches an empty branch's lse: autograd leaves 0 there, so does the reference
    torch.testing.assert_close(d_lses, want[1], rtol=1e-10, atol=1e-12)
    if with_sink:
        torch.testing.assert_close(d_sink, want[2], rtol=1e-10, atol=1e-12)
    else:
        assert torch.all(d_sink == 0) and d_sink.shape == (2,)


def test_merge_chunking_and_bf16(monkeypatch):
    outs, lses, sink = merge_inputs(2, 9, 3, 16, seed=7)
    outs32, lses32, sink32 = outs.float(), lses.float(), sink.float()
    whole = v4.merge_attention_with_sink(outs32, lses32, sink32)
    monkeypatch.setattr(v4, "CHUNK_BUDGET_ELEMENTS", 1)
    chunked = v4.merge_attention_with_sink(outs32, lses32, sink32)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    out16, lse16 = v4.merge_attention_with_sink(outs32.bfloat16(), lses32, sink32)
    assert out16.dtype == torch.bfloat16 and lse16.dtype == torch.float32
    want = naive_merge(outs32.bfloat16().double(), lses, sink)[0]
    assert (out16.double() - want).norm() / want.norm() <= 1e-2
