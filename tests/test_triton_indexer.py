"""Triton lightning-indexer kernels (csrc_dsl/triton/indexer.py) against naive fp64 oracles.

Without CUDA the kernels run in the Triton interpreter on tiny, odd shapes with fp16/fp32 inputs (the
interpreter's bf16 dot is wrong on CPU). With CUDA the same checks run at DeepSeek shapes in bf16.
Tolerances: SPEC section 9.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

from csrc_dsl.triton import indexer as ix  # noqa: E402

try:
    from csrc_dsl.triton.topk import topk as _team_topk_fn  # noqa: F401
    HAVE_TEAM_TOPK = True
except ImportError:
    HAVE_TEAM_TOPK = False

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="GPU-size checks need CUDA")
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------
# oracles (fp64, straight from SPEC sections 0, 1, 2, 6)
# ----------------------------------------------------------------------------------------------------

def default_q_start(B, Sq, Sk, ratio):
    return torch.full((B,), Sk * ratio - Sq, dtype=torch.int32, device=DEV)


def visible_counts(q_start, Sq, Sk, ratio):
    pos = q_start.long()[:, None] + torch.arange(Sq, device=q_start.device)[None, :]
    return ((pos + 1).clamp_min(0) // ratio).clamp_max(Sk)


def oracle_logits(q, k, w, scale, ratio, q_start, row_chunk=256):
    """fp64 scores and the per-entry rounding bound |scale| * sum_h |w_h| * sum_d |q_hd k_d| * eps."""
    B, Sq, HI, DI = q.shape
    Sk = k.shape[1]
    scores = torch.empty(B, Sq, Sk, dtype=torch.float64, device=q.device)
    magnitude = torch.empty_like(scores)
    kd = k.double()
    for r0 in range(0, Sq, row_chunk):
        qd = q[:, r0:r0 + row_chunk].double()
        wd = w[:, r0:r0 + row_chunk].double()
        s = torch.einsum("bqhd,bkd->bqhk", qd, kd) * scale
        scores[:, r0:r0 + row_chunk] = torch.einsum("bqhk,bqh->bqk", s.relu(), wd)
        a = torch.einsum("bqhd,bkd->bqhk", qd.abs(), kd.abs()) * abs(scale)
        magnitude[:, r0:r0 + row_chunk] = torch.einsum("bqhk,bqh->bqk", a, wd.abs())
    visible = torch.arange(Sk, device=q.device)[None, None, :] < visible_counts(q_start, Sq, Sk, ratio)[:, :, None]
    # fp32 summation of DI products then HI heads: |error| <= (DI + HI) * 2^-24 * sum |terms|; 2x margin.
    bound = magnitude * (DI + HI + 16) * 2.0 ** -23
    return scores.masked_fill(~visible, NEG_INF), bound, visible


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def assert_scores_close(out, ref, visible):
    assert out.dtype == torch.float32
    assert not torch.isnan(out).any(), "NaN (or an unwritten element) in the scores"
    assert torch.equal(torch.isneginf(out), ~visible), "the -inf pattern differs from the ratio-causal mask"
    if visible.any():
        assert rel_err(out[visible], ref[visible]) <= 2e-3


def stable_sort_topk(scores, k, lengths, sorted_=False):
    """Test-only fallback with the SPEC section 2 contract (used until csrc_dsl/triton/topk.py exists)."""
    C = scores.shape[-1]
    s = scores.clone()
    if lengths is not None:
        s = s.masked_fill(torch.arange(C, device=s.device) >= lengths[..., None].long(), NEG_INF)
    val, idx = torch.sort(s, dim=-1, descending=True, stable=True)  # equal values keep index order
    val, idx = val[..., :k].contiguous(), idx[..., :k].to(torch.int32)
    idx = torch.where(torch.isneginf(val), torch.full_like(idx, -1), idx)
    return idx, val


@pytest.fixture(autouse=True)
def team_topk_or_fallback(monkeypatch):
    if not HAVE_TEAM_TOPK:
        monkeypatch.setattr(ix, "_team_topk", lambda scores, k, lengths: stable_sort_topk(scores, k, lengths))


@pytest.fixture
def small_tiles(monkeypatch):
    """Interpreter shapes are tiny: shrink the tiles so several key tiles, -inf fills and row chunks occur."""
    monkeypatch.setattr(ix, "_FWD_BLOCK_K", 16)
    monkeypatch.setattr(ix, "_FILL_ROWS", 16)
    monkeypatch.setattr(ix, "_MIN_ROWS_PER_PROG", 8)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Outputs poisoned before the call: every torch.empty the kernels' launchers make starts as NaN/-7777."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-7777)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def check_topk(idx, val, ref, bound, visible, topk):
    """SPEC section 9 rule for a fused top-k. Rows of ref [R, C] fp64 (-inf hidden), bound [R, C].
    idx/val [R, topk] local ids. Swaps only between keys whose oracle scores differ by less than the
    rounding bound; exact oracle ties resolved by the smaller index."""
    R, C = ref.shape
    assert idx.dtype == torch.int32 and val.dtype == torch.float32
    assert idx.shape == (R, topk) and val.shape == (R, topk)
    assert not torch.isnan(val).any()
    n_vis = visible.sum(1)
    want = n_vis.clamp_max(topk)
    chosen = idx >= 0
    assert torch.equal(chosen.sum(1), want), "wrong number of selected keys per row"
    assert bool((idx[~chosen] == -1).all()) and bool(torch.isneginf(val[~chosen]).all()), "bad padding"
    assert bool((idx < C).all())
    safe = idx.long().clamp_min(0)
    assert bool(visible.gather(1, safe)[chosen].all()), "a hidden key was selected"
    counts = torch.zeros(R, C, dtype=torch.int32, device=ref.device)
    counts.scatter_add_(1, safe, chosen.to(torch.int32))
    assert bool((counts <= 1).all()), "duplicate ids in a row"
    sel = counts > 0
    # values are the kernel's own scores of the chosen keys
    ref_at = ref.gather(1, safe)
    assert bool(((val.double() - ref_at).abs() <= bound.gather(1, safe))[chosen].all()), "values off"
    # the set: k-th largest oracle value tau; only near-ties may be swapped
    rows = want > 0
    if not rows.any():
        return
    ref_desc = ref.sort(dim=1, descending=True).values
    tau = ref_desc.gather(1, (want - 1).clamp_min(0)[:, None]).squeeze(1)
    slack = 2 * bound.masked_fill(~visible, 0).amax(1)
    low_sel = (ref.masked_fill(~sel, float("inf")).amin(1) < tau - slack) & rows
    assert not low_sel.any(), "a selected key scores clearly below the k-th best"
    unsel = visible & ~sel
    high_unsel = (ref.masked_fill(~unsel, NEG_INF).amax(1) > tau + slack) & rows
    assert not high_unsel.any(), "an unselected key scores clearly above the k-th best"
    ties = visible & (ref == tau[:, None]) & rows[:, None]
    cols = torch.arange(C, device=ref.device)[None, :]
    last_chosen_tie = torch.where(ties & sel, cols, -1).amax(1)
    first_unchosen_tie = torch.where(ties & ~sel, cols, C).amin(1)
    assert bool((last_chosen_tie < first_unchosen_tie).all()), "exact ties must keep the smaller index"


def make_inputs(B, Sq, Sk, HI, DI, dtype, gen, plateau_rows=0, dup_keys=0):
    q = torch.randn(B, Sq, HI, DI, generator=gen, device=DEV).to(dtype)
    k = torch.randn(B, Sk, DI, generator=gen, device=DEV).to(dtype)
    w = torch.randn(B, Sq, HI, generator=gen, device=DEV)
    if plateau_rows:
        # keys with k >= 0 and queries with q <= 0: every head's ReLU is 0, a plateau of exact ties at 0.0
        k[:, : Sk // 2] = k[:, : Sk // 2].abs()
        q[:, :plateau_rows] = -q[:, :plateau_rows].abs()
        # half of those rows also have a few positive keys above the plateau
        q[:, : plateau_rows // 2, :, :1] = 1.0
    if dup_keys:
        k[:, Sk - dup_keys:] = k[:, :dup_keys]  # planted exact ties between distinct ids
    return q, k, w


def gen_for(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# indexer_logits
# ----------------------------------------------------------------------------------------------------

LOGITS_CASES = [
    # B, Sq, Sk, HI, DI, ratio, explicit q_start, dtype, scale
    (2, 37, 53, 3, 32, 1, False, torch.float16, 0.7),
    (1, 50, 45, 16, 64, 1, False, torch.float32, 1.0),  # Sq > Sk: the first rows see nothing
    (2, 20, 70, 1, 32, 4, True, torch.float16, 0.5),    # compressed keys, explicit q_start
    (1, 33, 29, 3, 32, 1, False, torch.float16, -0.3),  # negative scale: relu(scale*s) = scale*min(s, 0)
]


@pytest.mark.parametrize("B,Sq,Sk,HI,DI,ratio,explicit,dtype,scale", LOGITS_CASES)
def test_logits_matches_oracle(small_tiles, poisoned_empty, B, Sq, Sk, HI, DI, ratio, explicit, dtype, scale):
    gen = gen_for(1 + Sq)
    q, k, w = make_inputs(B, Sq, Sk, HI, DI, dtype, gen)
    if explicit:
        q_start = torch.randint(-8, Sk * ratio, (B,), generator=gen, device=DEV, dtype=torch.int32)
    else:
        q_start = None
    out = ix.indexer_logits(q, k, w, scale, ratio, q_start)
    qs = q_start if explicit else default_q_start(B, Sq, Sk, ratio)
    ref, _, visible = oracle_logits(q, k, w, scale, ratio, qs)
    assert out.shape == (B, Sq, Sk)
    assert_scores_close(out, ref, visible)


def test_logits_default_tiles_and_no_input_change(poisoned_empty):
    """The production tile sizes (one partial key tile here) and inputs left untouched."""
    gen = gen_for(7)
    q, k, w = make_inputs(1, 19, 150, 16, 32, torch.float16, gen)
    copies = [t.clone() for t in (q, k, w)]
    out = ix.indexer_logits(q, k, w, 1.0, 1, None)
    ref, _, visible = oracle_logits(q, k, w, 1.0, 1, default_q_start(1, 19, 150, 1))
    assert_scores_close(out, ref, visible)
    assert all(torch.equal(a, b) for a, b in zip(copies, (q, k, w)))


# ----------------------------------------------------------------------------------------------------
# indexer_logits_backward
# ----------------------------------------------------------------------------------------------------

def oracle_backward(grad, q, k, w, scale, ratio, q_start):
    qd, kd, wd = (t.detach().double().requires_grad_() for t in (q, k, w))
    Sq, Sk = q.shape[1], k.shape[1]
    s = torch.einsum("bqhd,bkd->bqhk", qd, kd) * scale
    scores = torch.einsum("bqhk,bqh->bqk", s.relu(), wd)
    visible = torch.arange(Sk, device=q.device)[None, None, :] < visible_counts(q_start, Sq, Sk, ratio)[:, :, None]
    scores = torch.where(visible, scores, 0.0)
    scores.backward(torch.where(visible, grad.double(), 0.0))
    return qd.grad, kd.grad, wd.grad


def assert_grad_close(got, ref, name):
    assert got.shape == ref.shape and not torch.isnan(got).any(), name
    assert rel_err(got, ref) <= 2e-2, f"{name}: rel err {rel_err(got, ref)}"
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(), ref.flatten(), dim=0).item()
    assert cos >= 0.999, f"{name}: cosine {cos}"


@pytest.mark.parametrize("B,Sq,Sk,HI,DI,ratio,dtype,scale", [
    (2, 21, 75, 3, 32, 1, torch.float16, 0.6),
    (1, 30, 17, 16, 32, 2, torch.float32, 1.0),
])
def test_logits_backward_matches_autograd(poisoned_empty, B, Sq, Sk, HI, DI, ratio, dtype, scale):
    gen = gen_for(11 + Sq)
    q, k, w = make_inputs(B, Sq, Sk, HI, DI, dtype, gen)
    q_start = default_q_start(B, Sq, Sk, ratio)
    grad = torch.randn(B, Sq, Sk, generator=gen, device=DEV)
    visible = torch.arange(Sk, device=DEV)[None, None, :] < visible_counts(q_start, Sq, Sk, ratio)[:, :, None]
    grad_in = grad.masked_fill(~visible, float("nan"))  # masked positions must not leak into the gradient
    dq, dk, dw = ix.indexer_logits_backward(grad_in, q, k, w, scale, ratio, None)
    rq, rk, rw = oracle_backward(grad, q, k, w, scale, ratio, q_start)
    assert (dq.dtype, dk.dtype, dw.dtype) == (q.dtype, k.dtype, w.dtype)
    assert_grad_close(dq, rq, "dq")
    assert_grad_close(dk, rk, "dk")
    assert_grad_close(dw, rw, "dw")


# ----------------------------------------------------------------------------------------------------
# indexer_topk (dense, packed) and indexer_topk_paged
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,Sq,Sk,HI,DI,ratio,topk,ws_rows,dtype", [
    (2, 40, 61, 3, 32, 1, 7, 9, torch.float16),     # row chunks of 9 rows, one batch at a time
    (3, 17, 33, 16, 32, 1, 40, 40, torch.float16),  # topk > Sk; two whole batches per chunk
    (1, 24, 50, 1, 32, 2, 16, None, torch.float32),  # default workspace (one chunk), ratio 2
])
def test_topk_fused(small_tiles, poisoned_empty, B, Sq, Sk, HI, DI, ratio, topk, ws_rows, dtype):
    gen = gen_for(21 + Sq)
    q, k, w = make_inputs(B, Sq, Sk, HI, DI, dtype, gen, plateau_rows=6, dup_keys=5)
    ws = None if ws_rows is None else ws_rows * Sk * 4
    idx, val = ix.indexer_topk(q, k, w, topk, 0.8, ratio, None, None, None, workspace_bytes=ws)
    ref, bound, visible = oracle_logits(q, k, w, 0.8, ratio, default_q_start(B, Sq, Sk, ratio))
    assert idx.shape == (B, Sq, topk)
    check_topk(idx.flatten(0, 1), val.flatten(0, 1), ref.flatten(0, 1), bound.flatten(0, 1),
               visible.flatten(0, 1), topk)


def test_topk_fused_never_reads_hidden_scores(small_tiles, monkeypatch):
    """The fused path leaves the score tiles a row cannot see unwritten (FILL_HIDDEN=False): poison every fresh
    float buffer with a huge finite score (NaN would never be selected anyway), so a read past a row's visible
    length would pick it."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(1e30)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    gen = gen_for(77)
    B, Sq, Sk, HI, DI, ratio, topk = 2, 40, 61, 3, 32, 1, 30
    q, k, w = make_inputs(B, Sq, Sk, HI, DI, torch.float16, gen)
    idx, val = ix.indexer_topk(q, k, w, topk, 0.8, ratio, None, None, None, workspace_bytes=9 * Sk * 4)
    ref, bound, visible = oracle_logits(q, k, w, 0.8, ratio, default_q_start(B, Sq, Sk, ratio))
    check_topk(idx.flatten(0, 1), val.flatten(0, 1), ref.flatten(0, 1), bound.flatten(0, 1),
               visible.flatten(0, 1), topk)


