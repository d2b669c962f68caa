"""Bad input gives a clear error naming the op, the argument, what was expected and what was given, in eager
mode and under fake tensors (the check is shared). Out-of-range ids are NOT errors (invalid slots)."""
import pytest
import torch

import dsa_ops
from dsa_ops import DSAArgumentError
from dsa_ops.testing import call_op, check_bad_argument, sample_args, with_arg


CASES = [
    # (op, argument position, bad value builder, words the message must contain)
    ("indexer_logits", 0, lambda a: a[0].to(torch.int32), ["indexer_logits", "q_idx", "dtype", "torch.int32"]),
    ("indexer_logits", 1, lambda a: a[1].half(), ["k_idx", "dtype of 'q_idx'"]),
    ("indexer_logits", 1, lambda a: a[1][:, :, :-1].contiguous(), ["k_idx", "shape"]),
    ("indexer_logits", 2, lambda a: a[2][:, :-1].contiguous(), ["w", "shape"]),
    ("indexer_logits", 0, lambda a: a[0].transpose(1, 2), ["q_idx", "contiguous"]),
    ("indexer_logits", 0, lambda a: a[0].unsqueeze(0), ["q_idx", "4-D tensor", "5-D"]),
    ("indexer_logits", 5, lambda a: a[5].long(), ["q_start", "torch.int64"]),
    ("indexer_logits", 5, lambda a: a[5][:1], ["q_start", "shape"]),
    ("indexer_logits", 4, lambda a: 0, ["ratio", "ratio >= 1", "got 0"]),
    ("topk", 1, lambda a: 100000, ["topk", "'k'", "16384"]),
    ("topk", 1, lambda a: 0, ["'k'"]),
    ("topk", 0, lambda a: a[0].half(), ["scores", "dtype"]),
    ("topk", 2, lambda a: a[2][:, :1].contiguous(), ["lengths", "shape"]),
    ("indexer_topk", 3, lambda a: 20000, ["indexer_topk", "topk"]),
    ("sparse_attention", 1, lambda a: a[1][:, :-1].contiguous(), ["sparse_attention", "kv", "D="]),
    ("sparse_attention", 2, lambda a: a[2].long(), ["indices", "torch.int64"]),
    ("sparse_attention", 2, lambda a: a[2][:-1].contiguous(), ["indices", "shape"]),
    ("sparse_attention", 2, lambda a: a[2].t().contiguous().t(), ["indices", "contiguous"]),
    ("sparse_attention", 4, lambda a: a[0].shape[-1] + 1, ["d_v"]),
    ("sparse_attention", 5, lambda a: a[5][:-1].contiguous(), ["attn_sink", "shape"]),
    ("sparse_attention", 5, lambda a: a[5].half(), ["attn_sink", "dtype"]),
    ("sparse_attention", 6, lambda a: a[6][:-1].contiguous(), ["topk_length", "shape"]),
    ("sparse_attention_decode", 3, lambda a: a[3][:1].contiguous(), ["seq_lens", "shape"]),
    ("sparse_attention_decode", 2, lambda a: a[2].long(), ["block_table", "torch.int64"]),
    ("sparse_attention_decode", 1, lambda a: a[1].half(), ["kv_cache", "dtype"]),
    ("sparse_attn_score", 2, lambda a: a[2][:, :-1].contiguous(), ["sparse_attn_score", "lse", "shape"]),
    ("dense_attn_score", 1, lambda a: a[1][:1].contiguous(), ["dense_attn_score", "kv", "shape"]),
    ("indexer_loss", 4, lambda a: a[4][..., :-1].contiguous(), ["indexer_loss", "target", "shape"]),
    ("dense_indexer_loss", 4, lambda a: a[4][:, :-1].contiguous(), ["dense_indexer_loss", "attn_l1", "shape"]),
    ("sparse_attention_backward", 4, lambda a: a[4].half(), ["sparse_attention_backward", "lse", "dtype"]),
]


@pytest.mark.parametrize("op,pos,bad,words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_argument_message(op, pos, bad, words):
    check_bad_argument(op, pos, bad, words)


def test_non_contiguous_activation():
    args = sample_args("sparse_attention")
    q = args[0].transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(DSAArgumentError, match=r"dsa.sparse_attention: argument 'q': expected a contiguous"):
        call_op("sparse_attention", with_arg(args, 0, q))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a second device")
def test_device_mismatch():
    args = sample_args("sparse_attention", device="cuda", dtype=torch.bfloat16)
    with pytest.raises(DSAArgumentError, match="argument 'kv': expected a tensor on cuda"):
        call_op("sparse_attention", with_arg(args, 1, args[1].cpu()))


def test_fake_mode_raises_the_same_error():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = sample_args("indexer_logits")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake[1] = fake[1][:, :, :-1]
        with pytest.raises(DSAArgumentError, match="argument 'k_idx'"):
            call_op("indexer_logits", fake)


@pytest.mark.parametrize("bad,words", [
    (lambda cq, ck: (cq.long(), ck), ["cu_seqlens_q", "torch.int64"]),
    (lambda cq, ck: (cq + 1, ck), ["cu_seqlens_q", "cu_seqlens[0] == 0"]),
    (lambda cq, ck: (cq, ck.flip(0)), ["cu_seqlens_k"]),
    (lambda cq, ck: (cq, ck[:-1].contiguous()), ["cu_seqlens_k"]),
    (lambda cq, ck: (cq, None), ["cu_seqlens"]),
    (lambda cq, ck: (cq[:1].contiguous(), ck), ["cu_seqlens_q", "B >= 1"]),
])
def test_bad_cu_seqlens(bad, words):
    q_idx, k_idx, w, *_ = sample_args("indexer_topk")
    q_idx, k_idx, w = q_idx[:1].contiguous(), k_idx[:1].contiguous(), w[:1].contiguous()
    Sq, Sk = q_idx.shape[1], k_idx.shape[1]
    cq = torch.tensor([0, 2, Sq], dtype=torch.int32)
    ck = torch.tensor([0, 4, Sk], dtype=torch.int32)
    cq, ck = bad(cq, ck)
    with pytest.raises(DSAArgumentError) as err:
        torch.ops.dsa.indexer_topk(q_idx, k_idx, w, 3, 1.0, 1, None, cq, ck)
    for word in words:
        assert word in str(err.value)


def test_out_of_range_ids_are_not_errors():
    q, kv, ids, scale, d_v, sink, tl = sample_args("sparse_attention")
    ids = torch.full_like(ids, kv.shape[0] + 100)
    ids[:, 0] = -7
    out, lse = dsa_ops.sparse_attention(q, kv, ids, scale, d_v, sink, tl)
    assert torch.all(out == 0) and torch.all(lse == float("inf"))
