"""Triton indexer KL-loss kernels (csrc_dsl/triton/indexer_loss.py) against the references
(dsa_ops/reference/loss.py), SPEC section 6 math and section 9 tolerances.

Without CUDA the kernels run in the Triton interpreter on tiny odd shapes with fp16/fp32 inputs (the
interpreter's bf16 dot is wrong on CPU) and 16-wide tiles, so every loop runs over several tiles. With CUDA the
same checks run, plus DeepSeek-size bf16 checks and bitwise determinism.
"""

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

from csrc_dsl.triton import indexer_loss as kernels  # noqa: E402
from dsa_ops.reference import loss as ref  # noqa: E402
from dsa_ops.reference._common import valid_slots  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="DeepSeek-size checks need CUDA")

LOSS_RTOL = 2e-3   # SPEC section 9: fp32-accumulating outputs
GRAD_RTOL = 2e-2   # SPEC section 9: gradients
GRAD_COS = 0.999


# ----------------------------------------------------------------------------------------------------
# fixtures and comparison helpers
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles (the tl.dot minimum), so tiny shapes still span several tiles, and short row ranges of the
    dense dk kernel, so its partial sums over several ranges are exercised."""
    monkeypatch.setattr(kernels, "_BLOCK_SLOTS", 16)
    monkeypatch.setattr(kernels, "_BLOCK_KEYS", 16)
    monkeypatch.setattr(kernels, "_DENSE_DK_MIN_ROWS", 8)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Outputs the kernels must fully write start as NaN (floats) or a huge sentinel (ints)."""
    def poisoned_empty(shape, dtype, device):
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.fill_(float("nan") if dtype.is_floating_point else 1 << 20)
    monkeypatch.setattr(kernels, "_empty", poisoned_empty)


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def rel_err(out, expected):
    out, expected = out.double(), expected.double()
    return ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def cosine(out, expected):
    out, expected = out.double().flatten(), expected.double().flatten()
    return (out @ expected / (out.norm() * expected.norm()).clamp_min(1e-30)).item()


def assert_loss_close(loss, expected):
    assert loss.shape == () and loss.dtype == torch.float32
    assert torch.isfinite(loss), "NaN/inf loss"
    assert rel_err(loss, expected) <= LOSS_RTOL, (loss.item(), expected.item())


def assert_rows_close(name, out, expected, n_rows):
    """Per query row (dq, dw) or key row (dk): a bug confined to a few rows (one tile edge, one missing
    contribution) hides inside a global norm. Each row must meet GRAD_RTOL of its own norm, with a floor of 1%
    of the RMS row norm for rows whose terms cancel."""
    out = out.double().reshape(n_rows, -1)
    expected = expected.double().reshape(n_rows, -1)
    row_err = (out - expected).norm(dim=1)
    row_norm = expected.norm(dim=1)
    bound = GRAD_RTOL * row_norm + 1e-2 * row_norm.pow(2).mean().sqrt()
    worst = int((row_err - bound).argmax())
    assert (row_err <= bound).all(), (name, worst, row_err[worst].item(), row_norm[worst].item())


def assert_grads_close(grads, expected, inputs):
    for name, grad, ref_grad, x in zip(("dq_idx", "dk_idx", "dw"), grads, expected, inputs):
        assert grad.shape == x.shape and grad.dtype == x.dtype, name
        assert not torch.isnan(grad).any(), f"NaN (or an unwritten element) in {name}"
        assert ref_grad.norm() > 0, f"degenerate test: reference {name} is 0"
        assert rel_err(grad, ref_grad) <= GRAD_RTOL, (name, rel_err(grad, ref_grad))
        assert cosine(grad, ref_grad) >= GRAD_COS, (name, cosine(grad, ref_grad))
        assert_rows_close(name, grad, ref_grad, x.shape[0] * x.shape[1])


# ----------------------------------------------------------------------------------------------------
# input builders
# ----------------------------------------------------------------------------------------------------

def _randn(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEV, dtype=dtype)


