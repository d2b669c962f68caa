"""The Native Sparse Attention ops through the op layer (SPEC section 8): argument errors, the public wrappers and
their defaults, selection outputs without gradient, and torch.compile(fullgraph=True) of a tiny NSA step against
eager. Opcheck and fp64 gradcheck of these ops run in compile_tests/test_opcheck.py and tests/test_autograd.py."""
import pytest
import torch
import torch._dynamo

import dsa_ops
from dsa_ops import DSAArgumentError
from dsa_ops.reference import nsa as ref
from dsa_ops.testing import call_op, check_bad_argument, randn, sample_args

# ------------------------------------------------------------------------------------------------------
# Argument errors (same pattern as tests/test_validation.py)
# ------------------------------------------------------------------------------------------------------
CASES = [
    # (op, argument position, bad value builder, words the message must contain)
    ("nsa_compress", 0, lambda a: a[0].to(torch.int32), ["nsa_compress", "'k'", "dtype", "torch.int32"]),
    ("nsa_compress", 0, lambda a: a[0][0], ["'k'", "4-D tensor", "3-D"]),
    ("nsa_compress", 0, lambda a: a[0].transpose(1, 2).contiguous().transpose(1, 2), ["'k'", "contiguous"]),
    ("nsa_compress", 1, lambda a: 0, ["'block'", "block >= 1", "got 0"]),
    ("nsa_compress", 2, lambda a: 3, ["'stride'", "a divisor of block=4", "got 3"]),
    ("nsa_compress_backward", 0, lambda a: a[0][:, :-1].contiguous(), ["nsa_compress_backward", "grad_out",
                                                                       "shape", "[B, N, G, D]"]),
    ("nsa_compress_backward", 0, lambda a: a[0].double(), ["grad_out", "dtype of 'k'"]),
    ("nsa_gate_combine", 1, lambda a: a[1].double(), ["nsa_gate_combine", "'o_slc'", "dtype of 'o_cmp'"]),
    ("nsa_gate_combine", 2, lambda a: a[2][:, :-1].contiguous(), ["'o_win'", "shape", "the shape of 'o_cmp'"]),
    ("nsa_gate_combine", 3, lambda a: a[3][..., :2].contiguous(), ["'gates'", "shape", "[B, S, H, 3]"]),
    ("nsa_gate_combine", 3, lambda a: a[3].half(), ["'gates'", "or torch.float32", "torch.float16"]),
    ("nsa_gate_combine_backward", 0, lambda a: a[0][:, :, :-1].contiguous(), ["nsa_gate_combine_backward",
                                                                              "grad_out", "shape"]),
    ("nsa_select", 0, lambda a: a[0].bfloat16(), ["nsa_select", "'p_cmp'", "dtype", "torch.bfloat16"]),
    ("nsa_select", 0, lambda a: a[0][0], ["'p_cmp'", "4-D tensor"]),
    ("nsa_select", 1, lambda a: 4, ["'groups'", "a divisor of H=6", "got 4"]),
    ("nsa_select", 2, lambda a: 2, ["'n'", "local_blocks + 1 = 3 <= n", "got 2"]),
    ("nsa_select", 4, lambda a: 3, ["'stride'", "a divisor of block=4"]),
    ("nsa_select", 5, lambda a: 0, ["'select_block'", "select_block >= 1"]),
    ("nsa_select", 6, lambda a: 0, ["'local_blocks'", "local_blocks >= 1"]),
]


@pytest.mark.parametrize("op,pos,bad,words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_argument_message(op, pos, bad, words):
    check_bad_argument(op, pos, bad, words)


def test_fake_mode_raises_the_same_error():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = sample_args("nsa_gate_combine")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) for a in args]
        fake[3] = fake[3][..., :2]
        with pytest.raises(DSAArgumentError, match="dsa.nsa_gate_combine: argument 'gates'"):
            call_op("nsa_gate_combine", fake)


