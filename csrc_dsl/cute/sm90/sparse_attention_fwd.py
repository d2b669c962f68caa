"""Sparse attention forward (SPEC section 4) for Hopper (SM90), in CuTe-DSL.

    sparse_attention(q [T,H,D] bf16, kv [S,D] bf16, indices [T,K] int32, scale, d_v=512,
                     attn_sink [H] fp32 | None, topk_length [T] int32 | None) -> (out [T,H,d_v] bf16, lse [T,H] fp32)

This file is the torch side (config, cache, launcher, `supports`); the kernel is in
sparse_attention_fwd_kernel.py, imported only when a variant is compiled.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from csrc_dsl.cute.common import KernelCache, current_stream, is_sm90, launch_unavailable_reason
from csrc_dsl.cute.common import unavailable_reason as _dsl_unavailable_reason
from csrc_dsl.cute.common.launch import env_choice

LOG2_E = 1.4426950408889634

# The op's forward, a name of VARIANTS. "seesaw+persistent_dynamic+hoisted_addresses" was 1.03-1.14x plain
# seesaw at every benchmark shape on the H100 (BENCHMARKS.md, session 17); its op-level GPU tests (oracle, CUDA
# graphs, torch.compile, the demo) passed in session 18, so the op runs it.
DEFAULT_VARIANT = "seesaw+persistent_dynamic+hoisted_addresses"
ENV_VARIANT = "DSA_OPS_CUTE_SPARSE_FWD_SCHEDULE"   # tests and benchmarks: run another variant
SUPPORTED_HEAD_DIMS = (512, 576)
SUPPORTED_DV = (512,)
MAX_HEADS = 128


@dataclass(frozen=True)
class FwdConfig:
    """One compiled variant. Static scalars only: T, H, S and K are runtime values of the compiled kernel.

    H is runtime on purpose: it only sets the number of 64-head CTAs per token and the masking of the
    last block, so one compile (about 2 s) serves every H from 1 to 128 instead of one per H."""
    head_dim: int               # D (576: V3.2, 512: V4)
    d_v: int                    # value width, the first d_v columns of kv
    has_sink: bool
    has_topk_length: bool
    dtype: str = "bfloat16"
    block_n: int = 64           # top-k slots (kv rows) per tile
    num_stages: int = 2
    # setmaxnreg for the gather warpgroup and for each math warpgroup; 0: 72 / 216 (the pair-wise ids need
    # the producer registers; 216 fits the consumers). 88 / 208 (the named variant `seesaw+wide_producer`, for a
    # producer that recomputed its gather addresses at 72) was never timed: the hoisted addresses removed that work.
    producer_regs: int = 0
    consumer_regs: int = 0
    arch: str = "sm_90a"
    # The tile schedule is "seesaw" (alternate tiles in pairs, each kv stage loaded and freed in two column
    # halves, the owner's P straight from registers, both consumers at one max per pair: the kernel's
    # docstring); the fields below are its variants.
    # The kv gather as cp.async with an L2 evict_last policy and a 256-byte L2 prefetch, 1-4% faster than
    # plain cp.async (BENCHMARKS.md, session 14); False for A/B runs
    l2_hints: bool = True
    # A persistent grid (one CTA per SM looping over (token, head block) items), so the next
    # item's Q and first kv tiles load during this item's last P V and epilogue, and O goes to global memory
    # straight from registers (the variant `seesaw+persistent`; the op's default, DEFAULT_VARIANT, adds
    # dynamic_items and hoist_gather_addresses)
    persistent: bool = False
    # persistent only: each CTA claims its next item from a global counter (zeroed per launch) as it gets free,
    # instead of taking every grid-th item: SMs that run faster do more items (the variant
    # `seesaw+persistent_dynamic`)
    dynamic_items: bool = False
    # O to global memory straight from registers (16-byte pieces after a quad transpose) instead of through
    # shared memory; the persistent grid always does this (the variant `seesaw+direct_store`)
    direct_store: bool = False
    # l2_hints only: each producer thread computes the swizzled shared address of its first kv piece
    # once; every other piece is that plus an immediate (no swizzle arithmetic per copy: the variant
    # `seesaw+hoisted_addresses`)
    hoist_gather_addresses: bool = False
    # Performance analysis only (wrong results): "no_gather" skips the kv cp.async.
    ablation: str = "none"


def shipped_configs() -> list[FwdConfig]:
    """Every variant the op can dispatch to; CI compiles all of them (tests/test_cute_sm90.py)."""
    return [FwdConfig(head_dim, d_v, has_sink, has_topk_length, **selected_variant())
            for head_dim in SUPPORTED_HEAD_DIMS for d_v in SUPPORTED_DV
            for has_sink in (False, True) for has_topk_length in (False, True)]


# ------------------------------------------------------------------------------------------------------
# The launcher (torch side)
# ------------------------------------------------------------------------------------------------------
def supports(q, kv, indices, scale=None, d_v=512, attn_sink=None, topk_length=None) -> bool:
    """Cheap predicate for the dispatch table: the shapes and devices this kernel is built for."""
    import torch

    if launch_unavailable_reason() is not None:
        return False
    if q.device.type != "cuda" or not is_sm90(q.device):
        return False
    if q.dtype != torch.bfloat16 or kv.dtype != torch.bfloat16 or indices.dtype != torch.int32:
        return False
    if q.dim() != 3 or kv.dim() != 2 or indices.dim() != 2:
        return False
    head_dim, num_heads = q.shape[2], q.shape[1]
    if head_dim not in SUPPORTED_HEAD_DIMS or kv.shape[1] != head_dim or d_v not in SUPPORTED_DV:
        return False
    if not 1 <= num_heads <= MAX_HEADS:
        return False
    if attn_sink is not None and (attn_sink.dtype != torch.float32 or attn_sink.numel() != num_heads):
        return False
    if topk_length is not None and topk_length.dtype != torch.int32:
        return False
    if not all(t is None or t.is_contiguous() for t in (q, kv, indices, attn_sink, topk_length)):
        return False
    # cp.async moves 16-byte pieces: rows must start on 16 bytes (D * 2 bytes is a multiple of 16).
    return q.data_ptr() % 16 == 0 and kv.data_ptr() % 16 == 0


def sparse_attention(q, kv, indices, scale: float, d_v: int = 512, attn_sink=None, topk_length=None):
    """SPEC section 4 on SM90. Inputs are validated and contiguous (the op layer's contract)."""
    import torch

    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty((num_tokens, num_heads, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=q.device)
    if num_tokens == 0:
        return out, lse
    if kv.shape[0] == 0 or indices.shape[1] == 0:
        # No key can be valid: every row is lonely. Nothing to gather, so no launch.
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    config = FwdConfig(head_dim=head_dim, d_v=d_v, has_sink=attn_sink is not None,
                       has_topk_length=topk_length is not None, **selected_variant())
    _launch(config, q, kv, indices, out, lse, scale, attn_sink, topk_length)
    return out, lse


def _launch(config: FwdConfig, q, kv, indices, out, lse, scale, attn_sink, topk_length, max_ctas=None) -> None:
    """max_ctas: the persistent grid's size (default: the SM count); tests pass a few to give each CTA many items.
    The other variants ignore it, so they skip the lookup."""
    kernel = _CACHE.get(config)
    item_counter = None
    if config.dynamic_items:
        import torch

        item_counter = torch.zeros(1, dtype=torch.int32, device=q.device)
    if max_ctas is None:
        max_ctas = _sm_count(q.device) if config.persistent else 0
    kernel(q, kv, indices, out, lse, attn_sink, topk_length, item_counter, float(scale) * LOG2_E, max_ctas,
           current_stream())


_SM_COUNTS: dict = {}


def _sm_count(device) -> int:
    """The persistent grid's size; cached: the property lookup costs microseconds."""
    index = device.index
    if index not in _SM_COUNTS:
        import torch

        _SM_COUNTS[index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNTS[index]


# The named variants (FwdConfig fields over its defaults), for the op (DEFAULT_VARIANT or ENV_VARIANT), tests and
# A/B benchmarks. Timings: BENCHMARKS.md, sessions 14 to 17.
VARIANTS = {"seesaw": {},                                     # one CTA per item, O staged through Q's smem
            "seesaw-no_l2_hints": {"l2_hints": False},
            "seesaw+persistent": {"persistent": True},
            "seesaw+persistent_dynamic": {"persistent": True, "dynamic_items": True},
            "seesaw+direct_store": {"direct_store": True},
            "seesaw+hoisted_addresses": {"hoist_gather_addresses": True},
            "seesaw+direct_store+hoisted_addresses": {"direct_store": True, "hoist_gather_addresses": True},
            "seesaw+persistent_dynamic+hoisted_addresses": {"persistent": True, "dynamic_items": True,
                                                            "hoist_gather_addresses": True}}


def selected_variant() -> dict:
    """The FwdConfig fields the op runs with: those of DEFAULT_VARIANT, or of the variant `ENV_VARIANT` names."""
    return dict(VARIANTS[env_choice(ENV_VARIANT, VARIANTS, DEFAULT_VARIANT)])


def warmup(configs=None) -> int:
    """Compile ahead of time (before CUDA-graph capture); default: every shipped variant."""
    from csrc_dsl.cute.common import warmup as _warmup

    return _warmup(shipped_configs() if configs is None else configs)


def compile_kernel(config: FwdConfig):
    """Compile one variant with TVM-FFI (the callable takes torch tensors). Needs no GPU."""
    import cutlass.cute as cute

    args = fake_arguments(config)
    return cute.compile(_make_kernel(config), *args, options=f"--enable-tvm-ffi --gpu-arch={config.arch}")


def compile_for_inspection(config: FwdConfig) -> tuple[str, bytes]:
    """(ptx, cubin) of one variant for `config.arch`, built from fake tensors on a machine with no GPU."""
    from csrc_dsl.cute.common.fake_compile import compile_fake

    return compile_fake(_make_kernel(config), *fake_arguments(config), arch=config.arch)


def fake_arguments(config: FwdConfig) -> list:
    """Fake tensors with symbolic T, H, S, K: one compiled kernel serves every length, head count and top-k."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    if config.dtype != "bfloat16":
        raise ValueError(f"only bfloat16 is implemented, got {config.dtype}")
    bf16 = cutlass.BFloat16
    num_tokens, num_heads, num_rows, topk = cute.sym_int(), cute.sym_int(), cute.sym_int(), cute.sym_int()
    H, D, DV = num_heads, config.head_dim, config.d_v
    q = make_fake_compact_tensor(bf16, (num_tokens, H, D), stride_order=(2, 1, 0), assumed_align=16)
    kv = make_fake_compact_tensor(bf16, (num_rows, D), stride_order=(1, 0), assumed_align=16)
    indices = make_fake_compact_tensor(cutlass.Int32, (num_tokens, topk), stride_order=(1, 0), assumed_align=4)
    out = make_fake_compact_tensor(bf16, (num_tokens, H, DV), stride_order=(2, 1, 0), assumed_align=16)
    lse = make_fake_compact_tensor(cutlass.Float32, (num_tokens, H), stride_order=(1, 0), assumed_align=4)
    sink = make_fake_compact_tensor(cutlass.Float32, (H,), assumed_align=4) if config.has_sink else None
    topk_length = (make_fake_compact_tensor(cutlass.Int32, (num_tokens,), assumed_align=4)
                   if config.has_topk_length else None)
    item_counter = make_fake_compact_tensor(cutlass.Int32, (1,), assumed_align=4) if config.dynamic_items else None
    return [q, kv, indices, out, lse, sink, topk_length, item_counter, cutlass.Float32(1.0), cutlass.Int32(132),
            make_fake_stream()]


def unavailable_reason() -> Optional[str]:
    return _dsl_unavailable_reason()


def _make_kernel(config: FwdConfig):
    from csrc_dsl.cute.sm90.sparse_attention_fwd_kernel import SparseAttentionFwdSm90

    return SparseAttentionFwdSm90(config)


_HERE = Path(__file__).resolve().parent
_CACHE = KernelCache(
    "sparse_attention_fwd_sm90", FwdConfig, compile_kernel,
    source_files=[_HERE / "sparse_attention_fwd.py", _HERE / "sparse_attention_fwd_kernel.py",
                  *sorted((_HERE.parent / "common").glob("*.py"))],
)


def _benchmark(argv=None) -> None:
    """`python -m csrc_dsl.cute.sm90.sparse_attention_fwd [--T 4096 --S 8192 --H 128 --K 2048 --D 576]`."""
    import argparse

    import torch
    from triton.testing import do_bench

    parser = argparse.ArgumentParser(description=_benchmark.__doc__)
    for name, default in [("T", 4096), ("S", 8192), ("H", 128), ("K", 2048), ("D", 576)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--sink", action="store_true")
    parser.add_argument("--ablation", default="none", choices=["none", "no_gather"])
    parser.add_argument("--variant", default=DEFAULT_VARIANT, choices=list(VARIANTS))
    args = parser.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(args.T, args.H, args.D, device="cuda", generator=gen).to(torch.bfloat16)
    kv = torch.randn(args.S, args.D, device="cuda", generator=gen).to(torch.bfloat16)
    indices = torch.randint(0, args.S, (args.T, args.K), device="cuda", generator=gen, dtype=torch.int32)
    sink = torch.randn(args.H, device="cuda", generator=gen) if args.sink else None
    out = torch.empty(args.T, args.H, 512, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(args.T, args.H, device="cuda", dtype=torch.float32)
    config = FwdConfig(args.D, 512, args.sink, False, ablation=args.ablation, **VARIANTS[args.variant])
    run = lambda: _launch(config, q, kv, indices, out, lse, args.D ** -0.5, sink, None)  # noqa: E731
    run()
    ms = do_bench(run, warmup=25, rep=200)
    flops = 2 * args.T * args.H * args.K * (args.D + 512)
    print(f"sparse_attention_fwd sm90 T={args.T} S={args.S} H={args.H} K={args.K} D={args.D} "
          f"variant={args.variant} ablation={args.ablation}: "
          f"{ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s")


if __name__ == "__main__":
    _benchmark()
