"""CuTe-DSL SM90 sparse attention backward (csrc_dsl/cute/sm90/sparse_attention_bwd*.py).

On any machine with nvidia-cutlass-dsl (no GPU needed): every shipped variant compiles for sm_90a from
fake tensors, fits shared memory, has no register spills, and its SASS has HGMMA (wgmma), LDGSTS (cp.async
gathers) and, in fast mode only, REDG (the fp32 dkv reductions). On any machine: the launcher's torch side
(Delta, L, d_sink) against an fp64 autograd oracle.
On an SM90 GPU: gradients against the fp64 autograd oracle written here (SPEC section 5, tolerances of
section 9), deterministic mode bitwise stable, CUDA-graph replay equal to eager.
"""
import os

import pytest
import torch

from csrc_dsl.cute import common
from csrc_dsl.cute.common.launch import sm90_unavailable_reason
from csrc_dsl.cute.common import compile_cache, fake_compile
from csrc_dsl.cute.sm90 import sparse_attention_bwd as bwd

needs_dsl = pytest.mark.skipif(not common.is_available(), reason=str(common.unavailable_reason()))


_GPU_REASON = sm90_unavailable_reason()
needs_sm90 = pytest.mark.skipif(_GPU_REASON is not None, reason=str(_GPU_REASON))

GRAD_REL = 2e-2      # SPEC section 9: backward gradients
GRAD_COS = 0.999


# ======================================================================================================
# The fp64 autograd oracle (SPEC sections 4 and 5), usable on CPU and GPU
# ======================================================================================================
def oracle(q, kv, indices, dout, scale, d_v, sink=None, topk_length=None, grad_lse=None):
    """Forward in fp64 with autograd through the gather, then backward from `dout` (and `grad_lse`, the
    gradient reaching lse, when given; a lonely row's lse is a constant, so it reaches nothing there).
    Returns (out fp64, lse fp64 (+inf on lonely rows), dq, dkv, d_sink (or None)), all fp64."""
    T, H, D = q.shape
    S, K = kv.shape[0], indices.shape[1]
    q64 = q.double().requires_grad_()
    kv64 = kv.double().requires_grad_()
    sink64 = sink.double().requires_grad_() if sink is not None else None
    ids = indices.long()
    valid = (ids >= 0) & (ids < S)
    if topk_length is not None:
        valid &= torch.arange(K, device=q.device)[None, :] < topk_length.long()[:, None]
    keys = kv64[ids.clamp(0, max(S - 1, 0))]                           # [T, K, D]: duplicates stay
    s = scale * torch.einsum("thd,tkd->thk", q64, keys)
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    lonely = ~valid.any(dim=1)[:, None].expand(T, H)
    # logsumexp of an all -inf row has a NaN gradient: take it over zeros there (then discarded).
    lse = torch.logsumexp(torch.where(lonely[..., None], torch.zeros_like(s), s), dim=-1)
    big_l = lse if sink64 is None else torch.logaddexp(lse, sink64[None, :].expand(T, H))
    big_l = torch.where(lonely, torch.zeros_like(big_l), big_l)        # P = exp(-inf - 0) = 0 there
    p = torch.exp(s - big_l[..., None])
    out = torch.einsum("thk,tkd->thd", p, keys[..., :d_v])
    if grad_lse is None:
        out.backward(dout.double())
    else:
        torch.autograd.backward([out, lse], [dout.double(), grad_lse.double()])
    lse = torch.where(lonely, torch.full_like(lse, float("inf")), lse)
    d_sink = sink64.grad if sink64 is not None else None
    return out.detach(), lse.detach(), q64.grad, kv64.grad, d_sink


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def cosine(x, ref):
    x, ref = x.double().flatten(), ref.flatten()
    return (x @ ref / (x.norm() * ref.norm()).clamp_min(1e-30)).item()


def assert_grad_close(x, ref, name):
    assert not torch.isnan(x).any(), f"{name} has NaN"
    if ref.norm() == 0:
        assert (x == 0).all(), f"{name} should be exactly 0"
        return
    assert rel_err(x, ref) <= GRAD_REL, f"{name}: rel err {rel_err(x, ref):.3e}"
    assert cosine(x, ref) >= GRAD_COS, f"{name}: cosine {cosine(x, ref):.6f}"


# ======================================================================================================
# CPU: configs, the torch side of the launcher, and the dispatch predicate
# ======================================================================================================
def test_shipped_configs_are_static_and_cover_the_op():
    configs = bwd.shipped_configs()
    assert configs[0] == bwd.BwdConfig(512, 512, False) and configs[0].schedule == "wide"   # the op's default
    assert {(c.schedule, c.head_dim, c.d_v, c.deterministic) for c in configs} == {
        (schedule, D, 512, det) for schedule in bwd.SCHEDULES for D in (576, 512) for det in (False, True)}
    for config in configs:
        compile_cache.check_static(config)
    assert compile_cache.cache_for(configs[0]) is bwd._CACHE


