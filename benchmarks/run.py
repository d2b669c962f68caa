"""The benchmark suite: every op, at DeepSeek shapes, against its baselines and the H100 roofline.

    python -m benchmarks.run                          # everything (long: use --max-seconds on a lent GPU)
    python -m benchmarks.run --quick                  # S = 4K/8K, fewer decode batches
    python -m benchmarks.run --ops topk,sparse_attention --out benchmarks/results
    python -m benchmarks.run --quick --also-backends triton    # also time Triton where CuTe-DSL is chosen
    python -m benchmarks.plot benchmarks/results/latest.json  # on any machine with matplotlib

For every case (one op at one shape) the runner
1. builds random inputs and asks the dispatch table which backend `torch.ops.dsa.<op>` will use;
2. runs the pure-torch reference on the checked rows (the last `--check-rows` query rows or sequences;
   all of them at small shapes) and our op on the whole input, and compares the two on those rows at the
   SPEC section 9 tolerances (top-k: sets). A wrong or failing kernel is reported as WRONG/ERROR and not
   timed. Outputs that mix rows (dkv, losses) are compared from a second call on the checked rows alone;
3. times our op (median of CUDA-event times, cold L2, see common.py) and each baseline that passes the
   same check at a 5x looser tolerance (baselines may round inputs to bf16; the check is there to catch
   adapters that get a convention wrong): the reference (called directly, so DSA_OPS_BACKEND does not
   touch it), a torch baseline where there is a natural one (torch.topk, einsum logits, gather + matmul
   attention) and cuDNN frontend's DSA kernels when `from cudnn import DSA` works. A reference that would
   take longer than --max-ref-seconds per call is not run on the whole input: its time is extrapolated
   from the checked rows and marked "~".
Rows go to a markdown table and a JSON file in --out (timestamped, and latest.*), followed by the per-call
Python overhead of the op boundary (benchmarks/bench_overhead.py).

Without CUDA (or with --device cpu) the cases shrink to tiny shapes and everything runs on the reference:
a smoke test of the machinery, not a benchmark.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import dsa_ops  # noqa: F401  (defines torch.ops.dsa.*)
from dsa_ops import dispatch
from dsa_ops.reference import attention as ref_attention
from dsa_ops.reference import indexer as ref_indexer
from dsa_ops.reference import loss as ref_loss

from . import common
from .common import check_close, generator, randn

BF16 = torch.bfloat16
BASELINE_TOL_FACTOR = 5.0


# ======================================================================================================
# Shapes
# ======================================================================================================
@dataclass(frozen=True)
class Model:
    name: str
    H: int                  # attention heads
    D: int                  # q/kv head dim (NoPE + RoPE)
    d_v: int
    HI: int                 # indexer heads
    DI: int                 # indexer head dim
    topks: tuple            # top-k sizes this model uses
    ratio: int              # KV compression seen by the indexer (V4's CSA: 4)
    sink: bool              # attention sink


@dataclass(frozen=True)
class Scale:
    seqs: tuple             # prefill sequence lengths S (queries = tokens = S)
    topk_rows: int          # rows of a standalone top-k call (one chunk of queries)
    decode_batches: tuple
    decode_ctx: int         # tokens in each decoded sequence's cache
    page: int
    dense_max_seq: int      # dense (all-key) ops only up to this S: they are for short warm-up sequences
    small_heads: tuple      # tensor-parallel shards of V3.2's 128 heads


GPU_MODELS = (
    Model("V3.2", H=128, D=576, d_v=512, HI=64, DI=128, topks=(2048,), ratio=1, sink=False),
    Model("V4", H=64, D=512, d_v=512, HI=64, DI=128, topks=(512, 1024), ratio=4, sink=True),
)
GPU_FULL = Scale(seqs=(4096, 8192, 16384, 32768, 65536), topk_rows=4096, decode_batches=(1, 8, 32, 128),
                 decode_ctx=32768, page=64, dense_max_seq=16384, small_heads=(16, 32))
GPU_QUICK = dataclasses.replace(GPU_FULL, seqs=(4096, 8192), decode_batches=(1, 32))

# CPU smoke test: the same case list at toy sizes (the reference runs everything).
CPU_MODELS = (
    Model("V3.2", H=4, D=80, d_v=64, HI=4, DI=16, topks=(16,), ratio=1, sink=False),
    Model("V4", H=2, D=64, d_v=64, HI=4, DI=16, topks=(8, 16), ratio=4, sink=True),
)
CPU_FULL = Scale(seqs=(64, 128, 256), topk_rows=32, decode_batches=(1, 3), decode_ctx=128, page=16,
                 dense_max_seq=256, small_heads=(1, 2))
CPU_QUICK = dataclasses.replace(CPU_FULL, seqs=(64, 128))


# ======================================================================================================
# Cases
# ======================================================================================================
@dataclass
class Case:
    op: str
    label: str                       # row name in the table, e.g. "V3.2 S=8192"
    series: str                      # one line of the plot, e.g. "V4 k=512"
    x: int                           # its x value: S, or the batch for decode ops
    x_name: str                      # "S" | "batch"
    build_inputs: Callable           # (device, seed) -> the positional arguments of torch.ops.dsa.<op>
    flops: float
    bytes: float                     # compulsory traffic: every input read once, every output written once
    rows: int                        # independent query rows (or sequences): the check samples the last ones
    baselines: dict = field(default_factory=dict)   # name -> fn(*args) returning the op's outputs

    @property
    def roofline_ms(self) -> float:
        return max(self.flops / (common.PEAK_TFLOPS * 1e9), self.bytes / (common.PEAK_GBPS * 1e6))

    @property
    def memory_bound(self) -> bool:
        return self.bytes / (common.PEAK_GBPS * 1e6) > self.flops / (common.PEAK_TFLOPS * 1e9)


def nbytes(*shape, itemsize: int) -> int:
    return math.prod(shape) * itemsize


# ---- input builders: (shape parameters..., device, seed) -> op arguments -----------------------------
def indexer_tensors(m: Model, S: int, device, seed: int, Sk: Optional[int] = None):
    """Prefill indexer inputs, batch 1: S queries over Sk keys (default S/ratio: the compressed sequence)."""
    g = generator(device, seed)
    q = randn(1, S, m.HI, m.DI, gen=g, device=device, dtype=BF16)
    k = randn(1, S // m.ratio if Sk is None else Sk, m.DI, gen=g, device=device, dtype=BF16)
    w = randn(1, S, m.HI, gen=g, device=device, scale=m.HI ** -0.5)
    return g, q, k, w, m.DI ** -0.5


def logits_inputs(m, S, device, seed, Sk=None):
    _, q, k, w, scale = indexer_tensors(m, S, device, seed, Sk)
    return (q, k, w, scale, m.ratio, None)  # q_start None: the queries are the last tokens


def logits_backward_inputs(m, S, device, seed):
    g, q, k, w, scale = indexer_tensors(m, S, device, seed)
    grad = randn(1, S, S // m.ratio, gen=g, device=device)
    return (grad, q, k, w, scale, m.ratio, None)


def topk_inputs(rows, cols, k, device, seed):
    g = generator(device, seed)
    return (randn(rows, cols, gen=g, device=device), k, None, False)


def indexer_topk_inputs(m, S, k, device, seed, Sk=None):
    _, q, kk, w, scale = indexer_tensors(m, S, device, seed, Sk)
    return (q, kk, w, k, scale, m.ratio, None, None, None)


def sparse_indexer_score_inputs(m, S, k, device, seed):
    g, q, kk, w, scale = indexer_tensors(m, S, device, seed)
    ids = common.distinct_ids(S, k, S // m.ratio, g, device).view(1, S, k)
    return (q, kk, w, ids, scale, None)


def indexer_loss_inputs(m, S, k, device, seed, backward=False):
    g, q, kk, w, scale = indexer_tensors(m, S, device, seed)
    ids = common.distinct_ids(S, k, S // m.ratio, g, device).view(1, S, k)
    target = torch.rand(1, S, k, generator=g, device=device) + 0.01
    target = target / target.sum(-1, keepdim=True)
    args = (q, kk, w, ids, target, scale, 1.0, None)
    return (torch.ones((), device=device), *args) if backward else args


def attention_tensors(m: Model, T: int, S_kv: int, K: int, device, seed: int):
    g = generator(device, seed)
    q = randn(T, m.H, m.D, gen=g, device=device, dtype=BF16)
    kv = randn(S_kv, m.D, gen=g, device=device, dtype=BF16)
    ids = common.distinct_ids(T, K, S_kv, g, device)
    sink = randn(m.H, gen=g, device=device) if m.sink else None
    return g, q, kv, ids, sink, m.D ** -0.5


def sparse_attention_inputs(m, S, K, device, seed, S_kv=None):
    """S queries over S_kv latent rows (default S)."""
    _, q, kv, ids, sink, scale = attention_tensors(m, S, S_kv or S, K, device, seed)
    return (q, kv, ids, scale, m.d_v, sink, None)


def sparse_attention_backward_inputs(m, S, K, device, seed, S_kv=None, deterministic=False):
    g, q, kv, ids, sink, scale = attention_tensors(m, S, S_kv or S, K, device, seed)
    with torch.no_grad():  # out and lse come from our own forward (any values define a backward)
        out, lse = torch.ops.dsa.sparse_attention(q, kv, ids, scale, m.d_v, sink, None)
    dout = randn(S, m.H, m.d_v, gen=g, device=device, dtype=BF16)
    return (dout, q, kv, out, lse, ids, scale, m.d_v, sink, None, deterministic)


def sparse_attn_score_inputs(m, S, K, device, seed):
    _, q, kv, ids, _, scale = attention_tensors(m, S, S, K, device, seed)
    with torch.no_grad():
        _, lse = torch.ops.dsa.sparse_attention(q, kv, ids, scale, m.d_v, None, None)
    return (q, kv, lse, ids, scale, None)


def dense_attn_score_inputs(m, S, device, seed):
    g = generator(device, seed)
    q = randn(1, S, m.H, m.D, gen=g, device=device, dtype=BF16)
    kv = randn(1, S, m.D, gen=g, device=device, dtype=BF16)
    scale = m.D ** -0.5
    # a realistic lse: the causal logsumexp of the scores (bf16 matmul, in row chunks)
    lse = torch.empty(1, S, m.H, device=device)
    keys = torch.arange(S, device=device)
    step = max(1, (1 << 26) // (m.H * S))
    for r0 in range(0, S, step):
        r1 = min(S, r0 + step)
        s = torch.matmul(q[0, r0:r1], kv[0].T).float() * scale                  # [rows, H, S]
        hidden = keys[None, :] > torch.arange(r0, r1, device=device)[:, None]
        lse[0, r0:r1] = torch.logsumexp(s.masked_fill(hidden[:, None, :], float("-inf")), dim=-1)
    return (q, kv, lse, scale, 1, None)


def paged_cache(B: int, ctx: int, page: int, dim: int, g, device, seed: int):
    """A cache of B sequences of ctx tokens, their pages scattered over the cache in random order."""
    pages_per_seq = -(-ctx // page)
    cache = randn(B * pages_per_seq, page, dim, gen=g, device=device, dtype=BF16)
    table = torch.randperm(B * pages_per_seq, generator=torch.Generator().manual_seed(seed))
    table = table.view(B, pages_per_seq).to(device=device, dtype=torch.int32)
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    return cache, table, seq_lens


def decode_inputs(m, B, ctx, page, K, device, seed):
    g = generator(device, seed)
    q = randn(B, 1, m.H, m.D, gen=g, device=device, dtype=BF16)
    cache, table, seq_lens = paged_cache(B, ctx, page, m.D, g, device, seed)
    ids = common.distinct_ids(B, K, ctx, g, device).view(B, 1, K)
    sink = randn(m.H, gen=g, device=device) if m.sink else None
    return (q, cache, table, seq_lens, ids, m.D ** -0.5, m.d_v, sink, None)


def paged_topk_inputs(m, B, ctx, page, k, device, seed):
    g = generator(device, seed)
    q = randn(B, 1, m.HI, m.DI, gen=g, device=device, dtype=BF16)
    cache, table, seq_lens = paged_cache(B, ctx, page, m.DI, g, device, seed)
    w = randn(B, 1, m.HI, gen=g, device=device, scale=m.HI ** -0.5)
    return (q, cache, table, seq_lens, w, k, m.DI ** -0.5)


# ---- the case list: one function per op family, each returning Cases -----------------------------
def case(op, label, series, x, build, flops, traffic, rows, x_name="S") -> Case:
    return Case(op, label, series, x, x_name, build, float(flops), float(traffic), rows,
                dict(OP_BASELINES.get(op, {})))


def series_name(m: Model, k: int) -> str:
    return m.name if len(m.topks) == 1 else f"{m.name} k={k}"


def indexer_cases(m: Model, S: int, topk_rows: int, with_backward: bool) -> list[Case]:
    """Prefill indexer ops: S queries over S/ratio keys, ratio-causal; FLOPs count visible pairs only."""
    Sk = S // m.ratio
    vis = common.visible_pairs(S, Sk, m.ratio)
    inputs = nbytes(S, m.HI, m.DI, itemsize=2) + nbytes(Sk, m.DI, itemsize=2) + nbytes(S, m.HI, itemsize=4)
    scores = nbytes(S, Sk, itemsize=4)
    label = f"{m.name} S={S}"
    cases = [case("indexer_logits", label, m.name, S, functools.partial(logits_inputs, m, S),
                  2 * m.HI * m.DI * vis, inputs + scores, S)]
    if with_backward:  # recomputed pre-activations, dq and dk: three times the forward's matmul work
        cases.append(case("indexer_logits_backward", label, m.name, S, functools.partial(logits_backward_inputs, m, S),
                          3 * 2 * m.HI * m.DI * vis, 2 * inputs + scores, S))
    for k in m.topks:
        series = series_name(m, k)
        label = f"{series} S={S}"
        if Sk > k:  # a standalone top-k over one chunk of query rows of the score matrix
            cases.append(case("topk", f"{series} {topk_rows}x{Sk}", series, S,
                              functools.partial(topk_inputs, topk_rows, Sk, k), 0,
                              nbytes(topk_rows, Sk, itemsize=4) + nbytes(topk_rows, k, itemsize=8), topk_rows))
        cases.append(case("indexer_topk", label, series, S, functools.partial(indexer_topk_inputs, m, S, k),
                          2 * m.HI * m.DI * vis, inputs + nbytes(S, k, itemsize=8), S))
        cases.append(case("sparse_indexer_score", label, series, S,
                          functools.partial(sparse_indexer_score_inputs, m, S, k),
                          2 * S * m.HI * k * m.DI, inputs + 2 * nbytes(S, k, itemsize=4), S))
    return cases


def attention_traffic(m: Model, T: int, S_kv: int, K: int) -> dict:
    """Compulsory bytes of the prefill attention ops: T queries over S_kv latent rows, K selected per query."""
    q_b, kv_b, o_b = nbytes(T, m.H, m.D, itemsize=2), nbytes(S_kv, m.D, itemsize=2), nbytes(T, m.H, m.d_v, itemsize=2)
    ids_b, lse_b = nbytes(T, K, itemsize=4), nbytes(T, m.H, itemsize=4)
    return {"sparse_attention": q_b + kv_b + ids_b + o_b + lse_b,
            "sparse_attention_backward": 2 * (q_b + kv_b + o_b) + o_b + ids_b + lse_b,
            "sparse_attn_score": q_b + kv_b + lse_b + 2 * ids_b}


def attention_cases(m: Model, S: int, K: int, series: str, with_scores: bool) -> list[Case]:
    """Prefill attention ops: T = S queries over S latent rows, K selected per query."""
    label = f"{series} S={S}"
    traffic = attention_traffic(m, S, S, K)
    cases = [
        case("sparse_attention", label, series, S, functools.partial(sparse_attention_inputs, m, S, K),
             2 * S * m.H * K * (m.D + m.d_v), traffic["sparse_attention"], S),
        case("sparse_attention_backward", label, series, S,
             functools.partial(sparse_attention_backward_inputs, m, S, K),
             2 * S * m.H * K * (3 * m.D + 2 * m.d_v), traffic["sparse_attention_backward"], S),
    ]
    if with_scores:
        cases.append(case("sparse_attn_score", label, series, S, functools.partial(sparse_attn_score_inputs, m, S, K),
                          2 * S * m.H * K * m.D, traffic["sparse_attn_score"], S))
    return cases


def training_cases(m: Model, S: int, dense: bool) -> list[Case]:
    """The indexer-loss ops (V3.2 shapes) and, for short sequences, the dense warm-up target."""
    k = m.topks[0]
    label = f"{m.name} S={S}"
    inputs = nbytes(S, m.HI, m.DI, itemsize=2) + nbytes(S, m.DI, itemsize=2) + nbytes(S, m.HI, itemsize=4)
    loss_bytes = inputs + 2 * nbytes(S, k, itemsize=4)
    cases = [
        case("indexer_loss", label, m.name, S, functools.partial(indexer_loss_inputs, m, S, k),
             2 * S * m.HI * k * m.DI, loss_bytes, S),
        case("indexer_loss_backward", label, m.name, S, functools.partial(indexer_loss_inputs, m, S, k, backward=True),
             3 * 2 * S * m.HI * k * m.DI, loss_bytes + inputs, S),
    ]
    if dense:
        cases.append(case("dense_attn_score", label, m.name, S, functools.partial(dense_attn_score_inputs, m, S),
                          2 * m.H * m.D * common.visible_pairs(S, S, 1),
                          nbytes(S, m.H, m.D, itemsize=2) + nbytes(S, m.D, itemsize=2) + nbytes(S, S, itemsize=4), S))
    return cases


def decode_cases(m: Model, B: int, sc: Scale, attention_only: bool) -> list[Case]:
    """One query per sequence over a paged cache: sparse attention over K cached tokens, and the indexer
    top-k over the (compressed) cache."""
    cases = []
    for k in m.topks:
        series, ctx = series_name(m, k), sc.decode_ctx
        cases.append(case("sparse_attention_decode", f"{series} B={B} ctx={ctx}", series, B,
                          functools.partial(decode_inputs, m, B, ctx, sc.page, k),
                          2 * B * m.H * k * (m.D + m.d_v),
                          nbytes(B, m.H, m.D, itemsize=2) + nbytes(B, min(k, ctx), m.D, itemsize=2)
                          + nbytes(B, k, itemsize=4) + nbytes(B, m.H, m.d_v, itemsize=2) + nbytes(B, m.H, itemsize=4),
                          B, x_name="batch"))
        if attention_only:
            continue
        ctx = sc.decode_ctx // m.ratio
        cases.append(case("indexer_topk_paged", f"{series} B={B} ctx={ctx}", series, B,
                          functools.partial(paged_topk_inputs, m, B, ctx, sc.page, k),
                          2 * m.HI * m.DI * B * ctx,
                          nbytes(B, m.HI, m.DI, itemsize=2) + nbytes(B, ctx, m.DI, itemsize=2)
                          + nbytes(B, m.HI, itemsize=4) + nbytes(B, k, itemsize=8), B, x_name="batch"))
    return cases


def headline_cases(device: torch.device) -> list[Case]:
    """`--headline`: the shapes of the performance targets in the issues (and the published baselines):
    top-k of 4096 x {8192, 65536}, k=2048; indexer logits / fused top-k with 4096 queries (the last tokens)
    over {8192, 65536} keys; sparse attention forward T=4096 over S_kv=8192 (and 65536 at H=128), backward
    T=4096 over 8192, fast and deterministic, K=2048, D=576, H in {128, 64, 32, 16}."""
    if device.type != "cuda":  # the same list at toy sizes, for the CPU smoke test
        v32, T, skv, K, rows = CPU_MODELS[0], 64, (128, 256), 16, 32
        heads = (v32.H, 2)
    else:
        v32, T, skv, K, rows = GPU_MODELS[0], 4096, (8192, 65536), 2048, 4096
        heads = (128, 64, 32, 16)
    cases = []
    HI, DI = v32.HI, v32.DI
    for Sk in skv:
        cases.append(case("topk", f"{rows}x{Sk} k={K}", "topk", Sk, functools.partial(topk_inputs, rows, Sk, K), 0,
                          nbytes(rows, Sk, itemsize=4) + nbytes(rows, K, itemsize=8), rows, x_name="S_k"))
        vis = common.visible_pairs(T, Sk, 1)
        inputs = nbytes(T, HI, DI, itemsize=2) + nbytes(Sk, DI, itemsize=2) + nbytes(T, HI, itemsize=4)
        label = f"Sq={T} Sk={Sk}"
        cases.append(case("indexer_logits", label, "V3.2 Sq=4096", Sk,
                          functools.partial(logits_inputs, v32, T, Sk=Sk), 2 * HI * DI * vis,
                          inputs + nbytes(T, Sk, itemsize=4), T, x_name="S_k"))
        cases.append(case("indexer_topk", f"{label} k={K}", "V3.2 Sq=4096", Sk,
                          functools.partial(indexer_topk_inputs, v32, T, K, Sk=Sk), 2 * HI * DI * vis,
                          inputs + nbytes(T, K, itemsize=8), T, x_name="S_k"))
    for H in heads:
        m = dataclasses.replace(v32, name=f"V3.2 H={H}", H=H)
        for S_kv in (skv if H == heads[0] else skv[:1]):
            cases.append(case("sparse_attention", f"H={H} T={T} S_kv={S_kv} K={K}", f"H={H}", S_kv,
                              functools.partial(sparse_attention_inputs, m, T, K, S_kv=S_kv),
                              2 * T * H * K * (m.D + m.d_v), attention_traffic(m, T, S_kv, K)["sparse_attention"],
                              T, x_name="S_kv"))
        S_kv = skv[0]
        for det in (False, True):
            mode = "deterministic" if det else "fast"
            cases.append(case("sparse_attention_backward", f"H={H} T={T} S_kv={S_kv} K={K} {mode}",
                              f"H={H} {mode}", S_kv,
                              functools.partial(sparse_attention_backward_inputs, m, T, K, S_kv=S_kv, deterministic=det),
                              2 * T * H * K * (3 * m.D + 2 * m.d_v),
                              attention_traffic(m, T, S_kv, K)["sparse_attention_backward"], T, x_name="S_kv"))
    cases.sort(key=lambda c: c.roofline_ms)
    return cases


def make_cases(device: torch.device, quick: bool) -> list[Case]:
    """Every case, cheapest first (so a --max-seconds cut drops the largest shapes of every op)."""
    on_gpu = device.type == "cuda"
    models = GPU_MODELS if on_gpu else CPU_MODELS
    sc = (GPU_QUICK if quick else GPU_FULL) if on_gpu else (CPU_QUICK if quick else CPU_FULL)
    v32 = models[0]
    shards = [dataclasses.replace(v32, name=f"V3.2 H={H}", H=H) for H in sc.small_heads]
    cases = []
    for S in sc.seqs:
        for m in models:
            cases += indexer_cases(m, S, sc.topk_rows, with_backward=m is v32)
            for k in m.topks:
                cases += attention_cases(m, S, k, series_name(m, k), with_scores=True)
        for m in shards:  # tensor-parallel shards of V3.2: the attention kernels at small H
            cases += attention_cases(m, S, m.topks[0], m.name, with_scores=True)
        cases += training_cases(v32, S, dense=S <= sc.dense_max_seq)
    for B in sc.decode_batches:
        for m in models:
            cases += decode_cases(m, B, sc, attention_only=False)
        for m in shards:
            cases += decode_cases(m, B, sc, attention_only=True)
    cases.sort(key=lambda c: c.roofline_ms)
    return cases


# ======================================================================================================
# Per-op knowledge: the reference, how to take rows out of arguments and outputs, how to compare
# ======================================================================================================
@dataclass(frozen=True)
class OpInfo:
    reference: Callable
    arg_dims: tuple                  # per positional argument: the dim that indexes rows, or None (shared)
    out_dims: tuple                  # per output: its row dim, or None when it mixes rows (dkv, a loss)
    compare: Callable                # (got, want, checked args, tolerance factor) -> (ok, note)
    q_start: Optional[tuple] = None  # (q arg, keys arg, ratio arg, q_start arg): q_start moves with the rows


def slice_args(info: OpInfo, args: tuple, rows: slice) -> tuple:
    out = list(args)
    for i, dim in enumerate(info.arg_dims):
        if dim is not None and args[i] is not None:
            out[i] = args[i].narrow(dim, rows.start, rows.stop - rows.start).contiguous()
    if info.q_start is not None:
        q_pos, k_pos, ratio_pos, start_pos = info.q_start
        q, q_start = args[q_pos], args[start_pos]
        if q_start is None:  # the default: the queries are the last tokens
            q_start = torch.full((q.shape[0],), args[k_pos].shape[1] * args[ratio_pos] - q.shape[1],
                                 dtype=torch.int32, device=q.device)
        out[start_pos] = (q_start + rows.start).to(torch.int32)
    return tuple(out)


def _close(names, tol, cos_min=None):
    """Compare outputs by name at one tolerance (SPEC section 9)."""
    def compare(got, want, args, factor):
        return common.all_ok([check_close(n, g, w, tol * factor, cos_min) for n, g, w in zip(names, got, want)])
    return compare


def _attention_compare(got, want, args, factor):
    return common.all_ok([check_close("out", got[0], want[0], 1e-2 * factor),
                          check_close("lse", got[1], want[1], 2e-3 * factor)])


def _topk_compare(got, want, args, factor):
    return common.check_topk_exact(got[0], got[1], want[0], want[1])


def _indexer_topk_compare(got, want, args, factor):
    q, k, w, topk, scale, ratio, q_start = args[:7]
    scores = ref_indexer.indexer_logits(q, k, w, scale, ratio, q_start)
    return common.check_topk_near(got[0], got[1], scores, topk, 1e-3 * factor)


def _paged_topk_compare(got, want, args, factor):
    q, cache, table, seq_lens, w, topk, scale = args
    B, Sq = q.shape[:2]
    keys = cache[table.long()].reshape(B, -1, cache.shape[-1])  # token t of sequence b at row t
    scores = ref_indexer.indexer_logits(q, keys, w, scale, 1, (seq_lens - Sq).to(torch.int32))
    return common.check_topk_near(got[0], got[1], scores, topk, 1e-3 * factor)


GRADS = dict(tol=2e-2, cos_min=0.999)  # SPEC section 9: gradients
OPS: dict[str, OpInfo] = {
    "indexer_logits": OpInfo(ref_indexer.indexer_logits, (1, None, 1, None, None, None), (1,),
                             _close(["scores"], 2e-3), q_start=(0, 1, 4, 5)),
    "indexer_logits_backward": OpInfo(ref_indexer.indexer_logits_backward, (1, 1, None, 1, None, None, None),
                                      (1, None, 1), _close(["dq", "dk", "dw"], **GRADS), q_start=(1, 2, 5, 6)),
    "topk": OpInfo(ref_indexer.topk, (0, None, 0, None), (0, 0), _topk_compare),
    "indexer_topk": OpInfo(ref_indexer.indexer_topk, (1, None, 1) + (None,) * 6, (1, 1), _indexer_topk_compare,
                           q_start=(0, 1, 5, 6)),
    "indexer_topk_paged": OpInfo(ref_indexer.indexer_topk_paged, (0, None, 0, 0, 0, None, None), (0, 0),
                                 _paged_topk_compare),
    "sparse_indexer_score": OpInfo(ref_indexer.sparse_indexer_score, (1, None, 1, 1, None, 1), (1,),
                                   _close(["predict"], 2e-3)),
    "sparse_attention": OpInfo(ref_attention.sparse_attention, (0, None, 0, None, None, None, 0), (0, 0),
                               _attention_compare),
    "sparse_attention_backward": OpInfo(ref_attention.sparse_attention_backward,
                                        (0, 0, None, 0, 0, 0, None, None, None, 0, None), (0, None, None),
                                        _close(["dq", "dkv", "d_sink"], **GRADS)),
    "sparse_attention_decode": OpInfo(ref_attention.sparse_attention_decode,
                                      (0, None, 0, 0, 0, None, None, None, 0), (0, 0), _attention_compare),
    "sparse_attn_score": OpInfo(ref_attention.sparse_attn_score, (0, None, 0, 0, None, 0), (0,),
                                _close(["target"], 2e-3)),
    "dense_attn_score": OpInfo(ref_attention.dense_attn_score, (1, None, 1, None, None, None), (1, 1),
                               _close(["scores", "l1"], 2e-3), q_start=(0, 1, 4, 5)),
    # the loss averages over rows, so no output of a row subset equals a slice of the whole one
    "indexer_loss": OpInfo(ref_loss.indexer_loss, (1, None, 1, 1, 1, None, None, 1), (None,),
                           _close(["loss"], 2e-3)),
    "indexer_loss_backward": OpInfo(ref_loss.indexer_loss_backward, (None, 1, None, 1, 1, 1, None, None, 1),
                                    (None, None, None), _close(["dq", "dk", "dw"], **GRADS)),
}


# ======================================================================================================
# Baselines. Each takes the op's positional arguments and returns its outputs in the op's format.
# ======================================================================================================
def torch_topk(scores, k, lengths, sorted_):
    if lengths is not None:
        cols = torch.arange(scores.shape[-1], device=scores.device)
        scores = scores.masked_fill(cols >= lengths[..., None], float("-inf"))
    values, ids = torch.topk(scores, k, dim=-1, sorted=sorted_)
    return torch.where(torch.isneginf(values), -1, ids).to(torch.int32), values


@contextlib.contextmanager
def tf32_matmuls():
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def torch_indexer_logits(q_idx, k_idx, w, scale, ratio, q_start):
    """einsum baseline, in row chunks: per-head q.k on TF32 tensor cores over fp32 copies of the bf16
    inputs (bf16 values are exact in TF32, so the products are exact and the sum fp32, as in a bf16 MMA with
    fp32 accumulation; a plain bf16 einsum would round every head's score to bf16), then ReLU, the
    head-weighted sum and the mask in fp32."""
    B, Sq, HI, _ = q_idx.shape
    Sk = k_idx.shape[1]
    out = torch.empty(B, Sq, Sk, dtype=torch.float32, device=q_idx.device)
    if q_start is None:
        q_start = torch.full((B,), Sk * ratio - Sq, device=q_idx.device)
    keys = torch.arange(Sk, device=q_idx.device)
    step = max(1, (1 << 27) // (HI * Sk))
    for b in range(B):
        k_b = k_idx[b].float()
        for r0 in range(0, Sq, step):
            r1 = min(Sq, r0 + step)
            with tf32_matmuls():
                s = torch.einsum("qhd,kd->qhk", q_idx[b, r0:r1].float(), k_b)
            # relu(scale * x) = scale * relu(x) for scale > 0: the scale folds into w
            rows = torch.einsum("qhk,qh->qk", s.relu_(), w[b, r0:r1].float() * scale)
            limit = torch.div(q_start[b] + torch.arange(r0, r1, device=q_idx.device) + 1, ratio, rounding_mode="floor")
            out[b, r0:r1] = rows.masked_fill(keys[None, :] >= limit[:, None], float("-inf"))
    return out


def torch_indexer_topk(q_idx, k_idx, w, topk, scale, ratio, q_start, cu_q=None, cu_k=None):
    if cu_q is not None or cu_k is not None:
        raise ValueError("this baseline has no packed form")
    scores = torch_indexer_logits(q_idx, k_idx, w, scale, ratio, q_start)
    take = min(topk, scores.shape[-1])
    ids, values = torch_topk(scores, take, None, False)
    if take < topk:
        pad = (0, topk - take)
        ids = torch.nn.functional.pad(ids, pad, value=-1)
        values = torch.nn.functional.pad(values, pad, value=float("-inf"))
    return ids, values


def torch_indexer_topk_paged(q_idx, cache, table, seq_lens, w, topk, scale):
    B, Sq = q_idx.shape[:2]
    keys = cache[table.long()].reshape(B, -1, cache.shape[-1])
    return torch_indexer_topk(q_idx, keys, w, topk, scale, 1, (seq_lens - Sq).to(torch.int32))


def torch_sparse_attention(q, kv, indices, scale, d_v, attn_sink, topk_length):
    """Gather the selected rows, two batched bf16 matmuls, fp32 softmax; in query chunks."""
    T, H, D = q.shape
    K = indices.shape[1]
    out = torch.empty(T, H, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    slots = torch.arange(K, device=q.device)
    step = max(1, (1 << 26) // (K * D))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        ids = indices[t0:t1]
        valid = (ids >= 0) & (ids < kv.shape[0])
        if topk_length is not None:
            valid &= slots[None, :] < topk_length[t0:t1, None]
        rows = kv[torch.where(valid, ids, 0).long()]                           # [c, K, D]
        s = torch.matmul(q[t0:t1], rows.transpose(1, 2)).float() * scale        # [c, H, K]
        s.masked_fill_(~valid[:, None, :], float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        denom = row_lse if attn_sink is None else torch.logaddexp(row_lse, attn_sink[None, :])
        p = torch.exp(s - torch.where(torch.isneginf(denom), 0.0, denom)[..., None])
        out[t0:t1] = torch.matmul(p.to(q.dtype), rows[..., :d_v])
        lse[t0:t1] = torch.where(torch.isneginf(row_lse), float("inf"), row_lse)
    return out, lse


def torch_sparse_attention_decode(q, cache, table, seq_lens, indices, scale, d_v, attn_sink, topk_length):
    """Token positions -> cache rows through the block table, then the packed torch baseline."""
    B, Sq, H, D = q.shape
    page = cache.shape[1]
    tokens = indices.long()
    valid = (tokens >= 0) & (tokens < seq_lens.long()[:, None, None])
    if topk_length is not None:
        valid &= torch.arange(tokens.shape[-1], device=q.device) < topk_length[..., None]
    safe = torch.where(valid, tokens, 0)
    pages = torch.gather(table.long(), 1, (safe // page).view(B, -1)).view_as(safe)
    rows = torch.where(valid, pages * page + safe % page, -1)
    out, lse = torch_sparse_attention(q.reshape(B * Sq, H, D), cache.reshape(-1, D), rows.view(B * Sq, -1),
                                      scale, d_v, attn_sink, None)
    return out.view(B, Sq, H, d_v), lse.view(B, Sq, H)


# ---- cuDNN frontend DSA adapters --------------------------------------------------------------------------
# Written against nvidia-cudnn-frontend 1.32.0 (`from cudnn import DSA`). Each returns the op's outputs in OUR
# conventions (SPEC) and raises where cuDNN cannot compute what the op computes; the runner then lists the
# baseline as unavailable. No stream is passed: with stream=None every DSA wrapper launches on torch's
# current stream. On SM90 (H100/H200) the sparse attention forward is missing (its wrapper is SM100-only).
_cudnn: Optional[tuple] = None
_TOPK_CALL_ELEMENTS = 1 << 30  # scores per cuDNN top-k call: its radix scratch is 2 int32 words per fp32 score


def cudnn_dsa():
    global _cudnn
    if _cudnn is None:
        _cudnn = common.load_cudnn_dsa()
    dsa, note = _cudnn
    if dsa is None:
        raise RuntimeError(f"cannot import cudnn.DSA ({note})")
    return dsa


def _causal_offsets(q_start, B, Sq, Sk, ratio, device):
    """cuDNN's q_causal_offsets (int32 [B], the token position of each sequence's first query; the mask is
    k < (offset + q + 1) // ratio, ours) for our q_start. Its default is 0, ours Sk * ratio - Sq: None where
    the two agree."""
    if q_start is None:
        if Sk * ratio == Sq:
            return None
        return torch.full((B,), Sk * ratio - Sq, dtype=torch.int32, device=device)
    return q_start.to(torch.int32).contiguous()


def _positive_scale(scale):
    # cuDNN scales the head-weighted ReLU sum, we scale inside the ReLU: equal only for scale > 0
    if not scale > 0:
        raise RuntimeError(f"cuDNN applies the indexer scale after the ReLU: same op only for scale > 0, got {scale}")


def _score_ids(indices, n_keys, topk_length):
    """Indices for cuDNN's sparse score recomputes, which skip only ids < 0 (an id >= S_kv reads a zero row and
    counts) and, given topk_length, stop looking at ids at all: every invalid slot of ours becomes -1 and
    topk_length is folded in. K is padded with -1 to a multiple of 128 (the SM90 kernels reduce a row in
    128-slot steps). Returns (ids, K)."""
    K = indices.shape[-1]
    valid = (indices >= 0) & (indices < n_keys)
    if topk_length is not None:
        valid &= torch.arange(K, device=indices.device) < topk_length[..., None]
    ids = torch.where(valid, indices, -1).to(torch.int32)
    if K % 128:
        ids = torch.nn.functional.pad(ids, (0, -K % 128), value=-1)
    return ids.contiguous(), K


def cudnn_topk(scores, k, lengths, sorted_):
    """cuDNN's radix top-k (SM90+, k <= 2048) with tie_break=1: among equal values the smaller column wins, our
    rule (except that it orders +0 before -0, which we tie). Rows are cut into calls of at most
    _TOPK_CALL_ELEMENTS scores, each starting on a 32-byte boundary, to bound its scratch."""
    dsa = cudnn_dsa()
    C = scores.shape[-1]
    rows = scores.reshape(-1, C)
    R = rows.shape[0]
    if lengths is None:
        seq_lens = torch.full((R,), C, dtype=torch.int32, device=scores.device)
    else:  # cuDNN wants 0 <= seq_lens <= C; ours reads a longer length as the whole row
        seq_lens = lengths.reshape(-1).clamp(0, C).to(torch.int32)
    take = min(k, C)
    step = max(8, _TOPK_CALL_ELEMENTS // max(C, 1) // 8 * 8)
    parts = [dsa.indexer_top_k_wrapper(rows[r0:r0 + step], seq_lens[r0:r0 + step], take, next_n=1,
                                       return_val=True, tie_break=1) for r0 in range(0, R, step)]
    ids = torch.cat([p["indices"] for p in parts]) if len(parts) > 1 else parts[0]["indices"]
    values = torch.cat([p["values"] for p in parts]) if len(parts) > 1 else parts[0]["values"]
    values = values.float()
    ids = torch.where(torch.isneginf(values), -1, ids)  # cuDNN pads short rows -1/-inf, but may pick a -inf score
    if take < k:
        ids = torch.nn.functional.pad(ids, (0, k - take), value=-1)
        values = torch.nn.functional.pad(values, (0, k - take), value=float("-inf"))
    if sorted_:  # cuDNN's order is unspecified; ours: value descending, then index ascending
        by_id = ids.sort(dim=-1, stable=True).indices
        ids, values = ids.gather(-1, by_id), values.gather(-1, by_id)
        by_value = values.sort(dim=-1, descending=True, stable=True).indices
        ids, values = ids.gather(-1, by_value), values.gather(-1, by_value)
    return ids.view(*scores.shape[:-1], k), values.view(*scores.shape[:-1], k)


def cudnn_indexer_logits(q_idx, k_idx, w, scale, ratio, q_start):
    """cuDNN's dense indexer forward (SM90: H_I in {16, 32, 64}, D_I = 128; bf16 q/k, fp32 w): masked keys
    come back -inf, as ours."""
    dsa = cudnn_dsa()
    _positive_scale(scale)
    offsets = _causal_offsets(q_start, q_idx.shape[0], q_idx.shape[1], k_idx.shape[1], ratio, q_idx.device)
    return dsa.indexer_forward_wrapper(q_idx, k_idx.unsqueeze(2), w, ratio=ratio, sm_scale=scale,
                                       q_causal_offsets=offsets)["scores"]  # k as [B, S_k, 1 head, D]


def cudnn_indexer_topk(q_idx, k_idx, w, topk, scale, ratio, q_start, cu_q=None, cu_k=None):
    """cuDNN's SM90 path is two kernels: dense scores, then its radix top-k over each row's visible keys (its
    fused indexer_forward_top_k_wrapper is SM100-only)."""
    if cu_q is not None or cu_k is not None:
        raise ValueError("this baseline has no packed form")
    scores = cudnn_indexer_logits(q_idx, k_idx, w, scale, ratio, q_start)
    B, Sq, Sk = scores.shape
    starts = q_start if q_start is not None else torch.full((B,), Sk * ratio - Sq, device=scores.device)
    pos = starts.long()[:, None] + torch.arange(Sq, device=scores.device)
    visible = torch.div(pos + 1, ratio, rounding_mode="floor").clamp(0, Sk).to(torch.int32)
    ids, values = cudnn_topk(scores.reshape(B * Sq, Sk), topk, visible.reshape(-1), False)
    return ids.view(B, Sq, topk), values.view(B, Sq, topk)


def cudnn_sparse_attention(q, kv, indices, scale, d_v, attn_sink, topk_length):
    """SM100 only; (H, D) in {(64, 512), (64, 576), (128, 512)}. Its lse is ours: natural log, over the valid
    slots only (no sink), +inf with out = 0 on empty rows; ids < 0, >= S_kv or past topk_length are skipped."""
    dsa = cudnn_dsa()
    if d_v != 512:
        raise RuntimeError(f"cuDNN's sparse attention forward has d_v = 512 only, got {d_v}")
    res = dsa.sparse_attention_forward_wrapper(q, kv, indices.to(torch.int32), attn_sink=attn_sink,
                                               topk_length=topk_length, softmax_scale=scale)
    return res["out"], res["lse"]


def cudnn_sparse_attention_backward(dout, q, kv, out, lse, indices, scale, d_v, attn_sink, topk_length, det):
    """D in {512, 576}; it takes our natural-log, sink-free lse (+inf: empty row) and skips invalid slots as we
    do. deterministic=True exists on SM100 only (SM90 refuses it)."""
    dsa = cudnn_dsa()
    D, H = q.shape[-1], q.shape[1]
    if d_v != (512 if D == 576 else D):
        raise RuntimeError(f"cuDNN's backward takes V = kv[:, :512] for D = 576, else all of kv; got D={D}, d_v={d_v}")
    # it always takes a sink: -inf is none (its sink probability, hence d_sink, is then 0)
    sink = attn_sink if attn_sink is not None else torch.full((H,), float("-inf"), device=q.device)
    res = dsa.sparse_attention_backward_wrapper(q, kv, out, dout, lse, sink, indices, softmax_scale=scale,
                                                topk_length=topk_length, deterministic=bool(det))
    d_sink = res["d_sink"] if attn_sink is not None else torch.zeros(H, device=q.device)
    return res["dq"], res["dkv"], d_sink


def cudnn_sparse_attn_score(q, kv, lse, indices, scale, topk_length):
    """Batch layout with B = 1. It divides by (row sum + 1e-10), we by max(row sum, 1e-12): the same unless a
    row's probabilities sum to ~1e-10."""
    dsa = cudnn_dsa()
    ids, K = _score_ids(indices, kv.shape[0], topk_length)
    res = dsa.sparse_attn_score_recompute_wrapper(q[None], kv[None], lse[None], ids[None], scale)
    return res["target"][0, :, :K]


