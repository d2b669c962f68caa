"""The SM-arch dispatch table: op x arch -> ordered candidates; the first that supports the call wins.

Reading guide:
- `TABLE` below is the whole policy. A row lists, per arch, the implementations to try in order; the
  pure-torch reference is always last, so every call has an implementation.
- An implementation is named by "module:function" and imported lazily, so a missing optional
  dependency (triton, nvidia-cutlass-dsl) makes that candidate *unavailable* (with the import error as the
  reason), never breaks the op.
- `supports` looks at the (already validated) arguments: dtype, head dims, H, k. It must be cheap.
- `DSA_OPS_BACKEND` forces a backend, for tests and benchmarks: `reference`, `triton` or `cute`
  for every op, or per op `topk=triton,sparse_attention=reference`. A forced backend that is unavailable or
  does not support the call raises instead of silently falling back.
- `python -m dsa_ops.backends` prints this table for the current machine.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

ENV_FORCE = "DSA_OPS_BACKEND"
ARCHES = ("sm90", "sm100", "cuda", "cpu")
HALF = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------------
# Predicates: what a kernel needs from the call. Arguments are those of the op, in schema order.
# ------------------------------------------------------------------------------------------------------
def any_call(*args) -> bool:
    return True


def half_inputs(x, *args) -> bool:
    """Kernels compute on bf16/fp16 activations; fp32/fp64 calls (tests, gradcheck) go to the reference."""
    return x.dtype in HALF


def fp32_scores(scores, k, *args) -> bool:
    return scores.dtype == torch.float32 and k <= 4096


def half_topk(q_idx, k_idx, w, topk, *args) -> bool:
    return q_idx.dtype in HALF and topk <= 4096


def half_paged_topk(q_idx, k_cache, block_table, seq_lens, w, topk, *args) -> bool:
    return q_idx.dtype in HALF and topk <= 4096


def half_grad_of(grad, x, *args) -> bool:  # backward ops: the activation is the second argument
    return x.dtype in HALF


MAX_HEADS, MAX_DIM = 128, 576
ATTENTION_NEEDS = f"bf16/fp16, H <= {MAX_HEADS}, D <= {MAX_DIM}"


def _attention_shapes(q) -> bool:
    """Register-resident tiles: up to 128 heads (a query's heads share its gathered rows) and D <= 576."""
    return q.dtype in HALF and q.shape[-2] <= MAX_HEADS and q.shape[-1] <= MAX_DIM


def attention_kernel(q, *args) -> bool:
    return _attention_shapes(q)


def attention_backward_kernel(dout, q, *args) -> bool:
    """A gradient of lse (args[-1], merged branches) is fine: the kernels shift Delta by it."""
    return _attention_shapes(q)


def attention_decode_kernel(q, *args) -> bool:
    return _attention_shapes(q)


def attention_score_kernel(q, *args) -> bool:
    return _attention_shapes(q)


# ------------------------------------------------------------------------------------------------------
# Candidates
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Impl:
    backend: str                       # "cute-sm90" | "triton" | "reference"
    target: str                        # "package.module:function"
    supports: Callable[..., bool] | str = any_call   # a predicate, or "module:function" of one (lazy)
    requires: str = "any input"        # what `supports` checks, for the report
    unavailable: Optional[str] = None  # "module:function" returning None, or why the backend cannot run here

    @property
    def family(self) -> str:
        return self.backend.split("-")[0]


@functools.lru_cache(maxsize=None)
def _load(target: str) -> tuple[Optional[Callable], str]:
    """Imports "module:function"; returns (function, "") or (None, why it is unavailable)."""
    module, _, name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as exc:  # ImportError, or a kernel module that fails to build its tables
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return fn, ""


def ref(family: str, op: str) -> Impl:
    return Impl("reference", f"dsa_ops.reference.{family}:{op}")


def triton(module: str, op: str, supports=half_inputs, requires="bf16/fp16 inputs") -> Impl:
    return Impl("triton", f"csrc_dsl.triton.{module}:{op}", supports, requires)


def cute_sm90(module: str, op: str, requires: str, faster: Optional[Callable[..., bool]] = None,
              predicate: str = "supports") -> Impl:
    """A CuTe-DSL kernel; its module's `predicate` decides (and, where given, `faster`: the calls on which it
    measured faster than the next candidate); it is unavailable without the DSL."""
    supports = f"csrc_dsl.cute.sm90.{module}:{predicate}"
    if faster is not None:
        supports = functools.partial(_supported_and_faster, supports, faster)
    return Impl("cute-sm90", f"csrc_dsl.cute.sm90.{module}:{op}", supports, requires,
                "csrc_dsl.cute.common.availability:launch_unavailable_reason")


def _supported_and_faster(supports: str, faster: Callable[..., bool], *args) -> bool:
    return faster(*args) and _holds(supports, args)


# Where the CuTe-DSL backward loses to Triton (BENCHMARKS.md, headline run 2026-11-25, H100, T=4096, K=2048,
# D=576): at H=16 (fast 11.0 vs 9.7 ms; deterministic a tie) and in deterministic mode at H=128 (43.5 vs 40.0 ms).
# The forward has no such rule: since its seesaw schedule (session 13) it wins at every H, H=16 included
# (1.77 vs 2.01 ms); both kernels pad the heads to a 64- (CuTe) or 16-head (Triton) tile, so H < 16 costs what
# H = 16 does.
def cute_backward_faster(dout, q, kv, out, lse, indices, scale, d_v, attn_sink, topk_length, deterministic,
                         grad_lse=None) -> bool:
    heads = q.shape[-2]
    return heads > 16 and not (deterministic and heads > 64)


def _why_unavailable(impl: Impl) -> tuple[Optional[Callable], str]:
    """(implementation, "") when it can run here, else (None, reason)."""
    fn, why = _load(impl.target)
    if fn is None or impl.unavailable is None:
        return fn, why
    probe, why = _load(impl.unavailable)
    reason = probe() if probe is not None else why
    return (None, reason) if reason else (fn, "")


def _holds(predicate: Callable[..., bool] | str, args: tuple) -> bool:
    """A predicate, or the "module:function" of one (False when it cannot be imported), applied to args."""
    if isinstance(predicate, str):
        predicate, _ = _load(predicate)
        if predicate is None:
            return False
    return predicate(*args)


def gpu_rows(sm90: list[Impl], portable: list[Impl], reference: Impl) -> dict[str, list[Impl]]:
    """SM90 tries its own kernels first; SM100 and other CUDA archs use the portable (Triton) path until an
    SM100 kernel can be tested; the CPU uses the reference."""
    return {
        "sm90": [*sm90, *portable, reference],
        "sm100": [*portable, reference],
        "cuda": [*portable, reference],
        "cpu": [reference],
    }


# ------------------------------------------------------------------------------------------------------
# THE TABLE
# ------------------------------------------------------------------------------------------------------
TABLE: dict[str, dict[str, list[Impl]]] = {
    # indexer family
    "indexer_logits": gpu_rows(
        [], [triton("indexer", "indexer_logits")],
        ref("indexer", "indexer_logits")),
    "indexer_logits_backward": gpu_rows(
        [], [triton("indexer", "indexer_logits_backward", half_grad_of)],
        ref("indexer", "indexer_logits_backward")),
    "topk": gpu_rows(
        [], [triton("topk", "topk", fp32_scores, "fp32 scores, k <= 4096")],
        ref("indexer", "topk")),
    "indexer_topk": gpu_rows(
        [], [triton("indexer", "indexer_topk", half_topk, "bf16/fp16 inputs, topk <= 4096")],
        ref("indexer", "indexer_topk")),
    "indexer_topk_paged": gpu_rows(
        [], [triton("indexer", "indexer_topk_paged", half_paged_topk, "bf16/fp16 inputs, topk <= 4096")],
        ref("indexer", "indexer_topk_paged")),
    "sparse_indexer_score": gpu_rows(
        [], [triton("indexer", "sparse_indexer_score")],
        ref("indexer", "sparse_indexer_score")),
    # attention family
    "sparse_attention": gpu_rows(
        [cute_sm90("sparse_attention_fwd", "sparse_attention", "bf16, D in {512, 576}, d_v = 512, H <= 128")],
        [triton("sparse_attention_fwd", "sparse_attention", attention_kernel, ATTENTION_NEEDS)],
        ref("attention", "sparse_attention")),
    "sparse_attention_backward": gpu_rows(
        [cute_sm90("sparse_attention_bwd", "sparse_attention_backward",
                   "bf16, D in {512, 576}, d_v = 512, 16 < H <= 128 (deterministic: H <= 64)",
                   cute_backward_faster)],
        [triton("sparse_attention_bwd", "sparse_attention_backward", attention_backward_kernel,
                    ATTENTION_NEEDS)],
        ref("attention", "sparse_attention_backward")),
    "sparse_attention_decode": gpu_rows(
        [], [triton("sparse_attention_fwd", "sparse_attention_decode", attention_decode_kernel,
                    ATTENTION_NEEDS)],
        ref("attention", "sparse_attention_decode")),
    "sparse_attn_score": gpu_rows(
        [cute_sm90("sparse_attn_score", "sparse_attn_score", "bf16, D in {512, 576}, H <= 128")],
        [triton("sparse_attention_fwd", "sparse_attn_score", attention_score_kernel, ATTENTION_NEEDS)],
        ref("attention", "sparse_attn_score")),
    "dense_attn_score": gpu_rows(
        [cute_sm90("sparse_attn_score", "dense_attn_score", "bf16, D in {512, 576}, H <= 128",
                   predicate="supports_dense")],
        [triton("sparse_attention_fwd", "dense_attn_score", attention_score_kernel, ATTENTION_NEEDS)],
        ref("attention", "dense_attn_score")),
    # indexer training loss
    "indexer_loss": gpu_rows(
        [], [triton("indexer_loss", "indexer_loss")],
        ref("loss", "indexer_loss")),
    "indexer_loss_backward": gpu_rows(
        [], [triton("indexer_loss", "indexer_loss_backward", half_grad_of)],
        ref("loss", "indexer_loss_backward")),
    "dense_indexer_loss": gpu_rows(
        [], [triton("indexer_loss", "dense_indexer_loss")],
        ref("loss", "dense_indexer_loss")),
    "dense_indexer_loss_backward": gpu_rows(
        [], [triton("indexer_loss", "dense_indexer_loss_backward", half_grad_of)],
        ref("loss", "dense_indexer_loss_backward")),
    # DeepSeek-V4 hybrid attention (SPEC section 7): reference only for now
    "hca_compress": gpu_rows([], [], ref("v4", "hca_compress")),
    "hca_compress_backward": gpu_rows([], [], ref("v4", "hca_compress_backward")),
    "csa_compress": gpu_rows([], [], ref("v4", "csa_compress")),
    "csa_compress_backward": gpu_rows([], [], ref("v4", "csa_compress_backward")),
    "merge_attention_with_sink": gpu_rows([], [], ref("v4", "merge_attention_with_sink")),
    "merge_attention_with_sink_backward": gpu_rows([], [], ref("v4", "merge_attention_with_sink_backward")),
    # Native Sparse Attention (SPEC section 8): reference only for now
    "nsa_compress": gpu_rows([], [], ref("nsa", "nsa_compress")),
    "nsa_compress_backward": gpu_rows([], [], ref("nsa", "nsa_compress_backward")),
    "nsa_gate_combine": gpu_rows([], [], ref("nsa", "nsa_gate_combine")),
    "nsa_gate_combine_backward": gpu_rows([], [], ref("nsa", "nsa_gate_combine_backward")),
    "nsa_select": gpu_rows([], [], ref("nsa", "nsa_select")),
}


# ------------------------------------------------------------------------------------------------------
# Picking
# ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def arch_of(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    major, _ = torch.cuda.get_device_capability(device)
    if major == 9:
        return "sm90"
    if major >= 10:
        return "sm100"
    return "cuda"


def forced_backend(op: str) -> Optional[str]:
    """The backend forced for `op` by DSA_OPS_BACKEND, or None."""
    value = os.environ.get(ENV_FORCE, "").strip()
    if not value:
        return None
    if "=" not in value:
        return value
    for item in value.split(","):
        name, _, backend = item.partition("=")
        if name.strip() == op:
            return backend.strip()
    return None


class NoImplementation(RuntimeError):
    pass


def device_of(args: tuple) -> torch.device:
    """The device of a call: that of its first tensor argument (the checks make every tensor share it)."""
    return next(a.device for a in args if isinstance(a, torch.Tensor))


def pick(op: str, args: tuple, device: Optional[torch.device] = None) -> Callable:
    """The implementation of `op` for these (validated) arguments (`device`: `device_of(args)`, when the
    caller has it already)."""
    return choose(op, args, device)[1]


def choose(op: str, args: tuple, device: Optional[torch.device] = None) -> tuple[Impl, Callable]:
    arch = arch_of(device_of(args) if device is None else device)
    forced = forced_backend(op)
    reasons = []
    for impl in TABLE[op][arch]:
        if forced is not None and impl.family != forced and impl.backend != forced:
            continue
        fn, why = _why_unavailable(impl)
        if fn is None:
            reasons.append(f"{impl.backend}: unavailable ({why})")
            continue
        if not _holds(impl.supports, args):
            reasons.append(f"{impl.backend}: needs {impl.requires}")
            continue
        return impl, fn
    raise NoImplementation(
        f"dsa.{op}: no implementation for this call on {arch}"
        + (f" with {ENV_FORCE}={forced!r}" if forced else "")
        + ("; " + "; ".join(reasons) if reasons else "")
    )


def report(device: Optional[torch.device] = None) -> str:
    """One line per op and candidate: what this machine would run, and why the others are skipped."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    arch = arch_of(device)
    lines = [f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
             f"arch row: {arch}"]
    forced = os.environ.get(ENV_FORCE)
    if forced:
        lines.append(f"{ENV_FORCE}={forced}")
    width = max(len(op) for op in TABLE)
    for op, rows in TABLE.items():
        chosen = None
        notes = []
        for impl in rows[arch]:
            fn, why = _why_unavailable(impl)
            f = forced_backend(op)
            if f is not None and impl.family != f and impl.backend != f:
                notes.append(f"{impl.backend} (not the forced backend)")
            elif fn is None:
                notes.append(f"{impl.backend} unavailable: {why}")
            elif chosen is None:
                chosen = impl
                notes.append(f"{impl.backend} <- used when the call has {impl.requires}")
            else:
                notes.append(f"{impl.backend} (fallback)")
        lines.append(f"{op:<{width}}  " + " | ".join(notes))
    return "\n".join(lines)