def test_topk_all_plateau_takes_smallest_ids(small_tiles):
    """Every visible score is exactly 0: the selection must be ids 0..topk-1 (smaller index wins)."""
    gen = gen_for(5)
    q, k, w = make_inputs(1, 12, 40, 3, 32, torch.float16, gen)
    q, k = -q.abs(), k.abs()
    idx, val = ix.indexer_topk(q, k, w, 8, 1.0, 1, None, None, None)
    n_vis = visible_counts(default_q_start(1, 12, 40, 1), 12, 40, 1)[0]
    for r in range(12):
        got = sorted(i for i in idx[0, r].tolist() if i >= 0)
        assert got == list(range(min(8, int(n_vis[r])))), (r, got)
        assert bool((val[0, r][idx[0, r] >= 0] == 0).all())


def test_topk_packed_global_ids(small_tiles, poisoned_empty):
    gen = gen_for(31)
    HI, DI, topk, ratio = 3, 32, 6, 1
    seq_q, seq_k = [5, 0, 19, 11], [9, 4, 30, 3]  # includes a sequence with no queries and Sq > Sk
    cu_q = torch.tensor([0] + torch.tensor(seq_q).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + torch.tensor(seq_k).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q, k, w = make_inputs(1, sum(seq_q), sum(seq_k), HI, DI, torch.float16, gen, dup_keys=2)
    for q_start in (None, torch.tensor([4, 0, 11, 0], dtype=torch.int32, device=DEV)):
        idx, val = ix.indexer_topk(q, k, w, topk, 1.0, ratio, q_start, cu_q, cu_k)
        assert idx.shape == (1, sum(seq_q), topk)
        for b in range(len(seq_q)):
            qs, qe, ks, ke = cu_q[b].item(), cu_q[b + 1].item(), cu_k[b].item(), cu_k[b + 1].item()
            if qe == qs:
                continue
            qsb = default_q_start(1, qe - qs, ke - ks, ratio) if q_start is None else q_start[b:b + 1]
            ref, bound, visible = oracle_logits(q[:, qs:qe], k[:, ks:ke], w[:, qs:qe], 1.0, ratio, qsb)
            local = idx[0, qs:qe]
            assert bool(((local == -1) | ((local >= ks) & (local < ke))).all()), "ids must be global rows"
            local = torch.where(local >= 0, local - ks, local)
            check_topk(local, val[0, qs:qe], ref[0], bound[0], visible[0], topk)


def make_paged(k_dense, seq_lens, page, extra_pages, gen):
    """Scatter dense keys [B, S, DI] into a shuffled page pool; unused slots hold garbage (huge values)."""
    B, S, DI = k_dense.shape
    max_pages = (S + page - 1) // page
    n_pages = B * max_pages + extra_pages
    pool = torch.full((n_pages, page, DI), 3e4, dtype=k_dense.dtype, device=DEV)
    perm = torch.randperm(n_pages, generator=gen, device=DEV)[: B * max_pages].view(B, max_pages)
    block_table = perm.to(torch.int32)
    for b in range(B):
        for p in range((int(seq_lens[b]) + page - 1) // page):
            n = min(page, int(seq_lens[b]) - p * page)
            pool[perm[b, p], :n] = k_dense[b, p * page: p * page + n]
    # table slots past seq_len point at page 0 or are -1: the kernel must never read through them
    for b in range(B):
        used = (int(seq_lens[b]) + page - 1) // page
        block_table[b, used:] = -1 if b % 2 else 0
    return pool, block_table


@pytest.mark.parametrize("Sq,page,topk,HI", [(1, 16, 9, 3), (3, 8, 20, 16)])
def test_topk_paged(small_tiles, poisoned_empty, Sq, page, topk, HI):
    gen = gen_for(41 + Sq)
    B, S, DI = 3, 45, 32
    seq_lens = torch.tensor([45, 13, 2], dtype=torch.int32, device=DEV)
    q, k, w = make_inputs(B, Sq, S, HI, DI, torch.float16, gen, dup_keys=3)
    pool, block_table = make_paged(k, seq_lens, page, 2, gen)
    idx, val = ix.indexer_topk_paged(q, pool, block_table, seq_lens, w, topk, 0.9)
    assert idx.shape == (B, Sq, topk)
    for b in range(B):
        n = int(seq_lens[b])
        qsb = torch.tensor([n - Sq], dtype=torch.int32, device=DEV)  # query j at n - Sq + j sees 0..pos
        ref, bound, visible = oracle_logits(q[b:b + 1], k[b:b + 1, :n], w[b:b + 1], 0.9, 1, qsb)
        check_topk(idx[b], val[b], ref[0], bound[0], visible[0], topk)


# ----------------------------------------------------------------------------------------------------
# sparse_indexer_score
# ----------------------------------------------------------------------------------------------------

def oracle_sparse_score(q, k, w, indices, scale, topk_length):
    B, Sq, K = indices.shape
    Sk = k.shape[1]
    slot = torch.arange(K, device=indices.device)
    valid = (indices >= 0) & (indices < Sk)
    if topk_length is not None:
        valid &= slot[None, None, :] < topk_length[..., None].long()
    keys = torch.gather(k.double()[:, None].expand(B, Sq, Sk, k.shape[2]), 2,
                        indices.long().clamp(0, Sk - 1)[..., None].expand(B, Sq, K, k.shape[2]))
    s = torch.einsum("bqhd,bqjd->bqhj", q.double(), keys) * scale
    logits = torch.einsum("bqhj,bqh->bqj", s.relu(), w.double()).masked_fill(~valid, NEG_INF)
    probs = torch.softmax(logits, dim=-1)
    return torch.where(valid, probs, 0.0)  # rows with no valid slot: softmax gives NaN, zeroed here


@pytest.mark.parametrize("B,Sq,Sk,HI,DI,K,with_len,dtype", [
    (2, 9, 40, 3, 32, 70, True, torch.float16),
    (1, 7, 25, 16, 64, 13, False, torch.float32),
])
def test_sparse_indexer_score(poisoned_empty, B, Sq, Sk, HI, DI, K, with_len, dtype):
    gen = gen_for(51 + K)
    q, k, w = make_inputs(B, Sq, Sk, HI, DI, dtype, gen)
    indices = torch.randint(-3, Sk + 3, (B, Sq, K), generator=gen, device=DEV, dtype=torch.int32)
    indices[:, :, 1] = indices[:, :, 0]  # duplicates count once per slot
    indices[0, 0] = -1                   # an empty row
    topk_length = None
    if with_len:
        topk_length = torch.randint(0, K + 5, (B, Sq), generator=gen, device=DEV, dtype=torch.int32)
    out = ix.sparse_indexer_score(q, k, w, indices, 0.75, topk_length)
    ref = oracle_sparse_score(q, k, w, indices, 0.75, topk_length)
    assert out.shape == (B, Sq, K) and out.dtype == torch.float32
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) <= 2e-3
    assert bool((out[ref == 0] == 0).all()), "invalid slots must be exactly 0"
    assert bool((out[0, 0] == 0).all())


# ----------------------------------------------------------------------------------------------------
# GPU: DeepSeek shapes in bf16, odd sizes, determinism (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("B,Sq,Sk,HI,ratio", [
    (1, 4096, 8192, 64, 1),
    (2, 1000, 3001, 1, 1),
    (1, 777, 2049, 3, 4),
    (1, 513, 1999, 128, 1),
])
def test_gpu_logits_bf16(poisoned_empty, B, Sq, Sk, HI, ratio):
    gen = gen_for(61 + HI)
    q, k, w = make_inputs(B, Sq, Sk, HI, 128, torch.bfloat16, gen)
    out = ix.indexer_logits(q, k, w, 0.5, ratio, None)
    ref, _, visible = oracle_logits(q, k, w, 0.5, ratio, default_q_start(B, Sq, Sk, ratio), row_chunk=128)
    assert_scores_close(out, ref, visible)


