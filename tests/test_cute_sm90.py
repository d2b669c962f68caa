"""CuTe-DSL SM90 kernels.

On any machine with nvidia-cutlass-dsl (no GPU needed): every shipped variant compiles for sm_90a from
fake tensors, with no register spills, and its SASS has HGMMA (wgmma) and LDGSTS (cp.async gathers).
On an SM90 GPU: the sparse attention forward against a naive fp64 oracle written here (SPEC section 4),
and CUDA-graph replay against eager.
"""
import dataclasses
import importlib
import types

import pytest
import torch

from csrc_dsl.cute import common
from csrc_dsl.cute.common.launch import sm90_unavailable_reason
from csrc_dsl.cute.common import availability, compile_cache, fake_compile
from csrc_dsl.cute.sm90 import sparse_attention_fwd as fwd

needs_dsl = pytest.mark.skipif(not common.is_available(), reason=str(common.unavailable_reason()))


_GPU_REASON = sm90_unavailable_reason()
needs_sm90 = pytest.mark.skipif(_GPU_REASON is not None, reason=str(_GPU_REASON))


# ======================================================================================================
# Availability and its message (CPU)
# ======================================================================================================
@pytest.fixture
def fresh_availability():
    availability.unavailable_reason.cache_clear()
    availability.launch_unavailable_reason.cache_clear()
    yield
    availability.unavailable_reason.cache_clear()
    availability.launch_unavailable_reason.cache_clear()


def test_is_available_agrees_with_import(fresh_availability):
    try:
        importlib.import_module("cutlass.cute")
        importable = True
    except Exception:
        importable = False
    assert common.is_available() is importable
    assert (common.unavailable_reason() is None) is importable


