"""dsa_ops: DeepSeek sparse-attention kernels as `torch.ops.dsa.*` custom ops.

Importing the package defines every op (`dsa_ops.ops`), registers the fakes (`meta_kernels`) and the
autograd formulas; `dsa_ops.dispatch` picks the implementation per device (`python -m dsa_ops.backends`).
"""
from . import ops  # noqa: F401  (defines torch.ops.dsa.*)
import meta_kernels  # noqa: F401,E402  (registers the fakes)

from ._validate import DSAArgumentError  # noqa: E402
from .api import (  # noqa: E402
    csa_compress,
    dense_attn_score,
    dense_indexer_loss,
    hca_compress,
    indexer_logits,
    indexer_loss,
    indexer_topk,
    indexer_topk_paged,
    indexer_topk_paged_out,
    merge_attention_with_sink,
    nsa_compress,
    nsa_gate_combine,
    nsa_select,
    sparse_attention,
    sparse_attention_backward,
    sparse_attention_decode,
    sparse_attention_decode_out,
    sparse_attn_score,
    sparse_indexer_score,
    topk,
)
from .dispatch import report as backend_report  # noqa: E402
from .warmup import warmup  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DSAArgumentError", "backend_report", "dense_attn_score", "dense_indexer_loss", "indexer_logits",
    "indexer_loss", "indexer_topk", "indexer_topk_paged", "indexer_topk_paged_out", "sparse_attention", "sparse_attention_backward",
    "sparse_attention_decode", "sparse_attention_decode_out", "sparse_attn_score", "sparse_indexer_score", "topk", "warmup",
    "csa_compress", "hca_compress", "merge_attention_with_sink",
    "nsa_compress", "nsa_gate_combine", "nsa_select",
]
