"""Random, valid argument sets for every op (tests, opcheck, compile tests, benchmarks).

`sample_args(op, ...)` returns the full positional argument tuple of `torch.ops.dsa.<op>`. Inputs are fresh
random values (never zeros); index sets mix valid ids with -1, out-of-range ids, duplicates and a shortened
`topk_length`, so every sample exercises the invalid-slot rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Shape:
    B: int = 2
    Sq: int = 5
    Sk: int = 9
    HI: int = 3
    DI: int = 16
    H: int = 3
    D: int = 24
    d_v: int = 16
    K: int = 6
    ratio: int = 1
    page: int = 4


def _gen(seed: int, device) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp64 (SPEC section 9's measure); NaN anywhere gives NaN, which no bound passes."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def randn(*shape, g, dtype, device, requires_grad=False):
    t = torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def random_ids(rows: tuple, K: int, n_keys: int, g, device) -> torch.Tensor:
    """Ids into [0, n_keys) with some -1, some >= n_keys, and duplicates."""
    ids = torch.randint(0, n_keys, (*rows, K), generator=g)
    flat = ids.view(-1)
    n = flat.numel()
    if n >= 4:
        flat[torch.randint(0, n, (max(1, n // 8),), generator=g)] = -1
        flat[torch.randint(0, n, (max(1, n // 10),), generator=g)] = n_keys + 3
        # a duplicate in the first row
        if K >= 2:
            ids.view(-1, K)[0, 1] = ids.view(-1, K)[0, 0].clamp(min=0)
    return ids.to(device=device, dtype=torch.int32)


def topk_length(rows: tuple, K: int, g, device) -> torch.Tensor:
    return torch.randint(0, K + 1, rows, generator=g).to(device=device, dtype=torch.int32)


def call_op(op: str, args) -> object:
    """torch.ops.dsa.<op>(*args)."""
    return getattr(torch.ops.dsa, op)(*args)


def with_arg(args, position: int, value) -> list:
    """A copy of `args` with one argument replaced (for bad-argument tests)."""
    args = list(args)
    args[position] = value
    return args


# Preallocated-output variants: name -> the functional op whose arguments they take first.
OUT_VARIANTS = {"indexer_topk_paged_out": "indexer_topk_paged", "sparse_attention_decode_out": "sparse_attention_decode"}


def sample_out_args(op: str, **kwargs) -> tuple:
    """Arguments of an out variant: the functional op's sample arguments plus NaN/garbage-filled outputs."""
    args = sample_args(OUT_VARIANTS[op], **kwargs)
    results = getattr(torch.ops.dsa, OUT_VARIANTS[op])(*args)
    poisoned = tuple(torch.full_like(r, -7) if r.dtype == torch.int32 else torch.full_like(r, float("nan"))
                     for r in results)
    return (*args, *poisoned)


def check_bad_argument(op: str, position: int, bad, words) -> None:
    """Calls dsa::<op> on sample arguments with argument `position` replaced by `bad(args)`; asserts it raises
    DSAArgumentError whose message names the op's argument and contains every one of `words`."""
    from dsa_ops._validate import DSAArgumentError

    args = sample_args(op)
    try:
        call_op(op, with_arg(args, position, bad(args)))
    except DSAArgumentError as err:
        msg = str(err)
    else:
        raise AssertionError(f"dsa.{op}: a bad argument {position} was accepted")
    assert msg.startswith(f"dsa.{op}: argument "), msg
    for w in words:
        assert w in msg, (w, msg)