def sparse_inputs(seed, B, Sq, Sk, HI, DI, K, dtype, use_len=True, empty_rows=(), logit_scale=1.0,
                  zero_targets=False):
    """Random sparse-loss inputs. Ids drawn from [-2, Sk + 2) give -1/-2, out-of-range ids and duplicates;
    empty_rows (b, t) get only invalid slots. Targets are normalised over the valid slots and NaN on the
    invalid ones (the kernels must never read them)."""
    gen = torch.Generator().manual_seed(seed)
    q_idx = _randn(gen, B, Sq, HI, DI, dtype=dtype)
    k_idx = _randn(gen, B, Sk, DI, dtype=dtype)
    w = _randn(gen, B, Sq, HI, dtype=torch.float32, scale=logit_scale)
    indices = torch.randint(-2, Sk + 2, (B, Sq, K), generator=gen, dtype=torch.int32)
    topk_length = torch.randint(0, K + 1, (B, Sq), generator=gen, dtype=torch.int32) if use_len else None
    for b, t in empty_rows:
        indices[b, t] = -1
    valid = valid_slots(indices, Sk, topk_length)
    raw = torch.rand(B, Sq, K, generator=gen) + 0.05
    if zero_targets:  # exact zeros on some valid slots: clip(log 0) = -100 and g's e^-100 floor
        raw = torch.where(torch.rand(B, Sq, K, generator=gen) < 0.3, 0.0, raw)
    raw = torch.where(valid, raw, 0.0)
    target = torch.where(valid, raw / raw.sum(-1, keepdim=True).clamp_min(1e-30), float("nan"))
    to_dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return q_idx, k_idx, w, to_dev(indices), to_dev(target), to_dev(topk_length)


