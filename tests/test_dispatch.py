"""The dispatch table: every op has a row per arch ending in the reference, forcing works and fails loudly,
the CPU falls back to the reference, and the report prints one line per op."""
import subprocess
import sys

import pytest
import torch

import dsa_ops
from dsa_ops import dispatch
from dsa_ops.testing import ALL_OPS, sample_args


def test_every_op_has_every_arch_ending_in_reference():
    assert set(dispatch.TABLE) == set(ALL_OPS)
    for op, rows in dispatch.TABLE.items():
        assert set(rows) == set(dispatch.ARCHES), op
        for arch, impls in rows.items():
            assert impls[-1].backend == "reference", (op, arch)
            assert dispatch._load(impls[-1].target)[0] is not None, (op, arch)
        assert [i.backend for i in rows["cpu"]] == ["reference"]
        # SM100 has no kernels of its own until one can be tested on Blackwell
        assert all(not i.backend.startswith("cute") for i in rows["sm100"])


@pytest.mark.parametrize("op", ALL_OPS)
def test_cpu_uses_reference(op):
    impl, _ = dispatch.choose(op, sample_args(op))
    assert impl.backend == "reference"


def test_forcing(monkeypatch):
    args = sample_args("topk")
    monkeypatch.setenv(dispatch.ENV_FORCE, "reference")
    assert dispatch.choose("topk", args)[0].backend == "reference"
    monkeypatch.setenv(dispatch.ENV_FORCE, "sparse_attention=triton,topk=reference")
    assert dispatch.forced_backend("topk") == "reference"
    assert dispatch.forced_backend("sparse_attention") == "triton"
    assert dispatch.forced_backend("indexer_logits") is None
    monkeypatch.setenv(dispatch.ENV_FORCE, "triton")  # no triton row on the CPU: a clear error, no fallback
    with pytest.raises(dispatch.NoImplementation, match="dsa.topk: no implementation for this call on cpu"):
        torch.ops.dsa.topk(*args)


def test_unavailable_candidate_is_skipped_with_reason(monkeypatch):
    broken = dispatch.Impl("triton", "csrc_dsl.triton.does_not_exist:kernel")
    rows = dict(dispatch.TABLE["topk"])
    rows["cpu"] = [broken, *rows["cpu"]]
    monkeypatch.setitem(dispatch.TABLE, "topk", rows)
    assert dispatch.choose("topk", sample_args("topk"))[0].backend == "reference"
    monkeypatch.setenv(dispatch.ENV_FORCE, "triton")
    with pytest.raises(dispatch.NoImplementation, match="unavailable.*does_not_exist"):
        dispatch.choose("topk", sample_args("topk"))


