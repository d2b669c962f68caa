"""torch.compile(fullgraph=True) through the whole DSA training pipeline: indexer top-k -> sparse attention ->
loss + indexer loss, forward and backward, against eager; dynamic shapes without recompiles; no graph breaks."""
import pytest
import torch
import torch._dynamo

import dsa_ops
from dsa_ops.testing import randn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(S, *, H=4, D=32, d_v=16, HI=3, DI=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    kw = dict(g=g, dtype=dtype, device=DEVICE)
    return dict(
        q=randn(S, H, D, **kw, requires_grad=True),
        kv=randn(S, D, **kw, requires_grad=True),
        sink=randn(H, g=g, dtype=torch.float32, device=DEVICE, requires_grad=True),
        q_idx=randn(1, S, HI, DI, **kw, requires_grad=True),
        k_idx=randn(1, S, DI, **kw, requires_grad=True),
        w=randn(1, S, HI, g=g, dtype=torch.float32, device=DEVICE, requires_grad=True),
        d_v=d_v,
    )


def pipeline(q, kv, sink, q_idx, k_idx, w, d_v, topk=6):
    """One DSA layer's training step: select keys, attend, and distil attention into the indexer."""
    scale = q.shape[-1] ** -0.5
    idx, _ = torch.ops.dsa.indexer_topk(q_idx.detach(), k_idx.detach(), w.detach(), topk)
    ids = idx[0]  # B = 1: local ids are rows of kv
    out, lse = torch.ops.dsa.sparse_attention(q, kv, ids, scale, d_v, sink)
    target = torch.ops.dsa.sparse_attn_score(q.detach(), kv.detach(), lse, ids, scale)
    loss_idx = torch.ops.dsa.indexer_loss(q_idx, k_idx, w, idx, target.unsqueeze(0), 1.0, 0.5)
    return out.float().square().sum() + loss_idx


def grads_of(fn, inputs):
    leaves = [inputs[k] for k in ("q", "kv", "sink", "q_idx", "k_idx", "w")]
    loss = fn(**inputs)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves))


def test_fullgraph_forward_backward_matches_eager():
    torch._dynamo.reset()
    inputs = make_inputs(13)
    eager = grads_of(pipeline, inputs)
    compiled = grads_of(torch.compile(pipeline, fullgraph=True), inputs)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in eager[1:]), "every input should get a gradient"


def test_no_graph_breaks():
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(pipeline)(**make_inputs(11))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_dynamic_shapes_no_recompile():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    fn = torch.compile(pipeline, backend=counter, fullgraph=True, dynamic=True)
    for S in (17, 29):
        inputs = make_inputs(S, seed=S)
        got = grads_of(fn, inputs)
        want = grads_of(pipeline, inputs)
        for e, c in zip(want, got):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"


def dense_warmup(q, kv, q_idx, k_idx, w):
    """The dense warm-up step of SPEC section 6: distil full attention into the indexer."""
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        s = torch.einsum("bqhd,bkd->bqhk", q.float(), kv.float()) * scale
        S_q, S_k = s.shape[1], s.shape[-1]
        mask = torch.ones(S_q, S_k, dtype=torch.bool, device=s.device).tril(S_k - S_q)
        lse = s.masked_fill(~mask[:, None], float("-inf")).logsumexp(-1)
    scores, l1 = torch.ops.dsa.dense_attn_score(q, kv, lse, scale)
    return torch.ops.dsa.dense_indexer_loss(q_idx, k_idx, w, scores, l1, 1.0)


def test_dense_warmup_compiles():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    kw = dict(g=g, dtype=torch.float32, device=DEVICE)
    args = (randn(1, 9, 2, 16, **kw), randn(1, 9, 16, **kw), randn(1, 9, 3, 8, **kw, requires_grad=True),
            randn(1, 9, 8, **kw, requires_grad=True), randn(1, 9, 3, g=g, dtype=torch.float32, device=DEVICE,
                                                               requires_grad=True))
    eager = dense_warmup(*args)
    (ge,) = torch.autograd.grad(eager, args[2])
    compiled = torch.compile(dense_warmup, fullgraph=True)(*args)
    (gc,) = torch.autograd.grad(compiled, args[2])
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(gc, ge)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_matches_eager():
    inputs = make_inputs(64, H=16, D=576, d_v=512, HI=64, DI=128, dtype=torch.bfloat16)
    static = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

    def forward(q, kv, sink, q_idx, k_idx, w, d_v):
        idx, _ = torch.ops.dsa.indexer_topk(q_idx, k_idx, w, 32)
        out, lse = torch.ops.dsa.sparse_attention(q, kv, idx[0], q.shape[-1] ** -0.5, d_v, sink)
        return out, lse, idx

    eager = forward(**static)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            forward(**static)  # warm-up: compiles kernels before capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = forward(**static)
    fresh = make_inputs(64, H=16, D=576, d_v=512, HI=64, DI=128, dtype=torch.bfloat16, seed=7)
    for k, v in fresh.items():
        if isinstance(v, torch.Tensor):
            static[k].copy_(v.detach())
    graph.replay()
    want = forward(**static)
    for c, e in zip(captured, want):
        assert torch.equal(c, e)
    assert not torch.equal(captured[0], eager[0])


def api_pipeline(q, kv, sink, q_idx, k_idx, w, d_v, topk=6):
    """The same step through the public Python wrappers, with every scalar left at its default."""
    idx, _ = dsa_ops.indexer_topk(q_idx.detach(), k_idx.detach(), w.detach(), topk)
    out, lse = dsa_ops.sparse_attention(q, kv, idx[0], d_v=d_v, attn_sink=sink)
    target = dsa_ops.sparse_attn_score(q.detach(), kv.detach(), lse, idx[0], q.shape[-1] ** -0.5)
    return out.float().square().sum() + dsa_ops.indexer_loss(q_idx, k_idx, w, idx, target.unsqueeze(0))


def test_api_defaults_compile_once_with_dynamic_shapes():
    """Defaults of the wrappers must not become symbolic floats (that restarts or recompiles the trace)."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    fn = torch.compile(api_pipeline, backend=counter, fullgraph=True, dynamic=True)
    for S in (15, 22):
        inputs = make_inputs(S, seed=S)
        for e, c in zip(grads_of(api_pipeline, inputs), grads_of(fn, inputs)):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, f"{counter.frame_count} frames"
