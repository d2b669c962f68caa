"""Our ops against cuDNN frontend's DSA kernels on the same inputs (GPU with the cuDNN frontend staged; skipped
elsewhere). cuDNN is a baseline, never a backend: this checks that the two implementations agree.

Each output is compared with the fp32 reference too: a test that only compared the two kernels could pass with
both wrong. Two outputs each within the SPEC tolerance of the truth differ by at most twice that tolerance, so
that is the bound between them (SPEC section 9: backward 2e-2 and cosine >= 0.999, scores 2e-3).
Shapes: what cuDNN's SM90 kernels take (H a multiple of 64, D 576 with d_v 512), T and S_kv not multiples of any
tile, -1 padded rows (benchmarks.common.distinct_ids).
"""
import dataclasses

import pytest
import torch

from benchmarks import common
from benchmarks import run as bench
from dsa_ops.reference import attention as ref_attention
from dsa_ops.testing import rel_err

_DSA, _NOTE = common.load_cudnn_dsa() if torch.cuda.is_available() else (None, "needs a CUDA GPU")
pytestmark = pytest.mark.skipif(_DSA is None, reason=f"cuDNN frontend DSA unavailable: {_NOTE}")


def cosine(x, ref):
    return torch.nn.functional.cosine_similarity(x.double().flatten(), ref.double().flatten(), dim=0).item()


def _model(H):
    return dataclasses.replace(bench.GPU_MODELS[0], H=H)   # V3.2: D = 576, d_v = 512


@pytest.mark.parametrize("H", [64, 128])
def test_backward_agrees_with_cudnn(H):
    args = bench.sparse_attention_backward_inputs(_model(H), 301, 256, torch.device("cuda"), seed=H, S_kv=4099)
    dout, q, kv, out, lse, ids, scale, d_v, sink, topk_length, det = args
    ours = torch.ops.dsa.sparse_attention_backward(dout, q, kv, out, lse, ids, scale, d_v, sink, topk_length, det,
                                                   None)
    theirs = bench.cudnn_sparse_attention_backward(*args)
    # the truth: fp32 autograd through the reference forward
    qf, kvf = q.float().requires_grad_(), kv.float().requires_grad_()
    out_ref, _ = ref_attention.sparse_attention(qf, kvf, ids, scale, d_v, None, None)
    truth = torch.autograd.grad(out_ref, (qf, kvf), dout.float())
    for name, mine, cudnn, want in zip(("dq", "dkv"), ours[:2], theirs[:2], truth):
        assert not mine.isnan().any() and not cudnn.isnan().any(), name
        assert rel_err(mine, want) <= 2e-2 and cosine(mine, want) >= 0.999, (name, rel_err(mine, want))
        assert rel_err(mine, cudnn) <= 4e-2 and cosine(mine, cudnn) >= 0.998, (name, rel_err(mine, cudnn))


def test_sparse_attn_score_agrees_with_cudnn():
    q, kv, lse, ids, scale, topk_length = bench.sparse_attn_score_inputs(_model(128), 301, 256,
                                                                         torch.device("cuda"), seed=3)
    ours = torch.ops.dsa.sparse_attn_score(q, kv, lse, ids, scale, topk_length)
    theirs = bench.cudnn_sparse_attn_score(q, kv, lse, ids, scale, topk_length)
    want = ref_attention.sparse_attn_score(q.float(), kv.float(), lse, ids, scale, topk_length)
    assert rel_err(ours, want) <= 2e-3 and rel_err(ours, theirs) <= 4e-3, (rel_err(ours, want), rel_err(ours, theirs))


def test_dense_attn_score_agrees_with_cudnn():
    q, kv, lse, scale, ratio, q_start = bench.dense_attn_score_inputs(_model(64), 333, torch.device("cuda"), 0)
    ours, ours_l1 = torch.ops.dsa.dense_attn_score(q, kv, lse, scale, ratio, q_start)
    theirs, theirs_l1 = bench.cudnn_dense_attn_score(q, kv, lse, scale, ratio, q_start)
    want, want_l1 = ref_attention.dense_attn_score(q.float(), kv.float(), lse, scale, ratio, q_start)
    assert rel_err(ours, want) <= 2e-3 and rel_err(ours, theirs) <= 4e-3, (rel_err(ours, want), rel_err(ours, theirs))
    assert rel_err(ours_l1, want_l1) <= 2e-3 and rel_err(ours_l1, theirs_l1) <= 4e-3