def cudnn_sparse_indexer_score(q_idx, k_idx, w, indices, scale, topk_length):
    dsa = cudnn_dsa()
    _positive_scale(scale)
    ids, K = _score_ids(indices, k_idx.shape[1], topk_length)
    # its wrapper takes bf16 weights and no scale: fold the scale into w (ReLU is positively homogeneous);
    # the bf16 rounding of w is well inside the baseline tolerance
    w_scaled = (w.float() * scale).to(torch.bfloat16)
    res = dsa.sparse_indexer_score_recompute_wrapper(q_idx, k_idx, w_scaled, ids)
    return res["predict"][..., :K]


def cudnn_dense_attn_score(q, kv, lse, scale, ratio, q_start):
    dsa = cudnn_dsa()
    offsets = _causal_offsets(q_start, q.shape[0], q.shape[1], kv.shape[1], ratio, q.device)
    res = dsa.dense_attn_score_recompute_wrapper(q, kv.unsqueeze(2), lse, scale, ratio=ratio,
                                                 q_causal_offsets=offsets)
    # cuDNN marks masked keys -inf (its raw-score convention), ours 0; visible entries are sums of exps (>= 0)
    return res["out"].clamp_(min=0.0), res["denom"]


# "reference" is added to every op by the runner; these are the others
OP_BASELINES = {
    "topk": {"torch": torch_topk, "cudnn": cudnn_topk},
    "indexer_logits": {"torch": torch_indexer_logits, "cudnn": cudnn_indexer_logits},
    "indexer_topk": {"torch": torch_indexer_topk, "cudnn": cudnn_indexer_topk},
    "indexer_topk_paged": {"torch": torch_indexer_topk_paged},
    "sparse_indexer_score": {"cudnn": cudnn_sparse_indexer_score},
    "sparse_attention": {"torch": torch_sparse_attention, "cudnn": cudnn_sparse_attention},
    "sparse_attention_backward": {"cudnn": cudnn_sparse_attention_backward},
    "sparse_attention_decode": {"torch": torch_sparse_attention_decode},
    "sparse_attn_score": {"cudnn": cudnn_sparse_attn_score},
    "dense_attn_score": {"cudnn": cudnn_dense_attn_score},
}
OP_ORDER = list(OPS)
# ops whose natural throughput measure is bytes moved (the plot's y axis; the table shows both)
MEMORY_BOUND_OPS = {"topk", "sparse_attention_decode", "indexer_topk_paged"}


