"""Shared machinery of the benchmark suite: timing, memory, correctness checks, inputs, cuDNN loading.

Nothing here knows about a particular op; `benchmarks/run.py` holds the cases.

Timing rules (shared/device/README.md): median of CUDA-event times after a warm-up, random inputs,
a cold L2 for every timed call (a 256 MB buffer is zeroed before it, outside the timed events, as
triton.testing.do_bench does), and, for memory-bound cases whose inputs are smaller than twice the
L2, several input copies rotated call to call, so no call reads data the previous one left in L2.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

# Roofline of the H100 SXM as measured in this workplace (shared/device/README.md); `use_roofline_of` switches
# to the GPU the run is on.
PEAK_TFLOPS = 760.0      # dense bf16 matmul
PEAK_GBPS = 2900.0       # device-to-device copy, bytes read + written
# (bf16 matmul TFLOP/s, copy GB/s) measured on the lent machines, by a word of the device name. H200: an
# 8192^3 bf16 product at 769-798 TFLOP/s and a device copy at about 4.3 TB/s (the device library's KINDS.md).
_ROOFLINES = {"H200": (790.0, 4300.0), "H100": (760.0, 2900.0)}
L2_BYTES = 50 * 2 ** 20
_FLUSH_BYTES = 256 * 2 ** 20


def use_roofline_of(device_name: str) -> tuple[float, float]:
    """Set PEAK_TFLOPS / PEAK_GBPS for the named GPU (unchanged when it is not one measured here)."""
    global PEAK_TFLOPS, PEAK_GBPS
    for word, (tflops, gbps) in _ROOFLINES.items():
        if word in device_name:
            PEAK_TFLOPS, PEAK_GBPS = tflops, gbps
            break
    return PEAK_TFLOPS, PEAK_GBPS


# ------------------------------------------------------------------------------------------------------
# Timing and memory
# ------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    ms: float                  # median time per call
    min_ms: float
    reps: int
    peak_mib: Optional[float]  # max_memory_allocated during one call minus what was allocated before it


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_flush_buffer: dict = {}


def flush_l2(device: torch.device) -> None:
    """Evicts L2 by writing a buffer much larger than it."""
    if device.type != "cuda":
        return
    buf = _flush_buffer.get(device)
    if buf is None:
        buf = _flush_buffer[device] = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)
    buf.zero_()


def warm_up_device(device: torch.device) -> None:
    """First-use costs (CUDA context, cuBLAS handles and workspaces) out of the way before anything is
    timed, so the first case's estimates are not inflated by them."""
    if device.type != "cuda":
        return
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(256, 256, device=device, dtype=dtype)
        torch.bmm(x[None], x[None]).sum()
        (x @ x).topk(8, dim=-1)
    flush_l2(device)
    torch.cuda.synchronize(device)


def wall_ms(fn: Callable, device: torch.device):
    """(result, milliseconds) of one synchronised call: for estimates, not for the table."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, (time.perf_counter() - start) * 1e3


def measure(fn: Callable, arg_sets: Sequence[tuple], device: torch.device, budget_s: float,
            max_reps: int = 100) -> Timing:
    """Times `fn(*args)`; call i uses arg_sets[i % len(arg_sets)]. The caller has already made one warm-up
    call (the correctness check). One more call measures the peak extra memory and estimates the time per
    call, which fixes the number of timed repetitions so that they take about `budget_s` (at least one)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    out, estimate_ms = wall_ms(lambda: fn(*arg_sets[0]), device)
    peak_mib = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20 if cuda else None
    del out
    reps = max(1, min(max_reps, int(budget_s * 1e3 / max(estimate_ms, 1e-3))))
    times = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (start, end) in enumerate(events):
            flush_l2(device)
            start.record()
            fn(*arg_sets[i % len(arg_sets)])
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for i in range(reps):
            start = time.perf_counter()
            fn(*arg_sets[i % len(arg_sets)])
            times.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(times), min(times), reps, peak_mib)


