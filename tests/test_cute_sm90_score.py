"""CuTe-DSL SM90 sparse_attn_score and dense_attn_score (csrc_dsl/cute/sm90/sparse_attn_score*.py), the SM90 rows
of both ops in the dispatch.

On any machine with nvidia-cutlass-dsl (no GPU needed): every shipped variant compiles for sm_90a from fake tensors,
fits shared memory, has no register spills, and its SASS has the expected wgmma, cp.async, shuffle and store counts.
On an SM90 GPU: against the fp32 reference (SPEC section 6, tolerance of section 9) with odd sizes, invalid and
duplicate ids, topk_length and lonely rows (dense: several batches, ratio 1 and 4, q_start, rows that see no key);
bitwise identical over 10 runs; CUDA-graph replay equal to eager; the ops dispatch to it.
"""
import pytest
import torch

from csrc_dsl.cute import common
from csrc_dsl.cute.common import fake_compile
from csrc_dsl.cute.common.launch import sm90_unavailable_reason
from csrc_dsl.cute.sm90 import sparse_attn_score as score
from dsa_ops.reference import attention as ref_attention
from dsa_ops.testing import rel_err

needs_dsl = pytest.mark.skipif(not common.is_available(), reason=str(common.unavailable_reason()))
_GPU_REASON = sm90_unavailable_reason()
needs_sm90 = pytest.mark.skipif(_GPU_REASON is not None, reason=str(_GPU_REASON))


def test_supports_is_false_off_gpu():
    q = torch.zeros(2, 4, 576, dtype=torch.bfloat16)
    kv = torch.zeros(8, 576, dtype=torch.bfloat16)
    lse = torch.zeros(2, 4)
    assert not score.supports(q, kv, lse, torch.zeros(2, 3, dtype=torch.int32), 0.1)


def _config_id(config):
    return (f"D{config.head_dim}-{'qreg' if config.q_in_registers else 'qsmem'}"
            f"{'-alt' if config.alternate_tiles else ''}{'-dense' if config.dense else ''}")


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
        assert ops["STG"] == (2 if config.alternate_tiles else 1)        # per key and tile (alternate: per consumer)
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


_HEADS_K = [(1, 2000), (16, 128), (64, 2048), (100, 2000), (128, 2048), (128, 37)]


@needs_sm90
@pytest.mark.parametrize("D", [576, 512])
@pytest.mark.parametrize("H,K,layout", [(H, K, layout) for layout in ("qreg", "qsmem", "qreg-alt")
                                        for H, K in _HEADS_K if layout != "qreg-alt" or H <= 64])  # alt: H <= 64
def test_score_matches_reference(H, K, D, layout):
    q, kv, lse, idx, scale, lengths = make_inputs(T=67, H=H, D=D, S=4099, K=K, seed=H * K + D)
    config = next(c for c in score.shipped_configs() if _config_id(c) == f"D{D}-{layout}")
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


@needs_sm90
@pytest.mark.parametrize("D", [576, 512])
@pytest.mark.parametrize("B,Sq,Sk,H,ratio,with_start", [(2, 67, 67, 128, 1, False), (3, 45, 130, 16, 1, True),
                                                       (2, 70, 33, 100, 4, True), (1, 200, 61, 1, 4, False),
                                                       (2, 50, 200, 64, 1, True)])
def test_dense_score_matches_reference(B, Sq, Sk, H, ratio, with_start, D):
    g = torch.Generator(device="cuda").manual_seed(B * Sq + Sk + D)
    q = torch.randn(B, Sq, H, D, generator=g, device="cuda").to(torch.bfloat16)
    kv = torch.randn(B, Sk, D, generator=g, device="cuda").to(torch.bfloat16)
    # q_start: one batch whose first rows see no key (position + 1 < ratio), one past the keys
    q_start = torch.tensor([-3, Sk * ratio - Sq, 5][:B], device="cuda") if with_start else None
    assert score.launch_config(D, H, dense=True).alternate_tiles == (H <= 64)
    scale = D ** -0.5
    # a consistent lse: the dense forward's log-sum-exp over visible keys (+inf where none is visible)
    mask = ref_attention.visible_mask(Sq, Sk, ratio, q_start, device="cuda")
    logits = scale * torch.einsum("bqhd,bkd->bqhk", q.float(), kv.float())
    lse = logits.masked_fill(~mask[:, :, None, :], float("-inf")).logsumexp(-1)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).contiguous()
    assert score.supports_dense(q, kv, lse, scale, ratio, q_start)
    got, l1 = score.dense_attn_score(q, kv, lse, scale, ratio, q_start)
    want, want_l1 = ref_attention.dense_attn_score(q.float(), kv.float(), lse, scale, ratio, q_start)
    assert got.shape == want.shape and not got.isnan().any() and not l1.isnan().any()
    assert rel_err(got, want) <= 2e-3 and rel_err(l1, want_l1) <= 2e-3, (rel_err(got, want), rel_err(l1, want_l1))
    assert (got[~mask.expand_as(got)] == 0).all()


@needs_sm90
def test_ops_dispatch_to_the_cute_kernel():
    from dsa_ops import dispatch

    q, kv, lse, idx, scale, lengths = make_inputs(T=5, H=128, D=576, S=300, K=64, seed=3)
    impl, _ = dispatch.choose("sparse_attn_score", (q, kv, lse, idx, scale, lengths))
    assert impl.backend == "cute-sm90"
    dense_args = (q[None], kv[None, :5], lse[None], scale, 1, None)
    impl, _ = dispatch.choose("dense_attn_score", dense_args)
    assert impl.backend == "cute-sm90"


@needs_sm90
@pytest.mark.parametrize("op", ["sparse_attn_score", "dense_attn_score"])
def test_ops_on_the_cute_kernel_pass_opcheck_and_graph_replay(op):
    """The torch.ops.dsa entry points while they dispatch to this kernel: opcheck (schema, fake vs real, AOT
    dispatch) and a CUDA graph replayed on new inputs equal to eager."""
    from dsa_ops import dispatch
    from dsa_ops.testing import Shape, sample_args

    shape = Shape(B=2, Sq=37, Sk=70, H=20, D=576, K=48, ratio=4 if op == "dense_attn_score" else 1)
    args = sample_args(op, device="cuda", dtype=torch.bfloat16, shape=shape)
    assert dispatch.choose(op, args)[0].backend == "cute-sm90"
    fn = getattr(torch.ops.dsa, op)
    torch.library.opcheck(fn.default, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    eager = fn(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(*args)
    q = args[0]
    q.copy_(torch.randn_like(q, dtype=torch.float32).to(q.dtype))
    graph.replay()
    want = fn(*args)
    for c, w, e in zip(*(t if isinstance(t, tuple) else (t,) for t in (captured, want, eager))):
        assert torch.equal(c, w) and not torch.equal(c, e)