# ======================================================================================================
# Running one case
# ======================================================================================================
@dataclass
class Settings:
    device: torch.device
    budget_s: float            # timed repetitions of one implementation take about this long
    check_rows: int
    max_ref_s: float           # a reference slower than this per call is extrapolated, not run whole
    compile_reference: bool = False
    also_backends: tuple = ()  # our other backends to time as baselines ("triton", "cute")


def as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _reason(exc: BaseException) -> str:
    return common.short(f"{type(exc).__name__}: {exc}", 200)


def evaluate(fn, arg_sets, sub_args, want, info: OpInfo, rows: slice, whole: bool, tol_factor: float,
             cfg: Settings, check: bool = True) -> dict:
    """Check `fn` against the reference outputs `want` on the checked rows, then time it. `check=False`
    (the reference itself) goes straight to the timing, which makes its own first call."""
    if not check:
        return _timed(fn, arg_sets, cfg, {"status": "ok", "note": "the oracle"})
    args = arg_sets[0]
    try:
        with torch.no_grad():
            full = as_tuple(fn(*args))                   # the warm-up call; its output is the one checked
            mixed = any(d is None for d in info.out_dims) and not whole
            alone = as_tuple(fn(*sub_args)) if mixed else full
        got = tuple(f if whole else (f.narrow(d, rows.start, rows.stop - rows.start) if d is not None else a)
                    for f, a, d in zip(full, alone, info.out_dims))
    except Exception as exc:  # noqa: BLE001 - a failing implementation is a result, not a crash
        return {"status": "error", "note": _reason(exc)}
    try:
        ok, note = info.compare(got, want, sub_args, tol_factor)
    except Exception as exc:  # noqa: BLE001 - outputs of the wrong shape or type
        ok, note = False, _reason(exc)
    del full, alone, got
    if not ok:
        return {"status": "WRONG", "note": note}
    return _timed(fn, arg_sets, cfg, {"status": "ok", "note": note})