def rotation_copies(input_bytes: int, memory_bound: bool, device: torch.device, limit: int = 8) -> int:
    """How many input sets a case rotates through: enough that they overflow L2 twice, for memory-bound
    cases only (compute-bound ones barely notice a warm L2)."""
    if device.type != "cuda" or not memory_bound or input_bytes >= 2 * L2_BYTES:
        return 1
    return min(limit, math.ceil(2 * L2_BYTES / max(input_bytes, 1)))


def tensor_bytes(args) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


# ------------------------------------------------------------------------------------------------------
# Correctness checks. Each returns (ok, note): note is the error measure, or why it failed.
# ------------------------------------------------------------------------------------------------------
def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float,
                cos_min: Optional[float] = None) -> tuple[bool, str]:
    """Relative Frobenius error over the finite reference entries <= tol (SPEC section 9); infinities must
    sit where the reference has them; NaN never passes; optionally cosine similarity >= cos_min."""
    if tuple(got.shape) != tuple(want.shape):
        return False, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.detach().double(), want.detach().double()
    if torch.isnan(got).any():
        return False, f"{name}: NaN"
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)) or not torch.equal(got[~finite], want[~finite]):
        return False, f"{name}: infinities differ"
    got, want = got[finite], want[finite]
    if want.norm() == 0:
        err = got.norm().item()  # an all-zero reference (no sink: d_sink = 0): absolute error
    else:
        err = rel_err(got, want)
    if not err <= tol:
        return False, f"{name}: rel err {err:.1e} > {tol:.0e}"
    if cos_min is not None and want.norm() > 0:
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
        if not cos >= cos_min:
            return False, f"{name}: cosine {cos:.5f} < {cos_min}"
    return True, f"{name} {err:.1e}"


def check_topk_exact(ids: torch.Tensor, values: torch.Tensor, ref_ids: torch.Tensor,
                     ref_values: torch.Tensor) -> tuple[bool, str]:
    """Top-k over given scores: the same set per row (the tie rule makes it unique) and the same values."""
    ids, ref_ids = ids.reshape(-1, ids.shape[-1]), ref_ids.reshape(-1, ref_ids.shape[-1])
    if ids.shape != ref_ids.shape:
        return False, f"indices: shape {tuple(ids.shape)} != {tuple(ref_ids.shape)}"
    bad = (ids.long().sort(-1).values != ref_ids.long().sort(-1).values).any(-1)
    if bad.any():
        return False, f"index sets differ in {int(bad.sum())} of {ids.shape[0]} rows"
    got_v = values.reshape(ids.shape).float().sort(-1).values
    want_v = ref_values.reshape(ids.shape).float().sort(-1).values
    if not torch.equal(got_v, want_v):
        return False, "values differ"
    return True, "same sets"


def check_topk_near(ids: torch.Tensor, values: torch.Tensor, ref_scores: torch.Tensor, k: int,
                    rel_tol: float = 1e-3) -> tuple[bool, str]:
    """Top-k of scores the implementation computed itself (fused indexer top-k): they differ from the
    reference's by rounding, so a swap is allowed between keys whose reference scores are within
    `rel_tol * max |score|` of the row (SPEC section 9). Checks: as many valid ids per row as the
    reference has candidates (up to k), ids distinct and visible, every selected key's reference score at
    least the reference k-th value minus the tolerance, and returned values equal to the reference scores
    within the tolerance."""
    ids = ids.reshape(-1, k).long()
    values = values.reshape(-1, k).double()
    scores = ref_scores.reshape(ids.shape[0], -1).double()
    finite = torch.isfinite(scores)
    n_expected = finite.sum(-1).clamp(max=k)
    valid = ids >= 0
    if not torch.equal(valid.sum(-1), n_expected):
        return False, "number of selected keys per row differs from min(k, visible keys)"
    # valid slots first is not required: sort each row so duplicates are adjacent
    safe = torch.where(valid, ids, -1)
    if (safe >= scores.shape[1]).any():
        return False, "id out of range"
    srt = safe.sort(-1).values
    if ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any():
        return False, "duplicate ids in a row"
    picked = torch.gather(scores, 1, safe.clamp_min(0))
    if not torch.isfinite(picked[valid]).all():
        return False, "a hidden (masked) key was selected"
    tol = rel_tol * scores.masked_fill(~finite, 0).abs().amax(-1, keepdim=True).clamp_min(1e-30)
    kth = scores.masked_fill(~finite, float("-inf")).topk(min(k, scores.shape[1]), dim=-1).values
    kth = torch.gather(kth, 1, (n_expected - 1).clamp_min(0)[:, None])
    if ((picked < kth - tol) & valid).any():
        return False, "a selected key scores below the k-th best by more than rounding"
    if ((values - picked).abs() > tol)[valid].any():
        return False, "returned values differ from the reference scores"
    return True, "sets agree up to rounding"


