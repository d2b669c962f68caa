"""Triton sparse MQA attention forward, paged decode, and the score-recompute ops vs naive fp64 oracles.

Without CUDA the kernels run in Triton's interpreter (set before triton is imported) on tiny fp16 shapes:
the interpreter's bf16 tl.dot is wrong on CPU, fp16 is right. With CUDA the same small tests run compiled
(fp16 and bf16), plus realistic shapes and a determinism check.
"""
import json
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from csrc_dsl.triton import sparse_attention_fwd as fwd  # noqa: E402  (after TRITON_INTERPRET)
from tests.sm90_compile import run_compiled  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
HALF_DTYPES = [torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float16]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (realistic shapes)")
# small tiles in the interpreter so tiny K still spans several tiles; the real defaults on the GPU
SMALL = fwd.FwdConfig(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1) if not HAS_CUDA else None


# ------------------------------------------------------------------------------------------------------
# Oracles (fp64, naive, chunked over queries so realistic GPU shapes fit)
# ------------------------------------------------------------------------------------------------------
def valid_slots(indices, num_rows, topk_length):
    slot = torch.arange(indices.shape[-1], device=indices.device)
    valid = (indices >= 0) & (indices < num_rows)
    if topk_length is not None:
        valid &= slot < topk_length.unsqueeze(-1)
    return valid


def oracle_sparse_attention(q, kv, indices, scale, d_v, sink=None, topk_length=None, chunk=16):
    """SPEC section 4 in fp64: (out [T,H,d_v] fp64, lse [T,H] fp64, +inf for rows with no valid slot)."""
    valid = valid_slots(indices, kv.shape[0], topk_length)
    outs, lses = [], []
    for t0 in range(0, q.shape[0], chunk):
        ok = valid[t0:t0 + chunk]
        rows = kv.double()[torch.where(ok, indices[t0:t0 + chunk], 0).long()]          # [c, K, D]
        s = torch.einsum("chd,ckd->chk", q[t0:t0 + chunk].double(), rows) * scale
        s = s.masked_fill(~ok[:, None, :], -math.inf)
        lse = torch.logsumexp(s, dim=-1)                                               # -inf if empty
        denom = lse if sink is None else torch.logaddexp(lse, sink.double()[None, :])
        empty = torch.isinf(lse) & (lse < 0)
        p = torch.exp(s - denom.masked_fill(empty, 0.0)[..., None]).masked_fill(~ok[:, None, :], 0.0)
        outs.append(torch.einsum("chk,ckd->chd", p, rows[..., :d_v]))
        lses.append(lse.masked_fill(empty, math.inf))
    return torch.cat(outs), torch.cat(lses)