@pytest.mark.parametrize("D", [576, 512])
def test_pair_column_order_round_trips(D):
    """`dkv_write="pair"` stores the accumulator's columns permuted within each 64-column block; `dkv_output`
    puts them back. Checked against the kernel's rule written out per lane: lane 4g + q of warp w sends, for
    r, e in {0, 1}, latent column 16w + 8r + 2(g // 2) + e at stored column 16w + 4(g // 2) + 2r + e."""
    order = bwd.pair_column_order(D)
    expected = torch.empty(D, dtype=torch.long)
    for block in range(D // 64):
        for w in range(4):
            for g in range(8):
                for r in range(2):
                    for e in range(2):
                        expected[64 * block + 16 * w + 4 * (g // 2) + 2 * r + e] = \
                            64 * block + 16 * w + 8 * r + 2 * (g // 2) + e
    assert torch.equal(order, expected)
    latent = torch.randn(7, D)
    stored = latent[:, order]
    assert torch.equal(bwd.dkv_output(stored, "pair", torch.float32), latent)
    assert torch.equal(bwd.dkv_output(stored, "pair", torch.bfloat16), latent.to(torch.bfloat16))
    assert torch.equal(bwd.dkv_output(latent, "vector", torch.bfloat16), latent.to(torch.bfloat16))


def test_selected_dkv_write(monkeypatch):
    monkeypatch.delenv(bwd.ENV_DKV_WRITE, raising=False)
    assert bwd.selected_dkv_write() == bwd.BwdConfig.dkv_write
    monkeypatch.setenv(bwd.ENV_DKV_WRITE, "pair")
    assert bwd.selected_dkv_write() == "pair"
    monkeypatch.setenv(bwd.ENV_DKV_WRITE, "butterfly")
    with pytest.raises(ValueError, match="expected one of"):
        bwd.selected_dkv_write()


def test_supports_is_false_off_gpu():
    T, H, D, S, K = 2, 4, 576, 8, 4
    q = torch.randn(T, H, D).to(torch.bfloat16)
    kv = torch.randn(S, D).to(torch.bfloat16)
    dout = torch.randn(T, H, 512).to(torch.bfloat16)
    out = torch.randn(T, H, 512).to(torch.bfloat16)
    lse = torch.randn(T, H)
    idx = torch.zeros(T, K, dtype=torch.int32)
    assert bwd.supports(dout, q, kv, out, lse, idx, 0.1, 512, None, None, False) is False


@pytest.mark.parametrize("with_sink", [False, True])
def test_row_terms_match_autograd(with_sink):
    """Delta, L and d_sink (torch ops in the launcher) against the fp64 oracle, on CPU, with lonely rows."""
    g = torch.Generator().manual_seed(7 + with_sink)
    T, H, D, S, K = 5, 3, 64, 40, 12
    q = torch.randn(T, H, D, generator=g).to(torch.bfloat16)
    kv = torch.randn(S, D, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, S, (T, K), generator=g, dtype=torch.int32)
    idx[1] = -1                                               # a lonely row
    dout = torch.randn(T, H, 32, generator=g).to(torch.bfloat16)
    sink = torch.randn(H, generator=g) if with_sink else None
    out, lse, _, _, d_sink_ref = oracle(q, kv, idx, dout, D ** -0.5, 32, sink)
    out_bf16 = out.to(torch.bfloat16)
    delta, l2, d_sink = bwd.row_terms(out_bf16, dout, lse.float(), sink)
    ref_delta = (out_bf16.double() * dout.double()).sum(-1)
    torch.testing.assert_close(delta.double(), ref_delta, rtol=1e-5, atol=1e-6)
    assert torch.isinf(l2[1]).all() and (l2[1] > 0).all()      # lonely: P = exp2(s - inf) = 0
    if with_sink:
        ref_l = torch.logaddexp(lse[0, 0], sink[0].double())
        torch.testing.assert_close(l2[0, 0].double(), ref_l * bwd.LOG2_E, rtol=1e-5, atol=1e-5)
        assert_grad_close(d_sink, d_sink_ref, "d_sink")
    else:
        assert (d_sink == 0).all() and d_sink.shape == (H,)


@pytest.mark.parametrize("with_sink", [False, True])
def test_row_terms_grad_lse_match_autograd(with_sink):
    """With a gradient of lse, the Delta that row_terms hands the kernel, put into SPEC section 5's dS,
    gives the fp64 oracle's dq and dkv; d_sink is unchanged by it (the sink is not in lse). The sink sits
    near lse so that exp(L - lse) = 1 + exp(sink - lse) matters. Lonely row with a nonzero grad_lse."""
    g = torch.Generator().manual_seed(17 + with_sink)
    T, H, D, S, K, d_v = 5, 3, 64, 40, 12, 32
    q = torch.randn(T, H, D, generator=g).to(torch.bfloat16)
    kv = torch.randn(S, D, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, S, (T, K), generator=g, dtype=torch.int32)
    idx[1] = -1                                               # a lonely row
    dout = torch.randn(T, H, d_v, generator=g).to(torch.bfloat16)
    sink = torch.randn(H, generator=g) + 2.5 if with_sink else None
    grad_lse = torch.randn(T, H, generator=g)
    scale = D ** -0.5
    out, lse, dq, dkv, d_sink_ref = oracle(q, kv, idx, dout, scale, d_v, sink, grad_lse=grad_lse)
    out_bf16 = out.to(torch.bfloat16)
    delta, _, d_sink = bwd.row_terms(out_bf16, dout, lse.float(), sink, grad_lse)
    _, _, d_sink_plain = bwd.row_terms(out_bf16, dout, lse.float(), sink)
    assert torch.isfinite(delta).all() and torch.equal(d_sink, d_sink_plain)
    f_dq, f_dkv, _ = spec_formulas(q, kv, idx, dout, out_bf16, lse, scale, d_v, sink, delta=delta)
    for x, ref, name in [(f_dq, dq, "dq"), (f_dkv, dkv, "dkv")]:
        assert_grad_close(x, ref, name)
    if with_sink:
        assert_grad_close(d_sink, d_sink_ref, "d_sink")
    plain_dq, _, _ = spec_formulas(q, kv, idx, dout, out_bf16, lse, scale, d_v, sink)
    assert rel_err(plain_dq, dq) > 2 * GRAD_REL                    # the shift is what makes dq right


def spec_formulas(q, kv, indices, dout, out, lse, scale, d_v, sink=None, topk_length=None, round_bf16=False,
                  delta=None):
    """SPEC section 5 written out slot by slot (fp64). With `round_bf16`, P and dS are rounded to bf16
    before the products, as the kernel's tensor-core operands are: the precision the design gives up.
    `delta` replaces out . dout in dS (the launcher's Delta shifted by grad_lse); d_sink then is not
    meaningful (the caller checks it)."""
    T, H, D = q.shape
    S, K = kv.shape[0], indices.shape[1]
    qd, kvd, doutd = q.double(), kv.double(), dout.double()
    delta = (out.double() * doutd).sum(-1) if delta is None else delta.double()
    big_l = lse.double() if sink is None else torch.logaddexp(lse.double(), sink.double()[None, :])
    dq = torch.zeros(T, H, D, dtype=torch.float64)
    dkv = torch.zeros(S, D, dtype=torch.float64)
    for t in range(T):
        n = K if topk_length is None else min(K, max(int(topk_length[t]), 0))
        for j in range(n):
            i = int(indices[t, j])
            if i < 0 or i >= S:
                continue
            p = torch.exp(scale * qd[t] @ kvd[i] - big_l[t])                  # [H]
            ds = p * (doutd[t] @ kvd[i, :d_v] - delta[t])
            if round_bf16:
                p = p.to(torch.bfloat16).double()
                ds = (scale * ds).to(torch.bfloat16).double() / scale
            dq[t] += scale * ds[:, None] * kvd[i][None, :]
            dkv[i] += scale * ds @ qd[t]
            dkv[i, :d_v] += p @ doutd[t]
    d_sink = None if sink is None else -(torch.exp(sink.double()[None, :] - big_l) * delta).sum(0)
    return dq, dkv, d_sink


@pytest.mark.parametrize("round_bf16", [False, True])
def test_oracle_matches_spec_and_bf16_operands_meet_tolerance(round_bf16):
    """The autograd oracle equals SPEC section 5's formulas (invalid ids, topk_length, duplicates,
    a lonely row, a sink); and the kernel's bf16 rounding of P and dS stays within SPEC tolerances."""
    g = torch.Generator().manual_seed(3)
    T, H, D, S, K, d_v = 4, 16, 96, 30, 40, 64
    q = torch.randn(T, H, D, generator=g).to(torch.bfloat16)
    kv = torch.randn(S, D, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, S, (T, K), generator=g, dtype=torch.int32)
    idx[0, :5] = -1
    idx[0, 5:8] = S + 2
    idx[2, 10:20] = 4                                                    # duplicates
    idx[3] = -1                                                          # lonely
    lengths = torch.tensor([K, 17, K - 1, K], dtype=torch.int32)
    dout = torch.randn(T, H, d_v, generator=g).to(torch.bfloat16)
    sink = torch.randn(H, generator=g)
    out, lse, dq, dkv, d_sink = oracle(q, kv, idx, dout, D ** -0.5, d_v, sink, lengths)
    f_dq, f_dkv, f_dsink = spec_formulas(q, kv, idx, dout, out, lse, D ** -0.5, d_v, sink, lengths, round_bf16)
    if round_bf16:
        for x, ref, name in [(f_dq, dq, "dq"), (f_dkv, dkv, "dkv"), (f_dsink, d_sink, "d_sink")]:
            assert_grad_close(x, ref, name)
        assert rel_err(f_dq, dq) > 1e-5 and rel_err(f_dkv, dkv) > 1e-5   # the rounding did happen
    else:
        for x, ref in [(f_dq, dq), (f_dkv, dkv), (f_dsink, d_sink)]:
            torch.testing.assert_close(x, ref, rtol=1e-9, atol=1e-9)
    assert (dq[3] == 0).all()


# ======================================================================================================
# CPU: every shipped variant compiles for sm_90a without spills
# ======================================================================================================
def _config_id(config):
    name = f"D{config.head_dim}-dv{config.d_v}-det{int(config.deterministic)}"
    if config.schedule == "split":
        return name
    return (f"{name}-{config.schedule}-{config.ablation}" + ("-overlap" if config.overlap_dkv else "-serial")
            + ("-lines" if config.dkv_lines else "-64B") + ("-uniform" if config.uniform_send else "")
            + ("-halves" if config.kv_halves else ""))


def _consumer1_sass(sass: str, config) -> str:
    """The wide kernel's consumer-1 code: from its setmaxnreg (`consumer1_regs`) to the next one."""
    return sass.split(f"USETMAXREG.TRY_ALLOC.CTAPOOL UP0, {config.consumer1_regs:#x}")[1].split("USETMAXREG")[0]


def _expected_hgmma(config):
    """Static wgmma count: per tile, S (D/16 k-steps) and dP (d_v/16), dQ (2 k-steps of 16 keys per
    wgmma: two 256-column ones, plus the 64 RoPE columns), dkv^T blocks (4 k-steps over 64 heads each,
    twice on the value columns)."""
    D, DV = config.head_dim, config.d_v
    dkv = sum(4 + (4 if b * 64 < DV else 0) for b in range(D // 64))
    if config.schedule == "wide":
        # S and dP in two halves of 32 keys; dQ over 64 keys (4 k-steps) per 256-column wgmma and RoPE block
        dq = 4 * 2 + (4 if D > DV else 0)
        return 2 * (D // 16 + DV // 16) + dq + (dkv if config.ablation != "no_dkv" else 0)
    dq = 2 * 2 + (2 if D > DV else 0)
    return D // 16 + DV // 16 + dq + dkv


@needs_dsl
@pytest.mark.parametrize("config", bwd.shipped_configs(), ids=_config_id)
def test_bwd_shipped_configs_compile_for_sm90a(config):
    ptx, cubin, smem_bytes = bwd.compile_for_inspection(config)
    assert ".target sm_90a" in ptx
    assert "wgmma.mma_async" in ptx and "cp.async.cg.shared.global" in ptx
    assert 0 < smem_bytes <= 232448                                     # SM90 opt-in limit per CTA

    # The split schedule spills nothing. The wide one keeps a few values in local memory (BENCHMARKS.md,
    # session 25): the producer 1 value per tile at D = 576, consumer 0 4 values across its tile loop at
    # D = 512. Register splits without them exist at D = 576 (producer 40, consumer 1 224) but measured
    # 0.6% / 3.4% slower at H = 64 / 128 on the H100; none was found at D = 512. Consumer 1, which sends
    # every dkv value, must never touch local memory.
    max_spills, max_stack = (4, 16) if config.schedule == "wide" else (0, 0)
    resources = fake_compile.cubin_resources(cubin)
    assert 0 < resources.registers <= 168                              # 384 threads at launch
    assert resources.stack_frame <= max_stack

    report = fake_compile.ptxas_report(ptx)
    if report is not None:
        assert report.spill_stores <= max_stack and report.spill_loads <= max_stack, report.text
        assert report.stack_frame <= max_stack, report.text
        assert "C7514" not in report.text, report.text        # wgmmas not serialized by ptxas

    sass = fake_compile.sass(cubin)
    if sass is not None:
        ops = fake_compile.count_opcodes(sass, "HGMMA", "LDGSTS", "REDG", "LDL", "STL", "USETMAXREG")
        assert ops["HGMMA"] == _expected_hgmma(config)
        # Q and dO rows (4 passes of 16 rows) + kv rows (a pass per 16 rows of the tile), one 16-byte piece per
        # 64 columns.
        kv_passes = config.block_n // 16
        assert ops["LDGSTS"] == 4 * (config.head_dim + config.d_v) // 64 + kv_passes * config.head_dim // 64
        assert ops["LDL"] <= max_spills and ops["STL"] <= max_spills
        if config.schedule == "wide":
            assert config.consumer1_regs != config.consumer_regs    # consumer 1's code found by its setmaxnreg
            consumer1 = _consumer1_sass(sass, config)
            assert "STL" not in consumer1 and "LDL" not in consumer1
            assert ("STG.E.128" if config.deterministic else "REDG.E.ADD.F32x4") in consumer1   # its dkv writes
        assert ops["USETMAXREG"] >= 2                                  # producer down, consumers up
        if config.deterministic:
            assert ops["REDG"] == 0                                    # plain stores, no float atomics
        else:
            assert ops["REDG"] > 0


@needs_dsl
@pytest.mark.parametrize("config", [bwd.BwdConfig(576, 512, False, schedule="split", **fields) for fields in (
                                    dict(ablation="no_dkv_write"), dict(dkv_write="scalar"),
                                    dict(dkv_write="vector"))] + [
                                    bwd.BwdConfig(576, 512, True, schedule="split", dkv_write="vector"),
                                    bwd.BwdConfig(576, 512, False, schedule="split", overlap_dkv=False),
                                    bwd.BwdConfig(576, 512, False, schedule="split", dkv_write="pair"),
                                    bwd.BwdConfig(576, 512, True, schedule="split", dkv_write="pair")],
                         ids=["no_dkv_write", "scalar_dkv", "vector_dkv", "vector_dkv_det", "serial_dkv",
                              "pair_dkv", "pair_dkv_det"])
def test_bwd_variants_compile_without_spills(config):
    """The benchmark's variants (dkv products kept but never written; the other dkv write paths) compile
    without spills; addresses computed per tile leave no thread-index reads in the write path, and vector
    writes are one 16-byte instruction per 4 values."""
    ptx, cubin, _ = bwd.compile_for_inspection(config)
    assert fake_compile.cubin_resources(cubin).stack_frame == 0
    sass = fake_compile.sass(cubin)
    if sass is not None:
        ops = fake_compile.count_opcodes(sass, "HGMMA", "LDL", "STL", "S2R")
        assert ops["HGMMA"] == _expected_hgmma(config)
        assert ops["LDL"] == 0 and ops["STL"] == 0
        if config.dkv_write != "scalar":
            # a few thread-index reads per consumer, not one per written key ("scalar": 72)
            assert ops["S2R"] <= 8
        if config.dkv_write in ("vector", "pair") and config.ablation == "none":
            # 16 values per thread and dkv^T block, 4 per instruction (the consumers' code is compiled
            # once each, so every block counts once); the dQ epilogue also stores 16-byte pieces.
            dkv_pieces = 4 * (config.head_dim // 64)
            if config.deterministic:
                epilogue_pieces = 2 * 64 * (config.head_dim // 8) // 256
                assert sass.count("STG.E.128") == dkv_pieces + epilogue_pieces
            else:
                assert sass.count("REDG.E.ADD.F32x4") == dkv_pieces
            # the lane exchange: two butterfly stages of 16 values ("vector"), or one of 8 ("pair")
            shuffles_per_block = 16 if config.dkv_write == "vector" else 8
            assert fake_compile.count_opcodes(sass, "SHFL")["SHFL"] == shuffles_per_block * (config.head_dim // 64)


WIDE_CONFIGS = [bwd.BwdConfig(D, 512, det, schedule="wide") for D in (576, 512) for det in (False, True)]


def test_schedules_fill_their_tiles(monkeypatch):
    split, wide = bwd.BwdConfig(576, 512, False, schedule="split"), bwd.BwdConfig(576, 512, False, schedule="wide")
    assert (split.block_n, split.num_stages) == (32, 2) and (wide.block_n, wide.num_stages) == (64, 1)
    for config in (split, wide):
        consumer1 = config.consumer1_regs or config.consumer_regs
        assert config.producer_regs + config.consumer_regs + consumer1 <= 504     # 168 registers x 384 threads
        assert all(r % 8 == 0 and 24 <= r <= 256 for r in (config.producer_regs, config.consumer_regs, consumer1))
    assert bwd.BwdConfig(576, 512, False, schedule="wide", block_n=32).block_n == 32   # explicit values stay
    assert (split.overlap_dkv, split.dkv_lines) == (True, False) and (wide.overlap_dkv, wide.dkv_lines) == (False, True)
    assert bwd.BwdConfig(576, 512, False, schedule="split", overlap_dkv=False).overlap_dkv is False  # not "unset"
    assert bwd.BwdConfig(576, 512, False, schedule="wide", dkv_lines=False).dkv_lines is False
    assert (split.uniform_send, wide.uniform_send) == (False, False)
    assert bwd.BwdConfig(576, 512, False, schedule="wide", uniform_send=True).uniform_send is True
    with pytest.raises(ValueError, match="schedule"):
        bwd.BwdConfig(576, 512, False, schedule="diagonal")
    monkeypatch.delenv(bwd.ENV_SCHEDULE, raising=False)
    assert bwd.selected_schedule() == bwd.BwdConfig.schedule
    monkeypatch.setenv(bwd.ENV_SCHEDULE, "wide")
    assert bwd.selected_schedule() == "wide"
    monkeypatch.setenv(bwd.ENV_SCHEDULE, "narrow")
    with pytest.raises(ValueError, match="narrow"):
        bwd.selected_schedule()


@needs_dsl
@pytest.mark.parametrize("config", WIDE_CONFIGS + [
    bwd.BwdConfig(576, 512, False, schedule="wide", ablation="no_dkv"),
    bwd.BwdConfig(576, 512, False, schedule="wide", overlap_dkv=True),
    bwd.BwdConfig(576, 512, False, schedule="wide", dkv_lines=False),
    bwd.BwdConfig(512, 512, True, schedule="wide", dkv_lines=False, overlap_dkv=True),
    bwd.BwdConfig(576, 512, False, schedule="wide", kv_halves=True),
    bwd.BwdConfig(576, 512, False, schedule="wide", uniform_send=True),
    bwd.BwdConfig(512, 512, True, schedule="wide", uniform_send=True, overlap_dkv=True)], ids=_config_id)
def test_bwd_wide_schedule_compiles_for_sm90a(config):
    """The wide schedule compiles for sm_90a within shared memory, with its static wgmma count (S and dP in
    halves, every dkv block in the second consumer), 16-byte dkv writes (8 pieces per thread and block;
    stores in deterministic mode) straight from the accumulator with no shuffle, or with `dkv_lines` after
    4 shuffles per 8 values (16 per block), and wgmmas that ptxas did not serialize (C7514, which a loop
    over the dkv blocks caused).
    (Not yet asserted: no spills. The producer still spills a few values at its 32 registers; the counts
    are in BENCHMARKS.md, session 24.)"""
    ptx, cubin, smem_bytes = bwd.compile_for_inspection(config)
    assert 0 < smem_bytes <= 232448
    assert fake_compile.cubin_resources(cubin).registers <= 168
    report = fake_compile.ptxas_report(ptx)
    if report is not None:
        assert "C7514" not in report.text, report.text
    sass = fake_compile.sass(cubin)
    if sass is not None:
        assert fake_compile.count_opcodes(sass, "HGMMA")["HGMMA"] == _expected_hgmma(config)
        blocks = config.head_dim // 64 if config.ablation != "no_dkv" else 0
        assert fake_compile.count_opcodes(sass, "SHFL")["SHFL"] == (16 * blocks if config.dkv_lines else 0)
        if config.dkv_lines:
            # consumer 1's selects: per block and thread, 8 values of each of 4 (row half, pair of pieces) are
            # exchanged, with 12 selects per 8 values, or 8 with `uniform_send`
            consumer1 = _consumer1_sass(sass, config)
            assert consumer1.count("FSEL") == (32 if config.uniform_send else 48) * blocks
        pieces = 8 * blocks if config.ablation == "none" else 0
        if config.deterministic:
            assert "REDG" not in sass and sass.count("STG.E.128") >= pieces
        else:
            assert sass.count("REDG.E.ADD.F32x4") == pieces


def test_wide_kernel_rejects_other_tiles():
    from csrc_dsl.cute.sm90.sparse_attention_bwd_kernel import SparseAttentionBwdSm90
    from csrc_dsl.cute.sm90.sparse_attention_bwd_wide_kernel import SparseAttentionBwdSm90Wide

    for bad in (dict(block_n=32), dict(num_stages=2), dict(dkv_write="scalar"), dict(dkv_write="vector")):
        with pytest.raises(ValueError):
            SparseAttentionBwdSm90Wide(bwd.BwdConfig(576, 512, False, schedule="wide", **bad))
    with pytest.raises(ValueError, match="dkv_lines"):
        SparseAttentionBwdSm90(bwd.BwdConfig(576, 512, False, schedule="split", dkv_lines=True))
    with pytest.raises(ValueError, match="uniform_send"):
        SparseAttentionBwdSm90Wide(bwd.BwdConfig(576, 512, False, schedule="wide", dkv_lines=False,
                                                 uniform_send=True))


# ======================================================================================================
# GPU: against the oracle
# ======================================================================================================
def make_inputs(T, H, D, S, K, *, seed, sink=False, topk_length=False, invalid=0.1, dup=0.05, d_v=512):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    q = torch.randn(T, H, D, generator=g, device=dev).to(torch.bfloat16)
    kv = torch.randn(S, D, generator=g, device=dev).to(torch.bfloat16)
    indices = torch.randint(0, S, (T, K), generator=g, device=dev, dtype=torch.int32)
    u = torch.rand(T, K, generator=g, device=dev)
    indices = torch.where(u < invalid / 2, torch.full_like(indices, -1), indices)          # padding ids
    indices = torch.where((u >= invalid / 2) & (u < invalid), indices + S, indices)          # ids >= S
    if dup > 0 and K > 1:                                                                    # duplicates
        j = torch.randint(1, K, (max(1, int(dup * K)),), generator=g, device=dev)
        indices[:, j] = indices[:, j - 1]
    attn_sink = torch.randn(H, generator=g, device=dev) * 2 if sink else None
    lengths = torch.randint(0, K + 1, (T,), generator=g, device=dev, dtype=torch.int32) if topk_length else None
    dout = torch.randn(T, H, d_v, generator=g, device=dev).to(torch.bfloat16)
    return q, kv, indices, attn_sink, lengths, dout


def forward_for(q, kv, indices, dout, scale, d_v, sink, lengths, grad_lse=None):
    """(out bf16, lse fp32) as the forward would hand them to the backward, and the oracle's grads."""
    out, lse, dq, dkv, d_sink = oracle(q, kv, indices, dout, scale, d_v, sink, lengths, grad_lse)
    return out.to(torch.bfloat16), lse.float(), (dq, dkv, d_sink)


def poison_allocator(*shapes_dtypes):
    """NaN-filled blocks of these sizes left in torch's caching allocator: outputs allocated next start
    as NaN, so an element the kernel forgets to write fails the comparison."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in shapes_dtypes]
    del blocks


def check(q, kv, indices, scale, d_v, sink, lengths, dout, deterministic=False, grad_lse=None):
    T, H, D = q.shape
    out, lse, (ref_dq, ref_dkv, ref_dsink) = forward_for(q, kv, indices, dout, scale, d_v, sink, lengths,
                                                         grad_lse)
    poison = [((T, H, D), torch.bfloat16)]
    if deterministic:  # the partial dkv rows the launcher allocates: a row the kernel skips reads NaN
        head_blocks, K = (H + 63) // 64, indices.shape[1]
        budget = int(os.environ.get(bwd.WORKSPACE_ENV, "2048")) << 20
        chunk = max(1, min(T, budget // (head_blocks * K * D * 4)))
        poison.append(((head_blocks, chunk * K, D), torch.float32))
    poison_allocator(*poison)
    dq, dkv, d_sink = bwd.sparse_attention_backward(dout, q, kv, out, lse, indices, scale, d_v, sink, lengths,
                                                    deterministic, grad_lse)
    torch.cuda.synchronize()
    assert dq.shape == q.shape and dq.dtype == torch.bfloat16
    assert dkv.shape == kv.shape and dkv.dtype == torch.bfloat16
    assert d_sink.shape == (H,) and d_sink.dtype == torch.float32
    assert_grad_close(dq, ref_dq, "dq")
    assert_grad_close(dkv, ref_dkv, "dkv")
    if sink is not None:
        assert_grad_close(d_sink, ref_dsink, "d_sink")
    else:
        assert (d_sink == 0).all()
    lonely = torch.isinf(lse).all(dim=1)
    assert (dq[lonely] == 0).all()                              # rows with no valid key: no gradient
    return dq, dkv, d_sink


@needs_sm90
@pytest.mark.parametrize("D", [576, 512])
@pytest.mark.parametrize("H", [1, 16, 64, 128])
def test_bwd_matches_oracle_heads(H, D):
    q, kv, idx, sink, lengths, dout = make_inputs(T=4, H=H, D=D, S=3001, K=2048, seed=H * 7 + D,
                                                  sink=H % 2 == 0, topk_length=H >= 64)
    check(q, kv, idx, D ** -0.5, 512, sink, lengths, dout)


@needs_sm90
@pytest.mark.parametrize("K", [128, 2000, 2048])
@pytest.mark.parametrize("sink,topk_length", [(False, False), (True, True), (True, False), (False, True)])
def test_bwd_matches_oracle_topk(K, sink, topk_length):
    q, kv, idx, attn_sink, lengths, dout = make_inputs(T=6, H=64, D=576, S=5000, K=K,
                                                       seed=K + 3 * sink + topk_length,
                                                       sink=sink, topk_length=topk_length)
    check(q, kv, idx, 576 ** -0.5, 512, attn_sink, lengths, dout)


@needs_sm90
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("sink,topk_length", [(False, False), (True, True)])
def test_bwd_matches_oracle_grad_lse(sink, topk_length, deterministic):
    """A random gradient of lse (merged split branches): the launcher shifts Delta by grad_lse * exp(L - lse).
    The sink sits near lse (offset 8, K = 2000) so that exp(L - lse) matters; a lonely row; odd H."""
    T, H, D, K = 6, 100, 576, 2000
    q, kv, idx, attn_sink, lengths, dout = make_inputs(T=T, H=H, D=D, S=5000, K=K, seed=41 + sink,
                                                       sink=sink, topk_length=topk_length)
    if attn_sink is not None:
        attn_sink = attn_sink + 8.0
    idx[2] = -1
    g = torch.Generator(device="cuda").manual_seed(43)
    grad_lse = torch.randn(T, H, generator=g, device="cuda")
    assert bwd.supports(dout, q, kv, dout, torch.zeros(T, H, device="cuda"), idx, D ** -0.5, 512, attn_sink,
                        lengths, deterministic, grad_lse)
    check(q, kv, idx, D ** -0.5, 512, attn_sink, lengths, dout, deterministic, grad_lse)


@needs_sm90
@pytest.mark.parametrize("deterministic", [False, True])
def test_bwd_tile_edges(deterministic):
    """Rows with 0, 1, 31, 32, 33, 64 and 65 slots (tile edges of the 32-slot tiles), odd H."""
    T, H, D, K = 8, 100, 576, 300
    q, kv, idx, sink, lengths, dout = make_inputs(T=T, H=H, D=D, S=777, K=K, seed=31, sink=True,
                                                  topk_length=True)
    lengths[:] = torch.tensor([0, 1, 31, 32, 33, 64, 65, 300], dtype=torch.int32)
    check(q, kv, idx, D ** -0.5, 512, sink, lengths, dout, deterministic)


@needs_sm90
@pytest.mark.parametrize("sink", [False, True])
def test_bwd_lonely_rows(sink):
    """Rows with no valid key: all ids -1, all ids >= S, topk_length 0, valid ids hidden by topk_length."""
    T, H, D, S, K = 5, 128, 576, 700, 130
    q, kv, idx, attn_sink, _, dout = make_inputs(T=T, H=H, D=D, S=S, K=K, seed=11, sink=sink)
    idx[0] = -1
    idx[1] = S + torch.arange(K, device="cuda", dtype=torch.int32)
    lengths = torch.full((T,), K, dtype=torch.int32, device="cuda")
    lengths[2] = 0
    idx[3] = -1
    idx[3, 10:20] = 5                                  # row 3's only real ids sit past its topk_length
    lengths[3] = 10
    dq, dkv, _ = check(q, kv, idx, D ** -0.5, 512, attn_sink, lengths, dout)
    assert (dq[:4] == 0).all() and (dq[4] != 0).any()


@needs_sm90
@pytest.mark.parametrize("deterministic", [False, True])
def test_bwd_all_duplicates(deterministic):
    """Every slot of a query names the same kv row: its gradient is the sum over all K slots."""
    T, H, D, S, K = 3, 16, 512, 50, 300
    q, kv, idx, _, _, dout = make_inputs(T=T, H=H, D=D, S=S, K=K, seed=5, invalid=0.0, dup=0.0)
    idx[0] = 7
    idx[1] = -1
    idx[1, 123] = 42
    check(q, kv, idx, D ** -0.5, 512, None, None, dout, deterministic)


@needs_sm90
@pytest.mark.parametrize("D", [576, 512])
def test_bwd_deterministic_is_bitwise_stable(D, monkeypatch):
    """Deterministic mode: 10 runs give the same bits; several query chunks and both head blocks."""
    monkeypatch.setenv(bwd.WORKSPACE_ENV, "8")       # 8 MiB: several chunks at H = 128
    q, kv, idx, sink, lengths, dout = make_inputs(T=12, H=128, D=D, S=300, K=512, seed=3 + D, sink=True,
                                                  topk_length=True, dup=0.2)
    first = check(q, kv, idx, D ** -0.5, 512, sink, lengths, dout, deterministic=True)
    out, lse, _ = forward_for(q, kv, idx, dout, D ** -0.5, 512, sink, lengths)
    for _ in range(9):
        again = bwd.sparse_attention_backward(dout, q, kv, out, lse, idx, D ** -0.5, 512, sink, lengths, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    fast = bwd.sparse_attention_backward(dout, q, kv, out, lse, idx, D ** -0.5, 512, sink, lengths, False)
    assert torch.equal(fast[0], first[0])                      # dq never depends on the dkv mode
    assert rel_err(fast[1], first[1].double()) <= 1e-2


@needs_sm90
@pytest.mark.parametrize("D", [512, 576])
def test_bwd_uniform_send_agrees(D):
    """`uniform_send` (the odd rows' pieces written from the other half of each 128-byte line) writes what the
    wide schedule's default lines write, at both head dims (test_bwd_dkv_write_paths_agree covers D = 576 only):
    deterministic partial rows bit for bit, fast-mode sums up to the order of the atomics."""
    T, S, K, H = 5, 260, 192, 64
    q, kv, idx, _, lengths, dout = make_inputs(T=T, H=H, D=D, S=S, K=K, seed=D, topk_length=True, dup=0.2)
    out, lse, _ = forward_for(q, kv, idx, dout, D ** -0.5, 512, None, lengths)
    delta, l2, _ = bwd.row_terms(out, dout, lse, None)
    for deterministic in (True, False):
        results = []
        for uniform in (False, True):
            config = bwd.BwdConfig(D, 512, deterministic, schedule="wide", uniform_send=uniform)
            dq = torch.full_like(q, float("nan"))
            target = torch.zeros(T * K if deterministic else S, D, device="cuda")
            bwd._launch(config, q, kv, idx, dout, l2, delta, lengths, dq, target, D ** -0.5)
            results.append((dq, bwd.dkv_output(target, config.dkv_write, torch.float32)))
        torch.cuda.synchronize()
        (dq_a, t_a), (dq_b, t_b) = results
        assert torch.equal(dq_a, dq_b) and t_a.abs().sum() > 0
        if deterministic:
            assert torch.equal(t_a, t_b)
        else:
            assert rel_err(t_b, t_a.double()) <= 1e-5


@needs_sm90
@pytest.mark.parametrize("H", [16, 128])
def test_bwd_dkv_write_paths_agree(H):
    """Every BwdConfig.dkv_write path, with or without overlap_dkv, and the wide schedule's variants write the
    same values to the same places: deterministic partial rows bit for bit, fast-mode sums up to the order of
    the atomics (see test_bwd_schedules_agree for why the schedules agree bit for bit)."""
    T, S, K, D = 7, 300, 200, 576
    q, kv, idx, _, lengths, dout = make_inputs(T=T, H=H, D=D, S=S, K=K, seed=H, topk_length=True, dup=0.2)
    out, lse, _ = forward_for(q, kv, idx, dout, D ** -0.5, 512, None, lengths)
    delta, l2, _ = bwd.row_terms(out, dout, lse, None)
    head_blocks = (H + 63) // 64
    results = {}
    split = {"schedule": "split"}
    variants = {"scalar": {**split, "dkv_write": "scalar"}, "tiled": {**split, "dkv_write": "tiled"},
                "vector": {**split, "dkv_write": "vector"},
                "serial": {**split, "dkv_write": "vector", "overlap_dkv": False},
                "pair": {**split, "dkv_write": "pair"}, "wide": {"schedule": "wide"},
                "wide_overlap": {"schedule": "wide", "overlap_dkv": True},
                "wide_64B": {"schedule": "wide", "dkv_lines": False},
                "wide_64B_overlap": {"schedule": "wide", "dkv_lines": False, "overlap_dkv": True},
                "wide_uniform": {"schedule": "wide", "uniform_send": True},
                "wide_uniform_overlap": {"schedule": "wide", "uniform_send": True, "overlap_dkv": True},
                "wide_halves": {"schedule": "wide", "kv_halves": True}}
    for mode, options in variants.items():
        for deterministic in (True, False):
            config = bwd.BwdConfig(D, 512, deterministic, **options)
            dq = torch.full_like(q, float("nan"))
            # deterministic: per-slot partial rows (skipped slots stay 0); fast: the fp32 [S, D] sums
            target = torch.zeros(head_blocks * T * K if deterministic else S, D, device="cuda")
            bwd._launch(config, q, kv, idx, dout, l2, delta, lengths, dq, target, D ** -0.5)
            # "pair" stores the columns in another order: back to latent order, fp32 kept bit for bit
            results[mode, deterministic] = (dq, bwd.dkv_output(target, config.dkv_write, torch.float32))
    torch.cuda.synchronize()
    for mode in [m for m in variants if m != "scalar"]:
        for deterministic in (True, False):
            (dq_m, t_m), (dq_s, t_s) = results[mode, deterministic], results["scalar", deterministic]
            assert torch.equal(dq_m, dq_s)
            if deterministic:
                assert torch.equal(t_m, t_s), mode
            else:
                assert rel_err(t_m, t_s.double()) <= 1e-5, mode          # fp32 sums in another order
            assert t_m.abs().sum() > 0


@needs_sm90
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("H,D,K", [(100, 576, 300), (128, 512, 2048)])
def test_bwd_op_with_pair_dkv_write(H, D, K, deterministic, monkeypatch):
    """The op with `dkv_write="pair"` (permuted accumulator columns, put back by the launcher) against the
    oracle: tile edges, sink, topk_length, duplicates, both head dims and modes."""
    monkeypatch.setenv(bwd.ENV_SCHEDULE, "split")
    monkeypatch.setenv(bwd.ENV_DKV_WRITE, "pair")
    q, kv, idx, sink, lengths, dout = make_inputs(T=8, H=H, D=D, S=777, K=K, seed=H + K, sink=True,
                                                  topk_length=True, dup=0.2)
    lengths[:4] = torch.tensor([0, 1, 33, 65], dtype=torch.int32)
    check(q, kv, idx, D ** -0.5, 512, sink, lengths, dout, deterministic)


WIDE_CASES = [  # (T, H, D, S, K, sink, topk_length, deterministic)
    (4, 64, 576, 3001, 2048, True, True, False),
    (4, 128, 576, 3001, 2048, False, False, True),
    (5, 100, 512, 5000, 2000, True, False, False),
    (3, 16, 576, 777, 300, False, True, True),
    (2, 1, 512, 900, 128, True, True, False),
]


@needs_sm90
@pytest.mark.parametrize("case", WIDE_CASES, ids=lambda c: "T{}-H{}-D{}-S{}-K{}-sink{:d}-len{:d}-det{:d}".format(*c))
def test_bwd_wide_schedule_matches_oracle(case, monkeypatch):
    """The op run with the wide schedule (64-key tiles) against the fp64 oracle: odd H, K not a multiple of
    64, invalid / out-of-range / duplicate ids, sink, topk_length, both dkv modes, NaN-poisoned outputs."""
    monkeypatch.setenv(bwd.ENV_SCHEDULE, "wide")
    T, H, D, S, K, sink, topk_length, deterministic = case
    q, kv, idx, attn_sink, lengths, dout = make_inputs(T=T, H=H, D=D, S=S, K=K, seed=T * H + K, sink=sink,
                                                       topk_length=topk_length)
    check(q, kv, idx, D ** -0.5, 512, attn_sink, lengths, dout, deterministic)


@needs_sm90
@pytest.mark.parametrize("deterministic", [False, True])
def test_bwd_wide_schedule_tile_edges_and_lonely_rows(deterministic, monkeypatch):
    """Rows with 0, 1, 31, 32, 33, 63, 64, 65 and 300 slots (edges of the 64-slot tiles and of their 32-key
    halves), a row of only invalid ids, and a row whose one valid key is named by every slot."""
    monkeypatch.setenv(bwd.ENV_SCHEDULE, "wide")
    T, H, D, S, K = 11, 100, 576, 777, 300
    q, kv, idx, sink, lengths, dout = make_inputs(T=T, H=H, D=D, S=S, K=K, seed=37, sink=True, topk_length=True)
    lengths[:] = torch.tensor([0, 1, 31, 32, 33, 63, 64, 65, 300, 300, 300], dtype=torch.int32)
    idx[9] = -1
    idx[10] = 5
    check(q, kv, idx, D ** -0.5, 512, sink, lengths, dout, deterministic)


@needs_sm90
@pytest.mark.parametrize("D", [576, 512])
def test_bwd_schedules_agree(D, monkeypatch):
    """Both schedules sum the same products in the same order per output element (S and dP as 64 x 32
    wgmmas, dQ over keys in 16-key steps, each dkv value over the 64 heads in 16-head steps: as dkv^T in the
    split schedule, with the keys as rows in the wide one), so dq and the deterministic dkv should agree bit
    for bit; fast-mode dkv up to the order of the atomics. The wide schedule's deterministic mode is bitwise
    stable over repeated runs."""
    T, H, S, K = 9, 128, 2000, 1000
    q, kv, idx, sink, lengths, dout = make_inputs(T=T, H=H, D=D, S=S, K=K, seed=71 + D, sink=True,
                                                  topk_length=True, dup=0.2)
    out, lse, _ = forward_for(q, kv, idx, dout, D ** -0.5, 512, sink, lengths)
    results = {}
    for schedule in ("split", "wide"):
        monkeypatch.setenv(bwd.ENV_SCHEDULE, schedule)
        for deterministic in (False, True):
            results[schedule, deterministic] = bwd.sparse_attention_backward(
                dout, q, kv, out, lse, idx, D ** -0.5, 512, sink, lengths, deterministic)
    for deterministic in (False, True):
        split, wide = results["split", deterministic], results["wide", deterministic]
        assert torch.equal(split[0], wide[0]) and torch.equal(split[2], wide[2])
        if deterministic:
            assert torch.equal(split[1], wide[1])
        else:
            assert rel_err(wide[1], split[1].double()) <= 1e-3
    again = bwd.sparse_attention_backward(dout, q, kv, out, lse, idx, D ** -0.5, 512, sink, lengths, True)
    assert all(torch.equal(a, b) for a, b in zip(again, results["wide", True]))


@needs_sm90
def test_bwd_one_compile_serves_all_shapes():
    config = bwd.BwdConfig(head_dim=576, d_v=512, deterministic=False)
    for T, H, S, K in [(3, 16, 300, 64), (5, 128, 4100, 1000), (1, 1, 65, 2)]:
        # no invalid or duplicate slots: the tiny case must keep two distinct keys (one key: see below)
        q, kv, idx, _, _, dout = make_inputs(T=T, H=H, D=576, S=S, K=K, seed=T * H, invalid=0.1 * (K > 2),
                                             dup=0.05 * (K > 2))
        if K == 2:
            idx = torch.tensor([[3, 40]], dtype=torch.int32, device="cuda")  # random ids may coincide
        check(q, kv, idx, 0.05, 512, None, None, dout)
        assert config in bwd._CACHE


@needs_sm90
def test_bwd_single_key_rows():
    """One valid key per row: P = 1, so dS = P (dP - Delta) and dq are 0 only by cancellation (dP = Delta =
    dout . v). The kernel's dP (wgmma, fp32) and Delta (torch, fp32) round differently, so dq is at the
    rounding level of the cancelled terms, not exactly 0: bound it by 1e-4 of their size."""
    T, H, S, K, scale = 6, 16, 65, 1, 0.05
    q, kv, idx, _, _, dout = make_inputs(T=T, H=H, D=576, S=S, K=K, seed=11, invalid=0.0, dup=0.0)
    out, lse, (ref_dq, ref_dkv, _) = forward_for(q, kv, idx, dout, scale, 512, None, None)
    assert ref_dq.norm() == 0                                      # the oracle cancels exactly in fp64
    dq, dkv, _ = bwd.sparse_attention_backward(dout, q, kv, out, lse, idx, scale, 512, None, None, False)
    assert_grad_close(dkv, ref_dkv, "dkv")
    key = kv[idx[:, 0].long()].double()                            # [T, D]
    delta = (out.double() * dout.double()).sum(-1)                 # [T, H]
    terms = scale * delta.abs()[..., None] * key.abs()[:, None, :]  # |dP| |k| per dq element
    assert (dq.double().abs() <= 1e-4 * terms + 1e-30).all(), (dq.double().abs() / terms).max().item()


@needs_sm90
def test_bwd_empty_inputs():
    q = torch.randn(4, 8, 576, device="cuda").to(torch.bfloat16)
    dout = torch.randn(4, 8, 512, device="cuda").to(torch.bfloat16)
    out = torch.zeros(4, 8, 512, device="cuda").to(torch.bfloat16)
    lse = torch.full((4, 8), float("inf"), device="cuda")
    kv = torch.randn(0, 576, device="cuda").to(torch.bfloat16)
    idx = torch.zeros(4, 16, dtype=torch.int32, device="cuda")
    sink = torch.randn(8, device="cuda")
    dq, dkv, d_sink = bwd.sparse_attention_backward(dout, q, kv, out, lse, idx, 0.1, 512, sink, None, False)
    assert (dq == 0).all() and dkv.shape == (0, 576) and (d_sink == 0).all()
    dq, dkv, d_sink = bwd.sparse_attention_backward(dout[:0], q[:0], kv, out[:0], lse[:0], idx[:0], 0.1, 512,
                                                    None, None, False)
    assert dq.shape == (0, 8, 576) and d_sink.shape == (8,)


@needs_sm90
@pytest.mark.parametrize("schedule", ["split", "wide"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_bwd_cuda_graph_replay_equals_eager(deterministic, schedule, monkeypatch):
    monkeypatch.setenv(bwd.ENV_SCHEDULE, schedule)
    T, H, D, S, K = 16, 64, 576, 4000, 2000
    q, kv, idx, sink, lengths, dout = make_inputs(T=T, H=H, D=D, S=S, K=K, seed=99, sink=True, topk_length=True)
    scale = D ** -0.5
    out, lse, _ = forward_for(q, kv, idx, dout, scale, 512, sink, lengths)
    bwd.warmup([bwd.BwdConfig(D, 512, deterministic, schedule=schedule)])   # no compile inside the capture
    args = lambda: (dout, q, kv, out, lse, idx, scale, 512, sink, lengths, deterministic)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                                      # warm up off the default stream
        bwd.sparse_attention_backward(*args())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_dq, g_dkv, g_dsink = bwd.sparse_attention_backward(*args())
    # New values in the captured buffers, then replay.
    q2, kv2, idx2, sink2, lengths2, dout2 = make_inputs(T=T, H=H, D=D, S=S, K=K, seed=100, sink=True,
                                                        topk_length=True)
    out2, lse2, (ref_dq, ref_dkv, _) = forward_for(q2, kv2, idx2, dout2, scale, 512, sink2, lengths2)
    for dst, src in [(q, q2), (kv, kv2), (idx, idx2), (sink, sink2), (lengths, lengths2), (dout, dout2),
                     (out, out2), (lse, lse2)]:
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    e_dq, e_dkv, e_dsink = bwd.sparse_attention_backward(*args())
    assert torch.equal(g_dq, e_dq) and torch.equal(g_dsink, e_dsink)
    if deterministic:
        assert torch.equal(g_dkv, e_dkv)
    else:                                                              # fp32 atomics: order may differ
        assert rel_err(g_dkv, e_dkv.double()) <= 1e-3
    assert_grad_close(g_dq, ref_dq, "dq")
    assert_grad_close(g_dkv, ref_dkv, "dkv")


@needs_sm90
def test_supports_on_sm90():
    q, kv, idx, sink, lengths, dout = make_inputs(T=2, H=64, D=576, S=100, K=64, seed=1)
    out = dout.clone()
    lse = torch.zeros(2, 64, device="cuda")
    assert bwd.supports(dout, q, kv, out, lse, idx, 0.1, 512, None, None, False)
    assert bwd.supports(dout, q, kv, out, lse, idx, 0.1, 512, sink, lengths, True)
    assert not bwd.supports(dout, q.float(), kv, out, lse, idx, 0.1, 512, None, None, False)
    assert not bwd.supports(dout, q, kv, out, lse, idx, 0.1, 256, None, None, False)
    big = torch.randn(2, 129, 576, device="cuda").to(torch.bfloat16)
    big_do = torch.randn(2, 129, 512, device="cuda").to(torch.bfloat16)
    assert not bwd.supports(big_do, big, kv, big_do, torch.zeros(2, 129, device="cuda"), idx, 0.1, 512,
                            None, None, False)
