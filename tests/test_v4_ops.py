"""The DeepSeek-V4 ops through the op layer (SPEC section 7): argument errors, the public wrappers and their
defaults, the merge identity (split index lists + merge with the sink == one sparse_attention call, values and
gradients), and torch.compile(fullgraph=True) of a tiny V4 layer step against eager.
Opcheck and fp64 gradcheck of these ops run in compile_tests/test_opcheck.py and tests/test_autograd.py."""
import pytest
import torch
import torch._dynamo

import dsa_ops
from dsa_ops import DSAArgumentError
from dsa_ops.reference import v4 as ref
from dsa_ops.testing import call_op, check_bad_argument, randn, sample_args


# ------------------------------------------------------------------------------------------------------
# Argument errors (same pattern as tests/test_validation.py)
# ------------------------------------------------------------------------------------------------------
CASES = [
    # (op, argument position, bad value builder, words the message must contain)
    ("hca_compress", 0, lambda a: a[0].to(torch.int32), ["hca_compress", "'c'", "dtype", "torch.int32"]),
    ("hca_compress", 0, lambda a: a[0][0], ["'c'", "3-D tensor", "2-D"]),
    ("hca_compress", 1, lambda a: a[1].half(), ["'z'", "the dtype of 'c'", "or torch.float32", "torch.float16"]),
    ("hca_compress", 1, lambda a: a[1][:, :-1].contiguous(), ["'z'", "shape", "the shape of 'c'"]),
    ("hca_compress", 1, lambda a: a[1].transpose(0, 1).contiguous().transpose(0, 1), ["'z'", "contiguous"]),
    ("hca_compress", 2, lambda a: 0, ["'m'", "m >= 1", "got 0"]),
    ("csa_compress", 2, lambda a: -3, ["csa_compress", "'m'"]),
    ("hca_compress_backward", 0, lambda a: a[0][:, :-1].contiguous(), ["hca_compress_backward", "grad_out",
                                                                       "shape"]),
    ("csa_compress_backward", 0, lambda a: a[0].double(), ["csa_compress_backward", "grad_out", "dtype of 'c'"]),
    ("merge_attention_with_sink", 0, lambda a: a[0][0], ["merge_attention_with_sink", "outs", "4-D"]),
    ("merge_attention_with_sink", 0, lambda a: a[0][:0], ["outs", "J >= 1"]),
    ("merge_attention_with_sink", 1, lambda a: a[1][:, :-1].contiguous(), ["lses", "shape", "[J, T, H]"]),
    ("merge_attention_with_sink", 1, lambda a: a[1].bfloat16(), ["lses", "dtype", "torch.bfloat16"]),
    ("merge_attention_with_sink", 2, lambda a: a[2][:-1].contiguous(), ["attn_sink", "shape"]),
    ("merge_attention_with_sink", 2, lambda a: a[2].half(), ["attn_sink", "dtype"]),
    ("merge_attention_with_sink_backward", 3, lambda a: a[3][:-1].contiguous(),
     ["merge_attention_with_sink_backward", "'out'", "shape"]),
    ("merge_attention_with_sink_backward", 4, lambda a: a[4].half(), ["'lse'", "dtype"]),
    ("merge_attention_with_sink_backward", 0, lambda a: a[0].double(), ["grad_out", "dtype of 'outs'"]),
]


@pytest.mark.parametrize("op,pos,bad,words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_argument_message(op, pos, bad, words):
    check_bad_argument(op, pos, bad, words)


def test_csa_needs_an_even_channel_count():
    c, z, m = sample_args("csa_compress")
    with pytest.raises(DSAArgumentError, match=r"dsa.csa_compress: argument 'c': expected .*even channel count"):
        dsa_ops.csa_compress(c[..., :-1].contiguous(), z[..., :-1].contiguous(), m)


def test_fake_mode_raises_the_same_error():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = sample_args("merge_attention_with_sink")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) for a in args]
        fake[1] = fake[1][:, :-1]
        with pytest.raises(DSAArgumentError, match="dsa.merge_attention_with_sink: argument 'lses'"):
            call_op("merge_attention_with_sink", fake)


