"""The Native Sparse Attention references (dsa_ops/reference/nsa.py) against naive per-element loops in fp64
(SPEC section 8), their backward functions against autograd of those loops, chunking, bf16 inputs, and the
selection rules (visible entries only, causal blocks, always-kept blocks, the tie rule, -1 padding)."""
import pytest
import torch

from dsa_ops.reference import nsa
from dsa_ops.testing import randn

F64 = torch.float64


def rand(*shape, seed, dtype=F64, requires_grad=False):
    return randn(*shape, g=torch.Generator().manual_seed(seed), dtype=dtype, device="cpu",
                 requires_grad=requires_grad)


def rel_err(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


# ------------------------------------------------------------------------------------------------------
# Naive oracles, straight from the SPEC wording
# ------------------------------------------------------------------------------------------------------
def naive_compress(k, block, stride):
    """Entry i = mean of tokens [i*stride, i*stride + block), complete blocks only."""
    B, S, G, D = k.shape
    N = 0
    while N * stride + block <= S:
        N += 1
    out = torch.zeros(B, N, G, D, dtype=F64)
    for b in range(B):
        for i in range(N):
            for g in range(G):
                for ch in range(D):
                    out[b, i, g, ch] = sum(k[b, i * stride + r, g, ch] for r in range(block)) / block
    return out


def naive_gate_combine(o_cmp, o_slc, o_win, gates):
    B, S, H, d_v = o_cmp.shape
    out = torch.zeros(B, S, H, d_v, dtype=F64)
    for b in range(B):
        for t in range(S):
            for h in range(H):
                for ch in range(d_v):
                    out[b, t, h, ch] = sum(torch.sigmoid(gates[b, t, h, j]) * o[b, t, h, ch]
                                           for j, o in enumerate((o_cmp, o_slc, o_win)))
    return out


def naive_select(p_cmp, groups, n, block, stride, select_block, local_blocks):
    """Token by token: every token u of a visible entry i adds p / block to the block u // select_block."""
    B, S, H, N = p_cmp.shape
    per_group = H // groups
    n_blocks = (S + select_block - 1) // select_block
    out = torch.full((B, S, groups, n), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(S):
            own = t // select_block
            for g in range(groups):
                score = [0.0] * n_blocks
                for i in range(N):
                    if t < i * stride + block - 1:  # entry not complete at token t: invisible
                        continue
                    p = sum(float(p_cmp[b, t, g * per_group + h, i]) for h in range(per_group))
                    for u in range(i * stride, i * stride + block):
                        score[u // select_block] += p / block
                forced = sorted({0} | {j for j in range(own - local_blocks + 1, own + 1) if j >= 0})
                rest = sorted((j for j in range(own + 1) if j not in forced), key=lambda j: (-score[j], j))
                chosen = sorted((forced + rest)[:n])
                out[b, t, g, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


# ------------------------------------------------------------------------------------------------------
# Compression
# ------------------------------------------------------------------------------------------------------
COMPRESS_CASES = [(4, 2, 17), (4, 4, 9), (3, 1, 8), (32, 16, 75), (4, 2, 3), (1, 1, 5), (6, 3, 6)]


@pytest.mark.parametrize("block,stride,S", COMPRESS_CASES, ids=[f"l{a}-d{b}-S{c}" for a, b, c in COMPRESS_CASES])
@pytest.mark.parametrize("G", [1, 4])
def test_compress_matches_naive(block, stride, S, G):
    D = 3 if block == 32 else 5
    k = rand(2, S, G, D, seed=block + S + G)
    got = nsa.nsa_compress(k, block, stride)
    want = naive_compress(k, block, stride)
    assert got.shape == want.shape == (2, max(0, (S - block) // stride + 1), G, D) and got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block,stride,S", [(4, 2, 13), (3, 3, 10), (2, 1, 5), (4, 2, 3)])
def test_compress_backward_matches_autograd_of_naive(block, stride, S):
    k = rand(2, S, 2, 3, seed=S, requires_grad=True)
    N = max(0, (S - block) // stride + 1)
    grad = rand(2, N, 2, 3, seed=S + 1)
    # no complete block (N = 0): the naive output does not depend on k at all
    want = torch.autograd.grad(naive_compress(k, block, stride), k, grad)[0] if N else torch.zeros_like(k)
    got = nsa.nsa_compress_backward(grad, k.detach(), block, stride)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    last = (N - 1) * stride + block if N else 0
    assert torch.all(got[:, last:] == 0), "tokens in no complete block get no gradient"


def test_compress_chunking_is_invisible(monkeypatch):
    k = rand(2, 37, 3, 7, seed=3, dtype=torch.float32)
    grad = rand(2, (37 - 8) // 4 + 1, 3, 7, seed=4, dtype=torch.float32)
    whole = nsa.nsa_compress(k, 8, 4), nsa.nsa_compress_backward(grad, k, 8, 4)
    monkeypatch.setattr(nsa, "CHUNK_BUDGET_ELEMENTS", 1)  # one entry per chunk
    chunked = nsa.nsa_compress(k, 8, 4), nsa.nsa_compress_backward(grad, k, 8, 4)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compress_bf16():
    """bf16 keys: bf16 output computed in fp32 (SPEC section 9: rel. error <= 1e-2)."""
    k = rand(2, 75, 4, 16, seed=6, dtype=torch.float32).bfloat16()
    got = nsa.nsa_compress(k, 32, 16)
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    assert rel_err(got, nsa.nsa_compress(k.double(), 32, 16)) <= 1e-2
    grad = rand(*got.shape, seed=7, dtype=torch.float32).bfloat16()
    dk = nsa.nsa_compress_backward(grad, k, 32, 16)
    assert dk.dtype == torch.bfloat16
    assert rel_err(dk, nsa.nsa_compress_backward(grad.double(), k.double(), 32, 16)) <= 2e-2


# ------------------------------------------------------------------------------------------------------
# Gated combination
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("S,H", [(3, 1), (5, 4)])
def test_gate_combine_matches_naive_and_its_backward_matches_autograd(S, H):
    o = [rand(2, S, H, 3, seed=S + j, requires_grad=True) for j in range(3)]
    gates = 2 * rand(2, S, H, 3, seed=S + 9).requires_grad_(True)
    got = nsa.nsa_gate_combine(*[x.detach() for x in o], gates.detach())
    want = naive_gate_combine(*o, gates)
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    grad = rand(2, S, H, 3, seed=S + 10)
    want_grads = torch.autograd.grad(want, (*o, gates), grad)
    got_grads = nsa.nsa_gate_combine_backward(grad, *[x.detach() for x in o], gates.detach())
    for name, a, b in zip(("o_cmp", "o_slc", "o_win", "gates"), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_gate_combine_bf16_with_fp32_gates():
    o = [rand(2, 9, 3, 16, seed=j, dtype=torch.float32).bfloat16() for j in range(3)]
    gates = rand(2, 9, 3, 3, seed=5, dtype=torch.float32)
    want = nsa.nsa_gate_combine(*[x.double() for x in o], gates.double())
    for g in (gates, gates.bfloat16()):
        got = nsa.nsa_gate_combine(*o, g)
        assert got.dtype == torch.bfloat16 and rel_err(got, want) <= 1e-2
    grads = nsa.nsa_gate_combine_backward(torch.ones_like(o[0]), *o, gates)
    assert [x.dtype for x in grads] == [torch.bfloat16] * 3 + [torch.float32]


# ------------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------------
def dyadic_probs(B, S, H, N, seed):
    """Multiples of 1/8: every sum is exact in any order (so ties are real ties), with many planted ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (B, S, H, N), generator=g).to(torch.float32) / 8


# (groups, heads per group, S, n, block, stride, select_block, local_blocks)
SELECT_CASES = [
    (1, 1, 29, 4, 4, 2, 5, 2),
    (2, 4, 31, 4, 4, 2, 5, 2),
    (3, 1, 27, 3, 4, 2, 8, 1),
    (1, 4, 21, 5, 8, 4, 4, 2),     # selection blocks smaller than compression blocks
    (2, 1, 23, 6, 2, 1, 3, 3),
    (1, 4, 211, 16, 32, 16, 64, 2),  # the SPEC defaults: 4 blocks < n = 16, so -1 padding
]


@pytest.mark.parametrize("case", SELECT_CASES, ids=[f"G{c[0]}x{c[1]}-S{c[2]}-n{c[3]}" for c in SELECT_CASES])
@pytest.mark.parametrize("data", ["dyadic-ties", "softmax"])
def test_select_matches_naive(case, data):
    groups, per_group, S, n, block, stride, select_block, local_blocks = case
    N = max(0, (S - block) // stride + 1)
    H = groups * per_group
    if data == "dyadic-ties":
        p = dyadic_probs(2, S, H, N, seed=S)
    else:  # continuous probabilities, in fp64 so the reference and the loops round alike
        p = torch.softmax(rand(2, S, H, N, seed=S), dim=-1)
    got = nsa.nsa_select(p, groups, n, block, stride, select_block, local_blocks)
    assert got.shape == (2, S, groups, n) and got.dtype == torch.int32
    want = naive_select(p, groups, n, block, stride, select_block, local_blocks)
    assert torch.equal(got, want)


def test_select_rules():
    """Causal, always-kept blocks, ascending ids, padding, visible entries only, ties to the smaller id."""
    groups, n, block, stride, select_block, local_blocks = 2, 4, 4, 2, 4, 2
    S, H = 41, 4
    N = (S - block) // stride + 1
    p = torch.softmax(rand(1, S, H, N, seed=1), dim=-1)
    got = nsa.nsa_select(p, groups, n, block, stride, select_block, local_blocks)
    t = torch.arange(S).view(1, S, 1, 1)
    valid = got >= 0
    assert torch.all(got[valid.logical_not()] == -1)
    assert torch.all((got <= t // select_block) | ~valid), "a block starting after the query was selected"
    n_valid = valid.sum(-1)
    assert torch.equal(n_valid, torch.clamp(t.view(1, S, 1) // select_block + 1, max=n).expand_as(n_valid))
    ids = torch.where(valid, got, 10**6 + torch.arange(n, dtype=torch.int32))  # padding: distinct, large
    assert torch.all(ids[..., 1:] > ids[..., :-1]), "ids ascending, distinct, padding last"
    for row_t in range(S):
        own = row_t // select_block
        for j in {0, own, max(own - 1, 0)}:
            assert (got[0, row_t] == j).any(dim=-1).all(), (row_t, j)
    # Probabilities of entries not yet complete at token t must not change anything
    noisy = p.clone()
    complete = (torch.arange(N) * stride + block - 1).view(1, 1, 1, N) <= torch.arange(S).view(1, S, 1, 1)
    noisy[~complete.expand_as(noisy)] = 100.0
    assert torch.equal(nsa.nsa_select(noisy, groups, n, block, stride, select_block, local_blocks), got)
    # All scores equal (a uniform p): the smallest free block ids win
    flat = nsa.nsa_select(torch.full_like(p, 0.25), 1, 3, 4, 4, 4, 1)  # entries align with blocks: equal scores
    want_last = torch.tensor([0, 1, 10], dtype=torch.int32)  # t = 40: block 10 is local, then 0 (kept), then 1
    assert torch.equal(flat[0, 40, 0], want_last)


def test_select_head_sum_per_group():
    """A group's score is the sum over its own heads only: a huge p in group 1 does not move group 0."""
    p = torch.softmax(rand(1, 33, 8, 15, seed=2), dim=-1)
    base = nsa.nsa_select(p, 2, 3, 4, 2, 4, 1)
    moved_p = p.clone()
    moved_p[:, :, 4:, 2] += 5.0  # heads 4..7 = group 1, entry 2 (tokens 4..7: block 1 only)
    moved = nsa.nsa_select(moved_p, 2, 3, 4, 2, 4, 1)
    assert torch.equal(moved[:, :, 0], base[:, :, 0])
    assert not torch.equal(moved[:, :, 1], base[:, :, 1])
    assert torch.all((moved[0, 12:, 1] == 1).any(-1)), "the boosted block 1 is chosen once it is not local"


def test_select_chunking_is_invisible(monkeypatch):
    p = dyadic_probs(2, 45, 4, 21, seed=3)
    whole = nsa.nsa_select(p, 2, 5, 4, 2, 6, 2)
    monkeypatch.setattr(nsa, "CHUNK_BUDGET_ELEMENTS", 1)  # one query row per chunk
    assert torch.equal(nsa.nsa_select(p, 2, 5, 4, 2, 6, 2), whole)


def test_selection_weights_split_each_entry_exactly_once():
    """Every entry's overlap shares sum to 1 when its tokens lie inside the covered blocks."""
    w = nsa.selection_weights(9, 5, 32, 16, 64, F64, "cpu")  # entries up to token 159 < 5 * 64
    torch.testing.assert_close(w.sum(1), torch.ones(9, dtype=F64))
    assert set(w.unique().tolist()) <= {0.0, 0.5, 1.0}