@needs_cuda
def test_gpu_determinism_bitwise():
    gen = gen_for(71)
    q, k, w = make_inputs(1, 1500, 4099, 64, 128, torch.bfloat16, gen, plateau_rows=8)
    first = ix.indexer_logits(q, k, w, 1.0, 1, None)
    first_idx, first_val = ix.indexer_topk(q, k, w, 512, 1.0, 1, None, None, None)
    for _ in range(10):
        assert torch.equal(ix.indexer_logits(q, k, w, 1.0, 1, None), first)
        idx, val = ix.indexer_topk(q, k, w, 512, 1.0, 1, None, None, None)
        assert torch.equal(idx, first_idx) and torch.equal(val, first_val)


@needs_cuda
@pytest.mark.parametrize("Sq,Sk,HI,topk", [(4096, 8192, 64, 2048), (333, 5001, 3, 100)])
def test_gpu_topk_fused(Sq, Sk, HI, topk):
    gen = gen_for(81 + HI)
    q, k, w = make_inputs(1, Sq, Sk, HI, 128, torch.bfloat16, gen, plateau_rows=64, dup_keys=16)
    # a small workspace forces several chunks
    idx, val = ix.indexer_topk(q, k, w, topk, 1.0, 1, None, None, None, workspace_bytes=700 * Sk * 4)
    for r0 in range(0, Sq, 512):
        r1 = min(Sq, r0 + 512)
        qs = default_q_start(1, Sq, Sk, 1) + r0
        ref, bound, visible = oracle_logits(q[:, r0:r1], k, w[:, r0:r1], 1.0, 1, qs, row_chunk=128)
        check_topk(idx[0, r0:r1], val[0, r0:r1], ref[0], bound[0], visible[0], topk)


