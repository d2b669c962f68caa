"""Triton sparse MQA attention backward (csrc_dsl/triton/sparse_attention_bwd.py) vs fp64 autograd.

Without CUDA the kernel runs in Triton's interpreter (set before triton is imported). The
interpreter's tl.dot is wrong for bf16 on CPU, so interpreter cases use fp16 / fp32 inputs.
The oracle is torch.autograd in fp64 through a naive differentiable forward written here;
its out / lse are the kernel's inputs, as they would be in training.
"""

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from csrc_dsl.triton.sparse_attention_bwd import (  # noqa: E402
    CONFIG_ENV,
    MAX_GRID_YZ,
    WORKSPACE_ENV,
    dq_launch,
    pick_config,
    query_chunk,
    sparse_attention_backward,
)
from tests.sm90_compile import run_compiled  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


# ----------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------
def valid_slots(indices, num_kv_rows, topk_length):
    valid = (indices >= 0) & (indices < num_kv_rows)
    if topk_length is not None:
        slot = torch.arange(indices.shape[1], device=indices.device)
        valid &= slot[None, :] < topk_length[:, None].long()
    return valid


def naive_forward(q, kv, indices, scale, d_v, attn_sink, topk_length):
    """Differentiable SPEC section 4 forward: (out, lse). Gathers all rows: tiny shapes only.

    Masked entries never see -inf inside a differentiated op (its backward would give NaN for a
    row without keys): the logsumexp takes -1e300 there, the exp takes -inf only after a where.
    """
    valid = valid_slots(indices, kv.shape[0], topk_length)
    gathered = kv[indices.clamp(0, kv.shape[0] - 1).long()]  # [T, K, D]
    scores = scale * torch.einsum("thd,tkd->thk", q, gathered)
    mask = valid[:, None, :]
    lse = torch.logsumexp(torch.where(mask, scores, torch.full_like(scores, -1e300)), dim=-1)
    big_l = torch.logaddexp(lse, attn_sink[None, :]) if attn_sink is not None else lse
    exponent = torch.where(mask, scores - big_l[..., None], torch.full_like(scores, float("-inf")))
    out = torch.einsum("thk,tkd->thd", torch.exp(exponent), gathered[..., :d_v])
    lse = torch.where(valid.any(dim=1)[:, None], lse, torch.full_like(lse, float("inf")))
    return out, lse


def oracle(dout, q, kv, indices, scale, d_v, attn_sink, topk_length, grad_lse=None):
    """(out, lse, dq, dkv, d_sink) in fp64 by autograd; `grad_lse` [T, H] (optional) is the gradient
    reaching lse (rows with no key: their lse is a constant +inf, it reaches nothing)."""
    q64 = q.detach().double().requires_grad_(True)
    kv64 = kv.detach().double().requires_grad_(True)
    sink64 = attn_sink.detach().double().requires_grad_(True) if attn_sink is not None else None
    out, lse = naive_forward(q64, kv64, indices, scale, d_v, sink64, topk_length)
    inputs = [q64, kv64] + ([sink64] if sink64 is not None else [])
    if grad_lse is None:
        grads = torch.autograd.grad(out, inputs, grad_outputs=dout.double())
    else:
        grads = torch.autograd.grad([out, lse], inputs,
                                    grad_outputs=[dout.double(), grad_lse.double()])
    d_sink = grads[2] if sink64 is not None else torch.zeros(q.shape[1], dtype=torch.float64)
    return out.detach(), lse.detach(), grads[0], grads[1], d_sink


