"""CuTe-DSL SM90 sparse_attn_score (csrc_dsl/cute/sm90/sparse_attn_score*.py), not yet in the dispatch.

On any machine with nvidia-cutlass-dsl (no GPU needed): every shipped variant compiles for sm_90a from fake tensors,
fits shared memory, has no register spills, and its SASS has the expected wgmma, cp.async, shuffle and store counts.
On an SM90 GPU: against the fp32 reference (SPEC section 6, tolerance of section 9) with odd sizes, invalid and
duplicate ids, topk_length and lonely rows; bitwise identical over 10 runs; CUDA-graph replay equal to eager.
"""
import pytest
import torch

from csrc_dsl.cute import common
from csrc_dsl.cute.common import fake_compile
from csrc_dsl.cute.common.launch import sm90_unavailable_reason
from csrc_dsl.cute.sm90 import sparse_attn_score as score
from dsa_ops.reference import attention as ref_attention

needs_dsl = pytest.mark.skipif(not common.is_available(), reason=str(common.unavailable_reason()))
_GPU_REASON = sm90_unavailable_reason()
needs_sm90 = pytest.mark.skipif(_GPU_REASON is not None, reason=str(_GPU_REASON))


def test_supports_is_false_off_gpu():
    q = torch.zeros(2, 4, 576, dtype=torch.bfloat16)
    kv = torch.zeros(8, 576, dtype=torch.bfloat16)
    lse = torch.zeros(2, 4)
    assert not score.supports(q, kv, lse, torch.zeros(2, 3, dtype=torch.int32), 0.1)


def _config_id(config):
    return f"D{config.head_dim}-{'qreg' if config.q_in_registers else 'qsmem'}"


@needs_dsl
@pytest.mark.parametrize("config", score.shipped_configs(), ids=_config_id)
def test_score_compiles_for_sm90a_without_spills(config):
    ptx, cubin, smem_bytes = score.compile_for_inspection(config)
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx
    assert 0 < smem_bytes <= 232448                                     # SM90 opt-in limit per CTA
    resources = fake_compile.cubin_resources(cubin)
    assert 0 < resources.registers <= 168 and resources.stack_frame == 0
    report = fake_compile.ptxas_report(ptx)
    if report is not None:
        assert report.spill_stores == 0 and report.spill_loads == 0, report.text
    sass = fake_compile.sass(cubin)
    if sass is not None:
        ops = fake_compile.count_opcodes(sass, "HGMMA", "LDGSTS", "SHFL", "STG", "MUFU", "LDL", "STL")
        k_steps = config.head_dim // 16
        assert ops["HGMMA"] == 2 * k_steps                               # each consumer's S = Q K^T
        pieces = config.head_dim // 64                                   # 16-byte pieces per row per thread
        assert ops["LDGSTS"] == (128 // 16) * pieces + (config.block_n // 16) * pieces   # Q, then kv rows
        columns = config.block_n // 4                                    # S columns per thread
        assert ops["SHFL"] == 2 * 3 * columns                            # 3 butterfly steps per column
        assert ops["MUFU"] == 2 * 2 * columns                            # exp2 of 2 rows x columns per thread
        assert ops["STG"] == 1                                           # one store per key and tile
        assert ops["LDL"] == 0 and ops["STL"] == 0
        if config.q_in_registers:                                        # A from registers: R.., not gdesc
            assert all("gdesc" not in line.split("BF16")[1].split(",")[1]
                       for line in sass.splitlines() if "HGMMA" in line)


def make_inputs(T, H, D, S, K, *, seed, topk_length=True, invalid=0.1, dup=0.05):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(T, H, D, generator=g, device="cuda").to(torch.bfloat16)
    kv = torch.randn(S, D, generator=g, device="cuda").to(torch.bfloat16)
    idx = torch.randint(0, S, (T, K), generator=g, device="cuda", dtype=torch.int32)
    u = torch.rand(T, K, generator=g, device="cuda")
    idx = torch.where(u < invalid / 2, torch.full_like(idx, -1), idx)
    idx = torch.where((u >= invalid / 2) & (u < invalid), idx + S, idx)          # ids >= S
    if dup > 0 and K > 1:
        j = torch.randint(1, K, (max(1, int(dup * K)),), generator=g, device="cuda")
        idx[:, j] = idx[:, j - 1]
    if T > 1:
        idx[0] = -1                                                              # a lonely row
    lengths = torch.randint(0, K + 1, (T,), generator=g, device="cuda", dtype=torch.int32) if topk_length else None
    scale = D ** -0.5
    # a consistent lse: the log-sum-exp of each row's valid scores (fp32 reference forward)
    _, lse = ref_attention.sparse_attention(q.float(), kv.float(), idx, scale, 512, None, lengths)
    return q, kv, lse.float().contiguous(), idx, scale, lengths


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@needs_sm90
@pytest.mark.parametrize("q_in_registers", [True, False])
@pytest.mark.parametrize("D", [576, 512])
@pytest.mark.parametrize("H,K", [(1, 2000), (16, 128), (64, 2048), (100, 2000), (128, 2048), (128, 37)])
def test_score_matches_reference(H, K, D, q_in_registers):
    q, kv, lse, idx, scale, lengths = make_inputs(T=67, H=H, D=D, S=4099, K=K, seed=H * K + D)
    config = next(c for c in score.shipped_configs() if c.head_dim == D and c.q_in_registers == q_in_registers)
    got = score.sparse_attn_score(q, kv, lse, idx, scale, lengths, config=config)
    want = ref_attention.sparse_attn_score(q.float(), kv.float(), lse, idx, scale, lengths)
    assert got.shape == want.shape and got.dtype == torch.float32 and not got.isnan().any()
    assert rel_err(got, want) <= 2e-3, rel_err(got, want)
    invalid = (idx < 0) | (idx >= kv.shape[0])
    invalid |= torch.arange(K, device="cuda")[None, :] >= lengths[:, None]
    assert (got[invalid] == 0).all()


@needs_sm90
def test_score_deterministic_and_graph_replay():
    q, kv, lse, idx, scale, lengths = make_inputs(T=300, H=128, D=576, S=8192, K=2048, seed=5)
    first = score.sparse_attn_score(q, kv, lse, idx, scale, lengths)
    for _ in range(9):
        assert torch.equal(first, score.sparse_attn_score(q, kv, lse, idx, scale, lengths))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        score.sparse_attn_score(q, kv, lse, idx, scale, lengths)          # compiled before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = score.sparse_attn_score(q, kv, lse, idx, scale, lengths)
    q.copy_(torch.randn_like(q, dtype=torch.float32).to(q.dtype))
    graph.replay()
    assert torch.equal(captured, score.sparse_attn_score(q, kv, lse, idx, scale, lengths))
    assert not torch.equal(captured, first)
