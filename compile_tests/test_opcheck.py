"""torch.library.opcheck for every op: schema, fake vs real, autograd registration, AOT dispatch (static and
dynamic shapes). Runs on CPU (reference) everywhere and on CUDA (the dispatched kernels) when present."""
import pytest
import torch

import dsa_ops  # noqa: F401
from dsa_ops.testing import ALL_OPS, DIFFERENTIABLE, Shape, sample_args

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("optionals", [True, False], ids=["optionals", "no-optionals"])
def test_opcheck(op, device, optionals):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    args = sample_args(op, device=device, dtype=dtype, requires_grad=op in DIFFERENTIABLE,
                       with_optionals=optionals)
    torch.library.opcheck(getattr(torch.ops.dsa, op).default, args, test_utils=TESTS)


@pytest.mark.parametrize("op", ["indexer_logits", "sparse_attention", "indexer_topk", "topk"])
def test_opcheck_ratio4_and_h1(op):
    args = sample_args(op, shape=Shape(B=1, Sq=7, Sk=5, HI=1, H=1, ratio=4), requires_grad=op in DIFFERENTIABLE)
    torch.library.opcheck(getattr(torch.ops.dsa, op).default, args, test_utils=TESTS)