def sample_args(op: str, device="cpu", dtype=torch.float32, shape: Optional[Shape] = None, seed: int = 0,
                requires_grad: bool = False, with_optionals: bool = True) -> tuple:
    """The positional arguments of dsa::<op> at a tiny shape, on `device` in `dtype`."""
    s = shape or Shape()
    g = _gen(seed, device)
    rg = requires_grad
    f32 = torch.float64 if dtype == torch.float64 else torch.float32

    def act(*shp, grad=False):
        return randn(*shp, g=g, dtype=dtype, device=device, requires_grad=grad and rg)

    def flt(*shp, grad=False):
        return randn(*shp, g=g, dtype=f32, device=device, requires_grad=grad and rg)

    opt = (lambda t: t) if with_optionals else (lambda t: None)
    # sequence b's queries end b tokens before the last key: exercises q_start given and not the default
    q_start = opt(torch.tensor([s.Sk * s.ratio - s.Sq - b for b in range(s.B)], dtype=torch.int32, device=device))
    scale_idx = 0.7
    scale_attn = s.D ** -0.5

    def indexer():
        return act(s.B, s.Sq, s.HI, s.DI, grad=True), act(s.B, s.Sk, s.DI, grad=True), flt(s.B, s.Sq, s.HI, grad=True)

    if op == "indexer_logits":
        return (*indexer(), scale_idx, s.ratio, q_start)
    if op == "indexer_logits_backward":
        q_idx, k_idx, w = indexer()
        return (flt(s.B, s.Sq, s.Sk), q_idx, k_idx, w, scale_idx, s.ratio, q_start)
    if op == "topk":
        scores = flt(s.B, s.Sq, s.Sk)
        scores[0, 0, :3] = float("-inf")
        scores[-1, -1, 1:4] = scores[-1, -1, 0]  # planted ties
        lengths = opt(torch.randint(0, s.Sk + 1, (s.B, s.Sq), generator=g).to(device=device, dtype=torch.int32))
        return (scores, s.K, lengths, False)
    if op == "indexer_topk":
        return (*indexer(), s.K, scale_idx, s.ratio, q_start, None, None)
    if op in ("indexer_topk_paged", "sparse_attention_decode"):
        dim = s.DI if op == "indexer_topk_paged" else s.D
        max_pages = (s.Sk + s.page - 1) // s.page
        n_pages = s.B * max_pages + 1
        cache = act(n_pages, s.page, dim)
        block_table = torch.randperm(n_pages, generator=g)[: s.B * max_pages].view(s.B, max_pages)
        block_table = block_table.to(device=device, dtype=torch.int32)
        seq_lens = torch.randint(s.Sq, s.Sk + 1, (s.B,), generator=g).to(device=device, dtype=torch.int32)
        if op == "indexer_topk_paged":
            return (act(s.B, s.Sq, s.HI, s.DI), cache, block_table, seq_lens, flt(s.B, s.Sq, s.HI), s.K, scale_idx)
        q = act(s.B, s.Sq, s.H, s.D)
        ids = random_ids((s.B, s.Sq), s.K, s.Sk, g, device)
        return (q, cache, block_table, seq_lens, ids, scale_attn, s.d_v, opt(flt(s.H)),
                opt(topk_length((s.B, s.Sq), s.K, g, device)))
    if op == "sparse_indexer_score":
        return (*indexer(), random_ids((s.B, s.Sq), s.K, s.Sk, g, device), scale_idx,
                opt(topk_length((s.B, s.Sq), s.K, g, device)))
    T = s.B * s.Sq
    if op in ("sparse_attention", "sparse_attention_backward", "sparse_attn_score"):
        q = act(T, s.H, s.D, grad=True)
        kv = act(s.Sk, s.D, grad=True)
        ids = random_ids((T,), s.K, s.Sk, g, device)
        tl = opt(topk_length((T,), s.K, g, device))
        sink = opt(flt(s.H, grad=True))
        if op == "sparse_attention":
            return (q, kv, ids, scale_attn, s.d_v, sink, tl)
        with torch.no_grad():
            out, lse = torch.ops.dsa.sparse_attention(q.detach(), kv.detach(), ids, scale_attn, s.d_v,
                                                      None if sink is None else sink.detach(), tl)
        if op == "sparse_attn_score":
            return (q, kv, lse, ids, scale_attn, tl)
        return (act(T, s.H, s.d_v), q, kv, out, lse, ids, scale_attn, s.d_v, sink, tl, False,
                opt(flt(T, s.H)))
    if op == "dense_attn_score":
        q = act(s.B, s.Sq, s.H, s.D)
        kv = act(s.B, s.Sk, s.D)
        lse = flt(s.B, s.Sq, s.H).abs() + 2.0
        return (q, kv, lse, scale_attn, s.ratio, q_start)
    if op in ("indexer_loss", "indexer_loss_backward"):
        q_idx, k_idx, w = indexer()
        ids = random_ids((s.B, s.Sq), s.K, s.Sk, g, device)
        target = torch.rand(s.B, s.Sq, s.K, generator=g, dtype=torch.float64).to(device=device, dtype=f32)
        target = target / target.sum(-1, keepdim=True)
        args = (q_idx, k_idx, w, ids, target, scale_idx, 0.5, opt(topk_length((s.B, s.Sq), s.K, g, device)))
        if op == "indexer_loss":
            return args
        return (flt(), *args)
    if op in ("dense_indexer_loss", "dense_indexer_loss_backward"):
        q_idx, k_idx, w = indexer()
        scores = torch.rand(s.B, s.Sq, s.Sk, generator=g, dtype=torch.float64).to(device=device, dtype=f32)
        l1 = scores.sum(-1)
        args = (q_idx, k_idx, w, scores, l1, scale_idx, s.ratio, 0.5, q_start)
        if op == "dense_indexer_loss":
            return args
        return (flt(), *args)
    if op in ("hca_compress", "hca_compress_backward", "csa_compress", "csa_compress_backward"):
        # S = Sq + Sk tokens, not a multiple of m (trailing tokens make no entry); an odd channel count d
        hca = op.startswith("hca")
        m = 4 if hca else 3
        S, d = s.Sq + s.Sk, s.d_v // 2 + 1
        channels = d if hca else 2 * d
        c, z = act(s.B, S, channels, grad=True), act(s.B, S, channels, grad=True)
        if not op.endswith("_backward"):
            return (c, z, m)
        return (act(s.B, S // m, d), c, z, m)
    if op in ("merge_attention_with_sink", "merge_attention_with_sink_backward"):
        J = 3  # branches, e.g. window, compressed, and one more
        outs = act(J, T, s.H, s.d_v, grad=True)
        lses = flt(J, T, s.H, grad=True)
        with torch.no_grad():  # empty branches (lse +inf, out 0): one in row 0, all of them in the last row
            lses[0, 0, 0], outs[0, 0, 0] = float("inf"), 0.0
            lses[:, -1, -1], outs[:, -1, -1] = float("inf"), 0.0
        sink = opt(flt(s.H, grad=True))
        if op == "merge_attention_with_sink":
            return (outs, lses, sink)
        with torch.no_grad():
            out, lse = torch.ops.dsa.merge_attention_with_sink(outs.detach(), lses.detach(),
                                                               None if sink is None else sink.detach())
        return (act(T, s.H, s.d_v), outs, lses, out, lse, sink, opt(flt(T, s.H)))
    # Native Sparse Attention (SPEC section 8): odd token counts, small blocks (block 4, stride 2), and GQA
    # groups of 2 query heads for the selection
    if op in ("nsa_compress", "nsa_compress_backward"):
        block, stride = 4, 2
        S = s.Sq + s.Sk + 3
        k = act(s.B, S, s.HI, s.DI, grad=True)
        if op == "nsa_compress":
            return (k, block, stride)
        return (act(s.B, (S - block) // stride + 1, s.HI, s.DI), k, block, stride)
    if op in ("nsa_gate_combine", "nsa_gate_combine_backward"):
        o_cmp, o_slc, o_win = (act(s.B, s.Sq, s.H, s.d_v, grad=True) for _ in range(3))
        gates = flt(s.B, s.Sq, s.H, 3, grad=True)
        if op == "nsa_gate_combine":
            return (o_cmp, o_slc, o_win, gates)
        return (act(s.B, s.Sq, s.H, s.d_v), o_cmp, o_slc, o_win, gates)
    if op == "nsa_select":
        block, stride, select_block = 4, 2, 5  # selection blocks not aligned to the compression stride
        S = 2 * (s.Sq + s.Sk) + 1
        N = (S - block) // stride + 1
        p_cmp = torch.softmax(flt(s.B, S, 2 * s.H, N), dim=-1)
        return (p_cmp, s.H, 4, block, stride, select_block, 2)
    raise KeyError(op)


ALL_OPS = (
    "indexer_logits", "indexer_logits_backward", "topk", "indexer_topk", "indexer_topk_paged",
    "sparse_indexer_score", "sparse_attention", "sparse_attention_backward", "sparse_attention_decode",
    "sparse_attn_score", "dense_attn_score", "indexer_loss", "indexer_loss_backward", "dense_indexer_loss",
    "dense_indexer_loss_backward",
    "hca_compress", "hca_compress_backward", "csa_compress", "csa_compress_backward",
    "merge_attention_with_sink", "merge_attention_with_sink_backward",
    "nsa_compress", "nsa_compress_backward", "nsa_gate_combine", "nsa_gate_combine_backward", "nsa_select",
)
# ops with a gradient: op -> positions of the differentiable inputs
DIFFERENTIABLE = {
    "indexer_logits": (0, 1, 2),
    "sparse_attention": (0, 1, 5),
    "indexer_loss": (0, 1, 2),
    "dense_indexer_loss": (0, 1, 2),
    "hca_compress": (0, 1),
    "csa_compress": (0, 1),
    "merge_attention_with_sink": (0, 1, 2),
    "nsa_compress": (0,),
    "nsa_gate_combine": (0, 1, 2, 3),
}