def all_ok(results: Sequence[tuple[bool, str]]) -> tuple[bool, str]:
    failed = [note for ok, note in results if not ok]
    if failed:
        return False, "; ".join(failed)
    return True, ", ".join(note for _, note in results)


# ------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------
def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(*shape, gen, device, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Drawn directly in `dtype`: no fp32 temporary twice the size of a large bf16 input."""
    out = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    return out.mul_(scale) if scale != 1.0 else out


def distinct_ids(rows: int, k: int, n_keys: int, gen, device, pad_every: int = 7) -> torch.Tensor:
    """[rows, k] int32: per row k distinct random ids in [0, n_keys) (what a top-k of random scores gives),
    built in row chunks so no [rows, n_keys] matrix exists; every `pad_every`-th row ends with a few -1
    pads, as a short top-k row does. Slots beyond n_keys are -1."""
    out = torch.full((rows, k), -1, dtype=torch.int32, device=device)
    take = min(k, n_keys)
    chunk = max(1, (1 << 24) // max(n_keys, 1))
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        noise = torch.rand(r1 - r0, n_keys, generator=gen, device=device)
        out[r0:r1, :take] = noise.topk(take, dim=1, sorted=False).indices.to(torch.int32)
    if pad_every and k >= 8:
        out[::pad_every, -5:] = -1
    return out


def visible_pairs(n_queries: int, n_keys: int, ratio: int, q_start: Optional[int] = None) -> int:
    """Number of (query, key) pairs the ratio-causal mask shows (SPEC section 0); q_start default: the
    queries are the last tokens."""
    if q_start is None:
        q_start = n_keys * ratio - n_queries
    pos = torch.arange(n_queries, dtype=torch.int64) + q_start
    return int(torch.div(pos + 1, ratio, rounding_mode="floor").clamp(0, n_keys).sum())


# ------------------------------------------------------------------------------------------------------
# cuDNN frontend (optional baseline)
# ------------------------------------------------------------------------------------------------------
CUDNN_FRONTEND_VERSION = "1.32.0"  # the nvidia-cudnn-frontend whose DSA API benchmarks/run.py's adapters call


def load_cudnn_dsa() -> tuple[Optional[object], str]:
    """cuDNN frontend's DSA namespace (`from cudnn import DSA`) and a version note, or (None, reason).

    `import cudnn` does not need the cuDNN library itself (it loads libcudnn if it finds one and goes on
    without it; the DSA kernels are CuTe-DSL ones), and `DSA` resolves lazily, so one wrapper is looked up
    here: that imports the CuTe-DSL stack (nvidia-cutlass-dsl, apache-tvm-ffi, cuda-bindings) the kernels
    need, and a missing piece shows here rather than as a failure of every cuDNN cell."""
    try:
        import cudnn
        from cudnn import DSA
        DSA.indexer_top_k_wrapper  # noqa: B018 - the import is the check
    except Exception as exc:  # not installed, a version without the DSA kernels, or no CuTe-DSL stack
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
    version = getattr(cudnn, "__version__", "?")
    note = "" if version == CUDNN_FRONTEND_VERSION else f" (adapters written for {CUDNN_FRONTEND_VERSION})"
    return DSA, f"cuDNN frontend {version}{note}"


def short(text: str, width: int = 70) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."