# ------------------------------------------------------------------------------------------------------
# Wrappers and defaults
# ------------------------------------------------------------------------------------------------------
def test_wrappers_use_the_spec_defaults_and_match_the_reference():
    g = torch.Generator().manual_seed(0)
    c, z = randn(2, 300, 6, g=g, dtype=torch.float32, device="cpu"), randn(2, 300, 6, g=g, dtype=torch.float32,
                                                                           device="cpu")
    hca = dsa_ops.hca_compress(c, z)  # m = 128: 2 entries, 44 trailing tokens
    assert hca.shape == (2, 2, 6)
    torch.testing.assert_close(hca, ref.hca_compress(c, z, 128), rtol=0, atol=0)
    csa = dsa_ops.csa_compress(c, z)  # m = 4, d = 3
    assert csa.shape == (2, 75, 3)
    torch.testing.assert_close(csa, ref.csa_compress(c, z, 4), rtol=0, atol=0)
    outs, lses, sink = sample_args("merge_attention_with_sink")
    for got, want in zip(dsa_ops.merge_attention_with_sink(outs, lses, sink),
                         ref.merge_attention_with_sink(outs, lses, sink)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_merged_lse_is_differentiable():
    """Merges compose: the merged lse (keys only) carries its gradient back to the branch lses (fp64 gradcheck;
    +inf entries are empty branches/rows, compared as 0)."""
    outs, lses, sink = sample_args("merge_attention_with_sink", dtype=torch.float64, requires_grad=True)

    def merged(outs, lses, sink):
        out, lse = torch.ops.dsa.merge_attention_with_sink(outs, lses, sink)
        return out, lse.masked_fill(lse.isinf(), 0.0)

    assert torch.autograd.gradcheck(merged, (outs, lses, sink), eps=1e-6, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------
# merge(split branches) == sparse_attention over the concatenated index list, with the sink
# ------------------------------------------------------------------------------------------------------
def attention_inputs(T=7, H=3, D=24, d_v=16, S_kv=20, K=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(g=g, dtype=torch.float64, device="cpu", requires_grad=True)
    q, kv, sink = randn(T, H, D, **kw), randn(S_kv, D, **kw), randn(H, **kw)
    ids = torch.randint(0, S_kv, (T, K), generator=g, dtype=torch.int32)
    ids[0, :4] = -1          # row 0: its first part is empty
    ids[1, 6:] = S_kv + 2    # row 1: out of range from slot 6 (an empty second part at split 6)
    ids[2, :] = -1           # row 2: no valid key at all
    ids[3, 1] = ids[3, 7]    # a duplicate across the two parts
    return q, kv, sink, ids, D ** -0.5, d_v


def split_ids(ids, tl, split):
    """The two halves of an index list (and of topk_length) as two branches."""
    return [(ids[:, :split].contiguous(), None if tl is None else tl.clamp(max=split)),
            (ids[:, split:].contiguous(), None if tl is None else (tl - split).clamp(min=0))]


def torch_attention(q, kv, ids, scale, d_v, tl):
    """SPEC section 4 without a sink in plain differentiable torch (fp64): (out, lse), lse +inf when empty."""
    valid = (ids >= 0) & (ids < kv.shape[0])
    if tl is not None:
        valid &= torch.arange(ids.shape[1]) < tl.unsqueeze(1)
    rows = kv[torch.where(valid, ids, 0).long()]  # [T, K, D]
    s = torch.einsum("thd,tkd->thk", q, rows) * scale
    s = s.masked_fill(~valid.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(lse.isinf(), 0.0, lse).unsqueeze(-1))
    out = torch.einsum("thk,tkd->thd", p, rows[..., :d_v])
    return out, torch.where(lse.isinf(), float("inf"), lse)


@pytest.mark.parametrize("split", [4, 6])
@pytest.mark.parametrize("with_topk_length", [False, True], ids=["all-slots", "topk_length"])
def test_merge_equals_one_sparse_attention_over_the_concatenated_ids(split, with_topk_length):
    q, kv, sink, ids, scale, d_v = attention_inputs()
    T, K = ids.shape
    tl = torch.randint(0, K + 1, (T,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    tl = tl if with_topk_length else None
    branch = [dsa_ops.sparse_attention(q, kv, part, scale, d_v, None, part_tl)
              for part, part_tl in split_ids(ids, tl, split)]
    out, lse = dsa_ops.merge_attention_with_sink(torch.stack([o for o, _ in branch]),
                                                 torch.stack([s for _, s in branch]), sink)
    want_out, want_lse = dsa_ops.sparse_attention(q, kv, ids, scale, d_v, sink, tl)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    assert torch.all(out[2] == 0) and torch.all(lse[2] == float("inf"))


@pytest.mark.parametrize("split", [4, 6])
@pytest.mark.parametrize("branches", ["torch", "dsa"])
def test_merge_gradient_equals_one_softmax_over_the_concatenated_ids(split, branches):
    """Split branches merged with the sink train exactly like one softmax over the concatenated ids with the sink:
    the gradient flows through each branch's lse (plain torch branches, or dsa.sparse_attention's lse)."""
    q, kv, sink, ids, scale, d_v = attention_inputs(seed=3)
    tl = torch.randint(0, ids.shape[1] + 1, (ids.shape[0],), generator=torch.Generator().manual_seed(4),
                       dtype=torch.int32)
    attend = torch_attention if branches == "torch" else (
        lambda q, kv, part, scale, d_v, part_tl: dsa_ops.sparse_attention(q, kv, part, scale, d_v, None, part_tl))
    branch = [attend(q, kv, part, scale, d_v, part_tl) for part, part_tl in split_ids(ids, tl, split)]
    out, _ = dsa_ops.merge_attention_with_sink(torch.stack([o for o, _ in branch]),
                                               torch.stack([s for _, s in branch]), sink)
    want_out, _ = dsa_ops.sparse_attention(q, kv, ids, scale, d_v, sink, tl)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, kv, sink), grad)
    want = torch.autograd.grad(want_out, (q, kv, sink), grad)
    for name, a, b in zip(("q", "kv", "sink"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------------------------
# A tiny V4 layer step under torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------------------
S, H, D, D_V, WINDOW = 23, 2, 16, 8, 5


def window_ids(S, window):
    """Query t attends tokens t, t-1, ..., t-window+1 (-1 before the first token)."""
    t = torch.arange(S).unsqueeze(1)
    ids = t - torch.arange(window)
    return torch.where(ids >= 0, ids, -1).to(torch.int32)


def compressed_ids(S, m, offset):
    """Query t sees compressed entry k iff k < (t + 1) // m (SPEC ratio-causal mask); ids are rows of the
    concatenated keys, where entry k sits at row offset + k."""
    t = torch.arange(S).unsqueeze(1)
    k = torch.arange(S // m)
    return torch.where(k < (t + 1) // m, offset + k, -1).to(torch.int32)


def v4_layer_step(q, kv, c_hca, z_hca, c_csa, z_csa, sink, win_ids, hca_ids, csa_ids):
    """Window keys plus the HCA (m = 8) and CSA (m = 4) compressed entries, one branch each, merged with the
    sink (a real V4 layer uses one compressor; both run here so one compile covers both). The gradient flows
    through the branch lses too (see test_merge_gradient_equals_one_softmax_over_the_concatenated_ids)."""
    hca = torch.ops.dsa.hca_compress(c_hca, z_hca, 8)[0]  # B = 1: [S // 8, D]
    csa = torch.ops.dsa.csa_compress(c_csa, z_csa, 4)[0]  # [S // 4, D]
    keys = torch.cat([kv, hca, csa])
    scale = q.shape[-1] ** -0.5
    branches = [torch.ops.dsa.sparse_attention(q, keys, ids, scale, D_V) for ids in (win_ids, hca_ids, csa_ids)]
    out, lse = torch.ops.dsa.merge_attention_with_sink(torch.stack([o for o, _ in branches]),
                                                       torch.stack([s for _, s in branches]), sink)
    return out.square().sum() + lse.masked_fill(lse.isinf(), 0).sum()


def step_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(g=g, dtype=torch.float32, device="cpu", requires_grad=True)
    leaves = dict(q=randn(S, H, D, **kw), kv=randn(S, D, **kw), c_hca=randn(1, S, D, **kw),
                  z_hca=randn(1, S, D, **kw), c_csa=randn(1, S, 2 * D, **kw), z_csa=randn(1, S, 2 * D, **kw),
                  sink=randn(H, **kw))
    ids = dict(win_ids=window_ids(S, WINDOW), hca_ids=compressed_ids(S, 8, S),
               csa_ids=compressed_ids(S, 4, S + S // 8))
    return leaves, ids


def loss_and_grads(fn, leaves, ids):
    loss = fn(**leaves, **ids)
    return [loss.detach()] + list(torch.autograd.grad(loss, list(leaves.values())))


def test_v4_layer_step_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    leaves, ids = step_inputs()
    eager = loss_and_grads(v4_layer_step, leaves, ids)
    compiled = loss_and_grads(torch.compile(v4_layer_step, fullgraph=True), leaves, ids)
    for name, e, c in zip(["loss", *leaves], eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=name)
    assert all(g.abs().sum() > 0 for g in eager[1:]), "every input should get a gradient"


def test_v4_layer_step_has_no_graph_breaks():
    torch._dynamo.reset()
    leaves, ids = step_inputs(seed=1)
    explanation = torch._dynamo.explain(v4_layer_step)(**leaves, **ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