def _timed(fn, arg_sets, cfg: Settings, result: dict) -> dict:
    try:
        with torch.no_grad():
            t = common.measure(fn, arg_sets, cfg.device, cfg.budget_s)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory while timing
        return {"status": "error", "note": "while timing: " + _reason(exc)}
    return {**result, "ms": t.ms, "min_ms": t.min_ms, "reps": t.reps, "peak_mib": t.peak_mib}


def op_with_backend_forced(op_name: str, backend: str) -> Callable:
    """Our op with DSA_OPS_BACKEND forcing `backend` for this op during the call (to compare two of our
    backends, e.g. cute vs triton); a backend that cannot run the call raises."""
    op = getattr(torch.ops.dsa, op_name)

    def call(*args):
        saved = os.environ.get(dispatch.ENV_FORCE)
        os.environ[dispatch.ENV_FORCE] = f"{op_name}={backend}"
        try:
            return op(*args)
        finally:
            if saved is None:
                del os.environ[dispatch.ENV_FORCE]
            else:
                os.environ[dispatch.ENV_FORCE] = saved
    return call


def _throughput(result: dict, case: Case) -> None:
    ms = result.get("ms")
    if ms:
        result["tflops"] = case.flops / ms / 1e9
        result["gbps"] = case.bytes / ms / 1e6


