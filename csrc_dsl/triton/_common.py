"""Small launch-side helpers shared by the Triton kernel files."""
from __future__ import annotations

import torch
import triton


def pad_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 16): tl.dot needs every operand dimension >= 16."""
    return max(16, triton.next_power_of_2(int(n)))


def dot_precision(dtype: torch.dtype, what: str) -> str:
    """tl.dot input precision: 16-bit operands are exact on tensor cores; fp32 inputs use exact fp32 products
    (not tf32) so fp32 calls meet the fp32 tolerances. fp64 (gradcheck) belongs to the reference."""
    if dtype in (torch.bfloat16, torch.float16):
        return "tf32"  # ignored for 16-bit operands
    if dtype == torch.float32:
        return "ieee"
    raise TypeError(
        f"Triton {what} kernels take bf16, fp16 or fp32 activations, got {dtype}; "
        "fp64 (gradcheck) goes to the reference implementation")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a small number under the interpreter, to keep grids small)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