def paged_to_flat_ids(indices, block_table, seq_lens, page_size):
    """Token positions [B,Sq,K] -> rows of kv_cache.view(-1, D), -1 where invalid (a naive loop)."""
    flat = torch.full_like(indices, -1)
    for b in range(indices.shape[0]):
        for s in range(indices.shape[1]):
            for j in range(indices.shape[2]):
                pos = int(indices[b, s, j])
                if 0 <= pos < int(seq_lens[b]):
                    flat[b, s, j] = int(block_table[b, pos // page_size]) * page_size + pos % page_size
    return flat


def oracle_sparse_attn_score(q, kv, lse, indices, scale, topk_length=None):
    valid = valid_slots(indices, kv.shape[0], topk_length)
    rows = kv.double()[torch.where(valid, indices, 0).long()]
    s = torch.einsum("thd,tkd->thk", q.double(), rows) * scale
    target = torch.exp(s - lse.double()[..., None]).sum(1).masked_fill(~valid, 0.0)
    return target / target.sum(-1, keepdim=True).clamp_min(1e-12)


def oracle_dense_attn_score(q, kv, scale, ratio, q_start):
    """Returns (scores, l1, lse) in fp64, with the true lse over visible keys (+inf when none)."""
    batch, seq_q, _, _ = q.shape
    seq_k = kv.shape[1]
    if q_start is None:
        q_start = torch.full((batch,), seq_k * ratio - seq_q, dtype=torch.int64)
    pos = q_start.cpu().long()[:, None] + torch.arange(seq_q)[None, :]                  # [B, Sq]
    visible = torch.arange(seq_k)[None, None, :] < torch.div(pos + 1, ratio, rounding_mode="floor")[..., None]
    visible = visible.to(q.device)
    s = torch.einsum("bqhd,bkd->bqhk", q.double(), kv.double()) * scale
    s = s.masked_fill(~visible[:, :, None, :], -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse)
    scores = torch.exp(s - lse[..., None]).sum(2).masked_fill(~visible, 0.0)
    return scores, scores.sum(-1), lse


# ------------------------------------------------------------------------------------------------------
# Checks (SPEC section 9)
# ------------------------------------------------------------------------------------------------------
def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_attention(out, lse, ref_out, ref_lse, dtype):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN in output"
    assert out.dtype == dtype and lse.dtype == torch.float32
    # rows with no valid slot: lse = +inf exactly, out = 0 exactly
    lonely = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse > 0), lonely), "lse = +inf pattern differs"
    assert (out[lonely] == 0).all()
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 2e-3
    assert rel_err(out, ref_out) <= tol, rel_err(out, ref_out)
    if (~lonely).any():
        # lse: fp32 accumulation of exact half products -> tight
        torch.testing.assert_close(lse[~lonely].double(), ref_lse[~lonely], rtol=2e-4, atol=2e-4)


# ------------------------------------------------------------------------------------------------------
# Input makers
# ------------------------------------------------------------------------------------------------------
def make_indices(gen, num_q, topk, num_rows, invalid_frac=0.15, dup_frac=0.1):
    """Random ids with -1, out-of-range ids (>= num_rows and very negative) and duplicates mixed in."""
    ids = torch.randint(0, num_rows, (num_q, topk), generator=gen)
    r = torch.rand(num_q, topk, generator=gen)
    ids[r < invalid_frac / 3] = -1
    ids[(r >= invalid_frac / 3) & (r < 2 * invalid_frac / 3)] = num_rows + 7
    ids[(r >= 2 * invalid_frac / 3) & (r < invalid_frac)] = -(2 ** 30)
    if topk > 1:
        dup = torch.rand(num_q, topk, generator=gen) < dup_frac
        ids[:, 1:][dup[:, 1:]] = ids[:, :1].expand(-1, topk - 1)[dup[:, 1:]]
    return ids.to(torch.int32)


def make_attention_inputs(seed, num_q, num_heads, dim, num_rows, topk, dtype, with_sink, with_len,
                          lonely_rows=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_q, num_heads, dim, generator=gen).to(dtype)
    kv = torch.randn(num_rows, dim, generator=gen).to(dtype)
    idx = make_indices(gen, num_q, topk, num_rows)
    sink = torch.randn(num_heads, generator=gen) * 2 if with_sink else None
    length = torch.randint(0, topk + 1, (num_q,), generator=gen).to(torch.int32) if with_len else None
    if lonely_rows and num_q > 1:
        idx[0] = -1  # a row with no valid slot
        if length is not None:
            length[-1] = 0
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return to(q), to(kv), to(idx), to(sink), to(length)