def run_case(case: Case, cfg: Settings) -> dict:
    info = OPS[case.op]
    op = getattr(torch.ops.dsa, case.op)
    row = {"op": case.op, "label": case.label, "series": case.series, "x": case.x, "x_name": case.x_name,
           "flops": case.flops, "bytes": case.bytes, "roofline_ms": case.roofline_ms,
           "metric": "GB/s" if case.op in MEMORY_BOUND_OPS else "TFLOP/s", "baselines": {}}
    try:
        args = case.build_inputs(cfg.device, 0)
        row["backend"] = dispatch.choose(case.op, args)[0].backend
    except Exception as exc:  # noqa: BLE001
        row.update(backend="?", status="error", note="building inputs / dispatch: " + _reason(exc))
        return row

    # the reference on the checked rows: the oracle, and an estimate of its time on the whole input
    n = min(case.rows, cfg.check_rows)
    rows = slice(case.rows - n, case.rows)
    whole = n == case.rows
    sub_args = args if whole else slice_args(info, args, rows)
    with torch.no_grad():
        want, ref_ms = common.wall_ms(lambda: as_tuple(info.reference(*sub_args)), cfg.device)
    ref_estimate_ms = ref_ms * case.rows / n
    row["checked_rows"] = [n, case.rows]

    copies = common.rotation_copies(common.tensor_bytes(args), case.memory_bound, cfg.device)
    arg_sets = [args] + [case.build_inputs(cfg.device, seed) for seed in range(1, copies)]
    row["input_copies"] = copies

    def run(fn, tol_factor, check=True):
        result = evaluate(fn, arg_sets, sub_args, want, info, rows, whole, tol_factor, cfg, check)
        _throughput(result, case)
        return result

    too_slow = ref_estimate_ms > cfg.max_ref_s * 1e3
    if row["backend"] == "reference" and too_slow:
        ours = {"status": "skipped", "note": f"reference backend, ~{ref_estimate_ms / 1e3:.0f} s per call"}
    else:
        ours = run(op, 1.0)
    row.update(ours)

    baselines = {"reference": info.reference, **case.baselines}
    if cfg.compile_reference:
        baselines["reference+compile"] = torch.compile(info.reference, dynamic=False)
    ours_family = row["backend"].split("-")[0]
    for backend in cfg.also_backends:
        if backend != ours_family and backend != row["backend"]:
            baselines[backend] = op_with_backend_forced(case.op, backend)
    for name, fn in baselines.items():
        if name.startswith("reference"):
            if row["backend"] == "reference":
                result = {"status": "same", "note": "ours is the reference"}
            elif too_slow and name == "reference":
                result = {"status": "estimated", "est_ms": ref_estimate_ms,
                          "note": f"extrapolated from {n} of {case.rows} rows"}
            elif too_slow:
                result = {"status": "skipped", "note": "the eager reference is too slow to run whole"}
            else:  # the oracle needs no check; its compiled form does (and a warm-up: the compile)
                result = run(fn, 1.0, check=name != "reference")
        else:  # other implementations: ours at the SPEC tolerance, the others at the looser one
            result = run(fn, 1.0 if name in cfg.also_backends else BASELINE_TOL_FACTOR)
            if result["status"] == "error":
                result["status"] = "unavailable"
        base_ms = result.get("ms") or result.get("est_ms")
        if base_ms and row.get("ms"):
            result["speedup"] = base_ms / row["ms"]
        row["baselines"][name] = result
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def progress_line(i: int, total: int, elapsed: float, row: dict) -> str:
    head = f"[{i + 1:>3}/{total} {elapsed:6.0f}s] {row['op']:<26} {row['label']:<26} {row.get('backend', '?'):<10}"
    if row.get("ms"):
        head += f" {row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s {row['gbps']:7.0f} GB/s " \
                f"{100 * row['roofline_ms'] / row['ms']:4.0f}% roofline"
    else:
        head += f" {row['status']}: {common.short(row.get('note', ''), 90)}"
    parts = [head]
    for name, b in row.get("baselines", {}).items():
        parts.append(f"{name} {baseline_cell(b, why=True)}")
    return " | ".join(parts)


