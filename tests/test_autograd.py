"""Autograd registered on the ops: fp64 gradcheck of every op with a gradient, and the rules around it
(no gradient for inputs that do not require it, none under no_grad, lse and selections non-differentiable)."""
import pytest
import torch

import dsa_ops  # noqa: F401
from dsa_ops.testing import DIFFERENTIABLE, Shape, sample_args

SHAPES = {
    "default": Shape(),
    "H1-ratio4": Shape(B=1, Sq=6, Sk=4, HI=1, H=1, ratio=4, K=5),
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("op", DIFFERENTIABLE)
@pytest.mark.parametrize("optionals", [True, False], ids=["optionals", "no-optionals"])
def test_gradcheck_fp64(op, shape, optionals):
    args = sample_args(op, dtype=torch.float64, shape=SHAPES[shape], seed=11, requires_grad=True,
                       with_optionals=optionals)
    fn = getattr(torch.ops.dsa, op)
    diff = [i for i in DIFFERENTIABLE[op] if isinstance(args[i], torch.Tensor)]

    def f(*xs):
        full = list(args)
        for i, x in zip(diff, xs):
            full[i] = x
        out = fn(*full)
        out = out[0] if isinstance(out, tuple) else out
        # masked logits are -inf: finite differences of -inf are NaN, so compare on the visible entries
        return out.masked_fill(out.isinf(), 0.0)

    assert torch.autograd.gradcheck(f, [args[i] for i in diff], eps=1e-6, atol=1e-6, rtol=1e-4)


def test_only_required_grads_and_no_grad():
    q, kv, ids, scale, d_v, sink, tl = sample_args("sparse_attention", requires_grad=True)
    kv.requires_grad_(False)
    sink.requires_grad_(False)
    out, lse = torch.ops.dsa.sparse_attention(q, kv, ids, scale, d_v, sink, tl)
    assert out.requires_grad and lse.requires_grad
    out.sum().backward()
    assert q.grad is not None and kv.grad is None and sink.grad is None
    with torch.no_grad():
        out, _ = torch.ops.dsa.sparse_attention(q, kv, ids, scale, d_v, sink, tl)
    assert not out.requires_grad


def test_backward_not_called_under_no_grad(monkeypatch):
    calls = []
    real = torch.ops.dsa.sparse_attention_backward
    monkeypatch.setattr(torch.ops.dsa, "sparse_attention_backward", lambda *a: calls.append(1) or real(*a))
    args = sample_args("sparse_attention", requires_grad=True)
    with torch.no_grad():
        torch.ops.dsa.sparse_attention(*args)
    assert calls == []


@pytest.mark.parametrize("op", ["topk", "indexer_topk", "sparse_indexer_score"])
def test_selection_outputs_never_require_grad(op):
    args = list(sample_args(op, requires_grad=True))
    if op == "topk":
        args[0].requires_grad_(True)
    outs = getattr(torch.ops.dsa, op)(*args)
    for o in outs if isinstance(outs, tuple) else (outs,):
        assert not o.requires_grad


def test_deterministic_flag_reaches_backward(monkeypatch):
    seen = []
    real = torch.ops.dsa.sparse_attention_backward
    monkeypatch.setattr(torch.ops.dsa, "sparse_attention_backward", lambda *a: seen.append(a[10]) or real(*a))
    args = sample_args("sparse_attention", requires_grad=True)
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        for flag in (False, True):
            torch.use_deterministic_algorithms(flag)
            torch.ops.dsa.sparse_attention(*args)[0].sum().backward()
    finally:
        torch.use_deterministic_algorithms(prev)
    assert seen == [False, True]


def test_gradcheck_through_lse():
    """lse is differentiable (merging split branches needs it): fp64 gradcheck of (out, lse) together."""
    q, kv, ids, scale, d_v, sink, tl = sample_args("sparse_attention", dtype=torch.float64, seed=5,
                                                   requires_grad=True)

    def f(q, kv, sink):
        out, lse = torch.ops.dsa.sparse_attention(q, kv, ids, scale, d_v, sink, tl)
        return out, lse.masked_fill(lse.isinf(), 0.0)  # rows with no valid key: lse = +inf

    assert torch.autograd.gradcheck(f, (q, kv, sink), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_unused_lse_keeps_the_kernel_path(monkeypatch):
    """When only `out` is used, the backward gets grad_lse=None (no zeros to read, no Delta shift); a used lse
    passes its gradient through."""
    seen = []
    real = torch.ops.dsa.sparse_attention_backward
    monkeypatch.setattr(torch.ops.dsa, "sparse_attention_backward", lambda *a: seen.append(a[11]) or real(*a))
    args = sample_args("sparse_attention", requires_grad=True)
    torch.ops.dsa.sparse_attention(*args)[0].sum().backward()
    out, lse = torch.ops.dsa.sparse_attention(*args)
    (out.sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
    assert seen[0] is None and seen[1] is not None


def test_boundary_skips_torchs_per_call_default_filling(monkeypatch):
    """Our Autograd kernels (`dsa_ops/ops/_library.py: register_autograd`) read the schema's defaults once;
    torch's `register_autograd` refills them on every call through `fill_defaults` (about 25 us a call on the
    CPU machine). Pin that no op pays it, in forward or backward, with and without the trailing defaults."""
    import torch._library.utils as library_utils

    def fail(*args, **kwargs):
        raise AssertionError("torch._library.utils.fill_defaults called per op call")

    monkeypatch.setattr(library_utils, "fill_defaults", fail)
    for op in DIFFERENTIABLE:
        for optionals in (True, False):
            args = sample_args(op, dtype=torch.float64, seed=3, requires_grad=True, with_optionals=optionals)
            out = getattr(torch.ops.dsa, op)(*args)
            out = out[0] if isinstance(out, tuple) else out
            out.masked_fill(out.isinf(), 0.0).sum().backward()
            assert any(a.grad is not None for a in args if isinstance(a, torch.Tensor))
