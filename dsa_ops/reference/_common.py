"""Helpers every reference module uses: compute dtype, row chunking, the invalid-slot rule."""
from __future__ import annotations

from typing import Iterator, Optional

import torch


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 if any input is fp64 (gradcheck), else fp32 (bf16/fp16/fp32 inputs)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def row_chunks(n_rows: int, elements_per_row: int, budget: int) -> Iterator[tuple[int, int]]:
    """(start, end) ranges covering 0..n_rows whose temporaries hold at most `budget` elements (>= 1 row)."""
    step = max(1, budget // max(1, elements_per_row))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def valid_slots(indices: torch.Tensor, n_keys: int, topk_length: Optional[torch.Tensor]) -> torch.Tensor:
    """bool mask of the valid index slots (SPEC section 0: 0 <= id < n_keys and slot j < topk_length)."""
    valid = (indices >= 0) & (indices < n_keys)
    if topk_length is not None:
        slot = torch.arange(indices.shape[-1], device=indices.device)
        valid = valid & (slot < topk_length.unsqueeze(-1).to(torch.int64))
    return valid