# ======================================================================================================
# Op-boundary overhead (benchmarks/bench_overhead.py)
# ======================================================================================================
def op_boundary_overhead(device: torch.device) -> dict:
    """Runs bench_overhead's table (fewer calls on the CPU smoke run) and parses its rows."""
    from . import bench_overhead

    saved_argv, saved_timer = sys.argv, bench_overhead.per_call_us
    sys.argv = ["bench_overhead", "--device", device.type]
    if device.type != "cuda":
        bench_overhead.per_call_us = functools.partial(saved_timer, n=100, rounds=3)
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            bench_overhead.main()
    except Exception as exc:  # noqa: BLE001 - the table is extra information
        return {"error": _reason(exc), "rows": []}
    finally:
        sys.argv, bench_overhead.per_call_us = saved_argv, saved_timer
    rows = []
    for line in text.getvalue().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("op", "---") and not cells[0].startswith("-"):
            try:
                rows.append({"op": cells[0], "boundary_us": float(cells[1]), "with_grad_us": float(cells[2])})
            except ValueError:
                pass
    return {"rows": rows, "text": text.getvalue()}


# ======================================================================================================
# Report
# ======================================================================================================
def baseline_cell(b: dict, why: bool = False) -> str:
    """A baseline's table cell; `why` adds the reason it is unavailable (the progress lines want it)."""
    status = b["status"]
    if status == "ok":
        ratio = f" ({b['speedup']:.2f}x)" if "speedup" in b else ""
        return f"{b['ms']:.3f} ms{ratio}"
    if status == "estimated":
        ratio = f" (~{b['speedup']:.0f}x)" if "speedup" in b else ""
        return f"~{b['est_ms']:.0f} ms{ratio}"
    if status == "same":
        return "= ours"
    if status == "WRONG":
        return f"WRONG ({common.short(b['note'], 50)})"
    return f"{status} ({common.short(b.get('note', ''), 80)})" if why else status


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# dsa_ops benchmarks", "",
        f"- device: {meta['device']}; torch {meta['torch']}; triton {meta['triton']}; cuDNN: {meta['cudnn']}",
        f"- {meta['time']}; mode: {meta['mode']}; DSA_OPS_BACKEND={meta['forced_backend'] or '(unset)'}",
        f"- roofline: {meta['peak_tflops']:.0f} TFLOP/s (bf16 matmul), {meta['peak_gbps']:.0f} GB/s (copy); "
        "% roofline = max(FLOPs / peak, compulsory bytes / bandwidth) / time",
        "- baseline columns: time (baseline time / our time; > 1 means ours is faster); "
        "`~`: extrapolated from the checked rows",
        "- peak MiB: torch.cuda.max_memory_allocated during one call minus what was allocated before it "
        "(outputs included)",
        "- every timed output was first compared with the reference on the checked rows (SPEC section 9)",
        "",
    ]
    for op in OP_ORDER:
        op_rows = [r for r in result["rows"] if r["op"] == op]
        if not op_rows:
            continue
        names = []
        for r in op_rows:
            names += [n for n in r.get("baselines", {}) if n not in names]
        lines += [f"## {op}", "",
                  "| shape | backend | ms | TFLOP/s | GB/s | % roofline | peak MiB | "
                  + " | ".join(f"vs {n}" for n in names) + " | check |",
                  "| --- " * (8 + len(names)) + "|"]
        reasons = {}
        for r in sorted(op_rows, key=lambda r: (r["series"], r["x"])):
            if r.get("ms"):
                timing = [f"{r['ms']:.3f}", _fmt(r["tflops"], ".1f"), _fmt(r["gbps"], ".0f"),
                          f"{100 * r['roofline_ms'] / r['ms']:.0f}%", _fmt(r.get("peak_mib"), ".0f")]
            else:
                timing = [r.get("status", "?"), "-", "-", "-", "-"]
            cells = []
            for n in names:
                b = r.get("baselines", {}).get(n)
                cells.append("-" if b is None else baseline_cell(b))
                if b is not None and b["status"] in ("unavailable", "error"):
                    reasons.setdefault(n, set()).add(common.short(b.get("note", ""), 160))
            check = f"{r.get('status')}: {common.short(r.get('note', ''), 60)}"
            if "checked_rows" in r:
                check += f" ({r['checked_rows'][0]}/{r['checked_rows'][1]} rows)"
            lines.append(f"| {r['label']} | {r.get('backend', '?')} | " + " | ".join(timing + cells + [check]) + " |")
        for n, why in reasons.items():
            lines.append(f"\n{n} unavailable: " + "; ".join(sorted(why)))
        lines.append("")
    overhead = result.get("overhead")
    if overhead:
        lines += ["## op-boundary overhead (eager, per call)", ""]
        if overhead.get("rows"):
            lines += ["| op | boundary us/call (no grad) | with requires_grad inputs |", "| --- | --- | --- |"]
            lines += [f"| {r['op']} | {r['boundary_us']:.1f} | {r['with_grad_us']:.1f} |" for r in overhead["rows"]]
        else:
            lines.append(f"not measured: {overhead.get('error', 'no rows parsed')}")
        lines.append("")
    return "\n".join(lines)