# ------------------------------------------------------------------------------------------------------
# sparse_attention: small shapes (interpreter on CPU, compiled on GPU)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("num_heads", [1, 3, 16])
@pytest.mark.parametrize("with_sink,with_len", [(False, False), (True, False), (False, True), (True, True)])
def test_sparse_attention_small(dtype, num_heads, with_sink, with_len):
    dim, d_v, num_rows, topk = 80, 64, 37, 45  # D = 64 + 16 (the same split as 512 + 64)
    q, kv, idx, sink, length = make_attention_inputs(
        1000 + num_heads, 4, num_heads, dim, num_rows, topk, dtype, with_sink, with_len)
    scale = dim ** -0.5
    ref_out, ref_lse = oracle_sparse_attention(q, kv, idx, scale, d_v, sink, length)
    out, lse = fwd._sparse_mqa_forward(q, kv, idx, scale, d_v, sink, length, config=SMALL, num_splits=1)
    check_attention(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("num_splits", [2, 3])
@pytest.mark.parametrize("with_sink", [False, True])
def test_sparse_attention_split_k(num_splits, with_sink):
    """The split-K path (partials + combine) against the oracle, incl. splits left empty by topk_length."""
    dtype, num_heads, dim, d_v = torch.float16, 3, 80, 64
    q, kv, idx, sink, length = make_attention_inputs(7 + num_splits, 3, num_heads, dim, 50, 61, dtype,
                                                     with_sink, True)
    scale = 0.3
    ref_out, ref_lse = oracle_sparse_attention(q, kv, idx, scale, d_v, sink, length)
    out, lse = fwd._sparse_mqa_forward(q, kv, idx, scale, d_v, sink, length, config=SMALL,
                                       num_splits=num_splits)
    check_attention(out, lse, ref_out, ref_lse, dtype)


def test_sparse_attention_public_entry():
    """The public function (default config, automatic split count: split on CPU) with odd sizes: D tail
    not a power of 2, d_v not a power of 2."""
    dtype, num_heads, dim, d_v = torch.float16, 5, 72, 48
    q, kv, idx, sink, length = make_attention_inputs(11, 3, num_heads, dim, 29, 70, dtype, True, True)
    ref_out, ref_lse = oracle_sparse_attention(q, kv, idx, 0.2, d_v, sink, length)
    out, lse = fwd.sparse_attention(q, kv, idx, 0.2, d_v, sink, length)
    check_attention(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("num_heads", [3, 16])
def test_sparse_attention_real_dims(num_heads):
    """The DeepSeek-V3.2 dims (D = 576 = 512 + 64, d_v = 512) and V4 (D = 512, no tail) on tiny T, K."""
    dtype = torch.float16
    for dim in (576, 512):
        q, kv, idx, sink, length = make_attention_inputs(3 + dim, 2, num_heads, dim, 40, 20, dtype, True, True)
        q = q / 4  # keep the D=576 logits in a range where softmax is not one-hot
        ref_out, ref_lse = oracle_sparse_attention(q, kv, idx, dim ** -0.5, 512, sink, length)
        out, lse = fwd._sparse_mqa_forward(q, kv, idx, dim ** -0.5, 512, sink, length, config=SMALL)
        check_attention(out, lse, ref_out, ref_lse, dtype)


def test_sparse_attention_64_head_block_on_8_warps():
    """The GPU default tile for H >= 64 (64 heads, 8 warps) on V3.2 dims, 40 heads (a partial block), odd K."""
    dtype, num_heads, dim = torch.float16, 40, 576
    config = fwd.FwdConfig(BLOCK_H=64, BLOCK_N=16, num_warps=8, num_stages=1)
    q, kv, idx, sink, length = make_attention_inputs(77, 2, num_heads, dim, 40, 37, dtype, True, True)
    q = q / 4
    ref_out, ref_lse = oracle_sparse_attention(q, kv, idx, dim ** -0.5, 512, sink, length)
    out, lse = fwd._sparse_mqa_forward(q, kv, idx, dim ** -0.5, 512, sink, length, config=config, num_splits=1)
    check_attention(out, lse, ref_out, ref_lse, dtype)


def _default_launches_shared_memory():
    """Run in a fresh interpreter without TRITON_INTERPRET: [[launch, shared bytes], ...] of the bf16 defaults."""
    from tools.sparse_fwd_compile_check import compile_fwd_for_sm90, default_launches

    rows = [[f"D={dim} {config} split={split}", compile_fwd_for_sm90(config, dim, split=split).metadata.shared]
            for config, dim, split in default_launches()]
    print(json.dumps(rows))
    return rows


def test_default_launches_fit_sm90_shared_memory():
    """Compiles every launch the bf16 defaults make (H 16..128, D 512 / 576, prefill and split-K decode) for sm_90
    and checks the shared memory each asks for fits an H100 block (227 KB). A setting that compiles but asks for
    more fails only at launch on the GPU (2026-12-06: 274688 bytes, docs/experiments/triton-fwd-split-scores.patch)."""
    from tools.sparse_fwd_compile_check import SM90_MAX_SHARED

    stdout = run_compiled("from tests.test_triton_sparse_attention_fwd import _default_launches_shared_memory as c; c()")
    rows = json.loads(stdout.strip().splitlines()[-1])
    assert len(rows) >= 6
    too_big = [(launch, shared) for launch, shared in rows if shared > SM90_MAX_SHARED]
    assert not too_big, too_big


def test_sparse_attention_all_invalid_and_empty():
    """Every row lonely (sink present too): out = 0 and lse = +inf, no NaN. K = 0 and T = 0 work."""
    q, kv, idx, sink, _ = make_attention_inputs(5, 3, 3, 80, 10, 9, torch.float16, True, False)
    idx = torch.where(idx >= 0, idx + 10, idx)  # everything out of range or negative
    out, lse = fwd._sparse_mqa_forward(q, kv, idx, 0.1, 64, sink, None, config=SMALL)
    assert (out == 0).all() and torch.isinf(lse).all() and (lse > 0).all()
    out, lse = fwd.sparse_attention(q, kv, idx[:, :0].contiguous(), 0.1, 64, sink, None)
    assert out.shape == (3, 3, 64) and (out == 0).all() and (lse == math.inf).all()
    out, lse = fwd.sparse_attention(q[:0], kv, idx[:0], 0.1, 64, None, None)
    assert out.shape == (0, 3, 64) and lse.shape == (0, 3)


def test_sparse_attention_duplicates_count_twice():
    """A row that selects the same id twice weighs it twice (autograd-of-gather semantics)."""
    dtype = torch.float16
    q, kv, _, _, _ = make_attention_inputs(9, 1, 3, 80, 6, 4, dtype, False, False, lonely_rows=False)
    idx_dup = torch.tensor([[2, 2, 4, -1]], dtype=torch.int32, device=DEVICE)
    out, lse = fwd._sparse_mqa_forward(q, kv, idx_dup, 0.5, 64, None, None, config=SMALL)
    ref_out, ref_lse = oracle_sparse_attention(q, kv, idx_dup, 0.5, 64)
    check_attention(out, lse, ref_out, ref_lse, dtype)
    # lse of [2, 2, 4] = log(2 e^s2 + e^s4), not log(e^s2 + e^s4)
    s = (q[0].double() @ kv.double().T) * 0.5
    expect = torch.log(2 * torch.exp(s[:, 2]) + torch.exp(s[:, 4]))
    torch.testing.assert_close(lse[0].double(), expect, rtol=2e-4, atol=2e-4)


def test_num_splits_policy():
    """Split-K only for few programs, as many splits as fill ~2 waves, never splits too short to pay for
    their fp32 partials (the H100 measurements in _choose_num_splits)."""
    choose = fwd._choose_num_splits
    assert choose(num_programs=128, topk=2048, block_n=64, num_sms=132, heads_per_program=64) == 1
    assert choose(num_programs=64, topk=2048, block_n=32, num_sms=132, heads_per_program=16) == 4
    assert choose(num_programs=8, topk=2048, block_n=64, num_sms=132, heads_per_program=64) == 8
    assert choose(num_programs=1, topk=2048, block_n=32, num_sms=132, heads_per_program=1) == 64
    assert choose(num_programs=1, topk=40, block_n=32, num_sms=132, heads_per_program=1) == 1


# ------------------------------------------------------------------------------------------------------
# sparse_attention_decode (paged)
# ------------------------------------------------------------------------------------------------------
def make_paged_inputs(seed, batch, seq_q, num_heads, dim, topk, page_size, max_pages, dtype, with_sink,
                      with_len):
    gen = torch.Generator().manual_seed(seed)
    num_pages = batch * max_pages + 3
    kv_cache = torch.randn(num_pages, page_size, dim, generator=gen).to(dtype)
    seq_lens = torch.randint(1, max_pages * page_size + 1, (batch,), generator=gen).to(torch.int32)
    seq_lens[0] = max_pages * page_size  # one sequence uses its whole table
    # each sequence gets distinct physical pages in random order; unused table entries are garbage
    # (-1 or a huge page number) that valid ids must never reach
    block_table = torch.randperm(num_pages, generator=gen)[:batch * max_pages].view(batch, max_pages).int()
    for b in range(batch):
        used = (int(seq_lens[b]) + page_size - 1) // page_size
        block_table[b, used:] = torch.where(torch.rand(max_pages - used, generator=gen) < 0.5, -1, 10 ** 6).int()
    # token positions: mostly valid, plus -1, positions >= seq_len and beyond the table
    idx = (torch.rand(batch, seq_q, topk, generator=gen) * seq_lens[:, None, None].float()).long()
    r = torch.rand(batch, seq_q, topk, generator=gen)
    idx[r < 0.05] = -1
    idx[(r >= 0.05) & (r < 0.1)] = seq_lens.long()[:, None, None].expand(-1, seq_q, topk)[(r >= 0.05) & (r < 0.1)]
    idx[(r >= 0.1) & (r < 0.12)] = max_pages * page_size + 5
    idx = idx.to(torch.int32)
    q = torch.randn(batch, seq_q, num_heads, dim, generator=gen).to(dtype)
    sink = torch.randn(num_heads, generator=gen) if with_sink else None
    length = torch.randint(0, topk + 1, (batch, seq_q), generator=gen).int() if with_len else None
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return tuple(map(to, (q, kv_cache, block_table, seq_lens, idx, sink, length)))


def oracle_decode(q, kv_cache, block_table, seq_lens, idx, scale, d_v, sink, length):
    batch, seq_q, num_heads, dim = q.shape
    page_size = kv_cache.shape[1]
    flat = paged_to_flat_ids(idx.cpu(), block_table.cpu(), seq_lens.cpu(), page_size).to(idx.device)
    out, lse = oracle_sparse_attention(q.reshape(-1, num_heads, dim), kv_cache.reshape(-1, dim),
                                       flat.reshape(batch * seq_q, -1), scale, d_v, sink,
                                       None if length is None else length.reshape(-1))
    return out.view(batch, seq_q, num_heads, d_v), lse.view(batch, seq_q, num_heads)


@pytest.mark.parametrize("num_heads,with_sink,with_len,num_splits", [
    (1, False, False, 1), (3, True, True, 1), (16, True, False, 3), (3, False, True, None)])
def test_sparse_attention_decode_small(num_heads, with_sink, with_len, num_splits):
    dtype = torch.float16
    args = make_paged_inputs(20 + num_heads, 3, 2, num_heads, 80, 27, 4, 5, dtype, with_sink, with_len)
    q, kv_cache, block_table, seq_lens, idx, sink, length = args
    ref_out, ref_lse = oracle_decode(*args[:5], 0.25, 64, sink, length)
    batch, seq_q = q.shape[:2]
    page_size = kv_cache.shape[1]
    out, lse = fwd._sparse_mqa_forward(
        q.reshape(batch * seq_q, num_heads, -1), kv_cache.reshape(-1, q.shape[-1]),
        idx.reshape(batch * seq_q, -1), 0.25, 64, sink, None if length is None else length.reshape(-1),
        paged=(block_table, seq_lens, seq_q, page_size), config=SMALL, num_splits=num_splits)
    check_attention(out, lse, ref_out.reshape(out.shape), ref_lse.reshape(lse.shape), dtype)


def test_sparse_attention_decode_public_entry():
    dtype = torch.float16
    args = make_paged_inputs(31, 2, 1, 3, 80, 19, 8, 3, dtype, True, True)
    ref_out, ref_lse = oracle_decode(*args[:5], 0.25, 64, args[5], args[6])
    out, lse = fwd.sparse_attention_decode(*args[:5], 0.25, 64, args[5], args[6])
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    check_attention(out, lse, ref_out, ref_lse, dtype)


# ------------------------------------------------------------------------------------------------------
# Score recompute ops
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_heads,dim,with_len,block_h",
                         [(1, 80, False, None), (3, 80, True, None), (16, 64, True, None), (3, 576, False, None),
                          (40, 64, True, 16),   # 40 heads in blocks of 16: three partial rows summed
                          (100, 64, False, None)])  # one 128-head block (the default up to 128 heads)
def test_sparse_attn_score(num_heads, dim, with_len, block_h):
    dtype = torch.float16
    q, kv, idx, _, length = make_attention_inputs(40 + num_heads, 3, num_heads, dim, 31, 37, dtype, False,
                                                  with_len)
    q = q / 2
    scale = dim ** -0.5
    _, lse = oracle_sparse_attention(q, kv, idx, scale, 16, None, length)
    lse = lse.float()
    target = fwd.sparse_attn_score(q, kv, lse, idx, scale, length, block_h=block_h, block_n=16)
    ref = oracle_sparse_attn_score(q, kv, lse, idx, scale, length)
    # the kernel writes every entry of its partial rows (poisoned with NaN first); they sum to the target
    blocks = -(-num_heads // (block_h or 64))
    partial = torch.full((blocks, *idx.shape), float("nan"), device=DEVICE)
    fwd.head_summed_scores(q, kv, lse, idx, scale, length, partial, block_n=16)
    raw = partial.sum(0)
    assert not raw.isnan().any()
    assert rel_err(raw / raw.sum(-1, keepdim=True).clamp_min(1e-12), ref) <= 2e-3
    assert target.dtype == torch.float32 and target.shape == ref.shape
    assert not torch.isnan(target).any()
    valid = valid_slots(idx, kv.shape[0], length)
    assert (target[~valid] == 0).all()
    assert rel_err(target, ref) <= 2e-3, rel_err(target, ref)
    # rows with a valid slot sum to 1; lonely rows are all 0
    sums = target.sum(-1)
    has = valid.any(-1)
    torch.testing.assert_close(sums[has], torch.ones_like(sums[has]), rtol=1e-5, atol=1e-5)
    assert (sums[~has] == 0).all()


@pytest.mark.parametrize("num_heads,ratio,with_q_start",
                         [(1, 1, False), (3, 4, True), (16, 1, True), (3, 2, False)])
def test_dense_attn_score(num_heads, ratio, with_q_start):
    dtype = torch.float16
    gen = torch.Generator().manual_seed(50 + num_heads + ratio)
    batch, seq_q, seq_k, dim = 2, 5, 37, 80
    q = (torch.randn(batch, seq_q, num_heads, dim, generator=gen) / 2).to(dtype).to(DEVICE)
    kv = torch.randn(batch, seq_k, dim, generator=gen).to(dtype).to(DEVICE)
    # q_start may hide every key from the first queries (lse = +inf rows)
    q_start = torch.tensor([-3, 20], dtype=torch.int32) if with_q_start else None
    ref_scores, ref_l1, lse = oracle_dense_attn_score(q, kv, dim ** -0.5, ratio, q_start)
    lse = lse.float()
    q_start_dev = None if q_start is None else q_start.to(DEVICE)
    scores, l1 = fwd.dense_attn_score(q, kv, lse, dim ** -0.5, ratio, q_start_dev)
    assert scores.shape == (batch, seq_q, seq_k) and l1.shape == (batch, seq_q)
    assert not torch.isnan(scores).any()
    assert ((scores == 0) | (ref_scores != 0)).all() and (scores[ref_scores == 0] == 0).all()
    assert rel_err(scores, ref_scores) <= 2e-3, rel_err(scores, ref_scores)
    assert rel_err(l1, ref_l1) <= 2e-3


def test_dense_attn_score_small_blocks():
    """Several key tiles per query and heads in several blocks (40 heads in blocks of 16: three partial rows
    summed), incl. rows that see no key; the kernel writes every entry of its partial rows (poisoned first)."""
    dtype = torch.float16
    gen = torch.Generator().manual_seed(77)
    q = (torch.randn(2, 9, 40, 80, generator=gen) / 2).to(dtype).to(DEVICE)
    kv = torch.randn(2, 40, 80, generator=gen).to(dtype).to(DEVICE)
    q_start = torch.tensor([-5, 3], dtype=torch.int32)
    ref_scores, ref_l1, lse = oracle_dense_attn_score(q, kv, 0.1, 4, q_start)
    q_start = q_start.to(DEVICE)
    scores, l1 = fwd.dense_attn_score(q, kv, lse.float(), 0.1, 4, q_start, block_h=16, block_n=16)
    assert (scores[ref_scores == 0] == 0).all()
    assert rel_err(scores, ref_scores) <= 2e-3 and rel_err(l1, ref_l1) <= 2e-3
    partial = torch.full((3, 18, 40), float("nan"), device=DEVICE)
    fwd.head_summed_scores(q.view(18, 40, 80), kv, lse.float(), None, 0.1, None, partial, block_n=16,
                           dense=(9, 4, q_start))
    assert not partial.isnan().any() and rel_err(partial.sum(0).view(2, 9, 40), ref_scores) <= 2e-3


# ------------------------------------------------------------------------------------------------------
# GPU: realistic shapes, bf16, determinism
# ------------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dim", [576, 512])
@pytest.mark.parametrize("num_heads,topk", [(1, 2000), (16, 2048), (64, 128), (128, 2000), (128, 2048)])
def test_sparse_attention_gpu(dim, num_heads, topk):
    dtype = torch.bfloat16
    q, kv, idx, sink, length = make_attention_inputs(dim + num_heads + topk, 257, num_heads, dim, 8193,
                                                     topk, dtype, num_heads != 64, num_heads != 16)
    scale = dim ** -0.5
    ref_out, ref_lse = oracle_sparse_attention(q, kv, idx, scale, 512, sink, length)
    out, lse = fwd.sparse_attention(q, kv, idx, scale, 512, sink, length)
    check_attention(out, lse, ref_out, ref_lse, dtype)


@requires_cuda
@pytest.mark.parametrize("num_heads,batch,seq_q", [(128, 4, 1), (16, 3, 2), (64, 33, 1)])
def test_sparse_attention_decode_gpu(num_heads, batch, seq_q):
    dtype = torch.bfloat16
    args = make_paged_inputs(num_heads + batch, batch, seq_q, num_heads, 576, 2048, 64, 40, dtype, True,
                             batch != 4)
    ref_out, ref_lse = oracle_decode(*args[:5], 576 ** -0.5, 512, args[5], args[6])
    out, lse = fwd.sparse_attention_decode(*args[:5], 576 ** -0.5, 512, args[5], args[6])
    check_attention(out, lse, ref_out, ref_lse, dtype)


@requires_cuda
def test_sparse_attention_deterministic_gpu():
    """Bitwise identical over 10 runs, for the plain path and the split-K path."""
    q, kv, idx, sink, length = make_attention_inputs(99, 257, 128, 576, 8193, 2048, torch.bfloat16, True, True)
    for num_q in (257, 2):  # 2 queries -> split-K
        first = fwd.sparse_attention(q[:num_q], kv, idx[:num_q], 0.05, 512, sink, length[:num_q])
        for _ in range(9):
            again = fwd.sparse_attention(q[:num_q], kv, idx[:num_q], 0.05, 512, sink, length[:num_q])
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@requires_cuda
@pytest.mark.parametrize("num_heads,dim", [(64, 576), (128, 576), (100, 512), (40, 576)])
def test_score_ops_gpu(num_heads, dim):
    """Realistic shapes: one 128-head block (H = 100, 128) or one 64-head block (40, 64) by default, and two
    partial rows written into a NaN-poisoned buffer (every entry must be written)."""
    dtype = torch.bfloat16
    q, kv, idx, _, length = make_attention_inputs(123, 65, num_heads, dim, 8193, 2048, dtype, False, True)
    scale = dim ** -0.5
    _, lse = oracle_sparse_attention(q, kv, idx, scale, 16, None, length)
    target = fwd.sparse_attn_score(q, kv, lse.float(), idx, scale, length)
    assert rel_err(target, oracle_sparse_attn_score(q, kv, lse.float(), idx, scale, length)) <= 2e-3
    partial = torch.full((2, *idx.shape), float("nan"), device="cuda")
    fwd.head_summed_scores(q, kv, lse.float(), idx, scale, length, partial)
    assert not partial.isnan().any()

    gen = torch.Generator().manual_seed(5)
    qd = torch.randn(2, 64, num_heads, dim, generator=gen).to(dtype).cuda()
    kvd = torch.randn(2, 300, dim, generator=gen).to(dtype).cuda()
    ref_scores, ref_l1, lse_d = oracle_dense_attn_score(qd, kvd, scale, 4, None)
    scores, l1 = fwd.dense_attn_score(qd, kvd, lse_d.float(), scale, 4, None)
    assert rel_err(scores, ref_scores) <= 2e-3 and rel_err(l1, ref_l1) <= 2e-3


@requires_cuda
def test_score_ops_deterministic_and_graph_replay_gpu():
    """Both score ops through the dispatched ops: bitwise identical over 10 runs, and a CUDA graph replayed on
    fresh inputs equals eager on them (H = 128: one program per query; H = 80: two partial rows summed)."""
    import dsa_ops  # noqa: F401  (registers torch.ops.dsa)

    for num_heads in (128, 80):
        q, kv, idx, _, length = make_attention_inputs(7, 300, num_heads, 576, 4000, 2048, torch.bfloat16, False,
                                                      True)
        _, lse = oracle_sparse_attention(q, kv, idx, 576 ** -0.5, 16, None, length)
        lse = lse.float()
        qd, kvd = q[None, :256].contiguous(), kv[None, :1024].contiguous()
        lse_d = torch.rand(1, 256, num_heads, device="cuda") * 4 + 2

        def both():
            target = torch.ops.dsa.sparse_attn_score(q, kv, lse, idx, 576 ** -0.5, length)
            scores, l1 = torch.ops.dsa.dense_attn_score(qd, kvd, lse_d, 576 ** -0.5, 2, None)
            return target, scores, l1

        first = both()
        for _ in range(9):
            assert all(torch.equal(a, b) for a, b in zip(first, both()))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            both()                                     # warm-up before capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = both()
        for t in (q, kv, qd, kvd):
            t.copy_(torch.randn_like(t, dtype=torch.float32).to(t.dtype))
        lse_d.copy_(torch.rand_like(lse_d) * 4 + 2)
        graph.replay()
        want = both()
        assert all(torch.equal(c, w) for c, w in zip(captured, want))
        assert not torch.equal(captured[0], first[0])