def test_report_cli():
    out = subprocess.run([sys.executable, "-m", "dsa_ops.backends"], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("device:")
    for op in ALL_OPS:
        assert any(line.startswith(op + " ") for line in lines), op


def test_triton_candidates_import():
    """Every Triton implementation named in the table imports (under the interpreter on CPU)."""
    pytest.importorskip("triton")
    targets = {i.target for rows in dispatch.TABLE.values() for impls in rows.values() for i in impls
               if i.backend == "triton"}
    assert targets, "the table names no Triton kernel"
    for target in targets:
        fn, why = dispatch._load(target)
        assert fn is not None, (target, why)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(bool(dispatch.os.environ.get(dispatch.ENV_FORCE)), reason="a backend is forced")
@pytest.mark.parametrize("op", ALL_OPS)
def test_cuda_half_inputs_use_a_kernel(op):
    if all(i.backend == "reference" for i in dispatch.TABLE[op]["sm90"]):
        pytest.skip(f"{op} has no GPU kernel yet (reference on every arch)")
    impl, _ = dispatch.choose(op, sample_args(op, device="cuda", dtype=torch.bfloat16))
    assert impl.backend != "reference", op


def test_sm90_row_falls_back_cleanly_without_a_gpu(monkeypatch):
    """The SM90 row lists CuTe-DSL first; with no GPU (or no DSL) it is skipped with a reason, never an error."""
    assert [i.backend for i in dispatch.TABLE["sparse_attention"]["sm90"]] == ["cute-sm90", "triton", "reference"]
    monkeypatch.setattr(dispatch, "arch_of", lambda device: "sm90")
    impl, fn = dispatch.choose("sparse_attention", sample_args("sparse_attention"))  # fp32 on the CPU
    assert impl.backend == "reference"
    out, lse = fn(*sample_args("sparse_attention"))
    assert torch.isfinite(out).all()
    monkeypatch.setenv(dispatch.ENV_FORCE, "cute")
    with pytest.raises(dispatch.NoImplementation, match="cute-sm90"):
        dispatch.choose("sparse_attention", sample_args("sparse_attention"))


def test_score_ops_try_the_cute_kernel_first_on_sm90():
    """Both score ops run the CuTe-DSL kernel on SM90 (faster than cuDNN and Triton at every measured H,
    BENCHMARKS.md), Triton elsewhere on CUDA."""
    for op, predicate in [("sparse_attn_score", "supports"), ("dense_attn_score", "supports_dense")]:
        rows = dispatch.TABLE[op]
        assert [i.backend for i in rows["sm90"]] == ["cute-sm90", "triton", "reference"], op
        assert rows["sm90"][0].supports == f"csrc_dsl.cute.sm90.sparse_attn_score:{predicate}"
        assert [i.backend for i in rows["sm100"]] == ["triton", "reference"], op


def test_cute_rows_defer_to_triton_where_it_measured_faster(monkeypatch):
    """The CuTe-DSL attention rows apply both the kernel's `supports` and the measured preference: the backward
    at H <= 16 and the deterministic backward at H > 64 go to Triton, which was faster there; the forward stays
    on CuTe at every H since its seesaw schedule (BENCHMARKS.md)."""
    def attn_args(H, deterministic=False):
        q = torch.empty(4, H, 576, device="meta")
        kv, out = torch.empty(9, 576, device="meta"), torch.empty(4, H, 512, device="meta")
        lse, ids = torch.empty(4, H, device="meta"), torch.empty(4, 8, dtype=torch.int32, device="meta")
        return q, kv, out, lse, ids, deterministic

    for H, fast, det in [(1, False, False), (16, False, False), (17, True, True), (64, True, True),
                         (65, True, False), (128, True, False)]:
        q, kv, out, lse, ids, _ = attn_args(H)
        assert dispatch.cute_backward_faster(out, q, kv, out, lse, ids, 0.1, 512, None, None, False, None) is fast, H
        assert dispatch.cute_backward_faster(out, q, kv, out, lse, ids, 0.1, 512, None, None, True, None) is det, H
    # the preference gates the kernel's own predicate: never supported without it, and it is consulted second
    calls = []
    monkeypatch.setattr(dispatch, "_load", lambda target: (lambda *a: calls.append(target) or True, ""))
    impl = dispatch.TABLE["sparse_attention_backward"]["sm90"][0]
    assert impl.backend == "cute-sm90"
    q, kv, out, lse, ids, _ = attn_args(16)
    assert not impl.supports(out, q, kv, out, lse, ids, 0.1, 512, None, None, False, None) and not calls
    q, kv, out, lse, ids, _ = attn_args(64)
    assert impl.supports(out, q, kv, out, lse, ids, 0.1, 512, None, None, False, None) and len(calls) == 1
    # the forward row has no preference: its predicate is the kernel's own `supports`, for every H
    assert dispatch.TABLE["sparse_attention"]["sm90"][0].supports == \
        "csrc_dsl.cute.sm90.sparse_attention_fwd:supports"


def test_cuda_calls_run_on_their_tensors_device(monkeypatch):
    """`run_on`, through which every op's kernel calls its implementation, makes the tensors' device
    current for the call (Triton and CuTe-DSL launch on the current device) and leaves it alone when it
    already is (on the CPU machine: torch.cuda mocked; the two-GPU test below runs the ops themselves)."""
    from dsa_ops.ops import _library

    current, entered = [0], []

    class DeviceContext:
        def __init__(self, device):
            self.index, self.saved = torch.device(device).index, None

        def __enter__(self):
            entered.append(self.index)
            self.saved, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.saved

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", DeviceContext)
    seen = []
    run = _library.run_on(torch.device("cuda", 1), lambda x: seen.append(current[0]) or x, (5,))
    assert (run, seen, entered, current[0]) == (5, [1], [1], 0)        # switched for the call, then back
    _library.run_on(torch.device("cuda", 0), lambda: seen.append(current[0]), ())
    assert (seen[-1], entered) == (0, [1])                               # already current: no switch


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_a_device_that_is_not_current():
    """Inputs on cuda:1 while cuda:0 is current: the same results as with cuda:1 current."""
    results = []
    for current in (1, 0):
        with torch.cuda.device(current):
            args = sample_args("sparse_attention", device="cuda:1", dtype=torch.bfloat16, seed=4)
            out, lse = torch.ops.dsa.sparse_attention(*args)
            ids, _ = torch.ops.dsa.indexer_topk(*sample_args("indexer_topk", device="cuda:1",
                                                             dtype=torch.bfloat16, seed=4))
            torch.cuda.synchronize(1)
            results.append((out, lse, ids))
    for a, b in zip(*results):
        assert a.device == torch.device("cuda", 1) and torch.equal(a, b)
