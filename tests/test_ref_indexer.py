"""The indexer references (dsa_ops/reference/indexer.py) against naive per-element loops.

Everything runs on CPU with tiny shapes. The oracles below are deliberately dumb: Python loops
over (batch, query, key, head) on fp64 numbers, and a Python sort for top-k, so the tie rule
(value descending, then smaller column first) is spelled out where anyone can read it.
Integer-valued fp64 inputs make every score exact, so ties (ReLU-zero plateaus, duplicate keys)
are real ties and the reference must match the oracle bit for bit.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dsa_ops.reference import indexer as ref

INF = math.inf


# --------------------------------------------------------------------------------------
# input makers
# --------------------------------------------------------------------------------------

def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, g, dtype=torch.float64):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def randint_float(shape, low, high, g):
    """Integer-valued fp64 tensor (exact arithmetic: every score is exact, ties are real)."""
    return torch.randint(low, high, shape, generator=g).to(torch.float64)


def indexer_inputs(g, batch, n_queries, n_keys, heads, dim, dtype=torch.float64):
    q_idx = randn((batch, n_queries, heads, dim), g, dtype)
    k_idx = randn((batch, n_keys, dim), g, dtype)
    w = randn((batch, n_queries, heads), g, dtype)
    return q_idx, k_idx, w


def plateau_inputs(g, batch, n_queries, n_keys, heads, dim):
    """Integer inputs with planted exact ties.

    q >= 0 and w > 0; about half the keys are <= 0 in every dim, so all their dot products are
    <= 0 and their score is exactly 0.0 (the ReLU-zero plateau). Some keys are copies of
    others, so their scores repeat exactly.
    """
    q_idx = randint_float((batch, n_queries, heads, dim), 0, 3, g)
    w = randint_float((batch, n_queries, heads), 1, 4, g)
    k_idx = randint_float((batch, n_keys, dim), -2, 3, g)
    negative = torch.rand((batch, n_keys), generator=g) < 0.5
    k_idx = torch.where(negative.unsqueeze(-1), -k_idx.abs(), k_idx)
    # Duplicate keys: key j copies key j // 2 for every third j.
    for j in range(2, n_keys, 3):
        k_idx[:, j] = k_idx[:, j // 2]
    return q_idx, k_idx, w


# --------------------------------------------------------------------------------------
# naive oracles
# --------------------------------------------------------------------------------------

def naive_visible(pos, key, ratio):
    return key < (pos + 1) // ratio  # Python // is floor division, as the SPEC means


def naive_score(q_list, k_list, w_list, scale):
    """sum_h w[h] * relu(scale * q[h] . k) for one (query, key) pair, in Python floats."""
    total = 0.0
    for q_head, w_head in zip(q_list, w_list):
        dot = sum(a * b for a, b in zip(q_head, k_list))
        total += w_head * max(0.0, scale * dot)
    return total


def naive_starts(q_start, batch, n_queries, n_keys, ratio):
    if q_start is None:
        return [n_keys * ratio - n_queries] * batch
    return [int(v) for v in q_start.tolist()]


def naive_logits(q_idx, k_idx, w, scale, ratio, q_start):
    batch, n_queries, _, _ = q_idx.shape
    n_keys = k_idx.shape[1]
    Q, K, W = q_idx.double().tolist(), k_idx.double().tolist(), w.double().tolist()
    starts = naive_starts(q_start, batch, n_queries, n_keys, ratio)
    out = [[[-INF] * n_keys for _ in range(n_queries)] for _ in range(batch)]
    for b in range(batch):
        for i in range(n_queries):
            pos = starts[b] + i
            for j in range(n_keys):
                if naive_visible(pos, j, ratio):
                    out[b][i][j] = naive_score(Q[b][i], K[b][j], W[b][i], scale)
    return torch.tensor(out, dtype=torch.float64).reshape(batch, n_queries, n_keys)


def naive_topk_row(values, k, length=None):
    """Top-k of a list of floats by the SPEC rule: value descending, then smaller column."""
    n = len(values) if length is None else max(0, min(int(length), len(values)))
    candidates = [(v, j) for j, v in enumerate(values[:n]) if not math.isnan(v) and v != -INF]
    candidates.sort(key=lambda c: (-c[0], c[1]))
    picked = candidates[:k]
    ids = [j for _, j in picked] + [-1] * (k - len(picked))
    vals = [v for v, _ in picked] + [-INF] * (k - len(picked))
    return ids, vals


def naive_topk(scores, k, lengths=None):
    leading = scores.shape[:-1]
    rows = scores.double().reshape(-1, scores.shape[-1]).tolist()
    limits = lengths.reshape(-1).tolist() if lengths is not None else [None] * len(rows)
    ids, vals = [], []
    for row, limit in zip(rows, limits):
        i, v = naive_topk_row(row, k, limit)
        ids.append(i)
        vals.append(v)
    return (torch.tensor(ids, dtype=torch.int32).reshape(*leading, k),
            torch.tensor(vals, dtype=torch.float64).reshape(*leading, k))


def naive_gather(q_idx, k_idx, w, indices, scale, topk_length):
    batch, n_queries, _, _ = q_idx.shape
    n_keys = k_idx.shape[1]
    n_slots = indices.shape[-1]
    Q, K, W = q_idx.double().tolist(), k_idx.double().tolist(), w.double().tolist()
    out = torch.full((batch, n_queries, n_slots), -INF, dtype=torch.float64)
    for b in range(batch):
        for i in range(n_queries):
            for j in range(n_slots):
                key = int(indices[b, i, j])
                if key < 0 or key >= n_keys:
                    continue
                if topk_length is not None and j >= int(topk_length[b, i]):
                    continue
                out[b, i, j] = naive_score(Q[b][i], K[b][key], W[b][i], scale)
    return out


def naive_softmax_rows(logits):
    out = torch.zeros_like(logits, dtype=torch.float64)
    flat_in = logits.reshape(-1, logits.shape[-1]).tolist()
    flat_out = out.view(-1, logits.shape[-1])
    for r, row in enumerate(flat_in):
        valid = [v for v in row if v != -INF]
        if not valid:
            continue
        top = max(valid)
        denom = sum(math.exp(v - top) for v in valid)
        for j, v in enumerate(row):
            if v != -INF:
                flat_out[r, j] = math.exp(v - top) / denom
    return out


def naive_visible_mask(batch, n_queries, n_keys, ratio, q_start):
    starts = naive_starts(q_start, batch, n_queries, n_keys, ratio)
    mask = torch.zeros(batch, n_queries, n_keys, dtype=torch.bool)
    for b in range(batch):
        for i in range(n_queries):
            for j in range(n_keys):
                mask[b, i, j] = naive_visible(starts[b] + i, j, ratio)
    return mask


# Shapes: (batch, Sq, Sk, H_I, D_I, ratio, q_start or None). Sk is never a multiple of
# anything; H_I = 64 only with tiny S. q_start differs per batch where given, and includes
# negative starts (rows that see nothing) and starts past the end.
LOGIT_CASES = [
    (1, 5, 7, 1, 4, 1, None),
    (2, 6, 11, 3, 5, 1, [0, 4]),
    (2, 9, 5, 3, 3, 4, [-3, 13]),
    (2, 4, 6, 3, 2, 4, None),
    (1, 3, 5, 64, 3, 1, [2]),
    (1, 9, 5, 2, 3, 1, None),     # Sq > Sk: default q_start < 0, first rows fully masked
]


def _q_start(values):
    return None if values is None else torch.tensor(values, dtype=torch.int32)


# --------------------------------------------------------------------------------------
# indexer_logits
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", LOGIT_CASES)
def test_indexer_logits_matches_naive(case):
    batch, n_queries, n_keys, heads, dim, ratio, starts = case
    g = gen(100 + n_keys * heads)
    q_idx, k_idx, w = indexer_inputs(g, batch, n_queries, n_keys, heads, dim)
    q_start = _q_start(starts)
    scale = 0.37
    expected = naive_logits(q_idx, k_idx, w, scale, ratio, q_start)
    got = ref.indexer_logits(q_idx, k_idx, w, scale, ratio, q_start)
    assert got.dtype == torch.float64 and got.shape == (batch, n_queries, n_keys)
    # -inf exactly where the mask hides a key, the naive value elsewhere.
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    # Low-precision inputs are computed in fp32 and return fp32.
    for dtype in (torch.float32, torch.bfloat16):
        q_lp, k_lp, w_lp = q_idx.to(dtype), k_idx.to(dtype), w.to(dtype)
        got_lp = ref.indexer_logits(q_lp, k_lp, w_lp, scale, ratio, q_start)
        assert got_lp.dtype == torch.float32
        # Oracle on the same (rounded) inputs, so only fp32 accumulation error remains.
        expected_lp = naive_logits(q_lp, k_lp, w_lp, scale, ratio, q_start)
        torch.testing.assert_close(got_lp.double(), expected_lp, rtol=1e-5, atol=1e-5)


def test_indexer_logits_chunking_is_exact(monkeypatch):
    g = gen(1)
    q_idx, k_idx, w = indexer_inputs(g, 2, 13, 9, 3, 4)
    q_start = torch.tensor([1, 20], dtype=torch.int32)
    whole = ref.indexer_logits(q_idx, k_idx, w, 0.5, 4, q_start)
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 3 * 9 * 2)  # two query rows per chunk
    chunked = ref.indexer_logits(q_idx, k_idx, w, 0.5, 4, q_start)
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(chunked, naive_logits(q_idx, k_idx, w, 0.5, 4, q_start),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# indexer_logits_backward
# --------------------------------------------------------------------------------------

def naive_autograd_grads(grad_scores, q_idx, k_idx, w, scale, ratio, q_start):
    """torch.autograd.grad of the naive fp64 formula, summed only over visible keys."""
    batch, n_queries, _, _ = q_idx.shape
    n_keys = k_idx.shape[1]
    q = q_idx.detach().double().requires_grad_()
    k = k_idx.detach().double().requires_grad_()
    ww = w.detach().double().requires_grad_()
    # pre[b, i, j, h] = scale * q[b, i, h] . k[b, j], by broadcasting (no matmul tricks).
    pre = scale * (q[:, :, None, :, :] * k[:, None, :, None, :]).sum(-1)
    scores = (ww[:, :, None, :] * torch.relu(pre)).sum(-1)
    visible = naive_visible_mask(batch, n_queries, n_keys, ratio, q_start)
    grad = torch.where(visible, grad_scores.double(), 0.0)
    loss = (torch.where(visible, scores, 0.0) * grad).sum()
    return torch.autograd.grad(loss, (q, k, ww))


@pytest.mark.parametrize("case", LOGIT_CASES)
def test_indexer_logits_backward_matches_autograd(case):
    batch, n_queries, n_keys, heads, dim, ratio, starts = case
    g = gen(200 + n_queries * heads)
    q_idx, k_idx, w = indexer_inputs(g, batch, n_queries, n_keys, heads, dim)
    q_start = _q_start(starts)
    grad_scores = randn((batch, n_queries, n_keys), g)
    # Masked positions carry garbage the backward must ignore.
    hidden = ~naive_visible_mask(batch, n_queries, n_keys, ratio, q_start)
    garbage = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=torch.float64)
    grad_scores[hidden] = garbage.repeat(int(hidden.sum()) // 3 + 1)[: int(hidden.sum())]
    scale = 0.61
    expected = naive_autograd_grads(grad_scores, q_idx, k_idx, w, scale, ratio, q_start)
    got = ref.indexer_logits_backward(grad_scores, q_idx, k_idx, w, scale, ratio, q_start)
    for name, a, b in zip(("dq_idx", "dk_idx", "dw"), got, expected):
        assert a.dtype == torch.float64, name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_indexer_logits_backward_relu_zero_and_dtypes(monkeypatch):
    """Exact ReLU-zero pre-activations get no gradient; chunking is exact; dtypes follow inputs."""
    g = gen(3)
    q_idx, k_idx, w = plateau_inputs(g, 2, 7, 10, 3, 3)
    grad_scores = randn((2, 7, 10), g)
    q_start = torch.tensor([3, 9], dtype=torch.int32)
    expected = naive_autograd_grads(grad_scores, q_idx, k_idx, w, 1.0, 1, q_start)
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 3 * 10 * 3)  # three query rows per chunk
    got = ref.indexer_logits_backward(grad_scores, q_idx, k_idx, w, 1.0, 1, q_start)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    # bf16 activations with fp32 w: gradients come back in the input dtypes.
    dq, dk, dw = ref.indexer_logits_backward(grad_scores.float(), q_idx.bfloat16(),
                                             k_idx.bfloat16(), w.float(), 1.0, 1, q_start)
    assert (dq.dtype, dk.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------
# topk
# --------------------------------------------------------------------------------------

def planted_scores(g, shape):
    """fp32 scores full of exact ties: few distinct values, -0.0/+0.0, -inf, +inf and NaN."""
    palette = torch.tensor([3.5, 1.0, 1.0, 0.0, -0.0, 0.0, -2.25, float("-inf"), float("nan")])
    picks = torch.randint(0, len(palette), shape, generator=g)
    scores = palette[picks]
    noise = torch.randn(shape, generator=g)
    use_noise = torch.rand(shape, generator=g) < 0.3
    scores = torch.where(use_noise, noise, scores)
    scores.view(-1, shape[-1])[0, 0] = float("inf")
    return scores


def check_topk(scores, k, lengths=None):
    ids, vals = ref.topk(scores, k, lengths, True)
    exp_ids, exp_vals = naive_topk(scores, k, lengths)
    assert ids.dtype == torch.int32 and ids.shape == exp_ids.shape
    assert vals.dtype == (torch.float64 if scores.dtype == torch.float64 else torch.float32)
    assert torch.equal(ids, exp_ids)
    assert torch.equal(vals.double(), exp_vals)
    return ids, vals


@pytest.mark.parametrize("n_cols,k", [(1, 1), (7, 3), (37, 5), (37, 37), (29, 40), (200, 17)])
def test_topk_planted_ties_matches_naive(n_cols, k):
    g = gen(300 + n_cols + k)
    scores = planted_scores(g, (11, n_cols))
    scores[3] = float("-inf")            # an empty row
    scores[4, :] = float("nan")          # NaN only: also empty
    scores[5, 1:] = float("-inf")        # one candidate
    scores[6] = 0.0                      # a whole-row plateau: ids 0..k-1 win
    check_topk(scores, k)
    ids, _ = ref.topk(scores, k, None, True)
    assert ids[3].eq(-1).all() and ids[4].eq(-1).all()
    assert ids[6, : min(k, n_cols)].tolist() == list(range(min(k, n_cols)))


def test_topk_lengths_and_random_data():
    g = gen(4)
    scores = torch.randn(9, 50, generator=g)
    lengths = torch.tensor([0, 1, 3, 7, 49, 50, 20, 2, 10], dtype=torch.int32)
    check_topk(scores, 8, lengths)
    ids, _ = ref.topk(scores, 8, lengths, False)
    assert ids[0].eq(-1).all()
    assert (ids < lengths.unsqueeze(-1)).all()
    # fp64 scores too (values stay fp64).
    check_topk(scores.double() * 1e-3, 6, lengths)
    check_topk(planted_scores(g, (9, 50)), 12, lengths)


def test_topk_more_dims_and_chunking(monkeypatch):
    g = gen(5)
    scores = planted_scores(g, (2, 3, 4, 23))
    lengths = torch.randint(0, 26, (2, 3, 4), generator=g, dtype=torch.int32)
    ids, vals = check_topk(scores, 6, lengths)
    assert ids.shape == (2, 3, 4, 6)
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 23 * 5)  # five rows per chunk
    ids_chunked, vals_chunked = ref.topk(scores, 6, lengths, True)
    assert torch.equal(ids_chunked, ids) and torch.equal(vals_chunked, vals)
    # 1-D input and k = 0.
    check_topk(scores[0, 0, 0], 4)
    ids0, vals0 = ref.topk(scores, 0, None, False)
    assert ids0.shape == (2, 3, 4, 0) and vals0.shape == (2, 3, 4, 0)


def test_topk_is_deterministic_and_unsorted_has_same_set():
    g = gen(6)
    scores = planted_scores(g, (16, 300))
    a = ref.topk(scores, 33, None, False)
    b = ref.topk(scores.clone(), 33, None, False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    sorted_ids, _ = ref.topk(scores, 33, None, True)
    assert torch.equal(a[0].sort(-1).values, sorted_ids.sort(-1).values)


# --------------------------------------------------------------------------------------
# indexer_topk (batch and packed)
# --------------------------------------------------------------------------------------

TOPK_CASES = [
    # (batch, Sq, Sk, H, D, ratio, q_start, topk)
    (2, 8, 13, 3, 4, 1, [0, 6], 5),
    (2, 7, 9, 1, 3, 4, [-2, 20], 4),
    (1, 6, 11, 3, 5, 1, None, 12),     # topk > Sk: always padded
    (2, 5, 7, 2, 3, 4, None, 3),
    (1, 3, 5, 64, 2, 1, None, 2),
]


@pytest.mark.parametrize("case", TOPK_CASES)
def test_indexer_topk_matches_naive_on_plateaus(case):
    batch, n_queries, n_keys, heads, dim, ratio, starts, k = case
    g = gen(400 + n_keys + k)
    q_idx, k_idx, w = plateau_inputs(g, batch, n_queries, n_keys, heads, dim)
    q_start = _q_start(starts)
    ids, vals = ref.indexer_topk(q_idx, k_idx, w, k, 1.0, ratio, q_start, None, None)
    exp_ids, exp_vals = naive_topk(naive_logits(q_idx, k_idx, w, 1.0, ratio, q_start), k)
    assert ids.dtype == torch.int32 and ids.shape == (batch, n_queries, k)
    assert torch.equal(ids, exp_ids)
    assert torch.equal(vals, exp_vals)


@pytest.mark.parametrize("case", TOPK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_topk_equals_topk_of_logits(case, dtype):
    batch, n_queries, n_keys, heads, dim, ratio, starts, k = case
    g = gen(500 + n_queries + heads)
    q_idx, k_idx, w = indexer_inputs(g, batch, n_queries, n_keys, heads, dim, dtype)
    w = w.float()
    q_start = _q_start(starts)
    ids, vals = ref.indexer_topk(q_idx, k_idx, w, k, 0.3, ratio, q_start, None, None)
    scores = ref.indexer_logits(q_idx, k_idx, w, 0.3, ratio, q_start)
    exp_ids, exp_vals = ref.topk(scores, k, None, True)
    assert vals.dtype == torch.float32
    assert torch.equal(ids, exp_ids) and torch.equal(vals, exp_vals)


@pytest.mark.parametrize("ratio,given_start", [(1, False), (4, True), (4, False)])
def test_indexer_topk_packed_equals_per_sequence(ratio, given_start):
    g = gen(600 + ratio)
    heads, dim, k = 3, 4, 5
    query_lens = [5, 0, 8, 3]
    key_lens = [6, 4, 11, 2]
    starts = [2, 0, -1, 7] if given_start else None
    cu_q = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(key_lens).cumsum(0)), dtype=torch.int32)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q_idx, k_idx, w = indexer_inputs(g, 1, total_q, total_k, heads, dim, torch.float32)
    q_start = _q_start(starts)
    ids, vals = ref.indexer_topk(q_idx, k_idx, w, k, 0.7, ratio, q_start, cu_q, cu_k)
    assert ids.shape == (1, total_q, k)
    for s in range(len(query_lens)):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        one_start = None if starts is None else torch.tensor([starts[s]], dtype=torch.int32)
        exp_ids, exp_vals = ref.indexer_topk(q_idx[:, q0:q1], k_idx[:, k0:k1], w[:, q0:q1], k,
                                             0.7, ratio, one_start, None, None)
        exp_ids = torch.where(exp_ids >= 0, exp_ids + k0, exp_ids)   # local -> global rows
        assert torch.equal(ids[:, q0:q1], exp_ids)
        assert torch.equal(vals[:, q0:q1], exp_vals)
        picked = ids[0, q0:q1]
        assert ((picked == -1) | ((picked >= k0) & (picked < k1))).all()
    # Padding exists (short sequences), so the -1 path is exercised.
    assert (ids == -1).any()


# --------------------------------------------------------------------------------------
# indexer_topk_paged
# --------------------------------------------------------------------------------------

def make_paged(g, k_tokens, seq_lens, page_size, n_pages, max_pages):
    """Scatter each sequence's tokens into randomly chosen pages; junk in unused table slots."""
    batch = len(seq_lens)
    dim = k_tokens.shape[-1]
    k_cache = randn((n_pages, page_size, dim), g, k_tokens.dtype)    # junk everywhere first
    free_pages = torch.randperm(n_pages, generator=g).tolist()
    junk = [999 if p % 2 else -7 for p in range(max_pages)]     # out-of-range table entries
    block_table = torch.tensor([junk] * batch, dtype=torch.int32)
    for b, length in enumerate(seq_lens):
        for p in range(math.ceil(length / page_size)):
            page = free_pages.pop()
            block_table[b, p] = page
            for t in range(p * page_size, min(length, (p + 1) * page_size)):
                k_cache[page, t % page_size] = k_tokens[b, t]
    return k_cache, block_table