def dense_inputs(seed, B, Sq, Sk, HI, DI, ratio, q_start, dtype, logit_scale=1.0):
    """Random dense-loss inputs: attention scores positive on visible keys, NaN on hidden ones (never read),
    l1 their row sums (0 for rows that see nothing)."""
    gen = torch.Generator().manual_seed(seed)
    q_idx = _randn(gen, B, Sq, HI, DI, dtype=dtype)
    k_idx = _randn(gen, B, Sk, DI, dtype=dtype)
    w = _randn(gen, B, Sq, HI, dtype=torch.float32, scale=logit_scale)
    starts = [Sk * ratio - Sq] * B if q_start is None else list(q_start)
    positions = torch.tensor(starts)[:, None] + torch.arange(Sq)[None, :]
    n_visible = ((positions + 1).clamp_min(0) // ratio).clamp_max(Sk)
    visible = torch.arange(Sk)[None, None, :] < n_visible[:, :, None]
    scores = torch.where(visible, torch.rand(B, Sq, Sk, generator=gen) + 0.05, 0.0)
    l1 = scores.sum(-1)
    scores = torch.where(visible, scores, float("nan"))
    q_start_t = None if q_start is None else torch.tensor(q_start, dtype=torch.int32, device=DEV)
    return q_idx, k_idx, w, scores.to(DEV), l1.to(DEV), q_start_t


def _grad_loss():
    return torch.tensor(0.7, dtype=torch.float32, device=DEV)


# ----------------------------------------------------------------------------------------------------
# sparse loss (interpreter-size shapes)
# ----------------------------------------------------------------------------------------------------

# (B, Sq, Sk, HI, DI, K, dtype, use_len, scale, empty_rows)
SPARSE_CASES = [
    (1, 7, 19, 1, 16, 13, torch.float32, True, 1.0, ((0, 2),)),
    (2, 9, 30, 3, 32, 37, torch.float16, True, 0.5, ((1, 0), (1, 8))),
    (2, 5, 40, 16, 16, 21, torch.float32, False, 0.7, ((0, 4),)),
    (1, 6, 25, 3, 16, 37, torch.float32, True, -0.6, ()),  # negative scale: relu(scale * q.k)
]


def _sparse_case_id(case):
    B, Sq, Sk, HI, DI, K, dtype, use_len, scale, _ = case
    return f"B{B}-Sq{Sq}-Sk{Sk}-H{HI}-D{DI}-K{K}-{str(dtype)[6:]}-len{int(use_len)}-s{scale}"


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("case", SPARSE_CASES, ids=_sparse_case_id)
def test_sparse_loss_forward(case):
    B, Sq, Sk, HI, DI, K, dtype, use_len, scale, empty_rows = case
    q, k, w, idx, target, length = sparse_inputs(1, B, Sq, Sk, HI, DI, K, dtype, use_len, empty_rows)
    loss = kernels.indexer_loss(q, k, w, idx, target, scale, 1.3, length)
    assert_loss_close(loss, ref.indexer_loss(q, k, w, idx, target, scale, 1.3, length))


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("case", SPARSE_CASES, ids=_sparse_case_id)
def test_sparse_loss_backward(case, deterministic):
    B, Sq, Sk, HI, DI, K, dtype, use_len, scale, empty_rows = case
    q, k, w, idx, target, length = sparse_inputs(2, B, Sq, Sk, HI, DI, K, dtype, use_len, empty_rows)
    with deterministic_mode(deterministic):
        grads = kernels.indexer_loss_backward(_grad_loss(), q, k, w, idx, target, scale, 1.3, length)
    expected = ref.indexer_loss_backward(_grad_loss(), q, k, w, idx, target, scale, 1.3, length)
    assert_grads_close(grads, expected, (q, k, w))


@pytest.mark.usefixtures("small_tiles")
def test_sparse_loss_clipping():
    """Logits spread over hundreds of nats (log predict < -100 on many slots) and exact-zero targets: the
    clip of both logs in the loss, and the e^-100 floor and 1[predict >= e^-100] in the gradient."""
    q, k, w, idx, target, length = sparse_inputs(3, 2, 6, 31, 3, 16, 29, torch.float32, logit_scale=6.0,
                                                 zero_targets=True)
    scale = 3.0
    logits = ref.gather_indexer_logits(q, k, w, idx, scale, length)
    valid = torch.isfinite(logits)
    log_predict = logits - torch.logsumexp(logits, -1, keepdim=True)
    assert (log_predict[valid] < -100).sum() >= 10, "test inputs do not reach the clip"
    assert ((target == 0) & valid).any()

    loss = kernels.indexer_loss(q, k, w, idx, target, scale, 0.9, length)
    assert_loss_close(loss, ref.indexer_loss(q, k, w, idx, target, scale, 0.9, length))
    grads = kernels.indexer_loss_backward(_grad_loss(), q, k, w, idx, target, scale, 0.9, length)
    expected = ref.indexer_loss_backward(_grad_loss(), q, k, w, idx, target, scale, 0.9, length)
    assert_grads_close(grads, expected, (q, k, w))


def test_sparse_loss_no_valid_slot():
    """R = 0: the loss is exactly 0 and every gradient exactly 0 (no 0/0)."""
    q, k, w, idx, target, length = sparse_inputs(4, 1, 5, 12, 3, 16, 17, torch.float32)
    idx = torch.where(torch.arange(17, device=DEV) % 2 == 0, -1, 12 + idx.abs()).to(torch.int32)
    target = torch.full_like(target, float("nan"))
    assert kernels.indexer_loss(q, k, w, idx, target, 1.0, 1.0, length).item() == 0.0
    for grad in kernels.indexer_loss_backward(_grad_loss(), q, k, w, idx, target, 1.0, 1.0, length):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.usefixtures("small_tiles")
def test_sparse_loss_backward_deterministic_chunks(monkeypatch):
    """The deterministic dk path walks rows in chunks of the per-slot buffer: 2 rows per chunk here."""
    B, Sq, Sk, HI, DI, K = 2, 5, 23, 3, 16, 19
    monkeypatch.setattr(kernels, "_DETERMINISTIC_CHUNK_BYTES", 2 * K * DI * 4)
    q, k, w, idx, target, length = sparse_inputs(5, B, Sq, Sk, HI, DI, K, torch.float32, empty_rows=((0, 1),))
    with deterministic_mode(True):
        grads = kernels.indexer_loss_backward(_grad_loss(), q, k, w, idx, target, 0.8, 1.0, length)
    expected = ref.indexer_loss_backward(_grad_loss(), q, k, w, idx, target, 0.8, 1.0, length)
    assert_grads_close(grads, expected, (q, k, w))


def test_fp64_is_left_to_the_reference():
    q, k, w, idx, target, length = sparse_inputs(6, 1, 2, 8, 1, 16, 5, torch.float64)
    with pytest.raises(TypeError):
        kernels.indexer_loss(q, k, w.double(), idx, target.double(), 1.0, 1.0, length)


# ----------------------------------------------------------------------------------------------------
# dense loss (interpreter-size shapes)
# ----------------------------------------------------------------------------------------------------

# (B, Sq, Sk, HI, DI, ratio, q_start, dtype, scale)
DENSE_CASES = [
    (1, 17, 17, 1, 16, 1, None, torch.float32, 1.0),
    (2, 20, 33, 3, 32, 1, (13, -5), torch.float16, 0.5),      # batch 1: rows 0..4 see no key
    (2, 37, 11, 16, 16, 4, None, torch.float32, 0.7),
    (1, 29, 9, 3, 16, 4, (-3,), torch.float32, -0.4),          # rows 0..2 see no key; negative scale
]


def _dense_case_id(case):
    B, Sq, Sk, HI, DI, ratio, q_start, dtype, scale = case
    return f"B{B}-Sq{Sq}-Sk{Sk}-H{HI}-D{DI}-r{ratio}-qs{q_start}-{str(dtype)[6:]}-s{scale}"


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("case", DENSE_CASES, ids=_dense_case_id)
def test_dense_loss_forward_and_backward(case):
    B, Sq, Sk, HI, DI, ratio, q_start, dtype, scale = case
    q, k, w, scores, l1, qs = dense_inputs(7, B, Sq, Sk, HI, DI, ratio, q_start, dtype)
    args = (q, k, w, scores, l1, scale, ratio, 1.3, qs)
    assert_loss_close(kernels.dense_indexer_loss(*args), ref.dense_indexer_loss(*args))
    grads = kernels.dense_indexer_loss_backward(_grad_loss(), *args)
    assert_grads_close(grads, ref.dense_indexer_loss_backward(_grad_loss(), *args), (q, k, w))


@pytest.mark.usefixtures("small_tiles")
def test_dense_loss_clipping():
    q, k, w, scores, l1, qs = dense_inputs(8, 1, 19, 19, 3, 16, 1, None, torch.float32, logit_scale=6.0)
    args = (q, k, w, scores, l1, 3.0, 1, 0.9, qs)
    from dsa_ops.reference.indexer import indexer_logits
    logits = indexer_logits(q, k, w, 3.0, 1, None)
    log_predict = logits - torch.logsumexp(logits, -1, keepdim=True)
    assert (log_predict[torch.isfinite(logits)] < -100).sum() >= 10, "test inputs do not reach the clip"
    assert_loss_close(kernels.dense_indexer_loss(*args), ref.dense_indexer_loss(*args))
    grads = kernels.dense_indexer_loss_backward(_grad_loss(), *args)
    assert_grads_close(grads, ref.dense_indexer_loss_backward(_grad_loss(), *args), (q, k, w))


def test_dense_loss_no_visible_key():
    """Every query sits before the first complete key: R = 0, loss 0, gradients 0."""
    q, k, w, scores, l1, qs = dense_inputs(9, 1, 6, 5, 3, 16, 4, (-10,), torch.float32)
    args = (q, k, w, scores, l1, 1.0, 4, 1.0, qs)
    assert kernels.dense_indexer_loss(*args).item() == 0.0
    for grad in kernels.dense_indexer_loss_backward(_grad_loss(), *args):
        assert torch.equal(grad, torch.zeros_like(grad))


# ----------------------------------------------------------------------------------------------------
# GPU: DeepSeek shapes (B=1, Sq=1024, Sk=4096, HI=64, DI=128, bf16) and determinism
# ----------------------------------------------------------------------------------------------------

def _realistic_sparse(K, seed=11):
    """Unique ids per row (a random top-k of Sk), about 10% of rows shortened by topk_length (one empty),
    a peaked but not degenerate target, and logits of O(1) (w ~ HI^-1/2, scale DI^-1/2)."""
    B, Sq, Sk, HI, DI = 1, 1024, 4096, 64, 128
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Sq, HI, DI, generator=gen, device=DEV).to(torch.bfloat16)
    k = torch.randn(B, Sk, DI, generator=gen, device=DEV).to(torch.bfloat16)
    w = torch.randn(B, Sq, HI, generator=gen, device=DEV) * HI ** -0.5
    idx = torch.rand(B, Sq, Sk, generator=gen, device=DEV).topk(K, dim=-1).indices.to(torch.int32)
    length = torch.full((B, Sq), K, dtype=torch.int32, device=DEV)
    length[:, ::10] = torch.randint(0, K, (B, length[:, ::10].shape[1]), generator=gen, device=DEV,
                                    dtype=torch.int32)
    length[0, 0] = 0
    valid = valid_slots(idx, Sk, length)
    raw = torch.where(valid, torch.randn(B, Sq, K, generator=gen, device=DEV) * 2.0, float("-inf"))
    target = torch.softmax(raw, dim=-1).nan_to_num(0.0)
    return (q, k, w, idx, target, DI ** -0.5, 1.0, length)


