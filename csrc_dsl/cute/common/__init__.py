"""Shared machinery for the CuTe-DSL kernels. Importing this never imports `cutlass`."""
from .availability import (
    INSTALL_MESSAGE,
    TVM_FFI_MESSAGE,
    is_available,
    launch_unavailable_reason,
    require,
    unavailable_reason,
)
from .compile_cache import KernelCache, cache_for, check_static, warmup
from .launch import current_stream, is_sm90

__all__ = [
    "INSTALL_MESSAGE",
    "TVM_FFI_MESSAGE",
    "KernelCache",
    "cache_for",
    "check_static",
    "current_stream",
    "is_available",
    "is_sm90",
    "launch_unavailable_reason",
    "require",
    "unavailable_reason",
    "warmup",
]