@pytest.mark.parametrize("n_queries", [1, 3])
@pytest.mark.parametrize("integer_inputs", [True, False])
def test_indexer_topk_paged_equals_dense(n_queries, integer_inputs):
    g = gen(700 + n_queries + integer_inputs)
    seq_lens = [1, 9, 13]
    heads, dim, k, page_size, max_pages = 3, 4, 6, 4, 5
    batch, longest = len(seq_lens), max(seq_lens)
    if integer_inputs:
        q_idx, k_tokens, w = plateau_inputs(g, batch, n_queries, longest, heads, dim)
    else:
        q_idx, k_tokens, w = indexer_inputs(g, batch, n_queries, longest, heads, dim)
    k_cache, block_table = make_paged(g, k_tokens, seq_lens, page_size, 16, max_pages)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    ids, vals = ref.indexer_topk_paged(q_idx, k_cache, block_table, seq_lens_t, w, k, 0.9)
    assert ids.dtype == torch.int32 and ids.shape == (batch, n_queries, k)
    for b, length in enumerate(seq_lens):
        # Dense form on the same keys: query j sits at length - Sq + j = the default q_start.
        exp_ids, exp_vals = ref.indexer_topk(q_idx[b:b + 1], k_tokens[b:b + 1, :length],
                                             w[b:b + 1], k, 0.9, 1, None, None, None)
        assert torch.equal(ids[b:b + 1], exp_ids)
        if integer_inputs:   # exact arithmetic: values agree bit for bit
            assert torch.equal(vals[b:b + 1], exp_vals)
        else:                # different matmul shapes may round differently
            torch.testing.assert_close(vals[b:b + 1], exp_vals, rtol=1e-12, atol=1e-12)
        naive_ids, _ = naive_topk(naive_logits(q_idx[b:b + 1], k_tokens[b:b + 1, :length],
                                               w[b:b + 1], 0.9, 1, None), k)
        assert torch.equal(ids[b:b + 1], naive_ids)


