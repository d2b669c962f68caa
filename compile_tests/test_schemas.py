"""Pins every op schema: a schema change must be deliberate (EXPECTTEST_ACCEPT=1 rewrites the strings below)."""
import expecttest
import torch

import dsa_ops  # noqa: F401
from dsa_ops.ops import SCHEMAS


def schemas() -> str:
    return "\n".join(str(getattr(torch.ops.dsa, name).default._schema) for name in SCHEMAS)


class TestSchemas(expecttest.TestCase):
    def test_public_ops_schemas(self):
        self.assertExpectedInline(schemas(), """\
dsa::indexer_logits(Tensor q_idx, Tensor k_idx, Tensor w, float scale=1., int ratio=1, Tensor? q_start=None) -> Tensor
dsa::indexer_logits_backward(Tensor grad_scores, Tensor q_idx, Tensor k_idx, Tensor w, float scale=1., int ratio=1, Tensor? q_start=None) -> (Tensor, Tensor, Tensor)
dsa::topk(Tensor scores, int k, Tensor? lengths=None, bool sorted=False) -> (Tensor, Tensor)
dsa::indexer_topk(Tensor q_idx, Tensor k_idx, Tensor w, int topk, float scale=1., int ratio=1, Tensor? q_start=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None) -> (Tensor, Tensor)
dsa::indexer_topk_paged(Tensor q_idx, Tensor k_cache, Tensor block_table, Tensor seq_lens, Tensor w, int topk, float scale=1.) -> (Tensor, Tensor)
dsa::indexer_topk_paged_out(Tensor q_idx, Tensor k_cache, Tensor block_table, Tensor seq_lens, Tensor w, int topk, float scale, Tensor(a!) indices, Tensor(b!) values) -> ()
dsa::sparse_indexer_score(Tensor q_idx, Tensor k_idx, Tensor w, Tensor indices, float scale=1., Tensor? topk_length=None) -> Tensor
dsa::sparse_attention(Tensor q, Tensor kv, Tensor indices, float scale, int d_v=512, Tensor? attn_sink=None, Tensor? topk_length=None) -> (Tensor, Tensor)
dsa::sparse_attention_backward(Tensor dout, Tensor q, Tensor kv, Tensor out, Tensor lse, Tensor indices, float scale, int d_v=512, Tensor? attn_sink=None, Tensor? topk_length=None, bool deterministic=False, Tensor? grad_lse=None) -> (Tensor, Tensor, Tensor)
dsa::sparse_attention_decode(Tensor q, Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor indices, float scale, int d_v=512, Tensor? attn_sink=None, Tensor? topk_length=None) -> (Tensor, Tensor)
dsa::sparse_attention_decode_out(Tensor q, Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor indices, float scale, int d_v, Tensor? attn_sink, Tensor? topk_length, Tensor(a!) out, Tensor(b!) lse) -> ()
dsa::sparse_attn_score(Tensor q, Tensor kv, Tensor lse, Tensor indices, float scale, Tensor? topk_length=None) -> Tensor
dsa::dense_attn_score(Tensor q, Tensor kv, Tensor lse, float scale, int ratio=1, Tensor? q_start=None) -> (Tensor, Tensor)
dsa::indexer_loss(Tensor q_idx, Tensor k_idx, Tensor w, Tensor indices, Tensor target, float scale=1., float loss_coeff=1., Tensor? topk_length=None) -> Tensor
dsa::indexer_loss_backward(Tensor grad_loss, Tensor q_idx, Tensor k_idx, Tensor w, Tensor indices, Tensor target, float scale=1., float loss_coeff=1., Tensor? topk_length=None) -> (Tensor, Tensor, Tensor)
dsa::dense_indexer_loss(Tensor q_idx, Tensor k_idx, Tensor w, Tensor attn_scores, Tensor attn_l1, float scale=1., int ratio=1, float loss_coeff=1., Tensor? q_start=None) -> Tensor
dsa::dense_indexer_loss_backward(Tensor grad_loss, Tensor q_idx, Tensor k_idx, Tensor w, Tensor attn_scores, Tensor attn_l1, float scale=1., int ratio=1, float loss_coeff=1., Tensor? q_start=None) -> (Tensor, Tensor, Tensor)
dsa::hca_compress(Tensor c, Tensor z, int m=128) -> Tensor
dsa::hca_compress_backward(Tensor grad_out, Tensor c, Tensor z, int m=128) -> (Tensor, Tensor)
dsa::csa_compress(Tensor c, Tensor z, int m=4) -> Tensor
dsa::csa_compress_backward(Tensor grad_out, Tensor c, Tensor z, int m=4) -> (Tensor, Tensor)
dsa::merge_attention_with_sink(Tensor outs, Tensor lses, Tensor? attn_sink=None) -> (Tensor, Tensor)
dsa::merge_attention_with_sink_backward(Tensor grad_out, Tensor outs, Tensor lses, Tensor out, Tensor lse, Tensor? attn_sink=None, Tensor? grad_lse=None) -> (Tensor, Tensor, Tensor)
dsa::nsa_compress(Tensor k, int block=32, int stride=16) -> Tensor
dsa::nsa_compress_backward(Tensor grad_out, Tensor k, int block=32, int stride=16) -> Tensor
dsa::nsa_gate_combine(Tensor o_cmp, Tensor o_slc, Tensor o_win, Tensor gates) -> Tensor
dsa::nsa_gate_combine_backward(Tensor grad_out, Tensor o_cmp, Tensor o_slc, Tensor o_win, Tensor gates) -> (Tensor, Tensor, Tensor, Tensor)
dsa::nsa_select(Tensor p_cmp, int groups, int n=16, int block=32, int stride=16, int select_block=64, int local_blocks=2) -> Tensor""")