def write_results(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = result["meta"]["stamp"]
    text = render_markdown(result)
    paths = []
    for name in (f"bench-{stamp}", "latest"):
        for suffix, content in ((".json", json.dumps(result, indent=1, default=str)), (".md", text)):
            path = out_dir / (name + suffix)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(content)
            tmp.replace(path)  # readers of latest.* never see half a file
            paths.append(path)
    return paths


def _versions(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "not installed"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} (sm{cap[0]}{cap[1]})"
        dsa, note = common.load_cudnn_dsa()
        cudnn = note if dsa is not None else f"unavailable ({note})"
    else:
        name, cudnn = "CPU (smoke test: tiny shapes, reference only)", "not tried (CPU)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "cudnn": cudnn}


# ======================================================================================================
# Main
# ======================================================================================================
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    p.add_argument("--quick", action="store_true", help="S = 4K/8K only, fewer decode batches")
    p.add_argument("--headline", action="store_true",
                   help="only the shapes of the issues' performance targets (see headline_cases)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="results folder")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: cases not started by then are listed as skipped")
    p.add_argument("--rep-ms", type=float, default=None,
                   help="timed repetitions per implementation take about this long (GPU default: 200, quick 100)")
    p.add_argument("--check-rows", type=int, default=256, help="query rows (or sequences) compared per case")
    p.add_argument("--max-ref-seconds", type=float, default=None,
                   help="a reference slower than this per call is extrapolated from the checked rows "
                        "(default 0.5 on GPU; no limit on the CPU smoke run)")
    p.add_argument("--compile-reference", action="store_true",
                   help="also time the reference under torch.compile (slow to compile)")
    p.add_argument("--also-backends", default="",
                   help="comma-separated: also time these of our backends (triton, cute) where not chosen")
    p.add_argument("--no-overhead", action="store_true", help="skip the op-boundary overhead table")
    p.add_argument("--strict", action="store_true", help="exit 1 when any of our ops is WRONG or fails")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(a.device)
    cases = headline_cases(device) if a.headline else make_cases(device, a.quick)
    if a.ops:
        wanted = [o.strip() for o in a.ops.split(",") if o.strip()]
        unknown = sorted(set(wanted) - set(OPS))
        if unknown:
            raise SystemExit(f"unknown op(s) {unknown}; known: {', '.join(OPS)}")
        cases = [c for c in cases if c.op in wanted]
    on_gpu = device.type == "cuda"
    if on_gpu:
        common.use_roofline_of(torch.cuda.get_device_name(device))
    default_rep_ms = (100.0 if a.quick else 200.0) if on_gpu else 5.0
    cfg = Settings(device=device, budget_s=(a.rep_ms if a.rep_ms is not None else default_rep_ms) / 1e3,
                   check_rows=a.check_rows, compile_reference=a.compile_reference,
                   max_ref_s=a.max_ref_seconds if a.max_ref_seconds is not None else (0.5 if on_gpu else math.inf),
                   also_backends=tuple(b.strip() for b in a.also_backends.split(",") if b.strip()))
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {**_versions(device), "time": now.strftime("%Y-%m-%d %H:%M UTC"), "stamp": now.strftime("%Y%m%d-%H%M%S"),
            "mode": "headline" if a.headline else "quick" if a.quick else "full", "forced_backend": os.environ.get(dispatch.ENV_FORCE, ""),
            "argv": sys.argv[1:] if argv is None else list(argv), "peak_tflops": common.PEAK_TFLOPS,
            "peak_gbps": common.PEAK_GBPS, "dispatch": dispatch.report(device),
            "settings": {"rep_ms": cfg.budget_s * 1e3, "check_rows": cfg.check_rows,
                         "max_ref_seconds": None if math.isinf(cfg.max_ref_s) else cfg.max_ref_s,
                         "also_backends": list(cfg.also_backends)}}
    print(f"device: {meta['device']}; torch {meta['torch']}; triton {meta['triton']}; cuDNN: {meta['cudnn']}")
    print(f"{len(cases)} cases; check rows {cfg.check_rows}; ~{cfg.budget_s * 1e3:.0f} ms of timed calls each",
          flush=True)

    common.warm_up_device(device)
    rows, start = [], time.time()
    for i, case in enumerate(cases):
        elapsed = time.time() - start
        if a.max_seconds is not None and elapsed > a.max_seconds:
            row = {"op": case.op, "label": case.label, "series": case.series, "x": case.x, "x_name": case.x_name,
                   "status": "skipped", "note": f"time budget ({a.max_seconds:.0f} s) spent", "baselines": {}}
        else:
            try:
                row = run_case(case, cfg)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory in the reference: keep going
                row = {"op": case.op, "label": case.label, "series": case.series, "x": case.x,
                       "x_name": case.x_name, "status": "error", "note": _reason(exc), "baselines": {}}
        rows.append(row)
        print(progress_line(i, len(cases), time.time() - start, row), flush=True)
        if on_gpu:
            torch.cuda.empty_cache()

    result = {"meta": meta, "rows": rows}
    if not a.no_overhead:
        print("op-boundary overhead (bench_overhead) ...", flush=True)
        result["overhead"] = op_boundary_overhead(device)
    paths = write_results(result, Path(a.out))
    print()
    print(render_markdown(result))
    counts = {}
    for r in rows:
        counts[r.get("status")] = counts.get(r.get("status"), 0) + 1
    print("summary: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: str(kv[0]))))
    print("wrote " + ", ".join(str(p) for p in paths))
    json_path = next(p for p in paths if p.suffix == ".json")
    try:  # the plot too, where matplotlib is installed (the lent GPU machine has none: plot the JSON later)
        from . import plot
        print(f"wrote {plot.plot(result, json_path.with_suffix('.png'))}")
    except ImportError as exc:
        print(f"no plot ({exc}); on a machine with matplotlib: python -m benchmarks.plot {json_path}")
    bad = [r for r in rows if r.get("status") in ("WRONG", "error")]
    return 1 if (a.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
