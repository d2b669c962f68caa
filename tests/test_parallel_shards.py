"""The ops compose with the frameworks' parallelism (which is theirs, not ours):
- tensor parallel: a rank holds a slice of the attention heads (any count, uneven shards included); its
  forward, its dq and d_sink are the slices of the unsharded ones, its dkv a partial sum over heads that an
  all-reduce adds up, and its sparse_attn_score target (normalised per row) enters the whole one weighted
  by its share of the heads;
- context parallel: a rank holds a slice of the queries, placed in the sequence by `q_start`; every
  row-wise op gives the unsharded op's rows, and indexer_loss (a mean over the rows with a valid key)
  enters the whole one weighted by the rank's count of such rows.
On the CPU the ops run the reference (fp32); on a GPU the same tests run the kernels (bf16), where a shard of
heads may take another tile shape than the whole, so values are compared within the SPEC tolerances."""
import pytest
import torch

import dsa_ops  # noqa: F401
from dsa_ops.testing import randn, rel_err

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
D, D_V = 576, 512


def close(got, want, what, rel):
    err = rel_err(got, want)
    assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"


# SPEC section 9 tolerances for 16-bit inputs. The fp32 reference differs between a shard and the whole only
# by the order of its sums (at most 2e-6 seen, in d_sink, a sum over tokens with cancellation).
FWD_TOL = 1e-2 if CUDA else 1e-5
BWD_TOL = 2e-2 if CUDA else 1e-5


def attention_inputs(T, S, H, K, seed):
    g = torch.Generator().manual_seed(seed)
    q = randn(T, H, D, g=g, dtype=DTYPE, device=DEVICE)
    kv = randn(S, D, g=g, dtype=DTYPE, device=DEVICE)
    sink = randn(H, g=g, dtype=torch.float32, device=DEVICE)
    ids = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    ids[::5, -3:] = -1                                      # a few invalid slots
    dout = randn(T, H, D_V, g=g, dtype=DTYPE, device=DEVICE)
    return q, kv, sink, ids.to(DEVICE), dout


@pytest.mark.parametrize("shards", [(2, 4), (3, 3), (1, 2, 3)], ids=["2+4", "3+3", "1+2+3"])
def test_tensor_parallel_head_shards(shards):
    T, S, K = 20, 48, 16
    H = sum(shards)
    q, kv, sink, ids, dout = attention_inputs(T, S, H, K, seed=H + len(shards))
    scale = D ** -0.5

    def step(q, kv, sink, dout):
        q, kv, sink = (x.detach().requires_grad_(True) for x in (q, kv, sink))
        out, lse = torch.ops.dsa.sparse_attention(q, kv, ids, scale, D_V, sink)
        (out.float() * dout.float()).sum().backward()
        target = torch.ops.dsa.sparse_attn_score(q.detach(), kv.detach(), lse.detach(), ids, scale)
        return out.detach(), lse.detach(), q.grad, kv.grad, sink.grad, target

    full = step(q, kv, sink, dout)
    dkv_sum, target_sum, h0 = 0, 0, 0
    for n in shards:
        heads = slice(h0, h0 + n)
        # a rank holds its shard as its own (contiguous) tensor
        out, lse, dq, dkv, d_sink, target = step(*(x.contiguous() for x in (q[:, heads], kv, sink[heads],
                                                                             dout[:, heads])))
        close(out, full[0][:, heads], f"out of heads {heads}", FWD_TOL)
        close(lse, full[1][:, heads], f"lse of heads {heads}", FWD_TOL)
        close(dq, full[2][:, heads], f"dq of heads {heads}", BWD_TOL)
        close(d_sink, full[4][heads], f"d_sink of heads {heads}", BWD_TOL)
        dkv_sum = dkv_sum + dkv.float()
        target_sum = target_sum + target * (n / H)
        h0 += n
    close(dkv_sum, full[3].float(), "dkv summed over the head shards", BWD_TOL)
    # the target is normalised per row, and every head with a valid key adds exactly 1 to the row's sum (its
    # probabilities over the selected keys, lse excluding the sink): shards combine by a head-weighted mean
    close(target_sum, full[5], "sparse_attn_score, head-weighted mean of the shards'", BWD_TOL)