@needs_cuda
def test_gpu_topk_paged():
    gen = gen_for(91)
    B, Sq, S, HI, page, topk = 4, 2, 3000, 64, 64, 512
    seq_lens = torch.tensor([3000, 1, 513, 2048], dtype=torch.int32, device=DEV)
    q, k, w = make_inputs(B, Sq, S, HI, 128, torch.bfloat16, gen)
    pool, block_table = make_paged(k, seq_lens, page, 5, gen)
    idx, val = ix.indexer_topk_paged(q, pool, block_table, seq_lens, w, topk, 1.0)
    for b in range(B):
        n = int(seq_lens[b])
        qsb = torch.tensor([n - Sq], dtype=torch.int32, device=DEV)
        ref, bound, visible = oracle_logits(q[b:b + 1], k[b:b + 1, :n], w[b:b + 1], 1.0, 1, qsb)
        check_topk(idx[b], val[b], ref[0], bound[0], visible[0], topk)


@needs_cuda
def test_gpu_backward_and_sparse_score():
    gen = gen_for(101)
    B, Sq, Sk, HI = 1, 300, 700, 64
    q, k, w = make_inputs(B, Sq, Sk, HI, 128, torch.bfloat16, gen)
    q_start = default_q_start(B, Sq, Sk, 1)
    grad = torch.randn(B, Sq, Sk, generator=gen, device=DEV)
    dq, dk, dw = ix.indexer_logits_backward(grad, q, k, w, 0.5, 1, None)
    rq, rk, rw = oracle_backward(grad, q, k, w, 0.5, 1, q_start)
    assert_grad_close(dq, rq, "dq")
    assert_grad_close(dk, rk, "dk")
    assert_grad_close(dw, rw, "dw")
    indices = torch.randint(-1, Sk, (B, Sq, 2048), generator=gen, device=DEV, dtype=torch.int32)
    topk_length = torch.randint(0, 2049, (B, Sq), generator=gen, device=DEV, dtype=torch.int32)
    out = ix.sparse_indexer_score(q, k, w, indices, 0.5, topk_length)
    ref = oracle_sparse_score(q, k, w, indices, 0.5, topk_length)
    assert rel_err(out, ref) <= 2e-3
