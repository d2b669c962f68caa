"""Preallocated-output variants of the decode ops (servers capture them in CUDA graphs over fixed buffers):
same results as the functional ops, every element written, checked arguments, opcheck, torch.compile."""
import pytest
import torch

import dsa_ops
from dsa_ops import DSAArgumentError
from dsa_ops.testing import OUT_VARIANTS, sample_args, sample_out_args

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OUT_VARIANTS)
def test_writes_what_the_functional_op_returns(op, device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    args = sample_out_args(op, device=device, dtype=dtype, seed=3)
    n_out = 2
    inputs, outs = args[:-n_out], args[-n_out:]
    assert getattr(torch.ops.dsa, op)(*args) is None
    for got, want in zip(outs, getattr(torch.ops.dsa, OUT_VARIANTS[op])(*inputs)):
        assert torch.equal(got, want)  # the poison (NaN / -7) is gone everywhere


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OUT_VARIANTS)
def test_opcheck(op, device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.library.opcheck(getattr(torch.ops.dsa, op).default, sample_out_args(op, device=device, dtype=dtype),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_wrong_output_buffers_are_errors():
    args = list(sample_out_args("sparse_attention_decode_out"))
    with pytest.raises(DSAArgumentError, match="sparse_attention_decode_out: argument 'out': expected shape"):
        torch.ops.dsa.sparse_attention_decode_out(*args[:-2], args[-2][..., :-1].contiguous(), args[-1])
    args = list(sample_out_args("indexer_topk_paged_out"))
    with pytest.raises(DSAArgumentError, match="indexer_topk_paged_out: argument 'indices': expected dtype"):
        torch.ops.dsa.indexer_topk_paged_out(*args[:-2], args[-2].long(), args[-1])


def test_compiled_decode_step_into_fixed_buffers():
    q, kv_cache, block_table, seq_lens, indices, scale, d_v, sink, tl = sample_args("sparse_attention_decode")
    q_idx, k_cache, bt2, sl2, w, topk, iscale = sample_args("indexer_topk_paged")
    out, lse = torch.ops.dsa.sparse_attention_decode(q, kv_cache, block_table, seq_lens, indices, scale, d_v, sink,
                                                     tl)
    idx, val = torch.ops.dsa.indexer_topk_paged(q_idx, k_cache, bt2, sl2, w, topk, iscale)

    def step(out_buf, lse_buf, idx_buf, val_buf):
        dsa_ops.indexer_topk_paged_out(q_idx, k_cache, bt2, sl2, w, topk, idx_buf, val_buf, iscale)
        dsa_ops.sparse_attention_decode_out(q, kv_cache, block_table, seq_lens, indices, out_buf, lse_buf, scale,
                                            d_v, sink, tl)

    bufs = [torch.full_like(out, float("nan")), torch.full_like(lse, float("nan")), torch.full_like(idx, -7),
            torch.full_like(val, float("nan"))]
    torch.compile(step, fullgraph=True)(*bufs)
    for got, want in zip(bufs, (out, lse, idx, val)):
        assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_into_the_same_buffers():
    args = list(sample_out_args("sparse_attention_decode_out", device="cuda", dtype=torch.bfloat16))
    out, lse = args[-2], args[-1]
    torch.ops.dsa.sparse_attention_decode_out(*args)  # warm-up: compiles before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.dsa.sparse_attention_decode_out(*args)
    args[0].copy_(torch.randn_like(args[0]))
    ptr = out.data_ptr()
    graph.replay()
    want_out, want_lse = torch.ops.dsa.sparse_attention_decode(*args[:-2])
    assert out.data_ptr() == ptr and torch.equal(out, want_out) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("op,topk_above_cache", [("indexer_topk_paged_out", False), ("indexer_topk_paged_out", True),
                                                  ("sparse_attention_decode_out", False)])
def test_triton_kernels_write_the_buffers_in_place(op, topk_above_cache):
    """The Triton kernels behind the out variants (`writes_out`) fill the given buffers themselves, no copy:
    every poisoned element is overwritten with what the kernel returns without buffers. On CPU this runs in
    Triton's interpreter (fp16: its bf16 dot is wrong on CPU)."""
    pytest.importorskip("triton")
    from csrc_dsl.triton import indexer, sparse_attention_fwd

    functional = OUT_VARIANTS[op]
    kernel = {"indexer_topk_paged": indexer.indexer_topk_paged,
              "sparse_attention_decode": sparse_attention_fwd.sparse_attention_decode}[functional]
    assert kernel.writes_out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = list(sample_out_args(op, device=device, dtype=torch.float16, seed=5))
    inputs, outs = args[:-2], args[-2:]
    if topk_above_cache:  # k beyond the cache's columns: the tail pads with -1 / -inf
        topk = inputs[2].shape[1] * inputs[1].shape[1] + 3     # max_pages * page + 3
        inputs[5] = topk
        outs = [torch.full((*o.shape[:-1], topk), -7 if o.dtype == torch.int32 else float("nan"),
                           dtype=o.dtype, device=device) for o in outs]
    returned = kernel(*inputs, out=tuple(outs))
    assert all(r.data_ptr() == o.data_ptr() for r, o in zip(returned, outs))
    for got, want in zip(outs, kernel(*inputs)):
        assert torch.equal(got, want)