# --------------------------------------------------------------------------------------
# gather_indexer_logits and sparse_indexer_score
# --------------------------------------------------------------------------------------

def gather_case(g, batch=2, n_queries=5, n_keys=9, heads=3, dim=4, n_slots=7):
    q_idx, k_idx, w = indexer_inputs(g, batch, n_queries, n_keys, heads, dim)
    # ids from -3 to Sk + 3: -1s, other negatives, out-of-range ids and duplicates.
    indices = torch.randint(-3, n_keys + 4, (batch, n_queries, n_slots), generator=g)
    indices[0, 0, :3] = torch.tensor([2, 2, 2])           # duplicates
    indices[0, 1] = -1                                    # an all -1 row
    indices[1, 2, 0] = n_keys                             # just out of range
    indices = indices.to(torch.int32)
    topk_length = torch.randint(0, n_slots + 1, (batch, n_queries), generator=g)
    topk_length[0, 0] = n_slots
    topk_length[1, 3] = 0                                 # an empty row
    return q_idx, k_idx, w, indices, topk_length.to(torch.int32)


@pytest.mark.parametrize("heads", [1, 3, 64])
def test_gather_indexer_logits_matches_naive(heads, monkeypatch):
    g = gen(800 + heads)
    q_idx, k_idx, w, indices, topk_length = gather_case(g, heads=heads)
    for lengths in (topk_length, None):
        expected = naive_gather(q_idx, k_idx, w, indices, 0.45, lengths)
        got = ref.gather_indexer_logits(q_idx, k_idx, w, indices, 0.45, lengths)
        assert got.dtype == torch.float64
        assert torch.equal(torch.isneginf(got), torch.isneginf(expected))
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert got[0, 0, 0] == got[0, 0, 1] == got[0, 0, 2]     # duplicates: same logit per slot
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 7 * max(heads, 4) * 2)   # 2 rows per chunk
    chunked = ref.gather_indexer_logits(q_idx, k_idx, w, indices, 0.45, topk_length)
    torch.testing.assert_close(chunked, naive_gather(q_idx, k_idx, w, indices, 0.45,
                                                     topk_length), rtol=1e-12, atol=1e-12)
    low = ref.gather_indexer_logits(q_idx.bfloat16(), k_idx.bfloat16(), w.float(), indices,
                                    0.45, topk_length)
    assert low.dtype == torch.float32


