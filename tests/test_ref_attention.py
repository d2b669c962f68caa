"""The attention references (dsa_ops/reference/attention.py) against independent oracles:
naive per-element loops in fp64 for the forward ops, and fp64 torch.autograd of a naive,
row-by-row differentiable formula for the backward. Tolerances follow SPEC section 9.
"""

import math

import pytest
import torch

from dsa_ops.reference import attention as ref


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def make_case(seed, num_rows, heads, head_dim, d_v, num_kv, num_slots, *, dtype=torch.float64,
              with_sink=True, with_topk=True):
    """Random sparse-attention inputs with the awkward cases planted (needs num_rows >= 4):
    row 0: every id invalid (-1 or >= S) -> no valid slot;
    row 1: slots 0, 1, 2 select the same kv row (counts three times), all slots inside topk_length;
    row 2: a -1 and an out-of-range id among valid ones;
    row 3: topk_length 0 when topk_length is given -> no valid slot;
    other rows: random ids with some -1 and some out-of-range ids sprinkled in.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_rows, heads, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    kv = torch.randn(num_kv, head_dim, generator=gen, dtype=torch.float64).to(dtype)

    ids = torch.randint(0, num_kv, (num_rows, num_slots), generator=gen)
    sprinkle = torch.rand(num_rows, num_slots, generator=gen)
    ids = torch.where(sprinkle < 0.15, torch.full_like(ids, -1), ids)
    ids = torch.where(sprinkle > 0.93, ids + num_kv, ids)  # out of range (>= S)
    ids[0] = torch.where(torch.arange(num_slots) % 2 == 0, -1, num_kv + torch.arange(num_slots))
    ids[1, :3] = torch.randint(0, num_kv, (1,), generator=gen)
    ids[1, 3:] = torch.randint(0, num_kv, (num_slots - 3,), generator=gen)
    ids[2, 0], ids[2, -1] = -1, num_kv
    ids[2, 1:-1] = torch.randint(0, num_kv, (num_slots - 2,), generator=gen)
    indices = ids.to(torch.int32)

    topk_length = None
    if with_topk:
        topk_length = torch.randint(1, num_slots + 1, (num_rows,), generator=gen)
        topk_length[1] = num_slots
        topk_length[2] = num_slots
        topk_length[3] = 0
        topk_length = topk_length.to(torch.int32)

    sink_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    attn_sink = torch.randn(heads, generator=gen, dtype=torch.float64).to(sink_dtype) if with_sink else None
    return q, kv, indices, attn_sink, topk_length


def valid_ids(indices, num_kv, topk_length, row):
    """The kv rows selected by valid slots of one query row, duplicates kept (plain Python)."""
    limit = indices.shape[1] if topk_length is None else int(topk_length[row])
    ids = [int(i) for i in indices[row, :limit]]
    return [i for i in ids if 0 <= i < num_kv]


def rel_err(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def cosine(actual, expected):
    return torch.nn.functional.cosine_similarity(
        actual.double().flatten(), expected.double().flatten(), dim=0).item()


# ----------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------


def naive_forward(q, kv, indices, scale, d_v, attn_sink, topk_length):
    """Element-by-element SPEC section 4 in fp64 Python floats."""
    num_rows, heads, _ = q.shape
    q, kv = q.double(), kv.double()
    out = torch.zeros(num_rows, heads, d_v, dtype=torch.float64)
    lse = torch.full((num_rows, heads), math.inf, dtype=torch.float64)
    for t in range(num_rows):
        ids = valid_ids(indices, kv.shape[0], topk_length, t)
        if not ids:
            continue  # out 0, lse +inf, with or without a sink
        for h in range(heads):
            scores = [scale * float(torch.dot(q[t, h], kv[i])) for i in ids]
            top = max(scores)
            row_lse = top + math.log(sum(math.exp(s - top) for s in scores))
            denom = row_lse
            if attn_sink is not None:
                sink = float(attn_sink[h])
                big = max(row_lse, sink)
                denom = big + math.log(math.exp(row_lse - big) + math.exp(sink - big))
            lse[t, h] = row_lse
            for s, i in zip(scores, ids):
                out[t, h] += math.exp(s - denom) * kv[i, :d_v]
    return out, lse


def naive_differentiable_out(q, kv, indices, scale, d_v, attn_sink, topk_length):
    """SPEC section 4 row by row with differentiable torch ops (autograd gives the oracle)."""
    rows = []
    for t in range(q.shape[0]):
        ids = valid_ids(indices, kv.shape[0], topk_length, t)
        if not ids:
            rows.append(torch.zeros(q.shape[1], d_v, dtype=q.dtype))
            continue
        selected = kv[torch.tensor(ids)]  # duplicates gather (and get gradient) once per slot
        scores = scale * q[t] @ selected.T  # [H, n]
        logits = scores if attn_sink is None else torch.cat([scores, attn_sink[:, None]], 1)
        probs = torch.exp(scores - torch.logsumexp(logits, dim=1, keepdim=True))
        rows.append(probs @ selected[:, :d_v])
    return torch.stack(rows)


def autograd_oracle(q, kv, indices, scale, d_v, attn_sink, topk_length, dout):
    """(out, dq, dkv, d_sink) from fp64 autograd of the naive formula."""
    q64 = q.detach().double().requires_grad_()
    kv64 = kv.detach().double().requires_grad_()
    sink64 = None if attn_sink is None else attn_sink.detach().double().requires_grad_()
    out = naive_differentiable_out(q64, kv64, indices, scale, d_v, sink64, topk_length)
    leaves = [q64, kv64] + ([sink64] if sink64 is not None else [])
    grads = torch.autograd.grad((out * dout.double()).sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    d_sink = grads[2] if sink64 is not None else torch.zeros(q.shape[1], dtype=torch.float64)
    return out.detach(), grads[0], grads[1], d_sink


# (heads, head_dim, d_v, num_kv, num_slots, num_rows): H in {1, 3, 64}, K not a multiple of 64,
# the real 576/512 latent at tiny T and a small latent.
SHAPES = [
    pytest.param(1, 40, 32, 23, 7, 6, id="H1-D40"),
    pytest.param(3, 40, 32, 150, 70, 6, id="H3-D40-K70"),
    pytest.param(64, 40, 32, 30, 5, 4, id="H64-D40"),
    pytest.param(3, 576, 512, 19, 9, 4, id="H3-D576"),
]


# ----------------------------------------------------------------------------------------------
# sparse_attention forward and backward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_topk", [True, False], ids=["topk_len", "no_topk_len"])
@pytest.mark.parametrize("with_sink", [True, False], ids=["sink", "no_sink"])
@pytest.mark.parametrize("heads,head_dim,d_v,num_kv,num_slots,num_rows", SHAPES)
def test_forward_matches_naive_loops(heads, head_dim, d_v, num_kv, num_slots, num_rows,
                                     with_sink, with_topk):
    q, kv, indices, sink, topk_length = make_case(
        1, num_rows, heads, head_dim, d_v, num_kv, num_slots, with_sink=with_sink, with_topk=with_topk)
    scale = head_dim ** -0.5
    out, lse = ref.sparse_attention(q, kv, indices, scale, d_v, sink, topk_length)
    out_naive, lse_naive = naive_forward(q, kv, indices, scale, d_v, sink, topk_length)

    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert out.shape == (num_rows, heads, d_v) and lse.shape == (num_rows, heads)
    torch.testing.assert_close(out, out_naive, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, lse_naive, rtol=1e-10, atol=1e-12)  # inf positions must match
    # Row 0 has no valid slot (and row 3 neither when topk_length is given): out 0, lse +inf.
    empty_rows = [0, 3] if with_topk else [0]
    for t in empty_rows:
        assert torch.all(out[t] == 0) and torch.all(torch.isposinf(lse[t]))
    assert torch.isfinite(lse[1:3]).all() and out[1:3].abs().sum() > 0


def test_duplicate_slot_counts_per_slot():
    # A row whose slots all select one kv row: P is uniform over the copies, lse gains log(copies).
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 16, generator=gen, dtype=torch.float64)
    kv = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    once = torch.tensor([[3, -1, -1]], dtype=torch.int32)
    thrice = torch.tensor([[3, 3, 3]], dtype=torch.int32)
    out1, lse1 = ref.sparse_attention(q, kv, once, 0.25, 8, None, None)
    out3, lse3 = ref.sparse_attention(q, kv, thrice, 0.25, 8, None, None)
    torch.testing.assert_close(out3, out1)
    torch.testing.assert_close(lse3, lse1 + math.log(3))


@pytest.mark.parametrize("with_topk", [True, False], ids=["topk_len", "no_topk_len"])
@pytest.mark.parametrize("with_sink", [True, False], ids=["sink", "no_sink"])
@pytest.mark.parametrize("heads,head_dim,d_v,num_kv,num_slots,num_rows", SHAPES)
def test_backward_matches_fp64_autograd(heads, head_dim, d_v, num_kv, num_slots, num_rows,
                                        with_sink, with_topk):
    q, kv, indices, sink, topk_length = make_case(
        3, num_rows, heads, head_dim, d_v, num_kv, num_slots, with_sink=with_sink, with_topk=with_topk)
    scale = head_dim ** -0.5
    dout = torch.randn(num_rows, heads, d_v, generator=torch.Generator().manual_seed(4),
                       dtype=torch.float64)
    out, lse = ref.sparse_attention(q, kv, indices, scale, d_v, sink, topk_length)
    dq, dkv, d_sink = ref.sparse_attention_backward(
        dout, q, kv, out, lse, indices, scale, d_v, sink, topk_length, False)
    _, dq_ref, dkv_ref, d_sink_ref = autograd_oracle(
        q, kv, indices, scale, d_v, sink, topk_length, dout)

    assert dq.dtype == q.dtype and dkv.dtype == kv.dtype and d_sink.dtype == torch.float64
    assert d_sink.shape == (heads,)
    for grad in (dq, dkv, d_sink):
        assert not torch.isnan(grad).any()
    torch.testing.assert_close(dq, dq_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dkv, dkv_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(d_sink, d_sink_ref, rtol=1e-9, atol=1e-11)
    assert torch.all(dq[0] == 0)  # the row with no valid slot gets no gradient
    if not with_sink:
        assert torch.all(d_sink == 0)
    # Rows selected by nobody get no gradient.
    selected = set()
    for t in range(num_rows):
        selected.update(valid_ids(indices, num_kv, topk_length, t))
    unselected = [i for i in range(num_kv) if i not in selected]
    assert torch.all(dkv[unselected] == 0)


def test_backward_deterministic_flag_on_cpu_is_bitwise_equal():
    q, kv, indices, sink, topk_length = make_case(5, 12, 4, 40, 32, 20, 33, dtype=torch.float32)
    dout = torch.randn(12, 4, 32, generator=torch.Generator().manual_seed(6))
    out, lse = ref.sparse_attention(q, kv, indices, 0.2, 32, sink, topk_length)
    grads_fast = ref.sparse_attention_backward(dout, q, kv, out, lse, indices, 0.2, 32, sink,
                                               topk_length, False)
    grads_det = ref.sparse_attention_backward(dout, q, kv, out, lse, indices, 0.2, 32, sink,
                                              topk_length, True)
    for fast, det in zip(grads_fast, grads_det):
        assert torch.equal(fast, det)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_backward_deterministic_on_cuda_is_reproducible():
    # Many slots hit a few kv rows, so the scatter has long runs of duplicates to reorder.
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(512, 16, 64, generator=gen).cuda()
    kv = torch.randn(8, 64, generator=gen).cuda()
    indices = torch.randint(0, 8, (512, 128), generator=gen, dtype=torch.int32).cuda()
    dout = torch.randn(512, 16, 48, generator=gen).cuda()
    out, lse = ref.sparse_attention(q, kv, indices, 0.125, 48, None, None)
    first = ref.sparse_attention_backward(dout, q, kv, out, lse, indices, 0.125, 48, None, None, True)
    for _ in range(5):
        again = ref.sparse_attention_backward(dout, q, kv, out, lse, indices, 0.125, 48, None, None,
                                              True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    cpu = ref.sparse_attention_backward(dout.cpu(), q.cpu(), kv.cpu(), out.cpu(), lse.cpu(),
                                        indices.cpu(), 0.125, 48, None, None, True)
    for gpu_grad, cpu_grad in zip(first, cpu):
        assert rel_err(gpu_grad.cpu(), cpu_grad) < 1e-5


@pytest.mark.parametrize("with_sink", [True, False], ids=["sink", "no_sink"])
def test_bf16_inputs_vs_fp64_oracle(with_sink):
    num_rows, heads, head_dim, d_v, num_kv, num_slots = 10, 16, 576, 512, 300, 100
    q, kv, indices, sink, topk_length = make_case(
        8, num_rows, heads, head_dim, d_v, num_kv, num_slots, dtype=torch.bfloat16, with_sink=with_sink)
    scale = head_dim ** -0.5
    dout = torch.randn(num_rows, heads, d_v, generator=torch.Generator().manual_seed(9)).bfloat16()

    out, lse = ref.sparse_attention(q, kv, indices, scale, d_v, sink, topk_length)
    dq, dkv, d_sink = ref.sparse_attention_backward(
        dout, q, kv, out, lse, indices, scale, d_v, sink, topk_length, False)
    out_ref, dq_ref, dkv_ref, d_sink_ref = autograd_oracle(
        q, kv, indices, scale, d_v, sink, topk_length, dout)
    _, lse_ref = naive_forward(q, kv, indices, scale, d_v, sink, topk_length)

    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert dq.dtype == torch.bfloat16 and dkv.dtype == torch.bfloat16 and d_sink.dtype == torch.float32
    assert rel_err(out, out_ref) <= 1e-2
    assert torch.equal(torch.isposinf(lse), torch.isposinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    assert rel_err(lse[finite], lse_ref[finite]) <= 2e-3
    grads = [(dq, dq_ref), (dkv, dkv_ref)] + ([(d_sink, d_sink_ref)] if with_sink else [])
    for grad, grad_ref in grads:
        assert not torch.isnan(grad).any()
        assert rel_err(grad, grad_ref) <= 2e-2
        assert cosine(grad, grad_ref) >= 0.999
    if not with_sink:
        assert torch.all(d_sink == 0)


# ----------------------------------------------------------------------------------------------
# Paged decode
# ----------------------------------------------------------------------------------------------


def make_paged_case(seed, dtype=torch.float64):
    """Three sequences of different lengths (one empty) in a cache with shuffled pages, junk in
    every cache slot that holds no token, and junk page numbers in unused block_table entries."""
    gen = torch.Generator().manual_seed(seed)
    batch, num_q, heads, head_dim, d_v, num_slots, page = 3, 2, 3, 40, 32, 21, 16
    seq_lens = [37, 5, 0]
    num_pages = 9
    kv_cache = torch.full((num_pages, page, head_dim), 50.0, dtype=dtype)  # junk: would dominate
    page_order = torch.randperm(num_pages, generator=gen).tolist()
    block_table = torch.tensor([[page_order[0], page_order[1], page_order[2]],
                                [page_order[3], 7777, -1],
                                [-5, 123, 4]], dtype=torch.int32)
    tokens = []
    for b, length in enumerate(seq_lens):
        seq_kv = torch.randn(length, head_dim, generator=gen, dtype=torch.float64).to(dtype)
        for t in range(length):
            kv_cache[block_table[b, t // page], t % page] = seq_kv[t]
        tokens.append(seq_kv)
    q = torch.randn(batch, num_q, heads, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    indices = torch.randint(-3, max(seq_lens) + 6, (batch, num_q, num_slots), generator=gen,
                            dtype=torch.int32)
    topk_length = torch.randint(0, num_slots + 1, (batch, num_q), generator=gen, dtype=torch.int32)
    attn_sink = torch.randn(heads, generator=gen, dtype=torch.float64).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    return dict(q=q, kv_cache=kv_cache, block_table=block_table,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), indices=indices,
                d_v=d_v, attn_sink=attn_sink, topk_length=topk_length, tokens=tokens)


@pytest.mark.parametrize("with_sink", [True, False], ids=["sink", "no_sink"])
@pytest.mark.parametrize("with_topk", [True, False], ids=["topk_len", "no_topk_len"])
def test_decode_matches_packed_form(with_sink, with_topk):
    case = make_paged_case(10)
    q, indices, tokens = case["q"], case["indices"], case["tokens"]
    batch, num_q, heads, head_dim = q.shape
    sink = case["attn_sink"] if with_sink else None
    topk_length = case["topk_length"] if with_topk else None
    scale = head_dim ** -0.5

    out, lse = ref.sparse_attention_decode(q, case["kv_cache"], case["block_table"], case["seq_lens"],
                                           indices, scale, case["d_v"], sink, topk_length)

    # The same data packed: sequences back to back, ids made global, invalid token ids -> -1.
    packed_kv = torch.cat(tokens)
    offsets = [0]
    for seq_kv in tokens:
        offsets.append(offsets[-1] + seq_kv.shape[0])
    packed_ids = indices.clone()
    for b in range(batch):
        local = indices[b]
        inside = (local >= 0) & (local < tokens[b].shape[0])
        packed_ids[b] = torch.where(inside, local + offsets[b], torch.full_like(local, -1))
    out_packed, lse_packed = ref.sparse_attention(
        q.reshape(-1, heads, head_dim), packed_kv, packed_ids.reshape(-1, indices.shape[-1]), scale,
        case["d_v"], sink, None if topk_length is None else topk_length.reshape(-1))

    assert out.shape == (batch, num_q, heads, case["d_v"]) and lse.shape == (batch, num_q, heads)
    torch.testing.assert_close(out.reshape(-1, heads, case["d_v"]), out_packed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.reshape(-1, heads), lse_packed, rtol=1e-12, atol=1e-12)
    # The empty sequence has no valid token: out 0, lse +inf.
    assert torch.all(out[2] == 0) and torch.all(torch.isposinf(lse[2]))
    assert torch.isfinite(lse[0]).any()
    # Independent check of the packed side too (junk in the cache would blow these up).
    out_naive, _ = naive_forward(q.reshape(-1, heads, head_dim), packed_kv,
                                 packed_ids.reshape(-1, indices.shape[-1]), scale, case["d_v"],
                                 sink, None if topk_length is None else topk_length.reshape(-1))
    torch.testing.assert_close(out_packed, out_naive, rtol=1e-10, atol=1e-12)


def test_decode_has_no_value_dependent_shapes():
    # Meta tensors carry no values: any .item(), nonzero() or boolean-mask indexing would raise.
    case = make_paged_case(11, dtype=torch.float32)
    on_meta = {k: v.to("meta") for k, v in case.items() if isinstance(v, torch.Tensor)}
    out, lse = ref.sparse_attention_decode(
        on_meta["q"], on_meta["kv_cache"], on_meta["block_table"], on_meta["seq_lens"],
        on_meta["indices"], 0.1, case["d_v"], on_meta["attn_sink"], on_meta["topk_length"])
    assert out.device.type == "meta" and out.shape == (3, 2, 3, case["d_v"])
    assert lse.shape == (3, 2, 3) and lse.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Indexer-training targets
# ----------------------------------------------------------------------------------------------


def naive_sparse_attn_score(q, kv, lse, indices, scale, topk_length):
    num_rows, heads, _ = q.shape
    q, kv, lse = q.double(), kv.double(), lse.double()
    target = torch.zeros(num_rows, indices.shape[1], dtype=torch.float64)
    for t in range(num_rows):
        limit = indices.shape[1] if topk_length is None else int(topk_length[t])
        for j in range(limit):
            i = int(indices[t, j])
            if 0 <= i < kv.shape[0]:
                target[t, j] = sum(math.exp(scale * float(torch.dot(q[t, h], kv[i])) - float(lse[t, h]))
                                   for h in range(heads))
        target[t] /= max(float(target[t].sum()), 1e-12)
    return target


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("with_topk", [True, False], ids=["topk_len", "no_topk_len"])
def test_sparse_attn_score_matches_naive(dtype, with_topk):
    q, kv, indices, _, topk_length = make_case(12, 7, 3, 40, 32, 50, 37, dtype=dtype,
                                               with_topk=with_topk, with_sink=False)
    scale = 40 ** -0.5
    _, lse = ref.sparse_attention(q, kv, indices, scale, 32, None, topk_length)
    lse[4] = float("inf")  # a row with valid slots but lse = +inf gives 0 too
    target = ref.sparse_attn_score(q, kv, lse, indices, scale, topk_length)
    expected = naive_sparse_attn_score(q, kv, lse, indices, scale, topk_length)

    assert target.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not torch.isnan(target).any()
    if dtype == torch.float64:
        torch.testing.assert_close(target, expected, rtol=1e-10, atol=1e-12)
    else:
        assert rel_err(target, expected) <= 2e-3
    assert torch.all(target[0] == 0) and torch.all(target[4] == 0)
    # Rows 1 and 2 have valid slots and a finite lse: they sum to 1.
    torch.testing.assert_close(target[1:3].sum(-1), torch.ones(2, dtype=target.dtype))
    # Invalid slots (bad id or past topk_length) are exactly 0.
    for t in range(7):
        limit = indices.shape[1] if topk_length is None else int(topk_length[t])
        for j in range(indices.shape[1]):
            if j >= limit or not 0 <= int(indices[t, j]) < kv.shape[0]:
                assert target[t, j] == 0


def naive_visible(q_pos, key, ratio, num_k):
    return key < (q_pos + 1) // ratio and key < num_k  # Python // floors, as SPEC means


@pytest.mark.parametrize("ratio,num_q,num_k", [(1, 6, 8), (4, 6, 5)])
@pytest.mark.parametrize("given_start", [True, False], ids=["q_start", "default_start"])
def test_dense_attn_score_matches_naive(ratio, num_q, num_k, given_start):
    gen = torch.Generator().manual_seed(13)
    batch, heads, head_dim = 2, 3, 40
    q = torch.randn(batch, num_q, heads, head_dim, generator=gen, dtype=torch.float64)
    kv = torch.randn(batch, num_k, head_dim, generator=gen, dtype=torch.float64)
    scale = head_dim ** -0.5
    # A realistic lse (over all keys) keeps exp(s - lse) <= 1; a random offset keeps it honest.
    lse = torch.logsumexp(scale * torch.einsum("bqhd,bkd->bqhk", q, kv), -1)
    lse = lse + torch.rand(lse.shape, generator=gen, dtype=torch.float64)
    q_start = torch.tensor([0, 3], dtype=torch.int32) if given_start else None

    scores, l1 = ref.dense_attn_score(q, kv, lse, scale, ratio, q_start)

    starts = q_start.tolist() if given_start else [num_k * ratio - num_q] * batch
    expected = torch.zeros(batch, num_q, num_k, dtype=torch.float64)
    for b in range(batch):
        for i in range(num_q):
            for k in range(num_k):
                if naive_visible(starts[b] + i, k, ratio, num_k):
                    expected[b, i, k] = sum(
                        math.exp(scale * float(torch.dot(q[b, i, h], kv[b, k])) - float(lse[b, i, h]))
                        for h in range(heads))
    assert scores.dtype == torch.float64 and l1.dtype == torch.float64
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(l1, expected.sum(-1), rtol=1e-10, atol=1e-12)
    assert (expected > 0).any() and (expected == 0).any()  # the mask both shows and hides keys


def test_dense_attn_score_bf16_and_visible_mask():
    gen = torch.Generator().manual_seed(14)
    q = torch.randn(2, 9, 4, 64, generator=gen).bfloat16()
    kv = torch.randn(2, 11, 64, generator=gen).bfloat16()
    lse = torch.rand(2, 9, 4, generator=gen) + 3.0
    q_start = torch.tensor([5, 30], dtype=torch.int32)
    scores, l1 = ref.dense_attn_score(q, kv, lse, 0.125, 4, q_start)
    expected, _ = ref.dense_attn_score(q.double(), kv.double(), lse.double(), 0.125, 4, q_start)
    assert scores.dtype == torch.float32 and l1.dtype == torch.float32
    assert rel_err(scores, expected) <= 2e-3

    for start_arg in (q_start, None):
        mask = ref.visible_mask(9, 11, 4, start_arg, range(2, 7))
        starts = start_arg.tolist() if start_arg is not None else [11 * 4 - 9]
        assert mask.shape == (len(starts), 5, 11)
        for b, start in enumerate(starts):
            for row, i in enumerate(range(2, 7)):
                for k in range(11):
                    assert bool(mask[b, row, k]) == naive_visible(start + i, k, 4, 11)


# ----------------------------------------------------------------------------------------------
# Chunking must not change results
# ----------------------------------------------------------------------------------------------


def test_chunked_path_matches_single_chunk(monkeypatch):
    q, kv, indices, sink, topk_length = make_case(15, 9, 3, 40, 32, 60, 45)
    dout = torch.randn(9, 3, 32, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    paged = make_paged_case(17)
    gen = torch.Generator().manual_seed(18)
    dq_in = torch.randn(2, 7, 3, 40, generator=gen, dtype=torch.float64)
    dkv_in = torch.randn(2, 5, 40, generator=gen, dtype=torch.float64)
    dlse_in = torch.rand(2, 7, 3, generator=gen, dtype=torch.float64) + 2.0

    def run_all():
        out, lse = ref.sparse_attention(q, kv, indices, 0.15, 32, sink, topk_length)
        grads = ref.sparse_attention_backward(dout, q, kv, out, lse, indices, 0.15, 32, sink,
                                              topk_length, True)
        decode = ref.sparse_attention_decode(
            paged["q"], paged["kv_cache"], paged["block_table"], paged["seq_lens"], paged["indices"],
            0.15, paged["d_v"], paged["attn_sink"], paged["topk_length"])
        target = ref.sparse_attn_score(q, kv, lse, indices, 0.15, topk_length)
        dense = ref.dense_attn_score(dq_in, dkv_in, dlse_in, 0.15, 4, None)
        return [out, lse, *grads, *decode, target, *dense]

    one_chunk = run_all()
    assert len(list(ref._chunks(9, 2 * 45 * 40 + 4 * 3 * 45))) == 1  # default budget: one chunk
    monkeypatch.setattr(ref, "GATHER_BUDGET_ELEMENTS", 1)  # now one row per chunk
    assert len(list(ref._chunks(9, 45 * 40))) == 9
    many_chunks = run_all()
    for whole, chunked in zip(one_chunk, many_chunks):
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-13)