# ------------------------------------------------------------------------------------------------------
# Wrappers and defaults
# ------------------------------------------------------------------------------------------------------
def test_wrappers_use_the_spec_defaults_and_match_the_reference():
    g = torch.Generator().manual_seed(0)
    k = randn(2, 101, 2, 8, g=g, dtype=torch.float32, device="cpu")
    cmp = dsa_ops.nsa_compress(k)  # block 32, stride 16: (101 - 32) // 16 + 1 = 5 entries
    assert cmp.shape == (2, 5, 2, 8)
    torch.testing.assert_close(cmp, ref.nsa_compress(k, 32, 16), rtol=0, atol=0)
    o = [randn(2, 7, 4, 8, g=g, dtype=torch.float32, device="cpu") for _ in range(3)]
    gates = randn(2, 7, 4, 3, g=g, dtype=torch.float32, device="cpu")
    torch.testing.assert_close(dsa_ops.nsa_gate_combine(*o, gates), ref.nsa_gate_combine(*o, gates), rtol=0, atol=0)
    p = torch.softmax(randn(1, 1100, 8, (1100 - 32) // 16 + 1, g=g, dtype=torch.float32, device="cpu"), dim=-1)
    sel = dsa_ops.nsa_select(p, 2)  # n 16, block 32, stride 16, select_block 64, local_blocks 2
    assert sel.shape == (1, 1100, 2, 16) and sel.dtype == torch.int32
    assert torch.equal(sel, ref.nsa_select(p, 2, 16, 32, 16, 64, 2))
    assert torch.all(sel[0, -1] >= 0) and torch.all(sel[0, 0, :, 1:] == -1)  # 18 blocks at the end, 1 at t = 0


@pytest.mark.parametrize("per_group", [1, 4])
def test_compress_and_combine_gradients_through_the_ops(per_group):
    """Autograd of the ops equals autograd of the same math written in plain torch (odd S, GQA 1 and 4)."""
    g = torch.Generator().manual_seed(per_group)
    kw = dict(g=g, dtype=torch.float64, device="cpu", requires_grad=True)
    G, S = 2, 17
    H = G * per_group
    k = randn(1, S, G, 6, **kw)
    o_slc, o_win, gates = randn(1, 7, H, 6, **kw), randn(1, 7, H, 6, **kw), randn(1, 7, H, 3, **kw)

    def step(compress, combine):
        entries = compress(k)  # [1, 7, G, 6] with block 4, stride 2
        o_cmp = entries.repeat_interleave(per_group, dim=2)  # each key head serves its group's query heads
        return combine(o_cmp, o_slc, o_win, gates).square().sum()

    def torch_compress(k):
        return k.unfold(1, 4, 2).mean(-1)

    def torch_combine(o_cmp, o_slc, o_win, gates):
        s = torch.sigmoid(gates)
        return s[..., :1] * o_cmp + s[..., 1:2] * o_slc + s[..., 2:] * o_win

    leaves = (k, o_slc, o_win, gates)
    got = torch.autograd.grad(step(lambda k: torch.ops.dsa.nsa_compress(k, 4, 2), torch.ops.dsa.nsa_gate_combine),
                              leaves)
    want = torch.autograd.grad(step(torch_compress, torch_combine), leaves)
    for name, a, b in zip(("k", "o_slc", "o_win", "gates"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_select_output_never_requires_grad():
    p = sample_args("nsa_select")[0].requires_grad_(True)
    sel = torch.ops.dsa.nsa_select(p, 3, 4, 4, 2, 5, 2)
    assert not sel.requires_grad and sel.dtype == torch.int32


# ------------------------------------------------------------------------------------------------------
# A tiny NSA step under torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------------------
def nsa_step(k, p_cmp, o_slc, o_win, gates):
    """Compression pooling, block selection and the gated combination in one graph."""
    entries = torch.ops.dsa.nsa_compress(k, 4, 2)
    selected = torch.ops.dsa.nsa_select(p_cmp, 2, 3, 4, 2, 4, 1)
    o_cmp = entries[:, :o_slc.shape[1]].repeat_interleave(2, dim=2)
    out = torch.ops.dsa.nsa_gate_combine(o_cmp, o_slc, o_win, gates)
    return out.square().sum(), selected


def step_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(g=g, dtype=torch.float32, device="cpu", requires_grad=True)
    S = 21
    leaves = dict(k=randn(1, S, 2, 8, **kw), o_slc=randn(1, 9, 4, 8, **kw), o_win=randn(1, 9, 4, 8, **kw),
                  gates=randn(1, 9, 4, 3, **kw))
    p_cmp = torch.softmax(randn(1, S, 4, (S - 4) // 2 + 1, g=g, dtype=torch.float32, device="cpu"), dim=-1)
    return leaves, p_cmp


def test_nsa_step_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    leaves, p_cmp = step_inputs()
    results = []
    for fn in (nsa_step, torch.compile(nsa_step, fullgraph=True)):
        loss, selected = fn(p_cmp=p_cmp, **leaves)
        results.append([loss.detach(), selected, *torch.autograd.grad(loss, list(leaves.values()))])
    eager, compiled = results
    assert torch.equal(eager[1], compiled[1])
    for name, e, c in zip(["loss", "selected", *leaves], eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=name)
    assert all(g.abs().sum() > 0 for g in eager[2:]), "every input should get a gradient"