def test_gather_indexer_logits_gradient():
    g = gen(9)
    q_idx, k_idx, w, indices, topk_length = gather_case(g, n_queries=4, n_keys=6, n_slots=5)
    inputs = tuple(t.clone().requires_grad_() for t in (q_idx, k_idx, w))
    weights = randn(indices.shape, g)

    def loss_of(q, k, ww):
        logits = ref.gather_indexer_logits(q, k, ww, indices, 0.8, topk_length)
        return torch.where(torch.isneginf(logits), 0.0, logits * weights).sum()

    got = torch.autograd.grad(loss_of(*inputs), inputs)

    # Naive: the same loss written as a loop over valid slots of the dense naive formula.
    q, k, ww = (t.detach().clone().requires_grad_() for t in (q_idx, k_idx, w))
    total = torch.zeros((), dtype=torch.float64)
    for b in range(indices.shape[0]):
        for i in range(indices.shape[1]):
            for j in range(int(topk_length[b, i])):
                key = int(indices[b, i, j])
                if 0 <= key < k.shape[1]:
                    score = (ww[b, i] * torch.relu(0.8 * (q[b, i] * k[b, key]).sum(-1))).sum()
                    total = total + weights[b, i, j] * score
    expected = torch.autograd.grad(total, (q, k, ww))
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *t: torch.nan_to_num(ref.gather_indexer_logits(*t, indices, 0.8, topk_length),
                                    neginf=0.0),
        inputs)


