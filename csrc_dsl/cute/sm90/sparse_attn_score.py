"""sparse_attn_score and dense_attn_score (SPEC section 6) for Hopper (SM90), in CuTe-DSL.

    sparse_attn_score(q [T,H,D] bf16, kv [S,D] bf16, lse [T,H] fp32, indices [T,K] int32, scale,
                      topk_length [T] int32 | None) -> target [T,K] fp32 (normalised per row)
    dense_attn_score(q [B,Sq,H,D] bf16, kv [B,Sk,D] bf16, lse [B,Sq,H] fp32, scale, ratio, q_start [B] | None)
                      -> (scores [B,Sq,Sk] fp32, ratio-causally masked entries 0; l1 [B,Sq] row sums)

Written on 2026-12-04 after the Triton kernel's redesign (one program per query and 128 heads: 0.68x cuDNN on the
H200): this kernel gathers each token's kv rows once for all its heads and overlaps the gathers with the
products (warp specialisation), which Triton's 1-stage launch cannot. First run on 2026-12-05 (H100, V3.2
S=4096: 2.40 ms against cuDNN's 3.09 and Triton's 4.27; BENCHMARKS.md), then put in the SM90 row of the dispatch.
The dense op is the same kernel with kv row = the batch's first row + slot (ScoreConfig.dense).

The kernel is in sparse_attn_score_kernel.py (imported only when a variant is compiled).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from csrc_dsl.cute.common import KernelCache, current_stream, is_sm90, launch_unavailable_reason
from csrc_dsl.cute.common import unavailable_reason as _dsl_unavailable_reason

LOG2_E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (512, 576)
MAX_HEADS = 128
HEADS_PER_CONSUMER = 64       # the wgmma M of one consumer warpgroup


@dataclass(frozen=True)
class ScoreConfig:
    """One compiled variant. Static scalars only: T, H, S and K are runtime values."""
    head_dim: int
    dtype: str = "bfloat16"
    # Q as the wgmma's register operand, with 3 stages of 64 kv rows (True), or Q in shared memory next to
    # 2 stages of 32 rows (False); the kernel's docstring says why.
    q_in_registers: bool = True
    block_n: int = 64           # top-k slots (kv rows) per tile: 64 with q_in_registers, else 32
    num_stages: int = 3         # 3 with q_in_registers, else 2
    producer_regs: int = 40
    consumer_regs: int = 232
    dense: bool = False         # dense_attn_score: `indices` is [T, 1], the first kv row of the token's batch
    alternate_tiles: bool = False   # H <= 64: both consumers take heads [0, 64), each every other tile
    arch: str = "sm_90a"


def launch_config(head_dim: int, num_heads: int, dense: bool = False) -> ScoreConfig:
    """The variant the ops launch: Q in registers (measured faster than Q in shared memory), with alternate
    tiles where all heads fit one consumer."""
    return ScoreConfig(head_dim, dense=dense, alternate_tiles=num_heads <= HEADS_PER_CONSUMER)


def dispatched_configs() -> list[ScoreConfig]:
    """What the ops launch (compiled by `warmup`)."""
    return [launch_config(d, h, dense) for dense in (False, True) for d in SUPPORTED_HEAD_DIMS
            for h in (MAX_HEADS, HEADS_PER_CONSUMER)]


def shipped_configs() -> list[ScoreConfig]:
    """What the ops launch, and the Q-in-shared-memory layout (kept for the GPU comparison)."""
    return dispatched_configs() + [ScoreConfig(d, q_in_registers=False, block_n=32, num_stages=2)
                                   for d in SUPPORTED_HEAD_DIMS]


def _kernel_takes(q, kv, lse, head_dim: int, num_heads: int) -> bool:
    """What both ops need: an SM90 GPU with the DSL, bf16 q/kv and fp32 lse, contiguous and 16-byte aligned,
    a supported head dim and 1..128 heads."""
    import torch

    if launch_unavailable_reason() is not None:
        return False
    if q.device.type != "cuda" or not is_sm90(q.device):
        return False
    if q.dtype != torch.bfloat16 or kv.dtype != torch.bfloat16 or lse.dtype != torch.float32:
        return False
    if head_dim not in SUPPORTED_HEAD_DIMS or kv.shape[-1] != head_dim or not 1 <= num_heads <= MAX_HEADS:
        return False
    if not (q.is_contiguous() and kv.is_contiguous() and lse.is_contiguous()):
        return False
    return q.data_ptr() % 16 == 0 and kv.data_ptr() % 16 == 0


def supports(q, kv, lse, indices, scale=None, topk_length=None) -> bool:
    """Cheap predicate for a dispatch table: the shapes and devices this kernel is built for."""
    import torch

    if q.dim() != 3 or kv.dim() != 2 or indices.dim() != 2 or indices.dtype != torch.int32:
        return False
    num_tokens, num_heads, head_dim = q.shape
    if tuple(lse.shape) != (num_tokens, num_heads) or indices.shape[0] != num_tokens:
        return False
    if topk_length is not None and (topk_length.dtype != torch.int32 or not topk_length.is_contiguous()):
        return False
    return indices.is_contiguous() and _kernel_takes(q, kv, lse, head_dim, num_heads)


def supports_dense(q, kv, lse, scale=None, ratio=1, q_start=None) -> bool:
    """`supports` for dense_attn_score (q [B,Sq,H,D], kv [B,Sk,D], lse [B,Sq,H])."""
    if q.dim() != 4 or kv.dim() != 3 or lse.dim() != 3:
        return False
    batch, seq_q, num_heads, head_dim = q.shape
    if kv.shape[0] != batch or tuple(lse.shape) != (batch, seq_q, num_heads) or batch * kv.shape[1] >= 2 ** 31:
        return False
    return _kernel_takes(q, kv, lse, head_dim, num_heads)


def dense_attn_score(q, kv, lse, scale: float, ratio: int = 1, q_start=None, *, config: Optional[ScoreConfig] = None):
    """SPEC section 6, dense form, on SM90: every ratio-causally visible key of the query's batch. Inputs are
    validated and contiguous (the op layer's contract). Returns (scores [B,Sq,Sk], l1 [B,Sq]), fp32. `config`: a
    shipped dense variant (default: `launch_config`)."""
    import torch

    batch, seq_q, num_heads, head_dim = q.shape
    seq_k = kv.shape[1]
    num_tokens = batch * seq_q
    raw = torch.zeros((num_tokens, seq_k), dtype=torch.float32, device=q.device)   # masked keys stay 0
    if num_tokens > 0 and seq_k > 0:
        # query i of batch b sits at position q_start[b] + i and sees keys k < (position + 1) // ratio
        if q_start is None:
            starts = torch.full((batch, 1), seq_k * ratio - seq_q, dtype=torch.int64, device=q.device)
        else:
            starts = q_start.to(device=q.device, dtype=torch.int64).view(batch, 1)
        position = starts + torch.arange(seq_q, device=q.device)
        visible = torch.div(position + 1, ratio, rounding_mode="floor").clamp(0, seq_k)
        visible = visible.to(torch.int32).view(num_tokens)
        row_base = (torch.arange(batch, device=q.device, dtype=torch.int32) * seq_k).repeat_interleave(seq_q)
        l2 = (lse.float() * LOG2_E).reshape(num_tokens, num_heads).contiguous()
        kernel = _CACHE.get(config or launch_config(head_dim, num_heads, dense=True))
        kernel(q.view(num_tokens, num_heads, head_dim), kv.view(batch * seq_k, head_dim),
               row_base.view(num_tokens, 1), l2, visible, raw, float(scale) * LOG2_E, current_stream())
    scores = raw.view(batch, seq_q, seq_k)
    return scores, scores.sum(dim=-1)


def sparse_attn_score(q, kv, lse, indices, scale: float, topk_length=None, *, config: Optional[ScoreConfig] = None):
    """SPEC section 6 on SM90. Inputs are validated and contiguous (the op layer's contract). `config`: a
    shipped variant (default: `launch_config`)."""
    import torch

    num_tokens, topk = indices.shape
    raw = torch.zeros((num_tokens, topk), dtype=torch.float32, device=q.device)   # slots past the tiles: 0
    if num_tokens > 0 and topk > 0 and kv.shape[0] > 0:
        if topk_length is None:
            topk_length = torch.full((num_tokens,), topk, dtype=torch.int32, device=q.device)
        l2 = (lse.float() * LOG2_E).contiguous()       # +inf (no valid key) stays +inf: P = 0
        kernel = _CACHE.get(config or launch_config(q.shape[2], q.shape[1]))
        kernel(q, kv, indices, l2, topk_length, raw, float(scale) * LOG2_E, current_stream())
    return raw / raw.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def warmup(configs=None) -> int:
    """Compile ahead of time (before CUDA-graph capture); default: the variants the dispatch launches."""
    from csrc_dsl.cute.common import warmup as _warmup

    return _warmup(dispatched_configs() if configs is None else configs)


def compile_kernel(config: ScoreConfig):
    """Compile one variant with TVM-FFI (the callable takes torch tensors). Needs no GPU."""
    import cutlass.cute as cute

    return cute.compile(_make_kernel(config), *fake_arguments(config),
                        options=f"--enable-tvm-ffi --gpu-arch={config.arch}")


def compile_for_inspection(config: ScoreConfig) -> tuple[str, bytes, int]:
    """(ptx, cubin, shared memory bytes per CTA) for `config.arch`, from fake tensors on a machine with no GPU."""
    from csrc_dsl.cute.common.fake_compile import compile_fake

    kernel = _make_kernel(config)
    ptx, cubin = compile_fake(kernel, *fake_arguments(config), arch=config.arch)
    return ptx, cubin, kernel.smem_bytes


def fake_arguments(config: ScoreConfig) -> list:
    """Fake tensors with symbolic T, H, S and K: one compiled kernel serves every size."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    if config.dtype != "bfloat16":
        raise ValueError(f"only bfloat16 is implemented, got {config.dtype}")
    bf16, f32 = cutlass.BFloat16, cutlass.Float32
    num_tokens, num_heads, num_rows, topk = (cute.sym_int() for _ in range(4))
    D = config.head_dim
    q = make_fake_compact_tensor(bf16, (num_tokens, num_heads, D), stride_order=(2, 1, 0), assumed_align=16)
    kv = make_fake_compact_tensor(bf16, (num_rows, D), stride_order=(1, 0), assumed_align=16)
    # dense: [T, 1], the first kv row of each token's batch (the output is [T, S_k])
    indices = make_fake_compact_tensor(cutlass.Int32, (num_tokens, 1 if config.dense else topk), stride_order=(1, 0),
                                       assumed_align=4)
    l2 = make_fake_compact_tensor(f32, (num_tokens, num_heads), stride_order=(1, 0), assumed_align=4)
    topk_length = make_fake_compact_tensor(cutlass.Int32, (num_tokens,), assumed_align=4)
    raw = make_fake_compact_tensor(f32, (num_tokens, topk), stride_order=(1, 0), assumed_align=4)
    return [q, kv, indices, l2, topk_length, raw, cutlass.Float32(1.0), make_fake_stream()]


def unavailable_reason() -> Optional[str]:
    return _dsl_unavailable_reason()


def _make_kernel(config: ScoreConfig):
    from csrc_dsl.cute.sm90.sparse_attn_score_kernel import SparseAttnScoreSm90

    return SparseAttnScoreSm90(config)


_HERE = Path(__file__).resolve().parent
_CACHE = KernelCache(
    "sparse_attn_score_sm90", ScoreConfig, compile_kernel,
    source_files=[_HERE / "sparse_attn_score.py", _HERE / "sparse_attn_score_kernel.py",
                  _HERE / "sparse_attention_fwd_kernel.py", *sorted((_HERE.parent / "common").glob("*.py"))],
)
