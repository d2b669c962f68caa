"""The benchmark runner (benchmarks/run.py) and plotter (benchmarks/plot.py), on tiny CPU shapes.

The suite itself runs on the GPU machine; here we check that its machinery works end to end (a subprocess run
of `python -m benchmarks.run --quick --device cpu`), that its correctness check rejects a wrong kernel (which is
then not timed), that the checkers accept rounding and reject real errors, and that the plot script turns a
results JSON into a PNG without a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsa_ops  # noqa: F401
from benchmarks import common, run
from csrc_dsl.cute import common as cute_common
from dsa_ops import dispatch
from dsa_ops.reference import attention as ref_attention

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    """These tests choose implementations through the dispatch table, so no backend may be forced."""
    monkeypatch.delenv("DSA_OPS_BACKEND", raising=False)


# ------------------------------------------------------------------------------------------------------
# The whole command, in a subprocess
# ------------------------------------------------------------------------------------------------------
def test_quick_cpu_run_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DSA_OPS_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--out", str(tmp_path),
         "--check-rows", "16", "--rep-ms", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[  1/" in proc.stdout  # per-case progress lines

    result = json.loads((tmp_path / "latest.json").read_text())
    stamped = list(tmp_path.glob("bench-*.json"))
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == result
    rows = result["rows"]
    assert {r["op"] for r in rows} == set(run.OPS)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["backend"] == "reference"
        assert r["ms"] > 0 and r["flops"] >= 0 and r["bytes"] > 0
        assert r["baselines"]["reference"]["status"] == "same"
        n, total = r["checked_rows"]
        assert n == min(16, total)
    # the torch baselines ran and passed their check; cuDNN is reported, not fatal
    torch_rows = [r["baselines"]["torch"] for r in rows if "torch" in r["baselines"]]
    assert torch_rows and all(b["status"] == "ok" and b["ms"] > 0 and b["speedup"] > 0 for b in torch_rows)
    assert all(r["baselines"]["cudnn"]["status"] == "unavailable" for r in rows if "cudnn" in r["baselines"])
    overhead = result["overhead"]["rows"]
    assert {o["op"] for o in overhead} == {"topk", "indexer_topk", "sparse_attention", "sparse_attention_decode",
                                           "indexer_loss"}

    text = (tmp_path / "latest.md").read_text()
    for op in run.OPS:
        assert f"## {op}\n" in text
    assert text.count("| shape | backend | ms |") == len(run.OPS)
    assert "op-boundary overhead" in text


def test_ops_filter_and_time_budget(tmp_path, capsys):
    assert run.main(["--ops", "topk", "--device", "cpu", "--quick", "--max-seconds", "0", "--no-overhead",
                     "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "latest.json").read_text())["rows"]
    assert rows and all(r["op"] == "topk" and r["status"] == "skipped" and "ms" not in r for r in rows)
    with pytest.raises(SystemExit):
        run.main(["--ops", "no_such_op", "--device", "cpu", "--out", str(tmp_path)])


# ------------------------------------------------------------------------------------------------------
# The correctness check stops a wrong kernel before it is timed
# ------------------------------------------------------------------------------------------------------
def wrong_sparse_attention(q, kv, indices, scale, d_v, attn_sink, topk_length):
    out, lse = ref_attention.sparse_attention(q, kv, indices, scale, d_v, attn_sink, topk_length)
    return out * 1.05, lse


def wrong_dkv_backward(*args):
    """dq right, dkv 10% off: dkv mixes rows, so the check must catch it from the call on the checked rows."""
    dq, dkv, d_sink = ref_attention.sparse_attention_backward(*args)
    return dq, dkv * 1.1, d_sink


def wrong_topk(scores, k, lengths, sorted):
    """One id of the last row replaced by a column outside its top-k."""
    ids, values = dsa_ops.reference.indexer.topk(scores, k, lengths, sorted)
    chosen = set(ids[-1].tolist())
    ids = ids.clone()
    ids[-1, 0] = next(c for c in range(scores.shape[-1]) if c not in chosen)
    return ids, values


@pytest.mark.parametrize("op, impl", [("sparse_attention", "wrong_sparse_attention"),
                                      ("sparse_attention_backward", "wrong_dkv_backward"),
                                      ("topk", "wrong_topk")])
def test_check_reports_wrong_kernel_untimed(monkeypatch, op, impl):
    broken = dispatch.Impl("broken", f"{__name__}:{impl}")
    monkeypatch.setitem(dispatch.TABLE, op, {**dispatch.TABLE[op], "cpu": [broken]})
    case = next(c for c in run.make_cases(CPU, quick=True) if c.op == op)
    cfg = run.Settings(device=CPU, budget_s=0.001, check_rows=8, max_ref_s=10.0)
    row = run.run_case(case, cfg)
    assert row["backend"] == "broken"
    assert row["status"] == "WRONG", row
    assert "ms" not in row and "tflops" not in row
    assert row["baselines"]["reference"]["status"] == "ok"  # the baselines still run


def kernel_stand_in(*args):
    """A correct implementation that is not the reference (so the reference becomes a baseline)."""
    return ref_attention.sparse_attention(*args)


def test_slow_reference_is_extrapolated_not_run(monkeypatch):
    case = next(c for c in run.make_cases(CPU, quick=True) if c.op == "sparse_attention")
    cfg = run.Settings(device=CPU, budget_s=0.001, check_rows=4, max_ref_s=0.0)
    row = run.run_case(case, cfg)
    # ours is the reference here, so it is skipped too: only the torch baseline is timed
    assert row["status"] == "skipped" and "ms" not in row
    assert row["baselines"]["torch"]["status"] == "ok" and row["baselines"]["reference"]["status"] == "same"

    stand_in = dispatch.Impl("kernel", f"{__name__}:kernel_stand_in")
    monkeypatch.setitem(dispatch.TABLE, "sparse_attention", {**dispatch.TABLE["sparse_attention"], "cpu": [stand_in]})
    row = run.run_case(case, cfg)
    ref = row["baselines"]["reference"]
    assert row["status"] == "ok" and row["backend"] == "kernel" and row["ms"] > 0
    assert ref["status"] == "estimated" and "ms" not in ref and ref["est_ms"] > 0
    assert ref["speedup"] == pytest.approx(ref["est_ms"] / row["ms"])


def test_also_backends_times_a_forced_backend(monkeypatch):
    """--also-backends: another of our backends, forced through DSA_OPS_BACKEND, is checked and timed."""
    stand_in = dispatch.Impl("triton", f"{__name__}:kernel_stand_in")
    reference = dispatch.TABLE["sparse_attention"]["cpu"]
    monkeypatch.setitem(dispatch.TABLE, "sparse_attention",
                        {**dispatch.TABLE["sparse_attention"], "cpu": [*reference, stand_in]})
    case = next(c for c in run.make_cases(CPU, quick=True) if c.op == "sparse_attention")
    row = run.run_case(case, run.Settings(device=CPU, budget_s=0.001, check_rows=4, max_ref_s=10.0,
                                          also_backends=("triton", "cute")))
    assert row["backend"] == "reference"
    assert row["baselines"]["triton"]["status"] == "ok" and row["baselines"]["triton"]["ms"] > 0
    assert row["baselines"]["cute"]["status"] == "unavailable"  # no cute candidate on the CPU row
    assert os.environ.get("DSA_OPS_BACKEND") is None


def test_row_slicing_moves_q_start():
    """The checked rows of a causal op keep their positions: q_start shifts with the slice."""
    case = next(c for c in run.make_cases(CPU, quick=True) if c.op == "indexer_logits")
    args = case.build_inputs(CPU, 0)
    rows = slice(case.rows - 5, case.rows)
    sub = run.slice_args(run.OPS["indexer_logits"], args, rows)
    whole = run.OPS["indexer_logits"].reference(*args)
    part = run.OPS["indexer_logits"].reference(*sub)
    assert torch.equal(part, whole[:, rows])


# ------------------------------------------------------------------------------------------------------
# Checkers
# ------------------------------------------------------------------------------------------------------
def test_check_close_rejects_nan_and_moved_infinities():
    g = torch.Generator().manual_seed(0)
    want = torch.randn(64, 32, generator=g)
    want[0, :3] = float("-inf")
    assert common.check_close("x", want + 1e-4 * torch.randn(64, 32, generator=g), want, 2e-3)[0]
    nan = want.clone()
    nan[5, 5] = float("nan")
    assert not common.check_close("x", nan, want, 2e-3)[0]
    moved = want.clone()
    moved[0, 0], moved[1, 0] = 0.0, float("-inf")
    assert not common.check_close("x", moved, want, 2e-3)[0]
    assert not common.check_close("x", want * 1.01, want, 2e-3)[0]


def test_check_topk_near_allows_rounding_swaps_only():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 50, generator=g, dtype=torch.float64)
    scores[:, 40:] = float("-inf")           # hidden keys
    k = 8
    values, ids = scores.topk(k, dim=-1)
    # row 0: the k-th and (k+1)-th keys nearly tie; choosing the other one is a rounding-level swap
    kth, nxt = scores[0].topk(k + 1).indices[-2:]
    scores[0, nxt] = scores[0, kth] - 1e-7
    ok, note = common.check_topk_near(ids.int(), values, scores, k)
    assert ok, note
    swapped = ids.clone()
    swapped[0, -1] = nxt
    assert common.check_topk_near(swapped.int(), scores.gather(1, swapped), scores, k)[0]
    # a clearly worse key, a hidden key, a duplicate
    worse = ids.clone()
    worse[1, 0] = scores[1, :40].argmin()
    assert not common.check_topk_near(worse.int(), scores.gather(1, worse), scores, k)[0]
    hidden = ids.clone()
    hidden[2, 0] = 45
    assert not common.check_topk_near(hidden.int(), values, scores, k)[0]
    dup = ids.clone()
    dup[3, 1] = dup[3, 0]
    assert not common.check_topk_near(dup.int(), values, scores, k)[0]


def test_visible_pairs_counts_the_ratio_causal_mask():
    assert common.visible_pairs(4, 4, 1) == 1 + 2 + 3 + 4
    assert common.visible_pairs(8, 2, 4) == 0 * 3 + 1 * 4 + 2 * 1  # (q + 1) // 4 keys for q = 0..7
    assert common.visible_pairs(2, 6, 1) == 5 + 6                 # decode-like: the last two tokens


# ------------------------------------------------------------------------------------------------------
# The plot, from a small synthetic JSON
# ------------------------------------------------------------------------------------------------------
def synthetic_result() -> dict:
    def row(op, series, x, ms, ref_ms, metric="TFLOP/s", x_name="S"):
        return {"op": op, "label": f"{series} {x_name}={x}", "series": series, "x": x, "x_name": x_name,
                "flops": 2e12 * x / 4096, "bytes": 1e9 * x / 4096, "metric": metric, "backend": "triton",
                "status": "ok", "ms": ms,
                "baselines": {"reference": {"status": "ok", "ms": ref_ms},
                              "cudnn": {"status": "unavailable", "note": "no cudnn"}}}
    rows = [row("sparse_attention", "V3.2", 4096, 4.0, 400.0), row("sparse_attention", "V3.2", 8192, 7.5, 810.0),
            row("sparse_attention", "V4 k=512", 4096, 1.0, 90.0),
            row("topk", "V3.2", 4096, 0.2, 9.0, metric="GB/s"),
            row("sparse_attention_decode", "V3.2", 32, 0.05, 3.0, metric="GB/s", x_name="batch"),
            {"op": "topk", "label": "V3.2 S=65536", "series": "V3.2", "x": 65536, "x_name": "S",
             "status": "skipped", "baselines": {}}]
    rows[2]["baselines"]["reference"] = {"status": "estimated", "est_ms": 5000.0}
    return {"meta": {"device": "synthetic", "time": "now"}, "rows": rows}


def test_plot_panels_group_measured_rows():
    from benchmarks import plot

    groups = plot.panels(synthetic_result()["rows"])
    assert set(groups) == {("sparse_attention", "S", "TFLOP/s"), ("topk", "S", "GB/s"),
                           ("sparse_attention_decode", "batch", "GB/s")}
    attention = groups[("sparse_attention", "S", "TFLOP/s")]
    assert sorted(attention[("V3.2", "ours (triton)")]) == [(4096, 500.0), (8192, 4e12 / 7.5 / 1e9)]
    assert ("V4 k=512", "reference") not in attention  # extrapolated times are not plotted
    assert len(attention[("V3.2", "reference")]) == 2


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    src = tmp_path / "latest.json"
    src.write_text(json.dumps(synthetic_result()))
    plot.main([str(src)])
    png = tmp_path / "latest.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_ncu_samples_summarizes_an_export(capsys, tmp_path):
    """tools/ncu_samples.py on a tiny export in ncu's format: shares by opcode and the S2R .. REDG window."""
    import gzip

    from tools import ncu_samples

    header = ["Address", "Source", "# Samples", "stall_wait", "stall_short_sb", "stall_wait (Not Issued)"]
    body = [["0x0", "S2R R0, SR_TID.X ;", "10", "10", "0", "0"],
            ["0x10", "SHF.R.U32.HI R3, RZ, 0x2, R0 ;", "30", "0", "30", "0"],
            ["0x20", "REDG.E.ADD.F32 desc[UR4][R2.64], R5 ;", "20", "20", "0", "0"],
            ["0x30", "@!P1 BRA 0x0 ;", "40", "40", "0", "0"]]
    path = tmp_path / "sass.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write('"Kernel Name","k"\n' + "\n".join(",".join(f'"{c}"' for c in row) for row in [header, *body]))
    ncu_samples.main([str(path), "--window", "SR_TID", "REDG"])
    out = capsys.readouterr().out
    assert "100 samples over 4 instructions" in out
    assert "| BRA | 40.0% | stall_wait 40.0%" in out
    assert "| SHF | 30.0% | stall_short_sb 30.0%" in out
    assert "1 windows SR_TID .. REDG: 60.0% of all samples" in out


