"""The indexer-logits layout experiment (benchmarks/experiments/indexer_layouts.py) against an fp64 oracle.

Without CUDA the kernels run in the Triton interpreter on tiny odd shapes with fp16 inputs (the interpreter's
bf16 dot is wrong on CPU), with row runs that start before, inside and after the causal diagonal.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

from benchmarks.experiments import indexer_layouts as layouts  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def oracle(q, k, w):
    """scores[r, j] = sum_h w[r,h] relu(q[r,h] . k[j]) for j <= Sk - Sq + r, -inf after (fp64)."""
    s = torch.einsum("qhd,kd->qhk", q.double(), k.double()).relu()
    out = torch.einsum("qhk,qh->qk", s, w.double())
    Sq, Sk = q.shape[0], k.shape[0]
    visible = torch.arange(Sk, device=q.device)[None, :] <= (Sk - Sq) + torch.arange(Sq, device=q.device)[:, None]
    return out.masked_fill(~visible, float("-inf"))


@pytest.mark.parametrize("layout", sorted(layouts.KERNELS))
@pytest.mark.parametrize("Sq, Sk, HI, rows_per_prog", [(37, 70, 16, 7), (21, 40, 12, 5), (33, 64, 16, 33)])
def test_layout_matches_oracle(layout, Sq, Sk, HI, rows_per_prog):
    gen = torch.Generator(device=DEV).manual_seed(Sq * 100 + HI)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float16
    q = torch.randn(Sq, HI, 32, generator=gen, device=DEV).to(dtype)
    k = torch.randn(Sk, 32, generator=gen, device=DEV).to(dtype)
    w = torch.randn(Sq, HI, generator=gen, device=DEV)
    got = layouts.logits(layout, q, k, w, 1.0, block_k=16, num_warps=4, num_stages=2, rows_per_prog=rows_per_prog)
    want = oracle(q, k, w).float()
    visible = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), visible) and not got.isnan().any()
    assert ((got[visible] - want[visible]).norm() / want[visible].norm()).item() <= 2e-3
