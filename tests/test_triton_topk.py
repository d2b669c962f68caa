"""Triton top-k (csrc_dsl/triton/topk.py) against an exact stable-sort oracle (SPEC section 2).

On a machine without CUDA the kernel runs in Triton's interpreter on tiny shapes, with a small BLOCK so that
buffer compactions, row splitting and the task hand-out are all exercised. The GPU tests run realistic shapes.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

from csrc_dsl.triton import topk as tk  # noqa: E402
from tests.sm90_compile import run_compiled  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------------------------------
# Oracle
# ------------------------------------------------------------------------------------------------------------
def oracle_topk(scores, k, lengths=None):
    """Exact SPEC rule, written independently of the kernel: per row, stable descending sort of the candidate
    columns (value desc, then column asc; NaN and -inf are not candidates), take the first k, pad (-1, -inf).
    Returns sorted (indices int64, values fp32)."""
    lead, n_cols = scores.shape[:-1], scores.shape[-1]
    x = scores.reshape(-1, n_cols).double().cpu()  # fp64 holds every fp32 exactly; -0.0 == 0.0 as in IEEE
    rows = x.shape[0]
    lens = None if lengths is None else lengths.reshape(-1).cpu()
    idx = torch.full((rows, k), -1, dtype=torch.int64)
    val = torch.full((rows, k), float("-inf"), dtype=torch.float32)
    for r in range(rows):
        n = n_cols if lens is None else max(0, min(int(lens[r]), n_cols))
        v = x[r, :n].clone()
        v[torch.isnan(v)] = float("-inf")
        order = torch.sort(v, descending=True, stable=True).indices
        order = order[v[order] != float("-inf")][:k]
        idx[r, : len(order)] = order
        val[r, : len(order)] = v[order].float()
    return idx.reshape(*lead, k), val.reshape(*lead, k)


def check(scores, k, lengths=None, sorted_out=False, **knobs):
    idx, val = tk._topk(scores, k, lengths, sorted_out, **knobs)
    assert idx.dtype == torch.int32 and val.dtype == torch.float32
    assert idx.shape == (*scores.shape[:-1], k) and val.shape == idx.shape
    ref_idx, ref_val = oracle_topk(scores, k, lengths)
    idx, val = idx.cpu().long(), val.cpu()
    n_cols = scores.shape[-1]
    flat = scores.reshape(-1, n_cols).cpu()
    # Every reported value is the score at its reported index (as a float: -0.0 == 0.0), pads are (-1, -inf).
    i2, v2 = idx.reshape(-1, k), val.reshape(-1, k)
    real = i2 >= 0
    assert torch.all(i2 < n_cols)
    gathered = torch.gather(flat, 1, i2.clamp(min=0))
    assert torch.equal(torch.where(real, gathered, v2), v2)
    assert torch.all(torch.isneginf(v2[~real]))
    if sorted_out:
        assert torch.equal(idx, ref_idx)
        assert torch.equal(val, ref_val)
    else:
        # Same set per row (the order is free but the set is exact, tie rule included).
        assert torch.equal(torch.sort(idx, dim=-1).values, torch.sort(ref_idx, dim=-1).values)
        assert torch.equal(torch.sort(val, dim=-1).values, torch.sort(ref_val, dim=-1).values)
    return idx, val


def gen(seed):
    return torch.Generator().manual_seed(seed)


DEV = "cuda" if HAS_CUDA else "cpu"


# Small steps and samples on the interpreter, so rows of a few thousand columns guess a first threshold and
# compact their buffer several times.
TINY = dict(block=64, programs=3, sample=64, kernel="stream")


# ------------------------------------------------------------------------------------------------------------
# Small shapes (interpreter on CPU, also run on GPU)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols,k", [(1, 1, 1), (3, 100, 7), (5, 777, 64), (2, 3000, 300), (3, 513, 513)])
@pytest.mark.parametrize("sorted_out", [False, True])
def test_random(rows, cols, k, sorted_out):
    x = torch.randn(rows, cols, generator=gen(rows * 1000 + cols + k)).to(DEV)
    check(x, k, sorted_out=sorted_out, **TINY)


def test_ascending_rows_compact_every_step():
    # Worst case for a rising threshold: every block beats the buffer, so every step compacts.
    g = gen(1)
    x = torch.sort(torch.randn(3, 2500, generator=g), dim=-1).values.to(DEV)
    check(x, 100, sorted_out=True, **TINY)
    check(x.flip(-1).contiguous(), 100, **TINY)


@pytest.mark.parametrize("sorted_out", [False, True])
def test_planted_ties(sorted_out):
    g = gen(2)
    # Few distinct values -> large tie groups straddling the k-th position; includes the ReLU plateau of
    # exact zeros and -0.0, which is equal to +0.0.
    levels = torch.tensor([-1.5, -0.0, 0.0, 0.0, 0.25, 1.0, 3.0])
    x = levels[torch.randint(0, len(levels), (6, 1500), generator=g)]
    x[0] = 0.0  # whole row one value: the first k columns win
    x[1, ::2] = -0.0
    x = x.to(DEV)
    for k in (1, 37, 200) if sorted_out else (1, 37, 200, 1499):  # the interpreter's sort of 2048 is slow
        idx, _ = check(x, k, sorted_out=sorted_out, **TINY)
        assert torch.equal(idx[0].sort().values, torch.arange(k))


def test_neg_inf_nan_and_short_rows():
    g = gen(3)
    x = torch.randn(6, 900, generator=g)
    x[0] = float("-inf")                        # no candidate at all: all padding
    x[1, 10:] = float("-inf")                   # 10 candidates < k
    x[2, ::3] = float("nan")                    # NaN is never selected
    x[3, :] = float("nan")
    x[4, 5] = float("inf")                      # +inf is an ordinary (largest) value
    x[5, 100:200] = torch.finfo(torch.float32).max
    x = x.to(DEV)
    for sorted_out in (False, True):
        idx, val = check(x, 50, sorted_out=sorted_out, **TINY)
        assert torch.all(idx[0] == -1) and torch.all(torch.isneginf(val[0]))
        assert int((idx[1] >= 0).sum()) == 10
        assert not torch.isnan(val).any()
        assert torch.all(idx[3] == -1)


def _resident_cases():
    """(scores, k, lengths) for the register-resident kernel: random rows, tie groups at the k-th position, a
    constant row, the ReLU plateau with -0.0, NaN / +-inf / +-FLT_MAX, short rows and k above the row."""
    g = gen(21)
    big = torch.finfo(torch.float32).max
    levels = torch.tensor([-1.5, -0.0, 0.0, 0.0, 0.25, 1.0, 3.0])
    ties = levels[torch.randint(0, len(levels), (6, 1500), generator=g)]
    ties[0] = 0.0
    ties[1, ::2] = -0.0
    odd = torch.randn(7, 900, generator=g)
    odd[0] = float("-inf")
    odd[1, 10:] = float("-inf")
    odd[2, ::3] = float("nan")
    odd[3] = float("nan")
    odd[4, 5] = float("inf")
    odd[5, 100:200] = big
    odd[6, :450] = -big
    lengths = torch.tensor([0, 1, 900, 450, 899, 5000, 33], dtype=torch.int32)
    return [
        (torch.randn(1, 1, generator=g), 1, None),
        (torch.randn(3, 100, generator=g), 7, None),
        (torch.randn(5, 777, generator=g), 64, None),
        (torch.randn(2, 3000, generator=g), 300, None),
        (torch.randn(3, 513, generator=g), 513, None),
        (torch.randn(2, 40, generator=g), 64, None),
        (ties, 1, None), (ties, 37, None), (ties, 200, None), (ties, 1499, None),
        (odd, 50, None), (odd, 50, lengths), (odd, 2, lengths),
        (torch.sort(torch.randn(3, 2500, generator=g), dim=-1).values, 100, None),
    ]


@pytest.mark.parametrize("case", range(14))
def test_resident_kernel(case):
    x, k, lengths = _resident_cases()[case]
    x = x.to(DEV)
    lengths = None if lengths is None else lengths.to(DEV)
    idx, _ = check(x, k, lengths, kernel="resident")
    if x.shape[-1] == 1500 and k < 1500:  # the constant row: the first k columns win
        assert torch.equal(idx[0].sort().values, torch.arange(k))


@pytest.mark.parametrize("case", [1, 7, 11, 13])
def test_resident_kernel_bisection_only(case, monkeypatch):
    monkeypatch.setattr(tk, "RESIDENT_INTERPOLATE", False)
    test_resident_kernel(case)


def test_resident_kernel_is_the_default_for_short_unsorted_rows(monkeypatch):
    calls = []
    real = tk._resident_topk_kernel
    monkeypatch.setattr(tk, "_resident_topk_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: (calls.append(grid), real[grid])[1]})())
    x = torch.randn(3, 700, generator=gen(22)).to(DEV)
    check(x, 50)
    assert len(calls) == 1
    check(x, 50, sorted_out=True)  # sorted output streams
    check(torch.randn(2, tk.RESIDENT_MAX_COLS + 1, generator=gen(23)).to(DEV), 4, block=64, sample=64)
    assert len(calls) == 1


def test_lengths_and_k_above_cols():
    g = gen(4)
    x = torch.randn(2, 3, 700, generator=g).to(DEV)
    lengths = torch.tensor([[0, 1, 700], [350, 699, 2000]], dtype=torch.int32).to(DEV)  # > C clamps to C
    check(x, 100, lengths, **TINY)
    check(x, 100, lengths, sorted_out=True, **TINY)
    check(x[0, :2, :40].contiguous(), 64, sorted_out=True, **TINY)  # k > C: pads after the C real entries


def test_split_rows_match_unsplit():
    # Few long rows -> split into segments (stage 1) and merged (stage 2); ties across segment borders.
    g = gen(5)
    x = torch.randint(-20, 20, (2, 2900), generator=g).float()
    x[1, 1000:2000] = 7.0
    x = x.to(DEV)
    lengths = torch.tensor([2900, 1700], dtype=torch.int32).to(DEV)
    knobs = dict(block=64, programs=16, min_segment=256, sample=32, kernel="stream")
    assert tk._plan(2, 2900, 40, 16, 64, 256)[0] > 1  # really split
    for sorted_out in (False, True):
        check(x, 40, sorted_out=sorted_out, **knobs)
        check(x, 40, lengths, sorted_out=sorted_out, **knobs)


def test_bad_guess_falls_back():
    # The sampled positions hold the largest values, so the guessed first threshold lets fewer than k through
    # and the row must be streamed again from -inf.
    g = gen(8)
    x = torch.rand(3, 1000, generator=g)
    n, sample = x.shape[-1], TINY["sample"]
    runs = min(tk.SAMPLE_RUNS, sample)
    for run in range(runs):  # the sample: `runs` evenly spaced runs of sample // runs columns
        x[:2, run * (n // runs): run * (n // runs) + sample // runs] += 10.0
    x[2] = torch.sort(torch.rand(n, generator=g), descending=True).values  # sorted rows: fine either way
    x = x.to(DEV)
    for sorted_out in (False, True):
        check(x, 100, sorted_out=sorted_out, **TINY)
        check(x, 300, sorted_out=sorted_out, **TINY)


def test_float_admission_edges():
    # The kernel admits with a float compare against the threshold's floor value: -0.0 == +0.0, denormals, values one
    # ulp either side of the threshold, and thresholds next to 0 must all behave as the integer keys do.
    g = gen(9)
    tiny = torch.finfo(torch.float32).smallest_normal
    den = 1.401298464324817e-45  # the smallest denormal
    levels = torch.tensor([-den, -0.0, 0.0, den, 2 * den, tiny, -tiny, 1.0, torch.nextafter(torch.tensor(1.0),
                                                                                          torch.tensor(2.0)).item()])
    x = levels[torch.randint(0, len(levels), (5, 2600), generator=g)]
    x[1] = torch.where(torch.rand(2600, generator=g) < 0.5, -0.0, 0.0)
    x[2, ::5] = den
    x = x.to(DEV)
    for k in (1, 100, 700, 1500):
        check(x, k, **TINY)
    check(x, 100, sorted_out=True, **TINY)


def test_full_key_range():
    # Keys spanning the whole uint32 range (-max .. +inf), so the select's relative digits need all 32 bits;
    # also huge rows of one value next to a few distinct extremes.
    g = gen(10)
    fmax = torch.finfo(torch.float32).max
    x = torch.randn(4, 3000, generator=g) * torch.exp(torch.randn(4, 3000, generator=g) * 30).clamp(max=1e30)
    x[0, ::7] = -fmax
    x[0, 3::11] = float("inf")
    x[1, :] = -fmax
    x[1, 2000:2010] = fmax
    x[2, ::3] = float("nan")
    x[3] = -torch.rand(3000, generator=g) * 1e-38  # negative denormals / tiny normals
    x = x.to(DEV)
    for k in (5, 64, 500):
        check(x, k, **TINY)
        check(x, k, sorted_out=True, **TINY)


@pytest.mark.parametrize("sorted_out", [False, True])
def test_k_at_tie_group_boundary(sorted_out):
    # k equal to the number of entries >= some value: the k-th entry closes its tie group, so the select can
    # stop with "keep every key >= the k-th" (the select's early exit) and nothing equal to the k-th may be dropped.
    g = gen(11)
    base = torch.randint(-8, 9, (2500,), generator=g).float() * 0.5
    base[:100] = 0.0
    base[100:150] = -0.0
    x = torch.stack([base[torch.randperm(2500, generator=g)] for _ in range(4)]).to(DEV)  # same multiset
    for level in (3.5, 1.0) if sorted_out else (3.5, 1.0, 0.0, -2.0):  # the interpreter's big sorts are slow
        k = int((base >= level).sum())
        check(x, k, sorted_out=sorted_out, **TINY)


def test_leading_dims_and_empty():
    g = gen(6)
    x = torch.randn(2, 2, 3, 130, generator=g).to(DEV)
    check(x, 9, sorted_out=True, **TINY)
    idx, val = tk.topk(torch.empty(0, 5, device=DEV), 3, None, False)
    assert idx.shape == (0, 3) and val.shape == (0, 3)
    idx, val = tk.topk(torch.randn(2, 5, device=DEV), 0, None, True)
    assert idx.shape == (2, 0)


def test_deterministic():
    g = gen(7)
    x = torch.randint(0, 5, (4, 1000), generator=g).float().to(DEV)
    first = tk._topk(x, 123, None, False, **TINY)
    again = tk._topk(x, 123, None, False, block=64, programs=1, sample=64,
                     kernel="stream")  # other program count, same bits
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def compile_for_sm90():
    """Compiles the kernel for sm_90 on any machine (Triton's compiler needs no GPU), sorted or not,
    with every integer argument a runtime value and then the compile-time constant 1, as a launch with k == 1
    (or one column, one row) makes it: the interpreter never specializes, so only a compile finds code that
    breaks on such constants."""
    from tools.topk_compile_check import compile_for_sm90 as compile_kernel

    bufs = [("buf_val_ptr", "*fp32"), ("buf_col_ptr", "*i32")]
    for sorted_out in (False, True):
        for unit_ints in (True, False):
            const = dict(HAS_LENGTHS=True, COLS_FROM_SRC=False, SORTED=sorted_out, BLOCK=64, CAP=128,
                         K_POW2=1 if unit_ints else 64, SAMPLE=64, SAMPLE_RUNS=16, SAMPLE_ROUNDS=2,
                         SELECT_BLOCK=64, RADIX_BITS=tk.RADIX_BITS, GUESS_SIGMAS=float(tk.GUESS_SIGMAS),
                         ASM_STORE=True,  # the inline-PTX stores a GPU launch uses (the interpreter has none)
                         SELECT_PREFETCH=tk.SELECT_PREFETCH)
            if unit_ints:
                const.update(n_cols=1, row_stride=1, seg_len=1, n_segs=1, n_tasks=1, k=1)
            compile_kernel(tk._stream_topk_kernel, bufs, const, num_warps=1)
    # The resident kernel with the inline-PTX stores and count a GPU launch uses: one warp of 128 values and
    # eight warps of 8192 (4 and 32 a thread), with and without lengths.
    import triton
    from triton.backends.compiler import GPUTarget

    sig = {"src_ptr": "*fp32", "lengths_ptr": "*i32", "out_val_ptr": "*fp32", "out_col_ptr": "*i32",
           "n_cols": "i32", "row_stride": "i32", "k": "i32"}
    for row, warps in ((128, 1), (8192, 8)):
        for lengths in (False, True):
            const = dict(HAS_LENGTHS=lengths, ROW=row, K_POW2=64, ASM_STORE=True, INTERPOLATE=True, ASM_COUNT=True)
            src = triton.compiler.ASTSource(fn=tk._resident_topk_kernel,
                                            signature={**sig, **{n: "constexpr" for n in const}}, constexprs=const)
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
            assert "@p3 add.u32" in kernel.asm["ptx"]  # the inline count is in (not compiled away)


def test_kernels_compile_for_sm90_with_unit_arguments():
    run_compiled("from tests.test_triton_topk import compile_for_sm90 as c; c()")


# ------------------------------------------------------------------------------------------------------------
# Realistic shapes (GPU only)
# ------------------------------------------------------------------------------------------------------------
def _check_gpu(x, k, lengths=None, sorted_out=False, exact_oracle=True):
    idx, val = tk.topk(x, k, lengths, sorted_out)
    torch.cuda.synchronize()
    n = x.shape[-1] if lengths is None else None
    if n is not None and n >= k:
        assert not torch.any(idx == -1), "enough candidates, yet padding appeared"
    if exact_oracle:
        # GPU oracle: stable sort on the GPU (torch.sort stable is exact and ties go to the smaller index).
        v = torch.nan_to_num(x, nan=float("-inf"))
        order = torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :k]
        ref_val = torch.gather(v, -1, order)
        ref_idx = torch.where(torch.isneginf(ref_val), -1, order)
        pad = k - ref_idx.shape[-1]  # k > C: the oracle pads too
        ref_idx = torch.nn.functional.pad(ref_idx, (0, pad), value=-1)
        ref_val = torch.nn.functional.pad(ref_val, (0, pad), value=float("-inf"))
        if sorted_out:
            assert torch.equal(idx.long(), ref_idx) and torch.equal(val, ref_val)
        else:
            assert torch.equal(idx.long().sort(-1).values, ref_idx.sort(-1).values)
            assert torch.equal(val.sort(-1).values, ref_val.sort(-1).values)
    return idx, val


@needs_cuda
@pytest.mark.parametrize("rows,cols,k", [(4096, 65536, 2048), (4096, 8192, 2048), (333, 70001, 2000),
                                         (128, 1 << 20, 4096), (8, 1 << 20, 2048), (64, 3000, 4096)])
def test_gpu_random(rows, cols, k):
    g = torch.Generator(device="cuda").manual_seed(rows + cols + k)
    x = torch.randn(rows, cols, device="cuda", generator=g)
    _check_gpu(x, k, sorted_out=False)
    _check_gpu(x[: min(rows, 256)].contiguous(), k, sorted_out=True)


@needs_cuda
def test_gpu_planted_ties_and_plateau():
    g = torch.Generator(device="cuda").manual_seed(11)
    x = torch.relu(torch.randn(512, 65536, device="cuda", generator=g) - 1.0)  # ~84% exact zeros
    x[:, 1::7] = -0.0
    x[0] = 0.0
    x[1, :] = 2.0
    x[2, 40000:] = float("-inf")
    x[3] = torch.randint(0, 3, (65536,), device="cuda", generator=g).float()
    for k in (2048, 4096, 13000):
        _check_gpu(x, k)
        _check_gpu(x[:64].contiguous(), k, sorted_out=True)
    # Sorted input: the buffer compacts on every step.
    _check_gpu(torch.sort(x[:64], dim=-1).values, 2048)


@needs_cuda
def test_gpu_lengths():
    g = torch.Generator(device="cuda").manual_seed(12)
    x = torch.randn(300, 70001, device="cuda", generator=g)
    lengths = torch.randint(0, 80000, (300,), device="cuda", generator=g, dtype=torch.int32)
    lengths[:3] = torch.tensor([0, 5, 2000], device="cuda", dtype=torch.int32)
    idx, val = tk.topk(x, 2000, lengths, True)
    ref_idx, ref_val = oracle_topk(x[:40].cpu(), 2000, lengths[:40].cpu())
    assert torch.equal(idx[:40].cpu().long(), ref_idx) and torch.equal(val[:40].cpu(), ref_val)
    # Few rows, long: the split path with lengths.
    x2 = torch.randn(4, 1 << 20, device="cuda", generator=g)
    l2 = torch.tensor([1 << 20, 1000, 500000, 0], device="cuda", dtype=torch.int32)
    idx, val = tk.topk(x2, 4096, l2, False)
    ref_idx, ref_val = oracle_topk(x2.cpu(), 4096, l2.cpu())
    assert torch.equal(idx.cpu().long().sort(-1).values, ref_idx.sort(-1).values)


@needs_cuda
def test_gpu_deterministic_and_graph_capture():
    g = torch.Generator(device="cuda").manual_seed(13)
    x = torch.randint(0, 50, (1024, 65536), device="cuda", generator=g).float()  # heavy ties
    first = tk.topk(x, 2048, None, False)
    for _ in range(10):
        again = tk.topk(x, 2048, None, False)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    static = x[:16].clone()
    tk.topk(static, 2048, None, True)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tk.topk(static, 2048, None, True)
    static.copy_(torch.randn(16, 65536, device="cuda", generator=g))
    graph.replay()
    ref = tk.topk(static, 2048, None, True)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_launch_settings_follow_the_gpu(monkeypatch):
    """GPU launches take DEVICE_SETTINGS' values on a GPU they name (the H200), the module's elsewhere and on CPU."""
    monkeypatch.setattr(tk, "_device_name", lambda index: "NVIDIA H200")
    tuned = tk._launch_settings(torch.device("cuda", 0))
    assert tuned == {"BLOCK": 512, "PROGRAMS_PER_SM": 16, "MAX_REGISTERS": None}
    module = {"BLOCK": tk.BLOCK, "PROGRAMS_PER_SM": tk.PROGRAMS_PER_SM, "MAX_REGISTERS": tk.MAX_REGISTERS}
    assert tk._launch_settings(torch.device("cpu")) == module
    monkeypatch.setattr(tk, "_device_name", lambda index: "NVIDIA H100 80GB HBM3")
    assert tk._launch_settings(torch.device("cuda", 0)) == module
