"""dsa_ops.warmup runs every pipeline op (forward and backward) for one static configuration."""
import pytest
import torch

import dsa_ops
from dsa_ops.warmup import PIPELINE_OPS


def test_warmup_runs_every_op_on_cpu(monkeypatch):
    calls = []
    real = torch.ops.dsa.sparse_attention_backward
    monkeypatch.setattr(torch.ops.dsa, "sparse_attention_backward", lambda *a: calls.append(1) or real(*a))
    done = dsa_ops.warmup("cpu", torch.float32, heads=3, head_dim=24, d_v=16, index_heads=3, index_dim=16, topk=6)
    assert done == list(PIPELINE_OPS)
    assert len(calls) == 2, "the attention backward must be compiled too (with and without optional inputs)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_warmup_then_capture_needs_no_compile():
    dsa_ops.warmup("cuda", heads=16, topk=64)
    from dsa_ops.testing import Shape, sample_args
    args = sample_args("sparse_attention", device="cuda", dtype=torch.bfloat16,
                       shape=Shape(B=4, Sq=8, Sk=300, H=16, D=576, d_v=512, K=64))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = torch.ops.dsa.sparse_attention(*args)
    graph.replay()
    torch.testing.assert_close(out, torch.ops.dsa.sparse_attention(*args)[0], rtol=0, atol=0)