def test_roofline_follows_the_gpu(monkeypatch):
    monkeypatch.setattr(common, "PEAK_TFLOPS", common.PEAK_TFLOPS)
    monkeypatch.setattr(common, "PEAK_GBPS", common.PEAK_GBPS)
    assert common.use_roofline_of("NVIDIA H200") == (790.0, 4300.0)
    assert (common.PEAK_TFLOPS, common.PEAK_GBPS) == (790.0, 4300.0)
    assert common.use_roofline_of("NVIDIA H100 80GB HBM3") == (760.0, 2900.0)
    assert common.use_roofline_of("Some other GPU") == (760.0, 2900.0)      # unchanged: the last one set


def test_k_sweep_fit_recovers_the_fixed_cost(capsys):
    """bench_cute_fwd_schedules' least-squares fit, on times built from a known fixed part and per-key slope."""
    from benchmarks.bench_cute_fwd_schedules import fit_fixed_cost

    rows = [dict(T=4096, H=H, backend=backend, K=K, ms=fixed + K * per_key)
            for H, backend, fixed, per_key in [(128, "ours", 0.18, 0.0018), (64, "theirs", 0.05, 0.0009)]
            for K in (128, 256, 512, 1024, 2048)]
    fit_fixed_cost(rows, num_sms=128)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 128") or
             line.startswith("| 64")]
    # H=128: 4096 * 2 CTAs over 128 SMs = 64 waves; H=64: 32 waves
    assert lines == ["| 128 | ours | 0.180 | 2.81 | 1.843 |", "| 64 | theirs | 0.050 | 1.56 | 0.922 |"]


@pytest.mark.skipif(not cute_common.is_available(), reason=str(cute_common.unavailable_reason()))
def test_bulk_reduction_kernel_compiles_to_tma_reductions():
    """`bench_dkv_reduction --bulk`'s kernel builds for sm_90a with no GPU, and each piece is one TMA bulk
    reduction (UBLKRED) per chunk of the row, fenced and double-buffered (a bulk-group wait per buffer)."""
    from benchmarks.bulk_reduction_kernel import BulkReduceBench, fake_arguments
    from csrc_dsl.cute.common import fake_compile

    ptx, cubin = fake_compile.compile_fake(BulkReduceBench(576, 64, 32), *fake_arguments())
    assert "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32" in ptx
    assert "cp.async.bulk.wait_group.read" in ptx
    sass = fake_compile.sass(cubin)
    if sass is not None:
        assert fake_compile.count_opcodes(sass, "UBLKRED")["UBLKRED"] == 576 // 64