def test_missing_dsl_gives_install_message(monkeypatch, fresh_availability):
    real_import = importlib.import_module

    def import_without_cutlass(name, *args, **kwargs):
        if name == "cutlass" or name.startswith("cutlass."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(availability.importlib, "import_module", import_without_cutlass)
    message = "nvidia-cutlass-dsl is not installed: pip install nvidia-cutlass-dsl>=4.8"
    assert availability.is_available() is False
    assert availability.unavailable_reason() == message
    assert availability.launch_unavailable_reason() == message
    with pytest.raises(RuntimeError, match="pip install nvidia-cutlass-dsl>=4.8"):
        availability.require()
    # The dispatch predicate answers False rather than raising.
    q = torch.randn(2, 4, 576).to(torch.bfloat16)
    kv = torch.randn(8, 576).to(torch.bfloat16)
    idx = torch.zeros(2, 4, dtype=torch.int32)
    assert fwd.supports(q, kv, idx, 0.1, 512, None, None) is False


def test_too_old_dsl_is_reported(monkeypatch, fresh_availability):
    real_import = importlib.import_module
    old = types.SimpleNamespace(__version__="4.2.0")

    def import_old_cutlass(name, *args, **kwargs):
        if name == "cutlass":
            return old
        if name == "cutlass.cute":
            return types.SimpleNamespace()
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(availability.importlib, "import_module", import_old_cutlass)
    assert availability.is_available() is False
    assert "found 4.2.0" in availability.unavailable_reason()
    assert availability.unavailable_reason().startswith(availability.INSTALL_MESSAGE)


def test_supports_is_false_off_gpu():
    q = torch.randn(2, 4, 576).to(torch.bfloat16)
    kv = torch.randn(8, 576).to(torch.bfloat16)
    idx = torch.zeros(2, 4, dtype=torch.int32)
    assert fwd.supports(q, kv, idx, 0.1, 512, None, None) is False


# ======================================================================================================
# The compile cache (CPU; a stand-in compile function, so no DSL needed)
# ======================================================================================================
@dataclasses.dataclass(frozen=True)
class _ToyConfig:
    head_dim: int
    flag: bool = False


def test_cache_compiles_once_per_config_and_warms_up(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV_DISK_CACHE, "0")
    calls = []

    def compile_fn(config):
        calls.append(config)
        return ("compiled", config)

    cache = compile_cache.KernelCache("toy", _ToyConfig, compile_fn, [__file__])
    a, b = _ToyConfig(64), _ToyConfig(64, flag=True)
    assert cache.get(a) == ("compiled", a)
    assert cache.get(_ToyConfig(64)) is cache.get(a)       # equal configs share one entry
    assert calls == [a]
    assert compile_cache.warmup([a, b]) == 2               # warmup finds the cache from the config type
    assert calls == [a, b] and b in cache


def test_cache_rejects_non_static_keys():
    @dataclasses.dataclass(frozen=True)
    class WithTensor:
        x: object

    cache = compile_cache.KernelCache("toy2", WithTensor, lambda c: c, [__file__])
    with pytest.raises(TypeError, match="static scalar"):
        cache.get(WithTensor(torch.zeros(2)))
    with pytest.raises(TypeError, match="frozen dataclass"):
        compile_cache.check_static({"head_dim": 64})


def test_cache_disk_path_tracks_sources(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(compile_cache.ENV_DISK_CACHE, "1")
    source = tmp_path / "kernel_source.py"
    source.write_text("v1")
    if not common.is_available():
        pytest.skip(str(common.unavailable_reason()))  # the fingerprint includes the cutlass version
    first = compile_cache.KernelCache("toy3", _ToyConfig, lambda c: c, [source]).path_for(_ToyConfig(64))
    source.write_text("v2")
    second = compile_cache.KernelCache("toy3", _ToyConfig, lambda c: c, [source]).path_for(_ToyConfig(64))
    assert first.parent.parent.parent == tmp_path
    assert first != second                                  # an edited kernel never loads a stale binary
    assert first.name == second.name                        # same config, same file name


@needs_dsl
def test_disk_cache_round_trip(tmp_path, monkeypatch):
    """A compiled variant is exported to disk, and a fresh cache loads it instead of compiling."""
    pytest.importorskip("tvm_ffi")
    monkeypatch.setenv(compile_cache.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(compile_cache.ENV_DISK_CACHE, "1")
    config = fwd.FwdConfig(head_dim=512, d_v=512, has_sink=False, has_topk_length=False)
    sources = fwd._CACHE._source_files

    def must_not_compile(config):
        raise AssertionError("compiled although a disk copy exists")

    try:
        writer = compile_cache.KernelCache("fwd_roundtrip", fwd.FwdConfig, fwd.compile_kernel, sources)
        writer.get(config)
        path = writer.path_for(config)
        assert path.is_file() and path.stat().st_size > 0
        reader = compile_cache.KernelCache("fwd_roundtrip", fwd.FwdConfig, must_not_compile, sources)
        assert callable(reader.get(config))
    finally:
        compile_cache._CACHES[fwd.FwdConfig] = fwd._CACHE  # a KernelCache registers itself for its config type


def test_warm_cache_sets_cover_the_ops_and_the_device_phases():
    from csrc_dsl.cute.sm90 import sparse_attention_bwd as bwd
    from tools import warm_cute_cache

    shipped, device = warm_cute_cache.shipped_configs(), warm_cute_cache.device_configs()
    assert set(fwd.shipped_configs()) | set(bwd.shipped_configs()) <= set(shipped)
    assert set(shipped) <= set(device) and len(set(device)) == len(device)
    schedules = {(c.schedule, c.kv_halves, c.overlap_dkv, c.dkv_lines) for c in device
                 if isinstance(c, bwd.BwdConfig)}
    assert {("split", False, True, False), ("wide", False, False, True), ("wide", False, True, True),
            ("wide", False, False, False), ("wide", False, True, False), ("wide", True, False, True)} <= schedules
    for config in device:
        compile_cache.check_static(config)


@needs_dsl
def test_warm_cache_writes_objects_a_fresh_cache_loads(tmp_path, monkeypatch):
    """tools/warm_cute_cache.py compiles in spawned workers into the given folder; a fresh cache in this
    process then loads the object instead of compiling (what a lent GPU does with the carried folder)."""
    pytest.importorskip("tvm_ffi")
    from tools import warm_cute_cache

    config = fwd.FwdConfig(head_dim=512, d_v=512, has_sink=False, has_topk_length=False)
    monkeypatch.setattr(warm_cute_cache, "shipped_configs", lambda: [config])
    monkeypatch.setenv(compile_cache.ENV_DISK_CACHE, "1")
    monkeypatch.setenv(compile_cache.ENV_CACHE_DIR, str(tmp_path / "unused"))   # main() points it at --dir
    assert warm_cute_cache.main(["--dir", str(tmp_path / "cache"), "--set", "shipped", "--jobs", "1"]) == 0

    def must_not_compile(config):
        raise AssertionError("compiled although the warmed folder holds it")

    try:
        reader = compile_cache.KernelCache("sparse_attention_fwd_sm90", fwd.FwdConfig, must_not_compile,
                                           fwd._CACHE._source_files)
        assert reader.path_for(config).is_file()
        assert callable(reader.get(config))
    finally:
        compile_cache._CACHES[fwd.FwdConfig] = fwd._CACHE  # a KernelCache registers itself for its config type


# ======================================================================================================
# Every shipped variant compiles for sm_90a, without spills (CPU)
# ======================================================================================================
def _config_id(config):
    return f"D{config.head_dim}-dv{config.d_v}-sink{int(config.has_sink)}-topklen{int(config.has_topk_length)}"


@needs_dsl
@pytest.mark.parametrize("config", fwd.shipped_configs(), ids=_config_id)
def test_fwd_compiles_for_sm90a_without_spills(config):
    ptx, cubin = fwd.compile_for_inspection(config)
    assert ".target sm_90a" in ptx
    assert "wgmma.mma_async" in ptx and "cp.async.cg.shared.global" in ptx

    # The cubin the DSL built: 384 threads must fit the register file at launch, no local memory.
    resources = fake_compile.cubin_resources(cubin)
    assert 0 < resources.registers <= 168
    assert resources.stack_frame == 0

    report = fake_compile.ptxas_report(ptx)
    if report is not None:
        assert report.spill_stores == 0 and report.spill_loads == 0, report.text
        assert report.stack_frame == 0, report.text

    sass = fake_compile.sass(cubin)
    if sass is not None:
        ops = fake_compile.count_opcodes(sass, "HGMMA", "LDGSTS", "LDL", "STL", "USETMAXREG")
        s_steps, pv_steps = config.head_dim // 16, 64 // 16   # k-steps of S (over D) and of PV (over keys)
        pieces = (64 // 16) * (config.head_dim // 64)          # 16-byte cp.async per thread for 64 rows
        # Each consumer has its own code (consumer 0 issues its first S before the loop): S three times, P V
        # four times (own P from registers and the other's from smem, in each consumer). Q and each of the
        # two stages' halves are loaded by their own copies.
        assert ops["HGMMA"] == 3 * s_steps + 4 * pv_steps
        assert ops["LDGSTS"] == 3 * pieces
        assert ops["LDL"] == 0 and ops["STL"] == 0
        assert ops["USETMAXREG"] == 2                   # producer gives registers to the math warpgroups


def test_forward_variant_from_the_environment(monkeypatch):
    """DSA_OPS_CUTE_SPARSE_FWD_SCHEDULE picks the op's forward: a named variant; anything else is an error that
    names the choices (never a silent fallback to the default)."""
    monkeypatch.delenv(fwd.ENV_VARIANT, raising=False)
    assert fwd.selected_variant() == fwd.VARIANTS[fwd.DEFAULT_VARIANT]
    assert all(getattr(config, field) == value for config in fwd.shipped_configs()
               for field, value in fwd.VARIANTS[fwd.DEFAULT_VARIANT].items())
    for name, fields in fwd.VARIANTS.items():
        monkeypatch.setenv(fwd.ENV_VARIANT, name)
        assert fwd.selected_variant() == fields
    monkeypatch.setenv(fwd.ENV_VARIANT, "seesaw-no_l2_hints")
    assert fwd.FwdConfig(576, 512, False, False, **fwd.selected_variant()).l2_hints is False
    assert {c.l2_hints for c in fwd.shipped_configs()} == {False}
    # the two schedules removed in session 23 are errors now, as is any other name
    for bad in ("seesaw+no_such_flag", "split_keys", "alternate", "nope"):
        monkeypatch.setenv(fwd.ENV_VARIANT, bad)
        with pytest.raises(ValueError, match="seesaw-no_l2_hints"):
            fwd.selected_variant()


def test_fake_compile_parsers():
    """The parsers behind the spill check, on fixed inputs (so they can fail without a DSL)."""
    text = ("ptxas info    : Used 168 registers, used 4 barriers\n"
            "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n")
    assert fake_compile.count_opcodes(
        "        /*0010*/                   HGMMA.64x32x16.F32.BF16 R1, gdesc[UR4], RZ ;\n"
        "        /*0020*/              @!P0 LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;\n"
        "        /*0030*/                   STL [R1], R2 ;\n", "HGMMA", "LDGSTS", "STL", "LDL"
    ) == {"HGMMA": 1, "LDGSTS": 1, "STL": 1, "LDL": 0}
    entries = list(fake_compile._nv_info_entries(bytes([0x04, 0x2F, 8, 0]) + (6).to_bytes(4, "little")
                                                 + (168).to_bytes(4, "little") + bytes([0x03, 0x1B, 0xFF, 0])))
    assert entries[0] == (0x2F, (6).to_bytes(4, "little") + (168).to_bytes(4, "little"))
    assert entries[1][0] == 0x1B
    assert "Used 168 registers" in text


# ======================================================================================================
# Correctness on an SM90 GPU against a naive fp64 oracle
# ======================================================================================================
def oracle(q, kv, indices, scale, d_v, sink=None, topk_length=None):
    """SPEC section 4, one token at a time, in fp64."""
    T, H, _ = q.shape
    S, K = kv.shape[0], indices.shape[1]
    out = torch.zeros(T, H, d_v, dtype=torch.float64, device=q.device)
    lse = torch.full((T, H), float("inf"), dtype=torch.float64, device=q.device)
    for t in range(T):
        ids = indices[t].long()
        valid = (ids >= 0) & (ids < S)
        if topk_length is not None:
            valid &= torch.arange(K, device=q.device) < int(topk_length[t])
        ids = ids[valid]
        if ids.numel() == 0:
            continue                       # lonely row: out 0, lse +inf
        keys = kv[ids].double()            # duplicates stay: each slot counts
        s = scale * q[t].double() @ keys.T
        row_lse = torch.logsumexp(s, dim=1)
        denom = row_lse if sink is None else torch.logaddexp(row_lse, sink.double())
        out[t] = torch.exp(s - denom[:, None]) @ keys[:, :d_v]
        lse[t] = row_lse
    return out, lse


def make_inputs(T, H, D, S, K, *, seed, sink=False, topk_length=False, invalid=0.1, dup=0.05):
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
    return q, kv, indices, attn_sink, lengths


def poison_allocator(*shapes_dtypes):
    """Leave NaN-filled blocks of exactly these sizes in torch's caching allocator, so that outputs the
    kernel allocates next start as NaN: an element it forgets to write fails the comparison."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in shapes_dtypes]
    del blocks


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(q, kv, indices, scale, d_v, attn_sink, topk_length):
    T, H, _ = q.shape
    poison_allocator(((T, H, d_v), torch.bfloat16), ((T, H), torch.float32))
    out, lse = fwd.sparse_attention(q, kv, indices, scale, d_v, attn_sink, topk_length)
    torch.cuda.synchronize()
    ref_out, ref_lse = oracle(q, kv, indices, scale, d_v, attn_sink, topk_length)
    assert out.shape == (T, H, d_v) and out.dtype == torch.bfloat16
    assert lse.shape == (T, H) and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    lonely = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), lonely)                    # +inf exactly on lonely rows
    assert (lse[lonely] > 0).all() and (out[lonely] == 0).all()
    assert rel_err(out, ref_out) <= 1e-2
    if (~lonely).any():
        assert rel_err(lse[~lonely], ref_lse[~lonely]) <= 1e-2
        assert torch.allclose(lse[~lonely].double(), ref_lse[~lonely], atol=2e-3, rtol=1e-3)
    return out, lse


@needs_sm90
@pytest.mark.parametrize("D", [576, 512])
@pytest.mark.parametrize("H", [1, 3, 16, 64, 100, 128])
def test_fwd_matches_oracle_heads(H, D):
    q, kv, idx, sink, lengths = make_inputs(T=6, H=H, D=D, S=3001, K=2048, seed=H * 7 + D,
                                            sink=H % 2 == 0, topk_length=H >= 64)
    check(q, kv, idx, D ** -0.5, 512, sink, lengths)


@needs_sm90
@pytest.mark.parametrize("K", [128, 2000, 2048])
@pytest.mark.parametrize("sink,topk_length", [(False, False), (True, True), (True, False), (False, True)])
def test_fwd_matches_oracle_topk(K, sink, topk_length):
    q, kv, idx, attn_sink, lengths = make_inputs(T=8, H=64, D=576, S=5000, K=K, seed=K + 3 * sink + topk_length,
                                                 sink=sink, topk_length=topk_length)
    check(q, kv, idx, 576 ** -0.5, 512, attn_sink, lengths)


@needs_sm90
@pytest.mark.parametrize("sink", [False, True])
def test_fwd_lonely_rows(sink):
    """Rows with no valid key: all ids -1, all ids >= S, topk_length 0, and valid ids hidden by topk_length."""
    T, H, D, S, K = 5, 128, 576, 700, 130
    q, kv, idx, attn_sink, _ = make_inputs(T=T, H=H, D=D, S=S, K=K, seed=11, sink=sink)
    idx[0] = -1
    idx[1] = S + torch.arange(K, device="cuda", dtype=torch.int32)
    lengths = torch.full((T,), K, dtype=torch.int32, device="cuda")
    lengths[2] = 0
    idx[3] = -1
    idx[3, 10:20] = 5                                  # row 3's only real ids sit past its topk_length
    lengths[3] = 10
    out, lse = check(q, kv, idx, D ** -0.5, 512, attn_sink, lengths)
    assert torch.isinf(lse[:4]).all() and (out[:4] == 0).all()
    assert torch.isfinite(lse[4]).all()


@needs_sm90
def test_fwd_all_duplicates_and_single_key():
    """Every slot names the same row (softmax over K equal scores), and a row with exactly one valid key."""
    T, H, D, S, K = 3, 16, 512, 50, 300
    q, kv, idx, _, _ = make_inputs(T=T, H=H, D=D, S=S, K=K, seed=5, invalid=0.0, dup=0.0)
    idx[0] = 7
    idx[1] = -1
    idx[1, 123] = 42
    out, lse = check(q, kv, idx, D ** -0.5, 512, None, None)
    torch.testing.assert_close(out[1].float(), kv[42, :512].float().expand(H, -1), atol=0, rtol=0)


@needs_sm90
def test_fwd_one_compile_serves_all_shapes():
    """T, H, S and K are runtime values: new sizes reuse the compiled variant."""
    config = fwd.FwdConfig(head_dim=576, d_v=512, has_sink=False, has_topk_length=False,
                           **fwd.selected_variant())
    for T, H, S, K in [(3, 16, 300, 64), (9, 128, 4100, 1000), (1, 1, 65, 1)]:
        q, kv, idx, _, _ = make_inputs(T=T, H=H, D=576, S=S, K=K, seed=T * H)
        check(q, kv, idx, 0.05, 512, None, None)
        assert config in fwd._CACHE
    assert sum(1 for c in fwd.shipped_configs() if c in fwd._CACHE) >= 1


@needs_sm90
def test_fwd_empty_inputs():
    q = torch.randn(4, 8, 576, device="cuda").to(torch.bfloat16)
    kv = torch.randn(0, 576, device="cuda").to(torch.bfloat16)
    idx = torch.zeros(4, 16, dtype=torch.int32, device="cuda")
    out, lse = fwd.sparse_attention(q, kv, idx, 0.1, 512, None, None)
    assert (out == 0).all() and torch.isinf(lse).all() and (lse > 0).all()
    out, lse = fwd.sparse_attention(q[:0], kv, idx[:0], 0.1, 512, None, None)
    assert out.shape == (0, 8, 512) and lse.shape == (0, 8)


@needs_sm90
def test_fwd_cuda_graph_replay_equals_eager():
    q, kv, idx, sink, lengths = make_inputs(T=16, H=64, D=576, S=4000, K=2000, seed=99, sink=True, topk_length=True)
    scale = 576 ** -0.5
    fwd.warmup([fwd.FwdConfig(576, 512, True, True, **fwd.selected_variant())])  # no compile in capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                            # warm the allocator off the default stream
        fwd.sparse_attention(q, kv, idx, scale, 512, sink, lengths)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = fwd.sparse_attention(q, kv, idx, scale, 512, sink, lengths)
    # New values in the captured buffers, then replay.
    q2, kv2, idx2, sink2, lengths2 = make_inputs(T=16, H=64, D=576, S=4000, K=2000, seed=100, sink=True,
                                                 topk_length=True)
    for dst, src in [(q, q2), (kv, kv2), (idx, idx2), (sink, sink2), (lengths, lengths2)]:
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    e_out, e_lse = fwd.sparse_attention(q, kv, idx, scale, 512, sink, lengths)
    assert torch.equal(g_out, e_out) and torch.equal(g_lse, e_lse)
    ref_out, _ = oracle(q, kv, idx, scale, 512, sink, lengths)
    assert rel_err(g_out, ref_out) <= 1e-2


@needs_sm90
@pytest.mark.parametrize("D", [576, 512])
@pytest.mark.parametrize("variant", list(fwd.VARIANTS))
def test_fwd_each_variant_matches_oracle(variant, D):
    """Every named variant (seesaw with its plain, unhinted gather among them), on rows with 0, 1, 2, 3 and many
    tiles (odd and even counts)."""
    T, H, K = 10, 128, 1000
    q, kv, idx, sink, lengths = make_inputs(T=T, H=H, D=D, S=3000, K=K, seed=21 + D, sink=True,
                                            topk_length=True)
    lengths[:8] = torch.tensor([0, 1, 64, 65, 128, 129, 999, 1000], dtype=torch.int32)
    launch_variant_vs_oracle(fwd.FwdConfig(D, 512, has_sink=True, has_topk_length=True, **fwd.VARIANTS[variant]),
                             q, kv, idx, sink, lengths)


def launch_variant_vs_oracle(config, q, kv, idx, sink, lengths, max_ctas=None):
    """Launch one compiled variant into NaN-poisoned outputs and check them against the fp64 oracle."""
    (T, H, _), scale = q.shape, q.shape[2] ** -0.5
    out = torch.full((T, H, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
    lse = torch.full((T, H), float("nan"), dtype=torch.float32, device="cuda")
    fwd._launch(config, q, kv, idx, out, lse, scale, sink, lengths, max_ctas=max_ctas)
    ref_out, ref_lse = oracle(q, kv, idx, scale, 512, sink, lengths)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert rel_err(out, ref_out) <= 1e-2
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=2e-3, rtol=1e-3)
    return out, lse


def compile_without_local_memory(config):
    """Compile one variant for sm_90a on the CPU, check that it has no stack frame and spills nothing; its SASS
    (None without nvdisasm)."""
    ptx, cubin = fwd.compile_for_inspection(config)
    assert fake_compile.cubin_resources(cubin).stack_frame == 0
    report = fake_compile.ptxas_report(ptx)
    if report is not None:
        assert report.spill_stores == 0 and report.spill_loads == 0, report.text
    return fake_compile.sass(cubin)


@needs_dsl
@pytest.mark.parametrize("variant", [v for v in fwd.VARIANTS if v != fwd.DEFAULT_VARIANT])
def test_fwd_variants_compile_without_spills(variant):
    """The named variants that are not the op's default still compile for sm_90a with no local memory."""
    for head_dim in fwd.SUPPORTED_HEAD_DIMS:
        config = fwd.FwdConfig(head_dim, 512, True, True, **fwd.VARIANTS[variant])
        sass = compile_without_local_memory(config)
        if sass is not None:
            if config.persistent or config.direct_store:
                # O leaves from registers: 16 16-byte stores per consumer thread, in each consumer's code
                assert fake_compile.count_opcodes(sass, "STG.E.128")["STG.E.128"] == 2 * 16


@needs_sm90
@pytest.mark.parametrize("variant", ["seesaw+persistent", "seesaw+persistent_dynamic+hoisted_addresses"])
@pytest.mark.parametrize("max_ctas", [1, 7])
@pytest.mark.parametrize("H", [17, 128])
def test_fwd_persistent_many_items_per_cta(max_ctas, H, variant):
    """The persistent grid with fewer CTAs than items: each CTA runs many (token, head block) items in turn, the
    barrier phases carried across them, including items with no tile (topk_length 0) next to full ones."""
    T, D, K = 13, 576, 700
    q, kv, idx, sink, lengths = make_inputs(T=T, H=H, D=D, S=2500, K=K, seed=40 + H + max_ctas, sink=True,
                                            topk_length=True)
    lengths[:9] = torch.tensor([0, 0, 1, 64, 0, 129, 700, 0, 640], dtype=torch.int32)
    config = fwd.FwdConfig(D, 512, has_sink=True, has_topk_length=True, **fwd.VARIANTS[variant])
    out, lse = launch_variant_vs_oracle(config, q, kv, idx, sink, lengths, max_ctas=max_ctas)
    # the same result whatever the grid: each item is computed the same way on any CTA
    out_full = torch.empty_like(out)
    lse_full = torch.empty_like(lse)
    fwd._launch(config, q, kv, idx, out_full, lse_full, D ** -0.5, sink, lengths)
    assert torch.equal(out, out_full) and torch.equal(lse, lse_full)


@needs_sm90
def test_fwd_is_deterministic():
    q, kv, idx, sink, lengths = make_inputs(T=8, H=128, D=576, S=2000, K=512, seed=3, sink=True, topk_length=True)
    a = fwd.sparse_attention(q, kv, idx, 0.04, 512, sink, lengths)
    b = fwd.sparse_attention(q, kv, idx, 0.04, 512, sink, lengths)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_sm90
def test_supports_on_sm90():
    q, kv, idx, sink, lengths = make_inputs(T=2, H=64, D=576, S=100, K=64, seed=1)
    assert fwd.supports(q, kv, idx, 0.1, 512, None, None)
    assert not fwd.supports(q.float(), kv, idx, 0.1, 512, None, None)
    assert not fwd.supports(q, kv, idx, 0.1, 256, None, None)
    big = torch.randn(2, 129, 576, device="cuda").to(torch.bfloat16)
    assert not fwd.supports(big, kv, idx, 0.1, 512, None, None)
