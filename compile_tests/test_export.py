"""torch.export of a DSA layer's inference forward (indexer top-k -> sparse attention, then the decode form):
the ops appear in the exported graph as themselves, their fakes give the shapes, and one export with a
dynamic sequence length serves other lengths with the eager results (how a serving stack deploys a model)."""
import torch

import dsa_ops  # noqa: F401
from dsa_ops.testing import randn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, D, D_V, HI, DI, TOPK = 3, 48, 32, 4, 32, 8


class PrefillLayer(torch.nn.Module):
    def forward(self, q_idx, k_idx, w, q, kv, sink):
        ids, _ = torch.ops.dsa.indexer_topk(q_idx, k_idx, w, TOPK)
        return torch.ops.dsa.sparse_attention(q, kv, ids[0], D ** -0.5, D_V, sink)


def prefill_inputs(S, seed):
    g = torch.Generator().manual_seed(seed)
    kw = dict(g=g, dtype=torch.float32, device=DEVICE)
    return (randn(1, S, HI, DI, **kw), randn(1, S, DI, **kw), randn(1, S, HI, **kw), randn(S, H, D, **kw),
            randn(S, D, **kw), randn(H, **kw))


def test_export_prefill_with_a_dynamic_length():
    s = torch.export.Dim("s", min=8, max=4096)
    exported = torch.export.export(PrefillLayer(), prefill_inputs(24, seed=0),
                                   dynamic_shapes=({1: s}, {1: s}, {1: s}, {0: s}, {0: s}, None))
    called = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert torch.ops.dsa.indexer_topk.default in called and torch.ops.dsa.sparse_attention.default in called
    for S in (24, 41):                      # the traced length and another one
        inputs = prefill_inputs(S, seed=S)
        for got, want in zip(exported.module()(*inputs), PrefillLayer()(*inputs)):
            assert got.shape == want.shape and torch.equal(got, want)


class DecodeStep(torch.nn.Module):
    def forward(self, q_idx, k_cache, block_table, seq_lens, w, q, kv_cache):
        ids, _ = torch.ops.dsa.indexer_topk_paged(q_idx, k_cache, block_table, seq_lens, w, TOPK)
        return torch.ops.dsa.sparse_attention_decode(q, kv_cache, block_table, seq_lens, ids, D ** -0.5, D_V)


def test_export_paged_decode_step():
    g = torch.Generator().manual_seed(5)
    B, page, pages = 2, 16, 3
    kw = dict(g=g, dtype=torch.float32, device=DEVICE)
    block_table = torch.tensor([[2, 0, 1], [1, 2, 0]], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([40, 17], dtype=torch.int32, device=DEVICE)
    inputs = (randn(B, 1, HI, DI, **kw), randn(pages, page, DI, **kw), block_table, seq_lens, randn(B, 1, HI, **kw),
              randn(B, 1, H, D, **kw), randn(pages, page, D, **kw))
    exported = torch.export.export(DecodeStep(), inputs)
    for got, want in zip(exported.module()(*inputs), DecodeStep()(*inputs)):
        assert got.shape == want.shape and torch.equal(got, want)