@pytest.mark.parametrize("heads", [1, 3, 64])
def test_sparse_indexer_score_matches_naive(heads):
    g = gen(1000 + heads)
    q_idx, k_idx, w, indices, topk_length = gather_case(g, heads=heads)
    for lengths in (topk_length, None):
        expected = naive_softmax_rows(naive_gather(q_idx, k_idx, w, indices, 1.3, lengths))
        got = ref.sparse_indexer_score(q_idx, k_idx, w, indices, 1.3, lengths)
        assert got.dtype == torch.float64 and torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got = ref.sparse_indexer_score(q_idx, k_idx, w, indices, 1.3, topk_length)
    assert got[0, 1].eq(0).all() and got[1, 3].eq(0).all()     # rows with no valid slot
    has_valid_slot = ~torch.isneginf(naive_gather(q_idx, k_idx, w, indices, 1.3,
                                                  topk_length)).all(-1)
    assert has_valid_slot.any() and not has_valid_slot.all()
    row_sums = got.sum(-1)
    torch.testing.assert_close(row_sums[has_valid_slot],
                               torch.ones_like(row_sums[has_valid_slot]))
    assert row_sums[~has_valid_slot].eq(0).all()
    low = ref.sparse_indexer_score(q_idx.bfloat16(), k_idx.bfloat16(), w.float(), indices, 1.3,
                                   topk_length)
    assert low.dtype == torch.float32