@pytest.mark.parametrize("ratio", [1, 4])
def test_context_parallel_query_shards(ratio):
    """Two sequences, their queries (the last S_q tokens) cut into three uneven shards; each shard's
    indexer scores, top-k and attention rows equal the unsharded ones'."""
    g = torch.Generator().manual_seed(7 + ratio)
    B, Sq, Sk, HI, DI, topk, H = 2, 21, 40, 4, 32, 12, 3
    kw = dict(g=g, dtype=DTYPE, device=DEVICE)
    q_idx, k_idx = randn(B, Sq, HI, DI, **kw), randn(B, Sk, DI, **kw)
    w = randn(B, Sq, HI, g=g, dtype=torch.float32, device=DEVICE)
    q = randn(B, Sq, H, D, **kw)
    kv = randn(B, Sk, D, **kw)
    sink = randn(H, g=g, dtype=torch.float32, device=DEVICE)
    scale = D ** -0.5
    first = Sk * ratio - Sq                                  # position of query 0 (the default)

    logits = torch.ops.dsa.indexer_logits(q_idx, k_idx, w, 1.0, ratio)
    ids, _ = torch.ops.dsa.indexer_topk(q_idx, k_idx, w, topk, 1.0, ratio)
    attn = [torch.ops.dsa.sparse_attention(q[b], kv[b], ids[b], scale, D_V, sink) for b in range(B)]

    # indexer_loss is a mean over the rows that have a valid key: ranks combine it weighted by that count
    target = torch.stack([torch.ops.dsa.sparse_attn_score(q[b], kv[b], attn[b][1], ids[b], scale) for b in range(B)])
    q_idx_leaf = q_idx.detach().requires_grad_(True)
    loss = torch.ops.dsa.indexer_loss(q_idx_leaf, k_idx, w, ids, target)
    (d_q_idx,) = torch.autograd.grad(loss, q_idx_leaf)
    shard_losses, shard_rows = [], []

    for a, e in ((0, 5), (5, 13), (13, Sq)):
        rows = slice(a, e)
        q_start = torch.full((B,), first + a, dtype=torch.int32, device=DEVICE)
        shard_q_idx, shard_w, shard_q = (x[:, rows].contiguous() for x in (q_idx, w, q))   # the rank's own
        shard_logits = torch.ops.dsa.indexer_logits(shard_q_idx, k_idx, shard_w, 1.0, ratio, q_start)
        assert torch.equal(shard_logits.isinf(), logits[:, rows].isinf()), f"mask of rows {rows}"
        finite = logits[:, rows].isfinite()
        close(shard_logits[finite], logits[:, rows][finite], f"logits of rows {rows}", FWD_TOL)
        shard_ids, _ = torch.ops.dsa.indexer_topk(shard_q_idx, k_idx, shard_w, topk, 1.0, ratio, q_start)
        # the same selected set per row (order within a row is not part of the contract)
        assert torch.equal(shard_ids.sort(-1).values, ids[:, rows].sort(-1).values), f"top-k of rows {rows}"
        for b in range(B):
            out, lse = torch.ops.dsa.sparse_attention(shard_q[b], kv[b], shard_ids[b], scale, D_V, sink)
            close(out, attn[b][0][rows], f"out of sequence {b}, rows {rows}", FWD_TOL)
            close(lse[lse.isfinite()], attn[b][1][rows][lse.isfinite()], f"lse of sequence {b}, rows {rows}",
                  FWD_TOL)
        shard_q_idx.requires_grad_(True)
        shard_loss = torch.ops.dsa.indexer_loss(shard_q_idx, k_idx, shard_w, shard_ids, target[:, rows].contiguous())
        (shard_grad,) = torch.autograd.grad(shard_loss, shard_q_idx)
        n_rows = (shard_ids >= 0).any(-1).sum()               # rows with a valid key (top-k pads with -1)
        shard_losses.append(shard_loss.detach() * n_rows)
        shard_rows.append(n_rows)
        close(shard_grad * n_rows / (ids >= 0).any(-1).sum(), d_q_idx[:, rows], f"d q_idx of rows {rows}", BWD_TOL)
    close(sum(shard_losses) / sum(shard_rows), loss.detach(), "indexer_loss, row-weighted mean of the shards'",
          FWD_TOL)
