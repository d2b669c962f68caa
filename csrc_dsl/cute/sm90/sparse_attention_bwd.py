"""Sparse attention backward (SPEC section 5) for Hopper (SM90), in CuTe-DSL.

    sparse_attention_backward(dout [T,H,d_v], q [T,H,D], kv [S,D], out [T,H,d_v], lse [T,H] fp32,
                              indices [T,K] int32, scale, d_v=512, attn_sink [H] fp32 | None,
                              topk_length [T] int32 | None, deterministic: bool, grad_lse [T,H] | None)
        -> (dq [T,H,D] bf16, dkv [S,D] bf16, d_sink [H] fp32 (zeros without a sink))

Design (the kernel's own docstring has the details): ONE fused kernel per (query token, 64-head block),
unlike the Triton backward's three kernels. The Triton version splits at the [T, H, K] matrices P and dS
because Triton cannot hold the dQ accumulator next to the score tiles without spilling; with explicit
warp specialisation and setmaxnreg, the two math warpgroups here keep dQ (64 x D fp32) in registers
while a producer warpgroup gathers kv tiles with cp.async, so P and dS never leave the SM (no workspace,
no second gather of kv for dQ). The dkv tile of each 32 slots (dS'^T Q + P^T dO) is computed with wgmma
and sent to global memory:
  - fast mode: `red.global.add.f32` into an fp32 [S, D] accumulator (cast to bf16 at the end);
  - deterministic mode: stores into a per-slot partial buffer [head_blocks, chunk*K, D] fp32, summed per
    kv row in ascending slot order (head block 0 first) by the Triton backward's `_reduce_kernel`.
Torch ops in this launcher: Delta = out . dout and L = logaddexp(lse, sink) (both [T, H] fp32),
d_sink = -sum_t exp(sink - L) * Delta, the shift of the kernel's Delta by a gradient of lse
(Delta - grad_lse * exp(L - lse), see `row_terms`), and the final fp32 -> bf16 cast of dkv.

Two tile schedules (`BwdConfig.schedule`, `SCHEDULES` below): "wide", the default since session 25
(sparse_attention_bwd_wide_kernel.py: 64-key tiles, one warpgroup on S, dP and dS, the other on every dkv
block, with the keys as the wgmma's M and whole 128-byte lines per reduction instruction), and "split" (32-key
tiles, both warpgroups on a half of everything; the history and numbers below are its). Measured on the H100
(session 25, T = 4096, S_kv = 8192, K = 2048, D = 576, kernel alone, same run): wide 7.61 / 15.11 ms against
split 9.19 / 17.99 ms at H = 64 / 128 (1.21x / 1.19x); the op 0.87-0.89x cuDNN's SM90 backward (was 0.75-0.77x).

Status: its GPU tests (tests/test_cute_sm90_bwd.py) pass on an H100 (2026-11-25) and an H200 (2026-12-04),
and it is in the SM90 row of dsa_ops/dispatch.py for 16 < H <= 128 (deterministic: H <= 64; Triton measured
faster elsewhere). The split schedule, measured on the H200 (BENCHMARKS.md, T=4096, S_kv=8192, K=2048, D=576):
309 / 316 TFLOP/s at H=64 / 128, 1.57-1.65x the Triton backward, 0.74-0.76x cuDNN's SM90 backward in the same
run; the wide schedule on the H100 (session 25): 375 / 380 TFLOP/s, 0.87 / 0.89x cuDNN in the same run.
The rest of this docstring is the split schedule's history. Where the time goes (kernel alone, H=64, H200: 9.3 ms):
without the dkv writes 7.2 ms, without the dkv products too 3.9 ms. The dkv reductions are 2048 x 576 fp32 values
per (token, 64-head) CTA, i.e. 19 GB at H=64; L2 takes them faster the longer the contiguous piece of a row that
one warp instruction covers (benchmarks/bench_dkv_reduction.py on the H200: 571 / 794 / 957 G values/s for 32 / 64
/ 128 bytes).
`BwdConfig.dkv_write` picks the write path; measured, kernel alone at H = 16 / 64 / 128:
  - "scalar": 4-byte reductions straight from the wgmma accumulator (32-byte pieces), the address redone
    per write: 10.59 / 10.70 / 21.89 ms;
  - "tiled": the same with each key's address computed once per tile (SASS: S2R 72 -> 2, LEA 536 -> 208):
    10.24 / 10.20 / 20.38 ms;
  - "vector" (default): a 4 x 4 block transpose across lanes (16 shuffles per 16 values) so that each
    instruction is a 16-byte `red.v4` and a warp covers 64 bytes of 8 keys: 9.29 / 9.34 / 18.68 ms;
    with `overlap_dkv` (default; two dkv accumulators, a block's wgmmas running while the block before is
    sent) 9.21 / 9.32 / 18.53 ms against 9.30 / 9.46 / 19.17 without, in one run;
  - "pair" (session 17, off): the same 16-byte pieces after one lane exchange instead of two, because the
    fp32 accumulator stores each 64-column block's columns permuted (`pair_column_order`), which
    `dkv_output` undoes in the bf16 cast (SASS at D = 576: SHFL 144 -> 72, FSEL 448 -> 232). Its GPU tests
    pass (H100), but it is slower than "vector" at H=64: 10.63 vs 9.16 ms with the shuffles between the
    writes (session 17), 10.89 vs 9.22 ms with all shuffles first (session 18). A plausible cause (SASS,
    not profiled): its reductions send the accumulator registers themselves, which the next block's
    first HGMMA overwrites, so that HGMMA waits until they are read.
Tried and NOT kept, because none was faster (docs/experiments/*.patch, numbers in BENCHMARKS.md):
  - (H100) 16-byte `red.v4` after a 4 x 4 lane transpose that still left 32-byte pieces per key, with the
    two dkv accumulators of `overlap_dkv`: within noise then (with 64-byte pieces, overlap gains 1-3%);
  - (H100) staging each dkv block in the dead half of the kv stage and sending whole 128-byte lines: slower,
    because the stage was held through the dkv phase (the gather waited longer);
  - (H200) handing P to consumer 1 in its bf16 tile, which frees the 8 KB fp32 exchange, and staging half
    blocks there per warp pair so that each instruction covers 128 bytes of 4 keys: 9.72 against 9.34 ms at
    H=64; the hand-off alone cost 0.7 ms (consumer 0 must wait until consumer 1's dkv products are done with
    the tile before writing the next P), the wider pieces saved 0.3 ms.
  - (H200) deterministic mode with int64 fixed-point reductions (`red.global.add.u64` of value * 2^e, 2^e
    from a bound computed on the GPU; integer sums do not depend on their order, so no partial rows and no
    ordered reduction): correct (the GPU tests passed, 3e-11 from exact sums in a CPU simulation), but 45.8
    against 16.8 ms for the partial rows at H=64: four scalar 8-byte integer reductions per 16-byte piece
    are far slower in L2 than one `red.v4.f32` (docs/experiments/dkv-fixed-point.patch).
The writes now add about 2.1 ms to the 7.2 ms without them, at 2.1 TB/s on average, half of what L2 takes in
64-byte pieces in isolation: the cost is in how they are issued (bursts at the end of each dkv block, while the
warpgroup's tensor work waits), not in L2's rate.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from csrc_dsl.cute.common import KernelCache, current_stream, is_sm90, launch_unavailable_reason
from csrc_dsl.cute.common.launch import env_choice
from csrc_dsl.cute.common import unavailable_reason as _dsl_unavailable_reason

LOG2_E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (512, 576)
SUPPORTED_DV = (512,)
MAX_HEADS = 128
HEADS_PER_CTA = 64
# Deterministic mode: budget in MiB for the partial dkv rows (queries are processed in chunks under it).
WORKSPACE_ENV = "DSA_OPS_CUTE_SPARSE_BWD_WORKSPACE_MB"
_DEFAULT_WORKSPACE_MB = 2048
_DELTA_CHUNK_ROWS = 1 << 16   # (token, head) rows per fp32 chunk of the Delta reduction


@dataclass(frozen=True)
class BwdConfig:
    """One compiled variant. Static scalars only: T, H, S, K (and topk_length, always passed) are runtime."""
    head_dim: int               # D (576: V3.2, 512: V4)
    d_v: int
    deterministic: bool         # dkv: per-slot partial rows (True) or fp32 atomics (False)
    dtype: str = "bfloat16"
    # How a CTA's work is split ("wide" or "split", see SCHEDULES and the kernels' docstrings). "wide" since
    # session 25: 1.19-1.21x faster than "split" on the H100, kernel alone (BENCHMARKS.md).
    schedule: str = "wide"
    # Tiles and registers; 0: the schedule's value (SCHEDULES).
    block_n: int = 0            # top-k slots (kv rows) per tile
    num_stages: int = 0         # kv stages in shared memory
    producer_regs: int = 0      # setmaxnreg for the gather warpgroup
    consumer_regs: int = 0      # setmaxnreg for the math warpgroups (producer + both consumers <= 504)
    consumer1_regs: int = 0     # the second one's, where it differs (0: consumer_regs)
    arch: str = "sm_90a"
    # How each thread sends its dkv values (the kernel's `write_dkv*`): "scalar" one 4-byte value per
    # instruction with the address computed per write, "tiled" the same with each key's address computed
    # once per tile (3.4% faster on the H200, 2026-12-04), "vector" 16-byte pieces after a lane
    # transpose, so that a warp instruction covers 64 contiguous bytes of a key instead of 32; "pair" the
    # same pieces after one exchange stage instead of two, the fp32 accumulator's columns stored in
    # `pair_column_order` (put back by `dkv_output`). "" is the schedule's (SCHEDULES): "vector" for "split"
    # ("pair" measured slower there, the module docstring); "pair" for "wide", whose dkv blocks have the keys
    # as rows, so that its 16-byte pieces need no exchange at all in that stored order.
    dkv_write: str = ""
    # Two dkv accumulators: a block's wgmmas run while the warpgroup sends the block before (True), or
    # each block is computed, waited for and sent in turn (False). None: the schedule's (SCHEDULES).
    overlap_dkv: Optional[bool] = None
    # The wide schedule only: lanes of neighbouring quads trade 16-byte pieces (4 shuffles per 8 values) so
    # that one warp instruction covers 128 contiguous bytes (a whole L2 line) of each of 4 keys, not 64 bytes
    # of each of 8; same stored column order. None: the schedule's (SCHEDULES).
    dkv_lines: Optional[bool] = None
    # With dkv_lines: every lane sends the same accumulator piece and the odd rows' pieces are written from
    # the other half of the line (8 selects per 8 values instead of 12). None: the schedule's (SCHEDULES).
    uniform_send: Optional[bool] = None
    # The wide schedule only: the kv tile's two halves of 32 rows each signal their arrival on their own
    # barrier, so that consumer 0 starts S and dP of the first half while the second is still in flight.
    kv_halves: bool = False
    # Performance analysis only (wrong dkv): "no_dkv_write" computes the dkv tiles but sends nothing to
    # global memory (the cost of the reductions), "no_dkv" skips the dkv products too.
    ablation: str = "none"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}: expected one of {tuple(SCHEDULES)}")
        for name, value in SCHEDULES[self.schedule].items():
            given = getattr(self, name)
            if given is None or (not isinstance(given, bool) and given in (0, "")):   # False is a choice
                object.__setattr__(self, name, value)


# The kernel's tile schedules and their tiles (`BwdConfig` fields):
#   "split" (sparse_attention_bwd_kernel.py): 32-key tiles in two kv stages; consumer 0 computes S and P,
#       consumer 1 dP and dS; both do half of dQ and half of the dkv blocks;
#   "wide" (sparse_attention_bwd_wide_kernel.py): 64-key tiles in one kv stage; consumer 0 computes S, dP,
#       P and dS and half of dQ, consumer 1 the other half of dQ and every dkv block, with the keys as the
#       wgmma's M: its dkv products have N = 64 where "split" has N = 32 (two thirds of the shared-memory
#       reads per multiply-add), and its dkv values leave the accumulator with one lane exchange (4 shuffles
#       per 8 values) for whole 128-byte lines per instruction, or none for 64-byte pieces (dkv_lines=False).
# Measured choices (H100, BENCHMARKS.md): "wide" with one dkv accumulator and dkv_lines (session 25).
# uniform_send timed faster in session 26 (kernel alone, same run: 7.47 against 7.67 ms at H = 64; 15.06
# against 17.36 at H = 128, where session 25 had timed the default at 15.11) and passed the GPU tests at
# D = 576, but has not run on the GPU at D = 512 (`test_bwd_uniform_send_agrees`): not the default yet. (When it
# is, a config with dkv_lines=False must also pass uniform_send=False: the wide kernel refuses the pair.)
SCHEDULES = {
    "split": {"block_n": 32, "num_stages": 2, "producer_regs": 40, "consumer_regs": 232, "dkv_write": "vector",
              "overlap_dkv": True, "dkv_lines": False, "uniform_send": False},
    "wide": {"block_n": 64, "num_stages": 1, "producer_regs": 32, "consumer_regs": 240, "consumer1_regs": 232,
             "dkv_write": "pair", "overlap_dkv": False, "dkv_lines": True, "uniform_send": False},
}
ENV_SCHEDULE = "DSA_OPS_CUTE_SPARSE_BWD_SCHEDULE"     # tests and benchmarks: run the op with another schedule


def selected_schedule() -> str:
    """The schedule the op runs with: BwdConfig's default, or `ENV_SCHEDULE`'s choice."""
    return env_choice(ENV_SCHEDULE, SCHEDULES, BwdConfig.schedule)


ENV_DKV_WRITE = "DSA_OPS_CUTE_SPARSE_BWD_DKV_WRITE"   # tests and benchmarks: run the op with another path
DKV_WRITES = ("scalar", "tiled", "vector", "pair")


def selected_dkv_write() -> str:
    """The dkv write path the op runs with: `ENV_DKV_WRITE`'s choice, or "" (the schedule's, SCHEDULES)."""
    return env_choice(ENV_DKV_WRITE, DKV_WRITES, "")


def pair_column_order(head_dim: int):
    """For `dkv_write="pair"`: stored column i of the fp32 accumulator holds latent column order[i]. Per block
    of 64 columns, stored 16w + 4p + 2r + e holds latent 16w + 8r + 2p + e (w, p < 4; r, e < 2): the four
    values a lane sends in one 16-byte piece (the kernel's `write_dkv_pair`)."""
    import torch

    w, p, r, e = torch.meshgrid(*(torch.arange(n) for n in (4, 4, 2, 2)), indexing="ij")
    block = (16 * w + 8 * r + 2 * p + e).reshape(64)
    return torch.cat([64 * b + block for b in range(head_dim // 64)])


def dkv_output(dkv_acc, dkv_write: str, dtype):
    """The fp32 [S, D] accumulator as the op's dkv: cast to `dtype`, columns put back in latent order for
    "pair" (one copy kernel either way)."""
    if dkv_write != "pair":
        return dkv_acc.to(dtype)
    import torch

    rows, head_dim = dkv_acc.shape
    out = torch.empty(rows, head_dim, dtype=dtype, device=dkv_acc.device)
    # stored (block, w, p, r, e) -> latent (block, w, r, p, e)
    out.view(rows, head_dim // 64, 4, 2, 4, 2).copy_(
        dkv_acc.view(rows, head_dim // 64, 4, 4, 2, 2).transpose(3, 4))
    return out


def shipped_configs() -> list[BwdConfig]:
    """Every variant the op can run (the default schedule's, then the other's, which `ENV_SCHEDULE` selects);
    CI compiles all of them (tests/test_cute_sm90_bwd.py)."""
    schedules = [BwdConfig.schedule, *(s for s in SCHEDULES if s != BwdConfig.schedule)]
    return [BwdConfig(head_dim, d_v, deterministic, schedule=schedule) for schedule in schedules
            for head_dim in SUPPORTED_HEAD_DIMS for d_v in SUPPORTED_DV for deterministic in (False, True)]


# ------------------------------------------------------------------------------------------------------
# The launcher (torch side)
# ------------------------------------------------------------------------------------------------------
def supports(dout, q, kv, out, lse, indices, scale=None, d_v=512, attn_sink=None, topk_length=None,
             deterministic=False, grad_lse=None) -> bool:
    """Cheap predicate for the dispatch table: the shapes and devices this kernel is built for. A gradient of
    lse (`grad_lse`) is handled by the launcher's torch side (`row_terms`)."""
    import torch

    if launch_unavailable_reason() is not None:
        return False
    if q.device.type != "cuda" or not is_sm90(q.device):
        return False
    if any(t.dtype != torch.bfloat16 for t in (dout, q, kv, out)) or indices.dtype != torch.int32:
        return False
    if lse.dtype != torch.float32:
        return False
    if q.dim() != 3 or kv.dim() != 2 or indices.dim() != 2 or dout.dim() != 3 or out.dim() != 3:
        return False
    num_tokens, num_heads, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS or kv.shape[1] != head_dim or d_v not in SUPPORTED_DV:
        return False
    if tuple(dout.shape) != (num_tokens, num_heads, d_v) or tuple(out.shape) != tuple(dout.shape):
        return False
    if tuple(lse.shape) != (num_tokens, num_heads) or indices.shape[0] != num_tokens:
        return False
    if grad_lse is not None and tuple(grad_lse.shape) != (num_tokens, num_heads):
        return False
    if not 1 <= num_heads <= MAX_HEADS:
        return False
    if attn_sink is not None and (attn_sink.dtype != torch.float32 or attn_sink.numel() != num_heads):
        return False
    if topk_length is not None and topk_length.dtype != torch.int32:
        return False
    tensors = (dout, q, kv, out, lse, indices, attn_sink, topk_length)
    if not all(t is None or t.is_contiguous() for t in tensors):
        return False
    # cp.async moves 16-byte pieces: rows must start on 16 bytes.
    return all(t.data_ptr() % 16 == 0 for t in (q, kv, dout))


def sparse_attention_backward(dout, q, kv, out, lse, indices, scale: float, d_v: int = 512, attn_sink=None,
                              topk_length=None, deterministic: bool = False, grad_lse=None):
    """SPEC section 5 on SM90. Inputs are validated and contiguous (the op layer's contract). `grad_lse`
    (optional [T, H]) only shifts the kernel's Delta (`row_terms`)."""
    import torch

    num_tokens, num_heads, head_dim = q.shape
    num_kv_rows, topk = kv.shape[0], indices.shape[1]
    device = q.device
    dq = torch.empty_like(q)
    dkv_acc = torch.zeros(num_kv_rows, head_dim, dtype=torch.float32, device=device)
    if num_tokens == 0 or num_heads == 0:
        return dq, dkv_acc.to(kv.dtype), torch.zeros(num_heads, dtype=torch.float32, device=device)

    delta, l2, d_sink = row_terms(out, dout, lse, attn_sink, grad_lse)
    if num_kv_rows == 0 or topk == 0:
        dq.zero_()                         # no valid key anywhere: every gradient is 0
        return dq, dkv_acc.to(kv.dtype), d_sink

    if topk_length is None:
        topk_length = torch.full((num_tokens,), topk, dtype=torch.int32, device=device)
    config = _op_config(head_dim, d_v, bool(deterministic), selected_dkv_write(), selected_schedule())
    if not deterministic:
        _launch(config, q, kv, indices, dout, l2, delta, topk_length, dq, dkv_acc, scale)
        return dq, dkv_output(dkv_acc, config.dkv_write, kv.dtype), d_sink

    # Deterministic: per-slot partial rows for a chunk of queries, then an ordered per-row sum.
    from csrc_dsl.triton import sparse_attention_bwd as triton_bwd

    head_blocks = (num_heads + HEADS_PER_CTA - 1) // HEADS_PER_CTA
    per_query = head_blocks * topk * head_dim * 4
    budget = int(os.environ.get(WORKSPACE_ENV, _DEFAULT_WORKSPACE_MB)) << 20
    chunk = max(1, min(num_tokens, budget // per_query))
    partial = torch.empty(head_blocks, chunk * topk, head_dim, dtype=torch.float32, device=device)
    sorted_slots, composite = triton_bwd._slots_by_kv_row(indices, topk_length, num_kv_rows)
    reduce_block_d = 64
    for t_begin in range(0, num_tokens, chunk):
        t_end = min(num_tokens, t_begin + chunk)
        rows = t_end - t_begin
        part = partial[:, : rows * topk].contiguous() if rows != chunk else partial
        _launch(config, q[t_begin:t_end], kv, indices[t_begin:t_end], dout[t_begin:t_end],
                l2[t_begin:t_end], delta[t_begin:t_end], topk_length[t_begin:t_end], dq[t_begin:t_end],
                part.view(-1, head_dim), scale)
        bounds = triton_bwd._chunk_bounds(composite, num_tokens, topk, num_kv_rows, t_begin, t_end)
        for hb in range(head_blocks):     # a fixed order of head blocks: the same bits every run
            triton_bwd._reduce_kernel[(num_kv_rows, math.ceil(head_dim / reduce_block_d))](
                part[hb], sorted_slots, bounds, dkv_acc, t_begin * topk, num_kv_rows,
                D=head_dim, BLOCK_D=reduce_block_d, BLOCK_E=16, num_warps=2)
    return dq, dkv_output(dkv_acc, config.dkv_write, kv.dtype), d_sink


@functools.lru_cache(maxsize=None)
def _op_config(head_dim: int, d_v: int, deterministic: bool, dkv_write: str, schedule: str) -> BwdConfig:
    """The op's BwdConfig, built once per key: `BwdConfig.__post_init__` (the schedule's tiles) is on the
    launch path otherwise."""
    return BwdConfig(head_dim=head_dim, d_v=d_v, deterministic=deterministic, dkv_write=dkv_write,
                     schedule=schedule)


def row_terms(out, dout, lse, attn_sink, grad_lse=None):
    """The per-(token, head) torch side of the backward: (Delta for the kernel, L2, d_sink).

    Delta = out . dout; L = logaddexp(lse, sink) (= lse without a sink); L2 = log2(e) * L, which the
    kernel subtracts from its log2-unit scores (+inf on rows with no valid key: P = 0 there);
    d_sink[h] = -sum_t exp(sink[h] - L[t, h]) * Delta[t, h] (zeros without a sink).
    With a gradient g of lse: d lse / d s_j = exp(s_j - lse) = P_j * exp(L - lse), so the kernel's
    dS = P (dP - Delta) gets Delta - g * exp(L - lse) instead, exp(L - lse) = 1 + exp(sink - lse) (no
    shift on rows with no valid key: P = 0 there). The sink is not in lse, so d_sink keeps the plain Delta."""
    import torch

    delta = _delta(out, dout)
    lse = lse.float()
    big_l = lse
    if attn_sink is not None:
        big_l = torch.logaddexp(big_l, attn_sink.float()[None, :])
        d_sink = -(torch.exp(attn_sink.float()[None, :] - big_l) * delta).sum(dim=0)
    else:
        d_sink = torch.zeros(lse.shape[1], dtype=torch.float32, device=lse.device)
    if grad_lse is not None:
        shift = grad_lse.float()
        if attn_sink is not None:
            shift = shift * (1.0 + torch.exp(attn_sink.float()[None, :] - lse))
        delta = delta - torch.where(torch.isfinite(lse), shift, torch.zeros_like(shift))
    return delta.contiguous(), (big_l * LOG2_E).contiguous(), d_sink


def _delta(out, dout):
    """Delta[t, h] = out[t, h] . dout[t, h] in fp32: one Triton pass on the GPU; on the CPU (tests of
    `row_terms`) torch in chunks, with no [T, H, d_v] fp32 temporary."""
    import torch

    if out.is_cuda:
        from csrc_dsl.triton.sparse_attention_bwd import row_dot

        return row_dot(out, dout)
    num_tokens, num_heads, d_v = out.shape
    flat_out, flat_dout = out.reshape(-1, d_v), dout.reshape(-1, d_v)
    delta = torch.empty(flat_out.shape[0], dtype=torch.float32, device=out.device)
    for start in range(0, flat_out.shape[0], _DELTA_CHUNK_ROWS):
        stop = start + _DELTA_CHUNK_ROWS
        delta[start:stop] = (flat_out[start:stop].float() * flat_dout[start:stop].float()).sum(dim=1)
    return delta.view(num_tokens, num_heads)


def _launch(config: BwdConfig, q, kv, indices, dout, l2, delta, topk_length, dq, dkv_target, scale) -> None:
    kernel = _CACHE.get(config)
    kernel(q, kv, indices, dout, l2, delta, topk_length, dq, dkv_target,
           float(scale) * LOG2_E, float(scale), current_stream())


def warmup(configs=None) -> int:
    """Compile ahead of time (before CUDA-graph capture); default: every shipped variant."""
    from csrc_dsl.cute.common import warmup as _warmup

    return _warmup(shipped_configs() if configs is None else configs)


def compile_kernel(config: BwdConfig):
    """Compile one variant with TVM-FFI (the callable takes torch tensors). Needs no GPU."""
    import cutlass.cute as cute

    args = fake_arguments(config)
    return cute.compile(_make_kernel(config), *args, options=f"--enable-tvm-ffi --gpu-arch={config.arch}")


def compile_for_inspection(config: BwdConfig) -> tuple[str, bytes, int]:
    """(ptx, cubin, shared memory bytes per CTA) of one variant for `config.arch`, built from fake tensors
    on a machine with no GPU."""
    from csrc_dsl.cute.common.fake_compile import compile_fake

    kernel = _make_kernel(config)
    ptx, cubin = compile_fake(kernel, *fake_arguments(config), arch=config.arch)
    return ptx, cubin, kernel.smem_bytes


def fake_arguments(config: BwdConfig) -> list:
    """Fake tensors with symbolic T, H, S, K and dkv rows: one compiled kernel serves every size."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    if config.dtype != "bfloat16":
        raise ValueError(f"only bfloat16 is implemented, got {config.dtype}")
    bf16, f32 = cutlass.BFloat16, cutlass.Float32
    num_tokens, num_heads, num_rows, topk, dkv_rows = (cute.sym_int() for _ in range(5))
    D, DV = config.head_dim, config.d_v
    q = make_fake_compact_tensor(bf16, (num_tokens, num_heads, D), stride_order=(2, 1, 0), assumed_align=16)
    kv = make_fake_compact_tensor(bf16, (num_rows, D), stride_order=(1, 0), assumed_align=16)
    indices = make_fake_compact_tensor(cutlass.Int32, (num_tokens, topk), stride_order=(1, 0), assumed_align=4)
    dout = make_fake_compact_tensor(bf16, (num_tokens, num_heads, DV), stride_order=(2, 1, 0), assumed_align=16)
    l2 = make_fake_compact_tensor(f32, (num_tokens, num_heads), stride_order=(1, 0), assumed_align=4)
    delta = make_fake_compact_tensor(f32, (num_tokens, num_heads), stride_order=(1, 0), assumed_align=4)
    topk_length = make_fake_compact_tensor(cutlass.Int32, (num_tokens,), assumed_align=4)
    dq = make_fake_compact_tensor(bf16, (num_tokens, num_heads, D), stride_order=(2, 1, 0), assumed_align=16)
    dkv = make_fake_compact_tensor(f32, (dkv_rows, D), stride_order=(1, 0), assumed_align=16)
    return [q, kv, indices, dout, l2, delta, topk_length, dq, dkv, cutlass.Float32(1.0), cutlass.Float32(1.0),
            make_fake_stream()]


def unavailable_reason() -> Optional[str]:
    return _dsl_unavailable_reason()


def _make_kernel(config: BwdConfig):
    if config.schedule == "wide":
        from csrc_dsl.cute.sm90.sparse_attention_bwd_wide_kernel import SparseAttentionBwdSm90Wide

        return SparseAttentionBwdSm90Wide(config)
    from csrc_dsl.cute.sm90.sparse_attention_bwd_kernel import SparseAttentionBwdSm90

    return SparseAttentionBwdSm90(config)


_HERE = Path(__file__).resolve().parent
_CACHE = KernelCache(
    "sparse_attention_bwd_sm90", BwdConfig, compile_kernel,
    source_files=[_HERE / "sparse_attention_bwd.py", _HERE / "sparse_attention_bwd_kernel.py",
                  _HERE / "sparse_attention_bwd_wide_kernel.py", _HERE / "sparse_attention_fwd_kernel.py",
                  *sorted((_HERE.parent / "common").glob("*.py"))],
)


# The benchmark's kernel-alone variants: BwdConfig fields over the defaults ("kernel": the op's default).
_KERNEL_VARIANTS = {
    "kernel": {},
    "split": {"schedule": "split"},
    "scalar_dkv": {"schedule": "split", "dkv_write": "scalar"},
    "tiled_dkv": {"schedule": "split", "dkv_write": "tiled"},
    "pair_dkv": {"schedule": "split", "dkv_write": "pair"},
    "serial_dkv": {"schedule": "split", "overlap_dkv": False},
    "no_dkv_write": {"schedule": "split", "ablation": "no_dkv_write"},
    "no_dkv": {"schedule": "split", "ablation": "no_dkv"},
    "wide": {"schedule": "wide"},
    "wide_no_dkv_write": {"schedule": "wide", "ablation": "no_dkv_write"},
    "wide_no_dkv": {"schedule": "wide", "ablation": "no_dkv"},
    "wide_overlap": {"schedule": "wide", "overlap_dkv": True},
    "wide_64B": {"schedule": "wide", "dkv_lines": False},
    "wide_64B_overlap": {"schedule": "wide", "dkv_lines": False, "overlap_dkv": True},
    "wide_halves": {"schedule": "wide", "kv_halves": True},
    "wide_p40": {"schedule": "wide", "producer_regs": 40, "consumer1_regs": 224},    # no spills at D = 576
    "wide_uniform": {"schedule": "wide", "uniform_send": True},
    "wide_uniform_overlap": {"schedule": "wide", "uniform_send": True, "overlap_dkv": True},
    "wide_uniform_p40": {"schedule": "wide", "uniform_send": True, "producer_regs": 40, "consumer1_regs": 224},
}


def _benchmark(argv=None) -> None:
    """`python -m csrc_dsl.cute.sm90.sparse_attention_bwd [--T 4096 --S 8192 --H 64 128 --K 2048 --D 576]`:
    this kernel vs the Triton backward, FLOPs 2*T*H*K*(3D + 2 d_v)."""
    import argparse

    import torch
    from triton.testing import do_bench

    from csrc_dsl.triton import sparse_attention_bwd as triton_bwd

    parser = argparse.ArgumentParser(description=_benchmark.__doc__)
    for name, default in [("T", 4096), ("S", 8192), ("K", 2048), ("D", 576)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--H", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--sink", action="store_true")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--no-triton", action="store_true", help="time only the CuTe kernel")
    parser.add_argument("--ablation", nargs="+", default=["none"],
                        choices=["none", *_KERNEL_VARIANTS],
                        help="none: the whole op; kernel: the kernel alone; scalar_dkv / tiled_dkv: the "
                             "kernel with that BwdConfig.dkv_write; no_dkv_write / no_dkv: the kernel without parts of "
                             "its work (wrong dkv), to see where the time goes")
    args = parser.parse_args(argv)
    d_v = 512
    for num_heads in args.H:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(args.T, num_heads, args.D, device="cuda", generator=gen).to(torch.bfloat16)
        kv = torch.randn(args.S, args.D, device="cuda", generator=gen).to(torch.bfloat16)
        indices = torch.randint(0, args.S, (args.T, args.K), device="cuda", generator=gen, dtype=torch.int32)
        dout = torch.randn(args.T, num_heads, d_v, device="cuda", generator=gen).to(torch.bfloat16)
        out = torch.randn(args.T, num_heads, d_v, device="cuda", generator=gen).to(torch.bfloat16) * 0.05
        # A realistic lse: the log-sum-exp of K scores of about this size.
        lse = torch.full((args.T, num_heads), math.log(args.K) + 0.5, device="cuda")
        sink = torch.randn(num_heads, device="cuda", generator=gen) if args.sink else None
        scale = args.D ** -0.5
        flops = 2 * args.T * num_heads * args.K * (3 * args.D + 2 * d_v)
        runs = []
        for ablation in args.ablation:
            if ablation == "none":
                runs.append(("cute_sm90", lambda: sparse_attention_backward(
                    dout, q, kv, out, lse, indices, scale, d_v, sink, None, args.deterministic)))
                continue
            # the kernel alone, fast mode (no Delta, no dkv zeroing or cast)
            config = BwdConfig(args.D, d_v, False, **_KERNEL_VARIANTS[ablation])
            delta, l2, _ = row_terms(out, dout, lse, sink)
            lengths = torch.full((args.T,), args.K, dtype=torch.int32, device="cuda")
            dq = torch.empty_like(q)
            dkv_acc = torch.zeros(args.S, args.D, dtype=torch.float32, device="cuda")
            runs.append((f"cute_sm90[{ablation}]", functools.partial(
                _launch, config, q, kv, indices, dout, l2, delta, lengths, dq, dkv_acc, scale)))
        if not args.no_triton:
            runs.append(("triton", lambda: triton_bwd.sparse_attention_backward(
                dout, q, kv, out, lse, indices, scale, d_v, sink, None, args.deterministic)))
        for name, run in runs:
            run()
            ms = do_bench(run, warmup=10, rep=100)
            print(f"sparse_attention_bwd {name} T={args.T} S={args.S} H={num_heads} K={args.K} D={args.D} "
                  f"deterministic={args.deterministic}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s")


if __name__ == "__main__":
    _benchmark()
