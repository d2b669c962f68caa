"""Tests of the indexer KL-loss references (dsa_ops/reference/loss.py, SPEC section 6).

Oracles: a naive per-row Python loop in fp64 for the loss, torch.autograd.grad of that
same (clipped, differentiable) loop for the gradients, and a hand loop of the exact SPEC
logit-gradient formula for the corner cases (zero targets, predict below e^-100).
"""

import math

import pytest
import torch

from dsa_ops.reference import loss as ref_loss
from dsa_ops.reference.loss import (dense_indexer_loss, dense_indexer_loss_backward,
                                    indexer_loss, indexer_loss_backward)

F64 = torch.float64


# --------------------------------------------------------------------------------------
# input builders
# --------------------------------------------------------------------------------------

def _randn(gen, *shape, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def _sparse_valid(indices, n_keys, topk_length):
    """Python-side validity: id in [0, Sk) and slot j < topk_length (SPEC section 0)."""
    batch, n_queries, n_slots = indices.shape
    valid = torch.zeros(batch, n_queries, n_slots, dtype=torch.bool)
    for b in range(batch):
        for t in range(n_queries):
            for j in range(n_slots):
                key = int(indices[b, t, j])
                in_length = topk_length is None or j < int(topk_length[b, t])
                valid[b, t, j] = 0 <= key < n_keys and in_length
    return valid


def _sparse_inputs(seed, batch, n_queries, n_keys, heads, dim, n_slots, dtype=F64,
                   use_length=True, empty_rows=()):
    """Random sparse-loss inputs with -1, out-of-range and duplicate ids and topk_length.

    empty_rows: (b, t) rows whose every slot is made invalid. Targets are normalised over
    the valid slots and NaN on invalid ones (the op must ignore them).
    """
    gen = torch.Generator().manual_seed(seed)
    q_idx = _randn(gen, batch, n_queries, heads, dim, dtype=dtype)
    k_idx = _randn(gen, batch, n_keys, dim, dtype=dtype)
    w = _randn(gen, batch, n_queries, heads, dtype=dtype)
    # Ids drawn with replacement from [-2, Sk + 2): -1/-2, ids >= Sk, and duplicates all occur.
    indices = torch.randint(-2, n_keys + 2, (batch, n_queries, n_slots), generator=gen,
                            dtype=torch.int32)
    topk_length = None
    if use_length:
        topk_length = torch.randint(1, n_slots + 1, (batch, n_queries), generator=gen,
                                    dtype=torch.int32)
    for b, t in empty_rows:
        indices[b, t] = -1
    valid = _sparse_valid(indices, n_keys, topk_length)
    raw = torch.rand(batch, n_queries, n_slots, generator=gen, dtype=F64) + 0.05
    raw = torch.where(valid, raw, 0.0)
    target = raw / raw.sum(-1, keepdim=True).clamp(min=1e-30)
    target = torch.where(valid, target, float("nan")).to(dtype if dtype == F64 else torch.float32)
    return q_idx, k_idx, w, indices, target, topk_length, valid


def _n_visible(position, n_keys, ratio):
    """Keys visible to a query at absolute position `position` (Python floor division)."""
    return min(max((position + 1) // ratio, 0), n_keys)


def _dense_inputs(seed, batch, n_queries, n_keys, heads, dim, ratio, q_start, dtype=F64):
    """Random dense-loss inputs; attention scores are NaN on hidden keys (must be ignored)."""
    gen = torch.Generator().manual_seed(seed)
    q_idx = _randn(gen, batch, n_queries, heads, dim, dtype=dtype)
    k_idx = _randn(gen, batch, n_keys, dim, dtype=dtype)
    w = _randn(gen, batch, n_queries, heads, dtype=dtype)
    starts = _starts(q_start, batch, n_queries, n_keys, ratio)
    scores = torch.rand(batch, n_queries, n_keys, generator=gen, dtype=F64) + 0.05
    l1 = torch.zeros(batch, n_queries, dtype=F64)
    for b in range(batch):
        for t in range(n_queries):
            n = _n_visible(starts[b] + t, n_keys, ratio)
            scores[b, t, n:] = float("nan")
            l1[b, t] = scores[b, t, :n].sum()
    score_dtype = dtype if dtype == F64 else torch.float32
    return q_idx, k_idx, w, scores.to(score_dtype), l1.to(score_dtype)


def _starts(q_start, batch, n_queries, n_keys, ratio):
    if q_start is None:
        return [n_keys * ratio - n_queries] * batch
    return [int(v) for v in q_start]


# --------------------------------------------------------------------------------------
# naive fp64 oracles (per-row loops, differentiable)
# --------------------------------------------------------------------------------------

def _row_logits(q_row, keys, w_row, scale):
    """Indexer logits of one query row at the given keys: sum_h w_h relu(scale q_h . k)."""
    return (w_row[:, None] * torch.relu(scale * (q_row @ keys.T))).sum(0)


def _row_kl(target, logits):
    """sum_j t_j (clip(log t_j) - clip(log p_j)) with zero targets contributing exactly 0."""
    log_p = torch.log_softmax(logits, dim=0).clamp(-100.0, 0.0)
    log_t = torch.log(target.clamp(min=1e-300)).clamp(-100.0, 0.0)
    return torch.where(target > 0, target * (log_t - log_p), 0.0).sum()


def naive_sparse_loss(q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length):
    batch, n_queries, _, _ = q_idx.shape
    n_keys = k_idx.shape[1]
    valid = _sparse_valid(indices, n_keys, topk_length)
    total = torch.zeros((), dtype=F64)
    n_rows = 0
    for b in range(batch):
        for t in range(n_queries):
            slots = valid[b, t].nonzero().flatten()
            if len(slots) == 0:
                continue
            n_rows += 1
            keys = k_idx[b, indices[b, t, slots].long()]
            logits = _row_logits(q_idx[b, t], keys, w[b, t], scale)
            total = total + _row_kl(target[b, t, slots].to(F64), logits)
    return total * (loss_coeff / n_rows) if n_rows else total


def naive_dense_loss(q_idx, k_idx, w, scores, l1, scale, ratio, loss_coeff, q_start):
    batch, n_queries, _, _ = q_idx.shape
    n_keys = k_idx.shape[1]
    starts = _starts(q_start, batch, n_queries, n_keys, ratio)
    total = torch.zeros((), dtype=F64)
    n_rows = 0
    for b in range(batch):
        for t in range(n_queries):
            n = _n_visible(starts[b] + t, n_keys, ratio)
            if n == 0:
                continue
            n_rows += 1
            logits = _row_logits(q_idx[b, t], k_idx[b, :n], w[b, t], scale)
            target = scores[b, t, :n].to(F64) / max(float(l1[b, t]), 1e-12)
            total = total + _row_kl(target, logits)
    return total * (loss_coeff / n_rows) if n_rows else total


def _autograd(fn, q_idx, k_idx, w, grad_out):
    """(loss, dq, dk, dw) of an fp64 naive loss by autograd."""
    leaves = [x.detach().to(F64).requires_grad_(True) for x in (q_idx, k_idx, w)]
    value = fn(*leaves)
    grads = torch.autograd.grad(value * grad_out, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return value.detach(), *grads


# --------------------------------------------------------------------------------------
# comparison helpers
# --------------------------------------------------------------------------------------

def _rel_err(actual, expected):
    actual, expected = actual.to(F64), expected.to(F64)
    assert torch.isfinite(actual).all(), "NaN/inf in result"
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-300))


def _assert_grads_close(actual, expected, tol, cosine=None):
    for name, a, e in zip(("dq_idx", "dk_idx", "dw"), actual, expected):
        assert a.shape == e.shape, name
        assert e.norm() > 0, f"{name}: oracle gradient is zero, test would be vacuous"
        err = _rel_err(a, e)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol}"
        if cosine is not None:
            cos = float(torch.nn.functional.cosine_similarity(
                a.to(F64).flatten(), e.flatten(), dim=0))
            assert cos >= cosine, f"{name}: cosine {cos}"


# --------------------------------------------------------------------------------------
# sparse loss
# --------------------------------------------------------------------------------------

SPARSE_CASES = [
    # batch, Sq, Sk, H, D, K, use topk_length
    (2, 5, 13, 1, 8, 37, True),
    (2, 4, 20, 3, 16, 70, True),
    (1, 6, 9, 3, 8, 11, False),
    (1, 3, 6, 64, 128, 7, True),    # V3.2 head count, tiny sequence
]


@pytest.mark.parametrize("batch,n_queries,n_keys,heads,dim,n_slots,use_length", SPARSE_CASES)
def test_sparse_loss_forward_and_backward_match_naive(batch, n_queries, n_keys, heads, dim,
                                                      n_slots, use_length):
    q_idx, k_idx, w, indices, target, topk_length, _ = _sparse_inputs(
        1000 + heads, batch, n_queries, n_keys, heads, dim, n_slots, use_length=use_length,
        empty_rows=[(0, 1)])
    scale, loss_coeff, grad_out = 0.35, 0.7, 1.3
    assert (indices == -1).any() and (indices >= n_keys).any()

    got = indexer_loss(q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length)
    assert got.shape == () and got.dtype == F64
    expected, *grads = _autograd(
        lambda q, k, ww: naive_sparse_loss(q, k, ww, indices, target, scale, loss_coeff,
                                           topk_length), q_idx, k_idx, w, grad_out)
    assert abs(float(got) - float(expected)) <= 1e-10 * abs(float(expected))

    got_grads = indexer_loss_backward(torch.tensor(grad_out, dtype=F64), q_idx, k_idx, w,
                                      indices, target, scale, loss_coeff, topk_length)
    _assert_grads_close(got_grads, grads, 1e-9)


def test_sparse_duplicate_ids_count_once_per_slot():
    """A row selecting the same key in several slots: each slot has its own probability
    and adds its own gradient to that key."""
    q_idx, k_idx, w, _, _, _, _ = _sparse_inputs(7, 1, 3, 5, 3, 8, 6, use_length=False)
    indices = torch.tensor([[[2, 2, 2, 0, -1, 4], [1, 3, 1, 1, 5, 3], [0, 0, 0, 0, 0, 0]]],
                           dtype=torch.int32)
    target = torch.tensor([[[0.1, 0.2, 0.3, 0.15, 0.0, 0.25],
                            [0.3, 0.2, 0.1, 0.05, 0.0, 0.35],
                            [0.4, 0.1, 0.1, 0.1, 0.1, 0.2]]], dtype=F64)
    got = indexer_loss(q_idx, k_idx, w, indices, target, 1.0, 1.0, None)
    expected, *grads = _autograd(
        lambda q, k, ww: naive_sparse_loss(q, k, ww, indices, target, 1.0, 1.0, None),
        q_idx, k_idx, w, 1.0)
    assert abs(float(got) - float(expected)) <= 1e-10 * abs(float(expected))
    got_grads = indexer_loss_backward(torch.tensor(1.0, dtype=F64), q_idx, k_idx, w, indices,
                                      target, 1.0, 1.0, None)
    _assert_grads_close(got_grads, grads, 1e-9)


def test_sparse_empty_rows_excluded_from_R():
    """Appending rows with no valid slot (all -1, or topk_length 0) changes nothing, and
    those rows get zero gradient."""
    q_idx, k_idx, w, indices, target, topk_length, _ = _sparse_inputs(
        11, 2, 4, 10, 3, 8, 13)
    base = indexer_loss(q_idx, k_idx, w, indices, target, 0.5, 2.0, topk_length)
    base_grads = indexer_loss_backward(torch.tensor(1.0, dtype=F64), q_idx, k_idx, w, indices,
                                       target, 0.5, 2.0, topk_length)

    gen = torch.Generator().manual_seed(12)
    extra = 3
    q_more = torch.cat([q_idx, _randn(gen, 2, extra, 3, 8)], dim=1)
    w_more = torch.cat([w, _randn(gen, 2, extra, 3)], dim=1)
    # Extra rows: two with valid-looking ids cut off by topk_length 0, one all -1.
    extra_ids = torch.randint(0, 10, (2, extra, 13), generator=gen, dtype=torch.int32)
    extra_ids[:, 2] = -1
    ids_more = torch.cat([indices, extra_ids], dim=1)
    target_more = torch.cat([target, torch.full((2, extra, 13), 0.3, dtype=F64)], dim=1)
    length_more = torch.cat([topk_length, torch.tensor([[0, 0, 13]] * 2, dtype=torch.int32)],
                            dim=1)
    more = indexer_loss(q_more, k_idx, w_more, ids_more, target_more, 0.5, 2.0, length_more)
    assert torch.allclose(more, base, rtol=1e-12, atol=0)
    dq, dk, dw = indexer_loss_backward(torch.tensor(1.0, dtype=F64), q_more, k_idx, w_more,
                                       ids_more, target_more, 0.5, 2.0, length_more)
    assert torch.count_nonzero(dq[:, 4:]) == 0 and torch.count_nonzero(dw[:, 4:]) == 0
    torch.testing.assert_close(dq[:, :4], base_grads[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dk, base_grads[1], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dw[:, :4], base_grads[2], rtol=1e-12, atol=1e-15)


def test_sparse_no_valid_row_gives_zero_loss_and_grads():
    q_idx, k_idx, w, indices, target, _, _ = _sparse_inputs(13, 2, 3, 6, 3, 8, 5,
                                                            use_length=False)
    indices = torch.where(indices >= 0, indices + 6, indices)  # every id out of range or < 0
    got = indexer_loss(q_idx, k_idx, w, indices, target, 1.0, 1.0, None)
    assert got.shape == () and float(got) == 0.0
    grads = indexer_loss_backward(torch.tensor(1.0, dtype=F64), q_idx, k_idx, w, indices,
                                  target, 1.0, 1.0, None)
    for grad, like in zip(grads, (q_idx, k_idx, w)):
        assert grad.shape == like.shape and torch.count_nonzero(grad) == 0


def _spec_dlogit_hand_loop(q_idx, k_idx, w, indices, target, scale, loss_coeff, grad_out,
                           valid):
    """dlogit [B, Sq, K] by the literal SPEC formulas, one scalar at a time (fp64)."""
    batch, n_queries, n_slots = indices.shape
    n_rows = int(valid.any(-1).sum())
    floor = math.exp(-100.0)
    dlogit = torch.zeros(batch, n_queries, n_slots, dtype=F64)
    n_underflow = 0
    for b in range(batch):
        for t in range(n_queries):
            slots = [j for j in range(n_slots) if valid[b, t, j]]
            if not slots:
                continue
            logits = {j: float(_row_logits(q_idx[b, t], k_idx[b, int(indices[b, t, j])][None],
                                           w[b, t], scale)[0]) for j in slots}
            top = max(logits.values())
            norm = sum(math.exp(v - top) for v in logits.values())
            predict = {j: math.exp(logits[j] - top) / norm for j in slots}
            g = {}
            for j in slots:
                passes = 1.0 if predict[j] >= floor else 0.0
                n_underflow += passes == 0.0
                g[j] = (-max(float(target[b, t, j]), floor) * passes * loss_coeff / n_rows
                        * grad_out)
            g_sum = sum(g.values())
            for j in slots:
                dlogit[b, t, j] = g[j] - predict[j] * g_sum
    return dlogit, n_underflow


def _naive_slot_logits(q_idx, k_idx, w, indices, valid, scale):
    """Differentiable logits [B, Sq, K] (0 on invalid slots) for chaining dlogit by autograd."""
    batch, n_queries, n_slots = indices.shape
    rows = []
    for b in range(batch):
        for t in range(n_queries):
            ids = torch.where(valid[b, t], indices[b, t], 0).long()
            logits = _row_logits(q_idx[b, t], k_idx[b, ids], w[b, t], scale)
            rows.append(torch.where(valid[b, t], logits, 0.0))
    return torch.stack(rows).view(batch, n_queries, n_slots)


@pytest.mark.parametrize("all_zero_target", [False, True])
def test_sparse_backward_exact_spec_g(all_zero_target):
    """Zero targets and predicts below e^-100: the exact SPEC g, checked by a hand loop.

    With all targets 0 the gradient comes only from the max(target, e^-100) floor, made
    visible by a huge loss_coeff (fp64 only); a kernel that uses target itself gets 0.
    """
    q_idx, k_idx, w, indices, target, topk_length, valid = _sparse_inputs(
        17, 2, 4, 12, 2, 4, 9, empty_rows=[(1, 2)])
    # Large positive head weights spread each row's logits over hundreds of nats.
    w = w.abs() * 40.0 + 20.0
    scale, grad_out = 1.0, 0.8
    if all_zero_target:
        target = torch.where(valid, 0.0, target)
        loss_coeff = 1e43
    else:
        gen = torch.Generator().manual_seed(18)
        zero = torch.rand(target.shape, generator=gen) < 0.3
        target = torch.where(valid & zero, 0.0, target)
        loss_coeff = 0.9
        assert ((target == 0) & valid).any()

    dlogit, n_underflow = _spec_dlogit_hand_loop(q_idx, k_idx, w, indices, target, scale,
                                                 loss_coeff, grad_out, valid)
    assert n_underflow > 0, "test data must have predict < e^-100 somewhere"
    leaves = [x.clone().requires_grad_(True) for x in (q_idx, k_idx, w)]
    logits = _naive_slot_logits(*leaves, indices, valid, scale)
    # Stay clear of the e^-100 boundary so rounding cannot flip the indicator.
    log_p = torch.log_softmax(torch.where(valid, logits, float("-inf")), -1).detach()
    assert ((log_p[valid] + 100.0).abs() > 1e-3).all()
    expected = torch.autograd.grad(logits, leaves, grad_outputs=dlogit)

    got = indexer_loss_backward(torch.tensor(grad_out, dtype=F64), q_idx, k_idx, w, indices,
                                target, scale, loss_coeff, topk_length)
    _assert_grads_close(got, expected, 1e-9)
    if not all_zero_target:
        # The forward loss stays finite with 0 * log 0 terms, and matches the naive loop.
        value = indexer_loss(q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length)
        naive = naive_sparse_loss(q_idx, k_idx, w, indices, target, scale, loss_coeff,
                                  topk_length)
        assert torch.isfinite(value)
        assert abs(float(value) - float(naive)) <= 1e-10 * abs(float(naive))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sparse_low_precision_dtypes(dtype):
    """fp32 math for bf16/fp16/fp32: fp32 loss, gradients in the input dtypes."""
    q_idx, k_idx, w, indices, target, topk_length, _ = _sparse_inputs(
        19, 2, 5, 16, 3, 16, 21, dtype=dtype)
    scale, loss_coeff = 0.25, 1.5
    got = indexer_loss(q_idx, k_idx, w, indices, target, scale, loss_coeff, topk_length)
    assert got.dtype == torch.float32 and got.shape == ()
    grad_out = torch.tensor(0.9, dtype=torch.float32)
    got_grads = indexer_loss_backward(grad_out, q_idx, k_idx, w, indices, target, scale,
                                      loss_coeff, topk_length)
    assert [g.dtype for g in got_grads] == [dtype] * 3
    expected, *grads = _autograd(
        lambda q, k, ww: naive_sparse_loss(q, k, ww, indices, target, scale, loss_coeff,
                                           topk_length), q_idx, k_idx, w, 0.9)
    assert _rel_err(got.reshape(1), expected.reshape(1)) <= 2e-3
    if dtype == torch.float32:
        _assert_grads_close(got_grads, grads, 2e-3)
    else:  # rounding the outputs to 8/11 mantissa bits dominates
        _assert_grads_close(got_grads, grads, 2e-2, cosine=0.999)


# --------------------------------------------------------------------------------------
# dense loss
# --------------------------------------------------------------------------------------

DENSE_CASES = [
    # batch, Sq, Sk, H, D, ratio, q_start
    (2, 11, 11, 3, 8, 1, None),               # prefill
    (2, 4, 11, 1, 8, 1, None),                # last 4 tokens
    (1, 6, 4, 3, 8, 1, None),                 # Sq > Sk: default q_start < 0, empty rows
    (2, 6, 9, 3, 8, 1, [2, 0]),
    (2, 24, 6, 3, 8, 4, None),                # prefill, first 3 rows see nothing
    (2, 5, 6, 1, 16, 4, None),
    (2, 9, 7, 3, 8, 4, [3, 10]),
    (1, 5, 3, 64, 128, 4, [4]),               # V3.2 head count, tiny sequence
]


@pytest.mark.parametrize("batch,n_queries,n_keys,heads,dim,ratio,q_start", DENSE_CASES)
def test_dense_loss_forward_and_backward_match_naive(batch, n_queries, n_keys, heads, dim,
                                                     ratio, q_start):
    q_idx, k_idx, w, scores, l1 = _dense_inputs(2000 + n_queries, batch, n_queries, n_keys,
                                                heads, dim, ratio, q_start)
    q_start_t = None if q_start is None else torch.tensor(q_start, dtype=torch.int32)
    scale, loss_coeff, grad_out = 0.3, 1.7, 0.6
    got = dense_indexer_loss(q_idx, k_idx, w, scores, l1, scale, ratio, loss_coeff, q_start_t)
    assert got.shape == () and got.dtype == F64
    expected, *grads = _autograd(
        lambda q, k, ww: naive_dense_loss(q, k, ww, scores, l1, scale, ratio, loss_coeff,
                                          q_start), q_idx, k_idx, w, grad_out)
    assert abs(float(got) - float(expected)) <= 1e-10 * abs(float(expected))
    got_grads = dense_indexer_loss_backward(torch.tensor(grad_out, dtype=F64), q_idx, k_idx,
                                            w, scores, l1, scale, ratio, loss_coeff, q_start_t)
    _assert_grads_close(got_grads, grads, 1e-9)


def test_dense_no_visible_key_gives_zero():
    # q_start far in the past: every query sits before the first complete key.
    q_idx, k_idx, w, scores, l1 = _dense_inputs(23, 2, 3, 5, 3, 8, 4, [-10, -10])
    q_start = torch.tensor([-10, -10], dtype=torch.int32)
    got = dense_indexer_loss(q_idx, k_idx, w, scores, l1, 1.0, 4, 1.0, q_start)
    assert float(got) == 0.0
    grads = dense_indexer_loss_backward(torch.tensor(1.0, dtype=F64), q_idx, k_idx, w, scores,
                                        l1, 1.0, 4, 1.0, q_start)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_low_precision_dtypes(dtype):
    q_idx, k_idx, w, scores, l1 = _dense_inputs(29, 2, 9, 10, 3, 16, 1, None, dtype=dtype)
    got = dense_indexer_loss(q_idx, k_idx, w, scores, l1, 0.25, 1, 1.0, None)
    assert got.dtype == torch.float32
    got_grads = dense_indexer_loss_backward(torch.tensor(1.0), q_idx, k_idx, w, scores, l1,
                                            0.25, 1, 1.0, None)
    assert [g.dtype for g in got_grads] == [dtype] * 3
    expected, *grads = _autograd(
        lambda q, k, ww: naive_dense_loss(q, k, ww, scores, l1, 0.25, 1, 1.0, None),
        q_idx, k_idx, w, 1.0)
    assert _rel_err(got.reshape(1), expected.reshape(1)) <= 2e-3
    if dtype == torch.float32:
        _assert_grads_close(got_grads, grads, 2e-3)
    else:
        _assert_grads_close(got_grads, grads, 2e-2, cosine=0.999)


@pytest.mark.parametrize("ratio,q_start", [(1, None), (1, [-2, 3]), (4, None), (4, [1, 7])])
def test_dense_equals_sparse_on_the_visible_set(ratio, q_start):
    """indices = every visible key (shuffled, padded with -1) and the same normalised target:
    the sparse and dense losses and gradients agree."""
    batch, n_queries, n_keys, heads, dim = 2, 7 * ratio if q_start is None else 6, 7, 3, 8
    q_idx, k_idx, w, scores, l1 = _dense_inputs(31, batch, n_queries, n_keys, heads, dim,
                                                ratio, q_start)
    starts = _starts(q_start, batch, n_queries, n_keys, ratio)
    n_slots = n_keys + 3
    gen = torch.Generator().manual_seed(32)
    indices = torch.full((batch, n_queries, n_slots), -1, dtype=torch.int32)
    target = torch.zeros(batch, n_queries, n_slots, dtype=F64)
    for b in range(batch):
        for t in range(n_queries):
            n = _n_visible(starts[b] + t, n_keys, ratio)
            ids = torch.randperm(n, generator=gen)
            indices[b, t, :n] = ids.to(torch.int32)
            target[b, t, :n] = scores[b, t, ids] / max(float(l1[b, t]), 1e-12)
    if (ratio, q_start) != (1, None):
        assert (indices[:, :, 0] == -1).any(), "want some empty rows too"
    q_start_t = None if q_start is None else torch.tensor(q_start, dtype=torch.int32)

    dense = dense_indexer_loss(q_idx, k_idx, w, scores, l1, 0.4, ratio, 1.3, q_start_t)
    sparse = indexer_loss(q_idx, k_idx, w, indices, target, 0.4, 1.3, None)
    assert abs(float(dense) - float(sparse)) <= 1e-12 * abs(float(dense))
    grad_out = torch.tensor(1.1, dtype=F64)
    dense_grads = dense_indexer_loss_backward(grad_out, q_idx, k_idx, w, scores, l1, 0.4,
                                              ratio, 1.3, q_start_t)
    sparse_grads = indexer_loss_backward(grad_out, q_idx, k_idx, w, indices, target, 0.4, 1.3,
                                         None)
    _assert_grads_close(dense_grads, sparse_grads, 1e-11)


# --------------------------------------------------------------------------------------
# chunking changes nothing
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_elements", [100, 290])
def test_small_chunks_equal_one_chunk(monkeypatch, chunk_elements):
    """Many small (uneven) row chunks give the one-chunk result."""
    grad_out = torch.tensor(0.7, dtype=F64)
    sparse_args = _sparse_inputs(37, 2, 7, 10, 3, 8, 13)[:6]
    dense_args = _dense_inputs(38, 2, 7, 40, 3, 8, 1, None)

    def run_all():
        q_idx, k_idx, w, indices, target, topk_length = sparse_args
        out = [indexer_loss(q_idx, k_idx, w, indices, target, 0.5, 1.2, topk_length),
               *indexer_loss_backward(grad_out, q_idx, k_idx, w, indices, target, 0.5, 1.2,
                                      topk_length)]
        q_idx, k_idx, w, scores, l1 = dense_args
        out += [dense_indexer_loss(q_idx, k_idx, w, scores, l1, 0.5, 1, 1.2, None),
                *dense_indexer_loss_backward(grad_out, q_idx, k_idx, w, scores, l1, 0.5, 1,
                                             1.2, None)]
        return out

    one_chunk = run_all()
    monkeypatch.setattr(ref_loss, "_CHUNK_ELEMENTS", chunk_elements)
    # Prove the patched budget really splits these shapes into several chunks.
    assert len(list(ref_loss._row_chunks(7, 13 * (3 + 8)))) > 1
    assert len(list(ref_loss._row_chunks(7, 3 * 40))) > 1
    chunked = run_all()
    for a, b in zip(chunked, one_chunk):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