@needs_cuda
@pytest.mark.parametrize("K", [512, 2048])
def test_gpu_sparse_realistic(K):
    args = _realistic_sparse(K)
    q, k, w = args[:3]
    assert_loss_close(kernels.indexer_loss(*args), ref.indexer_loss(*args))
    expected = ref.indexer_loss_backward(_grad_loss(), *args)
    for deterministic in (False, True):
        with deterministic_mode(deterministic):
            grads = kernels.indexer_loss_backward(_grad_loss(), *args)
        assert_grads_close(grads, expected, (q, k, w))


@needs_cuda
def test_gpu_sparse_determinism():
    args = _realistic_sparse(2048, seed=12)
    first = kernels.indexer_loss(*args)
    for _ in range(9):
        assert torch.equal(kernels.indexer_loss(*args), first), "sparse forward is not bitwise deterministic"
    with deterministic_mode(True):
        first_grads = kernels.indexer_loss_backward(_grad_loss(), *args)
        for _ in range(9):
            for grad, first_grad in zip(kernels.indexer_loss_backward(_grad_loss(), *args), first_grads):
                assert torch.equal(grad, first_grad), "deterministic sparse backward differs between runs"


def _realistic_dense(Sq, Sk, ratio, seed=13):
    HI, DI = 64, 128
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(1, Sq, HI, DI, generator=gen, device=DEV).to(torch.bfloat16)
    k = torch.randn(1, Sk, DI, generator=gen, device=DEV).to(torch.bfloat16)
    w = torch.randn(1, Sq, HI, generator=gen, device=DEV) * HI ** -0.5
    n_visible = ((Sk * ratio - Sq + torch.arange(Sq, device=DEV) + 1) // ratio).clamp(0, Sk)
    visible = torch.arange(Sk, device=DEV)[None, :] < n_visible[:, None]
    scores = torch.where(visible, torch.rand(Sq, Sk, generator=gen, device=DEV) ** 4, 0.0)[None]
    return (q, k, w, scores, scores.sum(-1), DI ** -0.5, ratio, 1.0, None)


@needs_cuda
@pytest.mark.parametrize("Sq,Sk,ratio", [(1024, 4096, 1), (1024, 1024, 4)])
def test_gpu_dense_realistic_and_deterministic(Sq, Sk, ratio):
    args = _realistic_dense(Sq, Sk, ratio)
    q, k, w = args[:3]
    loss = kernels.dense_indexer_loss(*args)
    assert_loss_close(loss, ref.dense_indexer_loss(*args))
    grads = kernels.dense_indexer_loss_backward(_grad_loss(), *args)
    assert_grads_close(grads, ref.dense_indexer_loss_backward(_grad_loss(), *args), (q, k, w))
    for _ in range(9):
        assert torch.equal(kernels.dense_indexer_loss(*args), loss), "dense forward is not bitwise deterministic"
    for _ in range(2):
        for grad, first in zip(kernels.dense_indexer_loss_backward(_grad_loss(), *args), grads):
            assert torch.equal(grad, first), "dense backward is not bitwise deterministic"
