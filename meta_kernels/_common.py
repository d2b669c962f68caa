"""Helpers shared by the fakes: output dtypes follow docs/IMPLEMENTATIONS.md."""
from __future__ import annotations

import torch

from dsa_ops.ops._library import with_defaults


def score_dtype(t: torch.Tensor) -> torch.dtype:
    """Scores, probabilities, LSE and losses are fp32, or fp64 when the inputs are fp64 (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def fake(name: str):
    """Registers the decorated function as the fake of dsa::<name>, called with the full argument list."""

    def register(fn):
        torch.library.register_fake(f"dsa::{name}", with_defaults(name, fn, "fake"))
        return fn

    return register