# --------------------------------------------------------------------------------------
# memory: indexer_topk never makes an [Sq, Sk] tensor
# --------------------------------------------------------------------------------------

class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


def test_indexer_topk_memory_is_bounded(monkeypatch):
    g = gen(11)
    batch, n_queries, n_keys, heads, dim, k = 2, 96, 80, 2, 4, 5
    q_idx, k_idx, w = plateau_inputs(g, batch, n_queries, n_keys, heads, dim)
    q_start = torch.tensor([-10, 250], dtype=torch.int32)
    expected = naive_topk(naive_logits(q_idx, k_idx, w, 1.0, 4, q_start), k)

    budget = heads * n_keys * 4                         # four query rows per chunk
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", budget)
    # Anything bigger than the budget, the inputs and the outputs would be a score matrix.
    bound = max(budget, q_idx.numel(), k_idx.numel(), batch * n_queries * k)
    assert bound * 2 < n_queries * n_keys

    with LargestTensor() as tracker:
        ids, vals = ref.indexer_topk(q_idx, k_idx, w, k, 1.0, 4, q_start, None, None)
    assert tracker.largest <= bound, (tracker.largest, bound)
    assert torch.equal(ids, expected[0]) and torch.equal(vals, expected[1])

    # Packed form of the same two sequences.
    cu_q = torch.tensor([0, n_queries, 2 * n_queries], dtype=torch.int32)
    cu_k = torch.tensor([0, n_keys, 2 * n_keys], dtype=torch.int32)
    with LargestTensor() as tracker:
        ids_p, vals_p = ref.indexer_topk(q_idx.reshape(1, -1, heads, dim),
                                         k_idx.reshape(1, -1, dim), w.reshape(1, -1, heads),
                                         k, 1.0, 4, q_start, cu_q, cu_k)
    assert tracker.largest <= bound, (tracker.largest, bound)
    global_ids = torch.where(expected[0] >= 0, expected[0] + cu_k[:-1].view(2, 1, 1), -1)
    assert torch.equal(ids_p, global_ids.reshape(1, -1, k))

    # Paged decode form: one gathered sequence of keys at a time, rows in chunks.
    page_size, max_pages = 8, 10
    seq_lens = [n_keys, n_keys - 7]
    k_cache, block_table = make_paged(g, k_idx, seq_lens, page_size, 24, max_pages)
    with LargestTensor() as tracker:
        ref.indexer_topk_paged(q_idx, k_cache, block_table,
                               torch.tensor(seq_lens, dtype=torch.int32), w, k, 1.0)
    assert tracker.largest <= max(bound, k_cache.numel()), tracker.largest
