"""Triton kernels: the portable GPU path (every CUDA arch), also runnable on CPU under TRITON_INTERPRET=1."""
