"""Pure-torch references of the Native Sparse Attention ops (SPEC section 8).

- `nsa_compress`: the compression branch's pooling. Entry `i` is the mean of the tokens
  `[i*stride, i*stride + block)`; only complete blocks make an entry (the optional projection stays in torch).
- `nsa_gate_combine`: `o = sum_b sigmoid(g_b) * o_b` over the three branches (compressed, selected, window).
- `nsa_select`: the selection branch's block choice, from the compressed-branch probabilities (see its
  docstring for the exact mapping of compressed entries onto selection blocks).

Conventions (as in reference/v4.py): math in fp32 (fp64 when an input is fp64, for gradcheck); every function
takes validated contiguous tensors and returns fresh outputs; work is chunked (over entries or query rows) so
the temporaries stay under CHUNK_BUDGET_ELEMENTS.
"""
from __future__ import annotations

import torch

from ._common import compute_dtype, row_chunks

# Largest number of elements one chunk's temporaries may hold; tests monkeypatch it to force many chunks.
CHUNK_BUDGET_ELEMENTS = 32 * 1024 * 1024


def n_entries(S: int, block: int, stride: int) -> int:
    """Number of complete compression blocks in S tokens."""
    return max(0, (S - block) // stride + 1)


# ----------------------------------------------------------------------------------------------
# Compression: mean over overlapping blocks of tokens
# ----------------------------------------------------------------------------------------------


def nsa_compress(k: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """k [B, S, G, D] -> [B, N, G, D] in k's dtype, N = max(0, (S - block) // stride + 1)."""
    B, S, G, D = k.shape
    N = n_entries(S, block, stride)
    dtype = compute_dtype(k)
    out = torch.empty(B, N, G, D, dtype=k.dtype, device=k.device)
    for i0, i1 in row_chunks(N, B * block * G * D, CHUNK_BUDGET_ELEMENTS):
        # tokens of entries [i0, i1): unfold gives [B, i1-i0, G, D, block] windows of the token dim
        tokens = k[:, i0 * stride:(i1 - 1) * stride + block].to(dtype)
        out[:, i0:i1] = tokens.unfold(1, block, stride).mean(dim=-1).to(k.dtype)
    return out


def nsa_compress_backward(grad_out: torch.Tensor, k: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """dk of `nsa_compress`, in k's dtype: token t gets grad_out[i] / block from every entry i covering it;
    trailing tokens that are in no complete block get zero."""
    B, S, G, D = k.shape
    N = grad_out.shape[1]
    dtype = compute_dtype(k, grad_out)
    dk = torch.zeros(B, S, G, D, dtype=dtype, device=k.device)
    if N > 0:
        g = grad_out.to(dtype) / block
        # Offset j of every block: tokens j, j + stride, ..., j + (N-1)*stride get one entry each.
        for j in range(block):
            dk[:, j:j + (N - 1) * stride + 1:stride] += g
    return dk.to(k.dtype)


# ----------------------------------------------------------------------------------------------
# Gated combination of the three branches
# ----------------------------------------------------------------------------------------------


def nsa_gate_combine(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor,
                     gates: torch.Tensor) -> torch.Tensor:
    """o_* [B, S, H, d_v], gates [B, S, H, 3] raw (sigmoid applied here) -> [B, S, H, d_v] in o_cmp's dtype."""
    dtype = compute_dtype(o_cmp, o_slc, o_win, gates)
    g = torch.sigmoid(gates.to(dtype))
    out = g[..., 0:1] * o_cmp.to(dtype) + g[..., 1:2] * o_slc.to(dtype) + g[..., 2:3] * o_win.to(dtype)
    return out.to(o_cmp.dtype)


def nsa_gate_combine_backward(grad_out: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor,
                              o_win: torch.Tensor, gates: torch.Tensor):
    """(d_cmp, d_slc, d_win, d_gates): d o_b = sigmoid(g_b) * grad, d g_b = (grad . o_b) * s_b * (1 - s_b)."""
    dtype = compute_dtype(o_cmp, o_slc, o_win, gates)
    s = torch.sigmoid(gates.to(dtype))
    grad = grad_out.to(dtype)
    d_outs, d_gates = [], []
    for b, o in enumerate((o_cmp, o_slc, o_win)):
        d_outs.append((s[..., b:b + 1] * grad).to(o.dtype))
        d_gates.append((grad * o.to(dtype)).sum(-1) * s[..., b] * (1 - s[..., b]))
    return (*d_outs, torch.stack(d_gates, dim=-1).to(gates.dtype))


# ----------------------------------------------------------------------------------------------
# Selection: top-n blocks per query and GQA group
# ----------------------------------------------------------------------------------------------


def selection_weights(N: int, n_blocks: int, block: int, stride: int, select_block: int, dtype, device):
    """[N, n_blocks]: the share of compressed entry i that falls in selection block j, i.e. the overlap
    length of tokens [i*stride, i*stride + block) with [j*select_block, (j+1)*select_block), over block."""
    start = torch.arange(N, device=device, dtype=torch.int64).unsqueeze(1) * stride
    lo = torch.arange(n_blocks, device=device, dtype=torch.int64).unsqueeze(0) * select_block
    overlap = (torch.minimum(start + block, lo + select_block) - torch.maximum(start, lo)).clamp(min=0)
    return overlap.to(dtype) / block


def nsa_select(p_cmp: torch.Tensor, groups: int, n: int, block: int, stride: int, select_block: int,
               local_blocks: int) -> torch.Tensor:
    """p_cmp [B, S, H, N] (compressed-branch probabilities, H = groups * heads per group) -> int32 selected
    block ids [B, S, groups, n].

    Query t sits at token t. Selection block j covers tokens [j*select_block, (j+1)*select_block); the
    sequence has ceil(S / select_block) of them.
    1. Group score: p[t, g, i] = sum of p_cmp[t, h, i] over the heads h of group g (h // (H // groups) == g),
       counting only the entries i visible to t (t >= i*stride + block - 1; others are read as 0).
    2. Block score: score[t, g, j] = sum_i p[t, g, i] * overlap(i, j) / block, where overlap(i, j) is the
       number of tokens entry i ([i*stride, i*stride + block)) shares with block j (so an entry's score is
       split over the blocks it overlaps in proportion to the overlap; with the defaults 32/16/64 an entry
       counts 1 or 1/2).
    3. Candidates: blocks j <= t // select_block (causal: a block starting after t is never chosen). Block 0
       and the local blocks t // select_block - local_blocks + 1 .. t // select_block are always kept (they
       rank above every scored block).
    4. The n best candidates by score; ties: the smaller block id wins (SPEC section 2). Output: the chosen
       ids in ascending order, then -1 where fewer than n candidates exist.
    """
    B, S, H, N = p_cmp.shape
    heads_per_group = H // groups
    n_blocks = -(-S // select_block)
    dtype = compute_dtype(p_cmp)
    device = p_cmp.device
    weights = selection_weights(N, n_blocks, block, stride, select_block, dtype, device)
    out = torch.empty(B, S, groups, n, dtype=torch.int32, device=device)
    block_ids = torch.arange(n_blocks, device=device)
    entry_last_token = torch.arange(N, device=device) * stride + block - 1
    per_row = B * (H * N + 3 * groups * n_blocks)
    for t0, t1 in row_chunks(S, per_row, CHUNK_BUDGET_ELEMENTS):
        t = torch.arange(t0, t1, device=device)
        visible = (entry_last_token.unsqueeze(0) <= t.unsqueeze(1)).to(dtype)  # [rows, N]
        p = p_cmp[:, t0:t1].to(dtype).view(B, t1 - t0, groups, heads_per_group, N).sum(3)
        score = (p * visible[None, :, None, :]) @ weights  # [B, rows, groups, n_blocks]
        own = (t // select_block).unsqueeze(1)  # [rows, 1]
        causal = block_ids.unsqueeze(0) <= own
        forced = (block_ids.unsqueeze(0) == 0) | ((block_ids.unsqueeze(0) > own - local_blocks) & causal)
        score = torch.where(forced[None, :, None, :], float("inf"), score)
        score = torch.where(causal[None, :, None, :], score, float("-inf"))
        # stable descending sort: equal scores keep ascending block order, so the smaller id wins
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :n]
        chosen = torch.where(torch.gather(score, -1, order) == float("-inf"), n_blocks, order)
        chosen = torch.sort(chosen, dim=-1).values
        if chosen.shape[-1] < n:  # fewer blocks in the sequence than n
            pad = torch.full((*chosen.shape[:-1], n - chosen.shape[-1]), n_blocks, dtype=chosen.dtype,
                             device=device)
            chosen = torch.cat([chosen, pad], dim=-1)
        out[:, t0:t1] = torch.where(chosen == n_blocks, -1, chosen).to(torch.int32)
    return out