# ----------------------------------------------------------------------------------------------
# Inputs and checks
# ----------------------------------------------------------------------------------------------
def make_case(num_tokens, num_kv_rows, num_heads, topk, head_dim, d_v, dtype, seed, *, sink=False,
              with_topk_length=False, invalid_ids=True, duplicates=True, lonely_rows=(),
              grad_lse=False, sink_offset=0.0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    kv = torch.randn(num_kv_rows, head_dim, generator=gen)
    dout = torch.randn(num_tokens, num_heads, d_v, generator=gen)
    indices = torch.randint(0, num_kv_rows, (num_tokens, topk), generator=gen, dtype=torch.int32)
    if invalid_ids:
        # -1 pads and out-of-range ids, both invalid.
        pick = torch.rand(num_tokens, topk, generator=gen)
        indices[pick < 0.1] = -1
        indices[(pick >= 0.1) & (pick < 0.15)] = num_kv_rows + 3
    if duplicates and topk >= 4:
        indices[:, 1] = indices[:, 0]  # the same row twice in one query: counts twice
        indices[:, topk - 1] = indices[:, 0]
    for row in lonely_rows:
        indices[row] = -1  # no valid key: lse = +inf, no gradient
    topk_length = None
    if with_topk_length:
        topk_length = torch.randint(0, topk + 1, (num_tokens,), generator=gen, dtype=torch.int32)
        topk_length[0] = topk  # keep one full row
    attn_sink = torch.randn(num_heads, generator=gen) + sink_offset if sink else None
    scale = head_dim ** -0.5
    # Drawn last so that the cases without it keep their inputs. Nonzero on lonely rows too.
    d_lse = torch.randn(num_tokens, num_heads, generator=gen) if grad_lse else None

    q, kv, dout = q.to(dtype), kv.to(dtype), dout.to(dtype)
    ref_out, ref_lse, ref_dq, ref_dkv, ref_dsink = oracle(
        dout, q, kv, indices, scale, d_v, attn_sink, topk_length, d_lse)
    case = dict(
        dout=dout.to(device), q=q.to(device), kv=kv.to(device),
        out=ref_out.to(dtype).to(device), lse=ref_lse.float().to(device),
        indices=indices.to(device), scale=scale, d_v=d_v,
        attn_sink=attn_sink.float().to(device) if sink else None,
        topk_length=topk_length.to(device) if topk_length is not None else None,
        grad_lse=d_lse.to(device) if d_lse is not None else None,
    )
    return case, (ref_dq, ref_dkv, ref_dsink)


def run(case, deterministic):
    return sparse_attention_backward(
        case["dout"], case["q"], case["kv"], case["out"], case["lse"], case["indices"],
        case["scale"], case["d_v"], case["attn_sink"], case["topk_length"], deterministic,
        case.get("grad_lse"))


def assert_close_grad(name, got, ref, rel_tol=2e-2, min_cos=0.999):
    got = got.detach().double().cpu()
    ref = ref.double().cpu()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    ref_norm = ref.norm().item()
    if ref_norm == 0.0:
        assert got.abs().max().item() == 0.0, f"{name}: expected all zeros"
        return
    rel = (got - ref).norm().item() / ref_norm
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
    assert rel <= rel_tol, f"{name}: relative error {rel:.3e} > {rel_tol}"
    assert cos >= min_cos, f"{name}: cosine {cos:.6f} < {min_cos}"


def check(case, refs, deterministic):
    dq, dkv, d_sink = run(case, deterministic)
    ref_dq, ref_dkv, ref_dsink = refs
    assert dq.dtype == case["q"].dtype and dkv.dtype == case["kv"].dtype
    assert d_sink.dtype == torch.float32 and d_sink.shape == (case["q"].shape[1],)
    assert_close_grad("dq", dq, ref_dq)
    assert_close_grad("dkv", dkv, ref_dkv)
    assert_close_grad("d_sink", d_sink, ref_dsink)
    return dq, dkv, d_sink


# ----------------------------------------------------------------------------------------------
# Interpreter-sized cases (also run on CUDA)
# ----------------------------------------------------------------------------------------------
SMALL_DTYPE = torch.float16  # bf16 tl.dot is wrong in the CPU interpreter


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize(
    "num_heads,sink,with_topk_length",
    [(1, False, False), (3, True, True), (16, True, False), (16, False, True)],
)
def test_small_shapes(num_heads, sink, with_topk_length, deterministic):
    # D = 64 value dims + 16 rope dims; K not a multiple of the tile; S not a multiple of anything.
    case, refs = make_case(num_tokens=4, num_kv_rows=45, num_heads=num_heads, topk=37, head_dim=80,
                           d_v=64, dtype=SMALL_DTYPE, seed=100 + num_heads, sink=sink,
                           with_topk_length=with_topk_length, lonely_rows=(2,))
    dq, dkv, d_sink = check(case, refs, deterministic)
    # Lonely row 2 has no valid key: no gradient at all.
    assert dq[2].abs().max().item() == 0.0
    # kv rows that no valid slot selects get exactly zero.
    valid = valid_slots(case["indices"].cpu(), case["kv"].shape[0],
                        case["topk_length"].cpu() if case["topk_length"] is not None else None)
    selected = torch.zeros(case["kv"].shape[0], dtype=torch.bool)
    selected[case["indices"].cpu()[valid].long()] = True
    assert (~selected).any(), "test setup: want some unselected kv rows"
    assert dkv.cpu()[~selected].abs().max().item() == 0.0


def test_fp32_no_rope_many_tiles():
    # D == d_v (DeepSeek-V4 layout, no rope part); K spans several tiles; fp32 inputs.
    case, refs = make_case(num_tokens=3, num_kv_rows=50, num_heads=3, topk=70, head_dim=64,
                           d_v=64, dtype=torch.float32, seed=7, sink=True)
    check(case, refs, deterministic=False)
    check(case, refs, deterministic=True)


def test_all_rows_lonely():
    case, refs = make_case(num_tokens=2, num_kv_rows=20, num_heads=3, topk=8, head_dim=80, d_v=64,
                           dtype=SMALL_DTYPE, seed=3, sink=True, lonely_rows=(0, 1))
    for deterministic in (False, True):
        dq, dkv, d_sink = run(case, deterministic)
        assert torch.isfinite(dq).all() and torch.isfinite(dkv).all() and torch.isfinite(d_sink).all()
        assert dq.abs().max().item() == 0.0 and dkv.abs().max().item() == 0.0
        assert d_sink.abs().max().item() == 0.0


def test_real_head_dims():
    # D = 576 = 512 value + 64 rope, as in DeepSeek-V3.2, on a tiny token count.
    case, refs = make_case(num_tokens=2, num_kv_rows=30, num_heads=3, topk=20, head_dim=576,
                           d_v=512, dtype=SMALL_DTYPE, seed=11, sink=True, with_topk_length=True)
    check(case, refs, deterministic=False)
    check(case, refs, deterministic=True)


def test_deterministic_is_bitwise_repeatable():
    case, refs = make_case(num_tokens=5, num_kv_rows=9, num_heads=16, topk=40, head_dim=80, d_v=64,
                           dtype=SMALL_DTYPE, seed=5, sink=True)  # 9 rows: many slots per row
    first = check(case, refs, deterministic=True)
    for _ in range(2):
        again = run(case, deterministic=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# The launch variants that apply to blocks of more heads than the other tests use, at H = 40:
# - SCORE_STACKED: one 64-head block, partly masked, S and dP as one product over q and dO stacked in
#   M (dO has no rope part); K = 70 spans whole score tiles and a partial one; STACKED_IDS_AHEAD
#   loads each tile's ids a step ahead (the last step's lookahead lies past K, all masked).
# - DQ_SPLIT: dq programs of a wider head block and half of the columns each (value and rope);
#   scaled down to 16-head blocks elsewhere and 32-head dq blocks, so that H = 40 has two dq head
#   blocks, the second partly masked; d_v = 80 leaves the second value half partly masked.
BLOCK_SETTINGS = {
    "two_products": "default,SCORE_STACKED=0",
    "stacked": "default,SCORE_STACKED=1,STACKED_IDS_AHEAD=0",
    "stacked_ids_ahead": "default,SCORE_STACKED=1,STACKED_IDS_AHEAD=1",
    "dq_all_columns": "default,BLOCK_H=16,DQ_SPLIT=0,DQ_BLOCK_N=32",
    "dq_column_halves": "default,BLOCK_H=16,DQ_SPLIT=1,DQ_SPLIT_BLOCK_H=32,DQ_BLOCK_N=32",
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize("setting", sorted(BLOCK_SETTINGS))
@pytest.mark.parametrize("head_dim,d_v", [(96, 64), (112, 80), (576, 512)])
def test_head_block_settings(monkeypatch, setting, head_dim, d_v, deterministic):
    # Lonely row, invalid and duplicate ids, topk_length, sink.
    case, refs = make_case(num_tokens=3, num_kv_rows=30, num_heads=40, topk=70, head_dim=head_dim,
                           d_v=d_v, dtype=SMALL_DTYPE, seed=31 + head_dim, sink=True,
                           with_topk_length=True, lonely_rows=(1,))
    monkeypatch.setenv(CONFIG_ENV, BLOCK_SETTINGS[setting])
    dq, dkv, d_sink = check(case, refs, deterministic=deterministic)
    assert dq[1].abs().max().item() == 0.0


def test_dq_column_split_launch():
    # The split applies only where it halves the gather: more heads than one block, 16-bit inputs,
    # column halves of at least 16 (tl.dot's smallest N).
    config = pick_config(128, "default,DQ_SPLIT=1")
    assert dq_launch(config, 128, 2, 512, 64, True) == (128, 2)
    assert dq_launch(config, 96, 2, 512, 64, True) == (128, 2)
    assert dq_launch(config, 128, 4, 512, 64, True) == (64, 1)      # fp32
    assert dq_launch(config, 128, 2, 512, 16, True) == (64, 1)      # rope halves of 8 columns
    assert dq_launch(config, 128, 2, 512, 16, False) == (128, 2)    # no rope part
    assert dq_launch(pick_config(64, "default,DQ_SPLIT=1"), 64, 2, 512, 64, True) == (64, 1)
    assert dq_launch(pick_config(128, "default,DQ_SPLIT=0"), 128, 2, 512, 64, True) == (64, 1)


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_query_chunks_and_head_blocks(monkeypatch, deterministic):
    # A tiny workspace budget forces one query per chunk (several launches, and in the
    # deterministic mode several reduction passes over the same kv rows); BLOCK_H=16 with H=20
    # gives two head blocks, the second one partly masked; two dkv tiles of 16 slots (21 slots,
    # fewer where topk_length says so).
    case, refs = make_case(num_tokens=5, num_kv_rows=12, num_heads=20, topk=21, head_dim=80,
                           d_v=64, dtype=SMALL_DTYPE, seed=21, sink=True, with_topk_length=True,
                           lonely_rows=(3,))
    monkeypatch.setenv(WORKSPACE_ENV, "0")
    monkeypatch.setenv(CONFIG_ENV, "default,BLOCK_H=16,DKV_BLOCK_D=32,DKV_BLOCK_N=16,"
                                   "DKV_DET_BLOCK_N=16,DQ_BLOCK_N=16")
    first = check(case, refs, deterministic)
    if deterministic:
        again = run(case, deterministic)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_query_chunk_fits_the_grid(monkeypatch):
    """A chunk's queries are a grid axis of the dkv launch, which CUDA caps at 65535: a V4 backward (K = 512)
    of 16 heads over 70000 tokens fits 65536 queries into the default 2 GiB, one more than a launch takes."""
    monkeypatch.delenv(WORKSPACE_ENV, raising=False)
    per_query = 16 * 512 * 2 * 2                    # P and dS in bf16 per (head, slot)
    assert (2048 << 20) // per_query == MAX_GRID_YZ + 1
    assert query_chunk(70000, per_query) == MAX_GRID_YZ
    assert query_chunk(1000, per_query) == 1000
    monkeypatch.setenv(WORKSPACE_ENV, "1")          # 1 MiB
    assert query_chunk(1000, per_query) == (1 << 20) // per_query
    monkeypatch.setenv(WORKSPACE_ENV, "0")          # below one query: still one
    assert query_chunk(1000, per_query) == 1


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize("num_heads,sink,with_topk_length",
                         [(3, False, True), (3, True, False), (20, True, True)])
def test_grad_lse(num_heads, sink, with_topk_length, deterministic, monkeypatch):
    """A gradient of lse (merged split branches) shifts Delta by grad_lse * exp(L - lse); d_sink
    keeps the plain Delta (the sink is not in lse). Odd H, K, S, D; a lonely row with a nonzero
    grad_lse; H = 20 on BLOCK_H = 16 gives a partly masked second head block. The sink sits near
    lse (offset 3), so that exp(L - lse) = 1 + exp(sink - lse) is far from 1."""
    case, refs = make_case(num_tokens=4, num_kv_rows=29, num_heads=num_heads, topk=37, head_dim=80,
                           d_v=64, dtype=SMALL_DTYPE, seed=300 + num_heads + 2 * sink, sink=sink,
                           with_topk_length=with_topk_length, lonely_rows=(1,), grad_lse=True,
                           sink_offset=3.0)
    if num_heads > 16:
        monkeypatch.setenv(CONFIG_ENV, "default,BLOCK_H=16")
    dq, dkv, d_sink = check(case, refs, deterministic)
    assert dq[1].abs().max().item() == 0.0  # lonely row: its lse is a constant, no gradient
    # The shift matters here: without grad_lse, dq misses the oracle's by twice the tolerance.
    without = dict(case, grad_lse=None)
    dq_plain, _, d_sink_plain = run(without, deterministic)
    rel = ((dq_plain.double().cpu() - refs[0]).norm() / refs[0].norm()).item()
    assert rel > 4e-2, rel
    # d_sink does not depend on grad_lse at all.
    assert torch.equal(d_sink, d_sink_plain)
    # The reference (the CPU kernel) agrees with the same oracle.
    from dsa_ops.reference.attention import sparse_attention_backward as reference
    names = ("dout", "q", "kv", "out", "lse", "indices", "scale", "d_v", "attn_sink", "topk_length")
    cpu_args = [case[k].cpu() if torch.is_tensor(case[k]) else case[k] for k in names]
    ref_grads = reference(*cpu_args, deterministic, case["grad_lse"].cpu())
    for name, got, ref in zip(("dq", "dkv", "d_sink"), ref_grads, refs):
        assert_close_grad("reference " + name, got, ref)


def test_grad_lse_fp32_no_rope_and_zero_is_a_no_op():
    """fp32 inputs, D == d_v, K over several tiles, fp64 grad_lse; an all-zero grad_lse gives the
    bits of grad_lse=None."""
    case, refs = make_case(num_tokens=3, num_kv_rows=50, num_heads=3, topk=70, head_dim=64,
                           d_v=64, dtype=torch.float32, seed=8, sink=True, grad_lse=True,
                           sink_offset=4.0)
    case["grad_lse"] = case["grad_lse"].double()  # the op accepts fp32 or fp64
    check(case, refs, deterministic=False)
    plain = run(dict(case, grad_lse=None), deterministic=True)
    zero = run(dict(case, grad_lse=torch.zeros_like(case["grad_lse"])), deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))


def test_config_override_errors(monkeypatch):
    case, _ = make_case(num_tokens=1, num_kv_rows=4, num_heads=1, topk=4, head_dim=80, d_v=64,
                        dtype=SMALL_DTYPE, seed=0)
    monkeypatch.setenv(CONFIG_ENV, "default,NOT_A_KEY=3")
    with pytest.raises(ValueError, match="unknown key"):
        run(case, False)
    monkeypatch.setenv(CONFIG_ENV, "default,DKV_BLOCK_N=256")
    with pytest.raises(ValueError, match="must divide"):
        run(case, False)


def test_deterministic_matches_fast_closely():
    # Fixed-point sum vs fp32 atomics: the same math, different rounding only.
    case, _ = make_case(num_tokens=4, num_kv_rows=30, num_heads=3, topk=33, head_dim=80, d_v=64,
                        dtype=torch.float32, seed=9, sink=True)
    _, dkv_fast, _ = run(case, deterministic=False)
    _, dkv_det, _ = run(case, deterministic=True)
    rel = (dkv_det - dkv_fast).norm() / dkv_fast.norm()
    assert rel.item() < 1e-5


# ----------------------------------------------------------------------------------------------
# Realistic shapes (CUDA only)
# ----------------------------------------------------------------------------------------------
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def make_cuda_case(num_heads, topk, seed, *, num_tokens=257, num_kv_rows=8193, sink=True,
                   with_topk_length=True):
    """Realistic shapes in bf16; the oracle here is a chunked fp32 torch backward (fp64 would be
    too slow at these sizes), itself checked against fp64 autograd by the small tests' math."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    head_dim, d_v = 576, 512
    q = torch.randn(num_tokens, num_heads, head_dim, device="cuda", generator=gen).bfloat16()
    kv = torch.randn(num_kv_rows, head_dim, device="cuda", generator=gen).bfloat16()
    dout = torch.randn(num_tokens, num_heads, d_v, device="cuda", generator=gen).bfloat16()
    indices = torch.randint(0, num_kv_rows, (num_tokens, topk), device="cuda", generator=gen,
                            dtype=torch.int32)
    indices[:, 1] = indices[:, 0]
    indices[:, 5::97] = -1
    indices[3] = -1  # lonely row
    topk_length = None
    if with_topk_length:
        topk_length = torch.randint(topk // 2, topk + 1, (num_tokens,), device="cuda",
                                    generator=gen, dtype=torch.int32)
    attn_sink = torch.randn(num_heads, device="cuda", generator=gen) if sink else None
    scale = head_dim ** -0.5
    out, lse, ref = torch_reference(dout, q, kv, indices, scale, d_v, attn_sink, topk_length)
    case = dict(dout=dout, q=q, kv=kv, out=out.bfloat16(), lse=lse, indices=indices, scale=scale,
                d_v=d_v, attn_sink=attn_sink, topk_length=topk_length)
    return case, ref


def torch_reference(dout, q, kv, indices, scale, d_v, attn_sink, topk_length, chunk=16):
    """fp32 forward + backward by explicit formulas, chunked over queries (bounded memory)."""
    num_tokens, num_heads, _ = q.shape
    outs, lses, dqs = [], [], []
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    d_sink = torch.zeros(num_heads, dtype=torch.float32, device=q.device)
    for start in range(0, num_tokens, chunk):
        sl = slice(start, min(start + chunk, num_tokens))
        idx = indices[sl]
        valid = valid_slots(idx, kv.shape[0], topk_length[sl] if topk_length is not None else None)
        rows = idx.clamp(0, kv.shape[0] - 1).long()
        gathered = kv[rows].float()
        qf, dof = q[sl].float(), dout[sl].float()
        scores = (scale * torch.einsum("thd,tkd->thk", qf, gathered)).masked_fill(
            ~valid[:, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        big_l = torch.logaddexp(lse, attn_sink[None, :]) if attn_sink is not None else lse
        safe_l = torch.where(torch.isfinite(big_l), big_l, torch.zeros_like(big_l))
        probs = torch.exp(scores - safe_l[..., None]).masked_fill(~valid[:, None, :], 0.0)
        out = torch.einsum("thk,tkd->thd", probs, gathered[..., :d_v])
        delta = (out * dof).sum(-1)
        dp = torch.einsum("thd,tkd->thk", dof, gathered[..., :d_v])
        ds = probs * (dp - delta[..., None])
        dqs.append(scale * torch.einsum("thk,tkd->thd", ds, gathered))
        contrib = scale * torch.einsum("thk,thd->tkd", ds, qf)
        contrib[..., :d_v] += torch.einsum("thk,thd->tkd", probs, dof)
        contrib = contrib * valid[..., None]
        dkv.index_add_(0, rows.flatten(), contrib.flatten(0, 1))
        if attn_sink is not None:
            d_sink -= (torch.exp(attn_sink[None, :] - big_l) * delta).sum(0)
        outs.append(out)
        lses.append(torch.where(valid.any(1)[:, None], lse, torch.full_like(lse, float("inf"))))
    return torch.cat(outs), torch.cat(lses), (torch.cat(dqs), dkv, d_sink)


@cuda_only
@pytest.mark.parametrize("num_heads,topk", [(16, 128), (64, 2000), (128, 2048)])
def test_cuda_realistic(num_heads, topk):
    case, ref = make_cuda_case(num_heads, topk, seed=num_heads + topk)
    for deterministic in (False, True):
        # The op allocates its outputs; NaN-fill the memory the caching allocator will hand it,
        # so that an element the kernels never write shows up as NaN.
        poison = [torch.full_like(case["q"], float("nan")),
                  torch.full(case["kv"].shape, float("nan"), device="cuda")]
        del poison
        dq, dkv, d_sink = run(case, deterministic)
        assert_close_grad("dq", dq, ref[0])
        assert_close_grad("dkv", dkv, ref[1])
        assert_close_grad("d_sink", d_sink, ref[2])


@cuda_only
def test_cuda_deterministic_bitwise_10_runs():
    case, ref = make_cuda_case(64, 2048, seed=1, num_kv_rows=1000)  # many slots per kv row
    first = run(case, deterministic=True)
    assert_close_grad("dkv", first[1], ref[1])
    for _ in range(9):
        again = run(case, deterministic=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@cuda_only
@pytest.mark.parametrize("num_heads", [40, 128])
def test_cuda_graph_replay_matches_eager(num_heads):
    # The default launches (the stacked score product with its ids a step ahead; at H = 128 also the
    # dq column split) captured in a CUDA graph, then replayed on fresh inputs copied into the
    # captured ones: deterministic mode gives the eager bits, both modes the reference's values.
    case, _ = make_cuda_case(num_heads, 2048, seed=num_heads, num_tokens=67)
    fresh, fresh_ref = make_cuda_case(num_heads, 2048, seed=num_heads + 1, num_tokens=67)
    for deterministic in (True, False):
        static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run(static, deterministic)  # compiles the kernels before the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run(static, deterministic)
        for key, value in fresh.items():
            if isinstance(value, torch.Tensor):
                static[key].copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        if deterministic:
            eager = run(fresh, deterministic)
            for got, want in zip(captured, eager):
                assert torch.equal(got, want)
        for name, got, want in zip(("dq", "dkv", "d_sink"), captured, fresh_ref):
            assert_close_grad(name, got, want)


@pytest.mark.parametrize("rows, n", [(1, 8), (37, 48), (300, 512)])
def test_row_dot_matches_fp64(rows, n):
    """`row_dot` (the CuTe-DSL backward's Delta = out . dout): odd row counts, a width that is not a
    power of two, fresh random inputs; bf16 on the GPU, fp16 in the interpreter."""
    from csrc_dsl.triton.sparse_attention_bwd import row_dot

    dtype = torch.bfloat16 if HAS_CUDA else torch.float16
    g = torch.Generator(device=DEVICE).manual_seed(rows * 1000 + n)
    a = torch.randn(rows, 3, n, generator=g, device=DEVICE).to(dtype)
    b = torch.randn(rows, 3, n, generator=g, device=DEVICE).to(dtype)
    got = row_dot(a, b)
    assert got.dtype == torch.float32 and got.shape == (rows, 3)
    want = (a.double() * b.double()).sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * n ** 0.5)
    with pytest.raises(ValueError, match="contiguous"):
        row_dot(a[..., ::2], b[..., ::2])


def test_dkv_settings_compile_for_sm90():
    """The dkv kernel, default (32-slot tiles) and with 64-slot tiles, compiled for sm_90 at H = 64 and 128
    (tools/sparse_bwd_compile_check.py): no spills, shared memory inside an H100 block, and the default fits at
    least two CTAs per SM at both H (the reason for its tile: 64-slot tiles fit one at H = 128, BENCHMARKS.md)."""
    from tools.sparse_fwd_compile_check import SM90_MAX_SHARED

    stdout = run_compiled("import json; from tools.sparse_bwd_compile_check import dkv_rows; "
                          "print(json.dumps(dkv_rows()))")
    rows = json.loads(stdout.strip().splitlines()[-1])
    assert len(rows) == 4
    for name, heads, regs, stack, shared, ctas in rows:
        assert stack == 0 and shared <= SM90_MAX_SHARED and ctas >= 1, (name, heads, regs, stack, shared)
        if name == "default":
            assert ctas >= 2, (name, heads, regs, shared, ctas)


def test_score_kernel_default_compiles_for_sm90():
    """The score kernel compiled for sm_90 at H = 64 and 128 with this Triton. Its default (the stacked product on
    64-slot tiles under Triton 3.6, where it was timed; the two products otherwise): no spills, shared memory
    inside an H100 block. The stacked product on 64-slot tiles, forced, fits too (Triton 3.9 spills some of it,
    which is why it is not the default there; see tools/sparse_bwd_compile_check.score_rows)."""
    from tools.sparse_fwd_compile_check import SM90_MAX_SHARED

    stdout = run_compiled("import json; from tools.sparse_bwd_compile_check import score_rows; "
                          "print(json.dumps(score_rows(('', 'SCORE_STACKED=1'))))")
    rows = json.loads(stdout.strip().splitlines()[-1])
    assert len(rows) == 4
    for name, heads, regs, stack, shared in rows:
        assert shared <= SM90_MAX_SHARED, (name, heads, regs, stack, shared)
        if name == "default":
            assert stack == 0, (name, heads, regs, stack, shared)


def test_dq_kernel_compiles_for_sm90():
    """The dq kernel compiled for sm_90 at H = 64 and 128 with this Triton, with and without the column split (the
    default for more than 64 heads): no spills, shared memory inside an H100 block."""
    from tools.sparse_fwd_compile_check import SM90_MAX_SHARED

    stdout = run_compiled("import json; from tools.sparse_bwd_compile_check import dq_rows; "
                          "print(json.dumps(dq_rows()))")
    rows = json.loads(stdout.strip().splitlines()[-1])
    assert len(rows) == 4
    for name, heads, regs, stack, shared in rows:
        assert stack == 0 and shared <= SM90_MAX_SHARED, (name, heads, regs, stack, shared)


def test_stacked_default_follows_the_measured_triton(monkeypatch):
    # The stacked score product is the default only where it was timed (Triton 3.6).
    import csrc_dsl.triton.sparse_attention_bwd as bwd

    for version, expected in [("3.6.0", (3, 6)), ("3.6.0+git1a2b", (3, 6)), ("3.10.1", (3, 10)),
                              ("nightly", (99, 99))]:
        monkeypatch.setattr(bwd.triton, "__version__", version)
        assert bwd._triton_minor_version() == expected
    assert bwd.CONFIGS["default"]["SCORE_STACKED"] == int(bwd._STACKED_MEASURED)
